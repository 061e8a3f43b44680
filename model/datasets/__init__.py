"""Data-set readers that turn preference files into canonical :class:`PreferenceRecord` s."""

from __future__ import annotations

from pathlib import Path

from model.datasets.llmfao import read_llmfao
from model.datasets.mt_bench import read_mt_bench
from model.datasets.records import PreferenceRecord, dataset_stats

DATASETS: tuple[str, ...] = ("mt_bench", "llmfao")


def load_dataset(name: str, path: str | Path) -> list[PreferenceRecord]:
    """Read data set ``name`` (one of :data:`DATASETS`) from ``path``.

    Raises:
        ValueError: unknown ``name``.
    """
    if name == "mt_bench":
        return read_mt_bench(path)
    if name == "llmfao":
        return read_llmfao(path)
    raise ValueError(f"unknown dataset (got {name!r}); expected one of {DATASETS}")


__all__ = [
    "DATASETS",
    "PreferenceRecord",
    "dataset_stats",
    "load_dataset",
    "read_llmfao",
    "read_mt_bench",
]

"""Plain functions behind ``gmtrouter train`` and ``gmtrouter evaluate`` (wired by server/cli)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import save_checkpoint
from model.data import prepare
from model.datasets import DATASETS, load_dataset
from model.datasets.splits import holdout_users
from model.evaluation import PROTOCOLS, format_table, run_evaluation
from model.network import NetworkConfig
from model.text_encoder import DEFAULT_ENCODER_NAME, TextEncoder
from model.training import TrainConfig, train_prepared


def train_config(
    *,
    num_layers: int = 2,
    hidden_dim: int = 64,
    num_heads: int = 4,
    steps: int = 300,
    lr: float = 5e-4,
    dropout: float = 0.1,
    head_dim: int = 64,
    reverse_edges: bool = True,
    turn_features: str = "signed",
    users_per_step: int = 16,
    max_history: int = 128,
    history_readout: bool = True,
    ema_decay: float = TrainConfig.model_fields["ema_decay"].default,
) -> TrainConfig:
    """The :class:`TrainConfig` of the command-line options (defaults = ``gmtrouter train``).

    Raises:
        pydantic.ValidationError: a value outside its range (the message names the field).
    """
    net = NetworkConfig(
        num_layers=num_layers,
        hidden_dim=hidden_dim,
        num_heads=num_heads,
        dropout=dropout,
        head_dim=head_dim,
        reverse_edges=reverse_edges,
        turn_features=turn_features,
        history_readout=history_readout,
    )  # type: ignore[arg-type,unused-ignore]
    return TrainConfig(
        network=net,
        steps=steps,
        lr=lr,
        users_per_step=users_per_step,
        max_history=max_history,
        ema_decay=ema_decay,
    )


def train_command(
    dataset: str,
    data_path: str | Path,
    out: str | Path,
    *,
    config: TrainConfig | None = None,
    seed: int = 136,
    encoder_name: str = DEFAULT_ENCODER_NAME,
    threads: int = 1,
    progress: bool = True,
    holdout_fraction: float = 0.0,
    split_seed: int = 0,
) -> dict[str, Any]:
    """Train on a whole data set (minus held-out users) and write a checkpoint to ``out``.

    Args:
        config: Hyper-parameters (default :func:`train_config`'s).
        holdout_fraction: Share of users left out of training
            (:func:`model.datasets.splits.holdout_users`), e.g. for ``gmtrouter replay
            --holdout-fraction`` on the same split.
        split_seed: Seed of the user split.

    Returns:
        ``{"version", "out", "train_time_s", "total_time_s", "best_step", "best_val_auc",
        "train_users", "models"}`` ("models": how many candidate models it knows).
    """
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    cfg = config or train_config()
    encoder = TextEncoder(encoder_name)
    records = load_dataset(dataset, data_path)
    if holdout_fraction > 0:
        held = holdout_users((r.user_id for r in records), holdout_fraction, split_seed)
        records = [r for r in records if r.user_id not in held]
    prep = prepare(records, encoder)
    res = train_prepared(prep, np.arange(prep.n, dtype=np.int64), cfg, seed=seed, progress=progress)
    version = save_checkpoint(
        out,
        res.network,
        encoder_name=encoder.name,
        encoder_dim=prep.query_emb.shape[1],
        models=prep.models,
        llm_x=torch.from_numpy(prep.llm_x),
        extra={
            "dataset": dataset,
            "seed": seed,
            "train_config": cfg.model_dump(),
            "best_step": res.metrics["best_step"],
            "best_val_auc": res.metrics["best_val_auc"],
            "holdout_fraction": holdout_fraction,
            "split_seed": split_seed,
            "train_users": len(prep.users),
        },
    )
    summary = {
        "version": version,
        "out": str(out),
        "train_time_s": res.metrics["train_time_s"],
        "total_time_s": time.perf_counter() - t0,
        "best_step": res.metrics["best_step"],
        "best_val_auc": res.metrics["best_val_auc"],
        "train_users": len(prep.users),
        "models": len(prep.models),  # how many; their names are stored in the checkpoint
    }
    print(json.dumps(summary, indent=2))
    return summary


def evaluate_command(
    dataset: str,
    data_path: str | Path,
    protocol: str = "heldout",
    seeds: int = 5,
    json_out: str | Path | None = None,
    *,
    config: TrainConfig | None = None,
    encoder_name: str = DEFAULT_ENCODER_NAME,
    threads: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Run :func:`model.evaluation.run_evaluation` with seeds ``0..seeds-1``; print the table.

    ``config`` (default :func:`train_config`'s) trains the network of every seed.

    Returns:
        The result dict (also written to ``json_out`` when given).
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset (got {dataset!r}) must be one of {DATASETS}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol (got {protocol!r}) must be one of {PROTOCOLS}")
    torch.set_num_threads(threads)
    cfg = config or train_config()
    prep = prepare(load_dataset(dataset, data_path), TextEncoder(encoder_name))
    result = run_evaluation(
        prep,
        dataset=dataset,
        protocol=protocol,
        seeds=list(range(seeds)),
        config=cfg,
        progress=progress,
    )
    print(format_table(result))
    print(f"wall time {result['wall_time_s']:.1f} s")
    if json_out is not None:
        p = Path(json_out)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result

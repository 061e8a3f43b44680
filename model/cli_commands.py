"""Plain functions behind ``gmtrouter train`` and ``gmtrouter evaluate`` (wired by server/cli).

``python -m model.cli_commands train|evaluate ...`` runs them directly (argparse only under
``__main__``).
"""

from __future__ import annotations

import argparse
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


def _configs(
    *,
    num_layers: int,
    hidden_dim: int,
    num_heads: int,
    steps: int,
    lr: float,
    dropout: float,
    head_dim: int,
    reverse_edges: bool,
    turn_features: str,
    users_per_step: int,
    max_history: int,
) -> TrainConfig:
    net = NetworkConfig(
        num_layers=num_layers,
        hidden_dim=hidden_dim,
        num_heads=num_heads,
        dropout=dropout,
        head_dim=head_dim,
        reverse_edges=reverse_edges,
        turn_features=turn_features,
    )  # type: ignore[arg-type,unused-ignore]
    return TrainConfig(
        network=net, steps=steps, lr=lr, users_per_step=users_per_step, max_history=max_history
    )


def train_command(
    dataset: str,
    data_path: str | Path,
    out: str | Path,
    *,
    num_layers: int = 2,
    hidden_dim: int = 64,
    num_heads: int = 4,
    steps: int = 300,
    lr: float = 2e-3,
    seed: int = 136,
    dropout: float = 0.1,
    head_dim: int = 64,
    reverse_edges: bool = True,
    turn_features: str = "signed",
    users_per_step: int = 16,
    max_history: int = 64,
    encoder_name: str = DEFAULT_ENCODER_NAME,
    threads: int = 1,
    progress: bool = True,
    holdout_fraction: float = 0.0,
    split_seed: int = 0,
) -> dict[str, Any]:
    """Train on a whole data set (minus held-out users) and write a checkpoint to ``out``.

    Args:
        holdout_fraction: Share of users left out of training
            (:func:`model.datasets.splits.holdout_users`), e.g. for ``gmtrouter replay
            --holdout-fraction`` on the same split.
        split_seed: Seed of the user split.

    Returns:
        ``{"version", "out", "train_time_s", "best_step", "best_val_auc", "models"}``.
    """
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    cfg = _configs(
        num_layers=num_layers,
        hidden_dim=hidden_dim,
        num_heads=num_heads,
        steps=steps,
        lr=lr,
        dropout=dropout,
        head_dim=head_dim,
        reverse_edges=reverse_edges,
        turn_features=turn_features,
        users_per_step=users_per_step,
        max_history=max_history,
    )
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
        },
    )
    summary = {
        "version": version,
        "out": str(out),
        "train_time_s": res.metrics["train_time_s"],
        "total_time_s": time.perf_counter() - t0,
        "best_step": res.metrics["best_step"],
        "best_val_auc": res.metrics["best_val_auc"],
        "models": prep.models,
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
    num_layers: int = 2,
    hidden_dim: int = 64,
    num_heads: int = 4,
    steps: int = 300,
    lr: float = 2e-3,
    dropout: float = 0.1,
    head_dim: int = 64,
    reverse_edges: bool = True,
    turn_features: str = "signed",
    users_per_step: int = 16,
    max_history: int = 64,
    encoder_name: str = DEFAULT_ENCODER_NAME,
    threads: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Run :func:`model.evaluation.run_evaluation` with seeds ``0..seeds-1``; print the table.

    Returns:
        The result dict (also written to ``json_out`` when given).
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset (got {dataset!r}) must be one of {DATASETS}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol (got {protocol!r}) must be one of {PROTOCOLS}")
    torch.set_num_threads(threads)
    cfg = _configs(
        num_layers=num_layers,
        hidden_dim=hidden_dim,
        num_heads=num_heads,
        steps=steps,
        lr=lr,
        dropout=dropout,
        head_dim=head_dim,
        reverse_edges=reverse_edges,
        turn_features=turn_features,
        users_per_step=users_per_step,
        max_history=max_history,
    )
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


def _main() -> None:
    ap = argparse.ArgumentParser(prog="python -m model.cli_commands")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("train", "evaluate"):
        p = sub.add_parser(name)
        p.add_argument("--dataset", required=True, choices=DATASETS)
        p.add_argument("--data-path", required=True)
        p.add_argument("--num-layers", type=int, default=2)
        p.add_argument("--hidden-dim", type=int, default=64)
        p.add_argument("--num-heads", type=int, default=4)
        p.add_argument("--steps", type=int, default=300)
        p.add_argument("--lr", type=float, default=2e-3)
        p.add_argument("--dropout", type=float, default=0.1)
        p.add_argument("--head-dim", type=int, default=64)
        p.add_argument("--no-reverse-edges", action="store_true")
        p.add_argument("--turn-features", choices=("signed", "zeros"), default="signed")
        p.add_argument("--users-per-step", type=int, default=16)
        p.add_argument("--max-history", type=int, default=64)
        p.add_argument("--threads", type=int, default=1)
        if name == "train":
            p.add_argument("--out", required=True)
            p.add_argument("--seed", type=int, default=136)
        else:
            p.add_argument("--protocol", choices=PROTOCOLS, default="heldout")
            p.add_argument("--seeds", type=int, default=5)
            p.add_argument("--json", dest="json_out", default=None)
    a = ap.parse_args()
    common = dict(
        num_layers=a.num_layers,
        hidden_dim=a.hidden_dim,
        num_heads=a.num_heads,
        steps=a.steps,
        lr=a.lr,
        dropout=a.dropout,
        head_dim=a.head_dim,
        reverse_edges=not a.no_reverse_edges,
        turn_features=a.turn_features,
        users_per_step=a.users_per_step,
        max_history=a.max_history,
        threads=a.threads,
    )
    if a.cmd == "train":
        train_command(a.dataset, a.data_path, a.out, seed=a.seed, **common)  # type: ignore[arg-type,unused-ignore]
    else:
        evaluate_command(a.dataset, a.data_path, a.protocol, a.seeds, a.json_out, **common)  # type: ignore[arg-type,unused-ignore]


if __name__ == "__main__":
    _main()

"""Evaluation protocols, baselines side by side, per-user breakdown and user-embedding spread.

Protocols (per seed, all methods trained and scored on the same split):

- ``heldout`` (the honest headline): per user, a seeded random 30 % of their sessions
  (conversations; all turns together) is scored; the rest is history and training data. A
  scored pair's own outcome is never in the graph: the history of a test pair is its user's
  training-side comparisons only.
- ``faithful`` (as the official code): the same split and training, but at scoring time the
  user's history graph *also holds the scored pairs themselves* (the official test path's label
  leakage). Only the GMTRouter rows are affected; reported for comparison, never a headline.

Hyper-parameters (per-user BT shrinkage, query_linear C) are tuned on a validation slice
(15 % of each user's training sessions) and refit on the whole training part; the network
early-stops on its own validation slice of the training part. The test part is only scored.

Methods: ``random``, ``global_bt``, ``per_user_bt``, ``query_linear``,
``gmtrouter_no_history`` (same network, user's history removed at scoring time),
``gmtrouter``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from model.baselines import GlobalBT, PerUserBT, QueryLinear, RandomBaseline
from model.data import IntArray, PreparedData, build_batch_graph, split_by_session
from model.metrics import pairwise_accuracy, roc_auc, roc_auc_non_tied
from model.training import TrainConfig, cap_history, score_pairs, train_prepared

PROTOCOLS: tuple[str, ...] = ("heldout", "faithful")
METHODS: tuple[str, ...] = (
    "random",
    "global_bt",
    "per_user_bt",
    "query_linear",
    "gmtrouter_no_history",
    "gmtrouter",
)
TEST_FRACTION = 0.3
PER_USER_PRIORS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
QUERY_LINEAR_C = (0.01, 0.03, 0.1, 0.3, 1.0)


def _tune(
    make: Callable[[float], Any],
    grid: Sequence[float],
    prep: PreparedData,
    fit: IntArray,
    val: IntArray,
) -> float:
    best, best_auc = grid[0], -1.0
    for g in grid:
        auc = roc_auc(make(g).fit(prep, fit).score(prep, val), prep.y[val])
        if auc > best_auc:
            best, best_auc = g, auc
    return best


def _history(prep: PreparedData, idx: IntArray, cap: int, seed: int) -> dict[int, IntArray]:
    rng = np.random.default_rng(seed)
    by: dict[int, list[int]] = {}
    for i in idx:
        by.setdefault(int(prep.user[i]), []).append(int(i))
    return {u: cap_history(np.array(v, dtype=np.int64), cap, rng) for u, v in by.items()}


def user_embedding_spread(user_h: torch.Tensor) -> dict[str, float]:
    """Spread of user embeddings ``[U, H]``: mean pairwise cosine distance, mean per-dim std."""
    if user_h.size(0) < 2:
        return {"mean_cosine_distance": 0.0, "mean_dim_std": 0.0}
    z = torch.nn.functional.normalize(user_h, dim=1)
    cos = z @ z.T
    n = cos.size(0)
    off = (cos.sum() - cos.diagonal().sum()) / (n * (n - 1))
    return {"mean_cosine_distance": float(1.0 - off), "mean_dim_std": float(user_h.std(0).mean())}


def _per_user(
    prep: PreparedData, te: IntArray, d_model: np.ndarray, d_base: np.ndarray
) -> dict[str, int]:
    better = worse = same = 0
    for u in np.unique(prep.user[te]):
        m = prep.user[te] == u
        a1, a0 = roc_auc(d_model[m], prep.y[te][m]), roc_auc(d_base[m], prep.y[te][m])
        if np.isnan(a1) or np.isnan(a0):
            continue
        if a1 > a0 + 1e-9:
            better += 1
        elif a1 < a0 - 1e-9:
            worse += 1
        else:
            same += 1
    return {"users_better": better, "users_worse": worse, "users_equal": same}


def evaluate_seed(
    prep: PreparedData, protocol: str, seed: int, config: TrainConfig, *, progress: bool = False
) -> dict[str, Any]:
    """One seed: split, fit every method, score the test part.

    Returns:
        ``{"scores": {method: float64 [N_test]}, "y": [N_test], "extra": {...}}``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol (got {protocol!r}) must be one of {PROTOCOLS}")
    rng = np.random.default_rng(seed)
    tr, te = split_by_session(prep, np.arange(prep.n, dtype=np.int64), TEST_FRACTION, rng)
    fit, val = split_by_session(prep, tr, 0.15, np.random.default_rng(seed + 1000))
    scores: dict[str, np.ndarray] = {}
    timing: dict[str, float] = {}
    t = time.perf_counter()
    scores["random"] = RandomBaseline(seed).score(prep, te)
    scores["global_bt"] = GlobalBT().fit(prep, tr).score(prep, te)
    prior = _tune(lambda g: PerUserBT(g), PER_USER_PRIORS, prep, fit, val)
    scores["per_user_bt"] = PerUserBT(prior).fit(prep, tr).score(prep, te)
    c = _tune(lambda g: QueryLinear(g, seed=seed), QUERY_LINEAR_C, prep, fit, val)
    scores["query_linear"] = QueryLinear(c, seed=seed).fit(prep, tr).score(prep, te)
    timing["baselines_s"] = time.perf_counter() - t
    res = train_prepared(
        prep, tr, config, seed=seed, progress=progress, desc=f"train gmtrouter seed {seed}"
    )
    net = res.network
    t = time.perf_counter()
    hist = _history(prep, tr, config.max_history, seed)
    with torch.inference_mode():
        scores["gmtrouter_no_history"] = score_pairs(net, prep, te, {})
        if protocol == "faithful":
            leak = _history(prep, np.sort(np.concatenate([tr, te])), config.max_history, seed)
            scores["gmtrouter"] = score_pairs(net, prep, te, leak)
        else:
            scores["gmtrouter"] = score_pairs(net, prep, te, hist)
        users = sorted(hist)
        graph = build_batch_graph(
            prep, [hist[u] for u in users], reverse_edges=net.config.reverse_edges
        )
        user_h, _ = net.encode(graph)
    timing["gmtrouter_train_s"] = res.metrics["train_time_s"]
    timing["gmtrouter_score_s"] = time.perf_counter() - t
    return {
        "scores": scores,
        "y": prep.y[te],
        "extra": {
            "seed": seed,
            "n_train": len(tr),
            "n_test": len(te),
            "per_user_bt_prior_strength": prior,
            "query_linear_c": c,
            "gmtrouter_best_step": res.metrics["best_step"],
            "gmtrouter_best_val_auc": res.metrics["best_val_auc"],
            "per_user_vs_global_bt": _per_user(prep, te, scores["gmtrouter"], scores["global_bt"]),
            "per_user_bt_vs_global_bt": _per_user(
                prep, te, scores["per_user_bt"], scores["global_bt"]
            ),
            "user_embedding_spread": user_embedding_spread(user_h),
            "timing": timing,
        },
    }


def _mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=np.float64)
    return float(np.nanmean(a)), float(np.nanstd(a))


def run_evaluation(
    prep: PreparedData,
    *,
    dataset: str,
    protocol: str,
    seeds: Sequence[int],
    config: TrainConfig,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate every method over ``seeds``.

    Returns:
        ``{"dataset", "protocol", "seeds", "methods": {name: {"accuracy", "accuracy_std",
        "auc", "auc_std", "auc_non_tied", "auc_non_tied_std", "n_pairs"}}, "per_seed": [...],
        "config": {...}, "wall_time_s"}``; ``auc`` is the official pooled ROC-AUC (ties count
        as negatives), ``auc_non_tied`` the AUC over non-tied pairs.
    """
    t0 = time.perf_counter()
    per_seed = [evaluate_seed(prep, protocol, s, config, progress=progress) for s in seeds]
    methods: dict[str, dict[str, Any]] = {}
    for name in METHODS:
        acc = [pairwise_accuracy(r["scores"][name], r["y"]) for r in per_seed]
        auc = [roc_auc(r["scores"][name], r["y"]) for r in per_seed]
        aunt = [roc_auc_non_tied(r["scores"][name], r["y"]) for r in per_seed]
        ma, sa = _mean_std(acc)
        mu, su = _mean_std(auc)
        mn, sn = _mean_std(aunt)
        methods[name] = {
            "accuracy": ma,
            "accuracy_std": sa,
            "auc": mu,
            "auc_std": su,
            "auc_non_tied": mn,
            "auc_non_tied_std": sn,
            "n_pairs": int(np.mean([len(r["y"]) for r in per_seed])),
            "auc_per_seed": auc,
        }
    return {
        "dataset": dataset,
        "protocol": protocol,
        "seeds": list(seeds),
        "methods": methods,
        "per_seed": [r["extra"] for r in per_seed],
        "config": config.model_dump(),
        "wall_time_s": time.perf_counter() - t0,
    }


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table: method, accuracy, AUC, AUC (non-tied), mean ± std."""
    lines = [
        f"dataset={result['dataset']} protocol={result['protocol']} seeds={result['seeds']}",
        f"{'method':<22}{'accuracy':>18}{'auc':>18}{'auc_non_tied':>18}{'n_pairs':>9}",
    ]
    for name, m in result["methods"].items():
        lines.append(
            f"{name:<22}{m['accuracy']:>11.3f} ± {m['accuracy_std']:.3f}"
            f"{m['auc']:>11.3f} ± {m['auc_std']:.3f}"
            f"{m['auc_non_tied']:>11.3f} ± {m['auc_non_tied_std']:.3f}{m['n_pairs']:>9d}"
        )
    for r in result.get("per_seed", []):
        pu = r["per_user_vs_global_bt"]
        sp = r["user_embedding_spread"]
        lines.append(
            f"seed {r['seed']}: gmtrouter vs global_bt per user: {pu['users_better']} better, "
            f"{pu['users_worse']} worse, {pu['users_equal']} equal; user-embedding spread: "
            f"cos-dist {sp['mean_cosine_distance']:.3f}, dim-std {sp['mean_dim_std']:.3f}"
        )
    return "\n".join(lines)

"""Evaluation metrics as the official GMTRouter code computes them.

``diff`` is s(a) − s(b) (float ``[N]``); ``y`` is the outcome of ``a`` (1 won, 0 lost,
0.5 tie), float ``[N]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import stats

ArrayLike = npt.ArrayLike


def pairwise_accuracy(diff: ArrayLike, y: ArrayLike) -> float:
    """Fraction of non-tied pairs where sign(diff) = sign(y − 0.5); diff = 0 counts 1/2.

    Returns NaN when there is no non-tied pair.
    """
    d = np.asarray(diff, dtype=np.float64)
    t = np.asarray(y, dtype=np.float64)
    mask = t != 0.5
    if not mask.any():
        return float("nan")
    d, t = d[mask], t[mask]
    hit = np.where(d == 0, 0.5, (np.sign(d) == np.sign(t - 0.5)).astype(np.float64))
    return float(hit.mean())


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    pos = labels.sum()
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s), dtype=np.float64)
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2.0 + 1.0
        i = j + 1
    r = np.empty_like(ranks)
    r[order] = ranks
    return float((r[labels == 1].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def roc_auc(diff: ArrayLike, y: ArrayLike) -> float:
    """ROC-AUC of ``diff`` against 1[y > 0.5], pooled over all pairs (ties count as 0).

    This is the official definition (``roc_auc_score(r1 > r2, s1 − s2)``). NaN when only one
    class is present.
    """
    d = np.asarray(diff, dtype=np.float64)
    t = (np.asarray(y, dtype=np.float64) > 0.5).astype(np.int64)
    return _auc(d, t)


def roc_auc_non_tied(diff: ArrayLike, y: ArrayLike) -> float:
    """ROC-AUC of ``diff`` against 1[y > 0.5] over non-tied pairs only."""
    d = np.asarray(diff, dtype=np.float64)
    t = np.asarray(y, dtype=np.float64)
    mask = t != 0.5
    return _auc(d[mask], (t[mask] > 0.5).astype(np.int64))


def history_trend(
    users: Sequence[str],
    history: ArrayLike,
    hits: ArrayLike,
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """How online accuracy changes with the user's history: a learning curve's slope.

    The least-squares slope of ``hits`` on ``log2(1 + history)``, i.e. accuracy points per
    doubling of the interactions a user had before, with a 95 % interval from a bootstrap
    over users (:func:`scipy.stats.bootstrap`, percentile method: users are resampled, each
    with all their comparisons, because one user's comparisons are not independent). Pass
    the difference of two methods' hits on the same comparisons to ask whether one method's
    advantage grows with history. Not in the GMTRouter paper: our measure of "the learning
    curve rises" (``gmtrouter replay``).

    Args:
        users: ``[N]`` user of each comparison.
        history: ``[N]`` interactions that user had before it (≥ 0).
        hits: ``[N]`` float: 1 right, 0 wrong, 0.5 a tie of scores (or a difference of two
            such arrays).
        resamples: Bootstrap resamples.
        seed: Bootstrap seed.

    Returns:
        ``{"slope_per_doubling": float | None, "ci95": [low, high] | None, "n_pairs": N,
        "n_users": U}``; the slope is None with fewer than two distinct history values, the
        interval None with fewer than two users.

    Raises:
        ValueError: the three inputs differ in length.
    """
    x = np.log2(1.0 + np.asarray(history, dtype=np.float64))
    y = np.asarray(hits, dtype=np.float64)
    if not len(users) == len(x) == len(y):
        raise ValueError(
            f"users, history and hits differ in length ({len(users)}, {len(x)}, {len(y)})"
        )
    by_user: dict[str, list[int]] = {}
    for i, u in enumerate(users):
        by_user.setdefault(u, []).append(i)
    groups = [np.array(v, dtype=np.int64) for v in by_user.values()]
    out: dict[str, Any] = {
        "slope_per_doubling": None,
        "ci95": None,
        "n_pairs": len(y),
        "n_users": len(groups),
    }

    def slope(rows: np.ndarray) -> float:
        xs = x[rows]
        if np.ptp(xs) == 0:
            return float("nan")
        return float(np.polyfit(xs, y[rows], 1)[0])

    if len(y) < 2 or np.ptp(x) == 0:
        return out
    out["slope_per_doubling"] = slope(np.arange(len(y)))
    if len(groups) < 2:
        return out

    def statistic(user_idx: np.ndarray) -> float:
        return slope(np.concatenate([groups[int(i)] for i in user_idx]))

    res = stats.bootstrap(
        (np.arange(len(groups)),),
        statistic,
        vectorized=False,
        n_resamples=resamples,
        method="percentile",
        random_state=np.random.default_rng(seed),
    )
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    out["ci95"] = None if np.isnan(low) or np.isnan(high) else [low, high]
    return out

"""Evaluation metrics as the official GMTRouter code computes them.

``diff`` is s(a) − s(b) (float ``[N]``); ``y`` is the outcome of ``a`` (1 won, 0 lost,
0.5 tie), float ``[N]``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

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

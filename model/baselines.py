"""Non-graph baselines, all fit on comparison indices of a :class:`~model.data.PreparedData`.

Each has ``fit(prep, idx)`` and ``score(prep, idx) -> float64 [N]`` (s(a) − s(b)).

- :class:`RandomBaseline`: uniform random scores.
- :class:`GlobalBT`: one Bradley–Terry strength per model over all users.
- :class:`PerUserBT`: BT per user, shrunk towards the global strengths with
  ``prior_strength`` virtual games per model (tuned on validation by the evaluation).
- :class:`QueryLinear`: pairwise logistic regression on (PCA-reduced query embedding ⊗
  (e_a − e_b)) plus (e_a − e_b): query-aware, non-personalized, no graph.
"""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression

from model.bradley_terry import fit_bradley_terry
from model.data import IntArray, PreparedData


def _wins(prep: PreparedData, idx: IntArray) -> list[tuple[str, str, float]]:
    out: list[tuple[str, str, float]] = []
    for i in idx:
        a, b, y = prep.models[prep.a[i]], prep.models[prep.b[i]], float(prep.y[i])
        if y == 1.0:
            out.append((a, b, 1.0))
        elif y == 0.0:
            out.append((b, a, 1.0))
        else:
            out += [(a, b, 0.5), (b, a, 0.5)]
    return out


class RandomBaseline:
    """Random scores (seeded)."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def fit(self, prep: PreparedData, idx: IntArray) -> RandomBaseline:
        """No-op."""
        return self

    def score(self, prep: PreparedData, idx: IntArray) -> np.ndarray:
        """float64 ``[N]`` uniform noise."""
        return self.rng.standard_normal(len(idx))


class GlobalBT:
    """Global Bradley–Terry strengths (``prior_strength`` virtual games for stability)."""

    def __init__(self, prior_strength: float = 1.0) -> None:
        self.prior_strength = prior_strength
        self.theta = np.zeros(0)

    def fit(self, prep: PreparedData, idx: IntArray) -> GlobalBT:
        """Fit θ on comparisons ``idx``."""
        th = fit_bradley_terry(
            _wins(prep, idx), prior_strength=self.prior_strength, models=prep.models
        )
        self.theta = np.array([th.get(m, 0.0) for m in prep.models])
        return self

    def score(self, prep: PreparedData, idx: IntArray) -> np.ndarray:
        """θ_a − θ_b, float64 ``[N]``."""
        return np.asarray(self.theta[prep.a[idx]] - self.theta[prep.b[idx]], dtype=np.float64)


class PerUserBT:
    """Per-user BT shrunk towards global strengths; users without data get the global θ."""

    def __init__(self, prior_strength: float = 5.0) -> None:
        self.prior_strength = prior_strength
        self.glob = GlobalBT()
        self.theta: dict[int, np.ndarray] = {}

    def fit(self, prep: PreparedData, idx: IntArray) -> PerUserBT:
        """Fit the global θ, then one shrunk θ per user."""
        self.glob.fit(prep, idx)
        prior = {m: float(t) for m, t in zip(prep.models, self.glob.theta, strict=True)}
        self.theta = {}
        for u in np.unique(prep.user[idx]):
            rows = idx[prep.user[idx] == u]
            th = fit_bradley_terry(
                _wins(prep, rows), prior_strength=self.prior_strength, prior=prior
            )
            self.theta[int(u)] = np.array([th.get(m, prior[m]) for m in prep.models])
        return self

    def score(self, prep: PreparedData, idx: IntArray) -> np.ndarray:
        """θ_u,a − θ_u,b, float64 ``[N]``."""
        out = np.zeros(len(idx))
        for k, i in enumerate(idx):
            th = self.theta.get(int(prep.user[i]), self.glob.theta)
            out[k] = th[prep.a[i]] - th[prep.b[i]]
        return out


class QueryLinear:
    """Pairwise logistic regression on query-embedding × model features (no personalization).

    Args:
        c: Inverse L2 strength of sklearn's ``LogisticRegression``.
        pca_dim: Query embedding reduced to at most this many PCA components.
    """

    def __init__(self, c: float = 1.0, pca_dim: int = 32, seed: int = 0) -> None:
        self.c = c
        self.pca_dim = pca_dim
        self.seed = seed
        self.pca: PCA | None = None
        self.clf: LogisticRegression | None = None

    def _features(self, prep: PreparedData, idx: IntArray) -> np.ndarray:
        assert self.pca is not None
        q = self.pca.transform(prep.query_emb[prep.query[idx]])
        q = np.concatenate([np.ones((len(idx), 1)), q], axis=1)  # bias column: global strength
        m = len(prep.models)
        e = np.zeros((len(idx), m))
        e[np.arange(len(idx)), prep.a[idx]] += 1.0
        e[np.arange(len(idx)), prep.b[idx]] -= 1.0
        return (q[:, :, None] * e[:, None, :]).reshape(len(idx), -1)

    def fit(self, prep: PreparedData, idx: IntArray) -> QueryLinear:
        """Fit on non-tied comparisons of ``idx`` (both orientations, no intercept)."""
        qs = np.unique(prep.query[idx])
        k = max(1, min(self.pca_dim, len(qs) - 1))
        self.pca = PCA(n_components=k, random_state=self.seed).fit(prep.query_emb[qs])
        rows = idx[prep.y[idx] != 0.5]
        x = self._features(prep, rows)
        y = (prep.y[rows] > 0.5).astype(np.int64)
        x2 = np.concatenate([x, -x])
        y2 = np.concatenate([y, 1 - y])
        self.clf = LogisticRegression(C=self.c, fit_intercept=False, max_iter=2000)
        self.clf.fit(x2, y2)
        return self

    def score(self, prep: PreparedData, idx: IntArray) -> np.ndarray:
        """Decision function, float64 ``[N]``."""
        assert self.clf is not None
        return np.asarray(self.clf.decision_function(self._features(prep, idx)), dtype=np.float64)

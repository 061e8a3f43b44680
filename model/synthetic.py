"""Synthetic data with planted per-user preferences (for tests and sanity checks).

Half the users prefer model ``A`` on math and ``B`` on writing, the other half the reverse;
model ``C`` sits in between. Globally every model is equally strong, so a global
Bradley–Terry model scores near AUC 0.5, while a personalized, query-aware one can reach
well above 0.9. :class:`HashEncoder` gives category-clustered query embeddings without
loading a real text model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from model.data import FloatArray
from model.datasets.records import Outcome, PreferenceRecord


class HashEncoder:
    """Deterministic fake encoder: texts starting with ``"<category>:"`` cluster by category.

    The embedding is a unit vector: a category direction plus small text-specific noise.
    """

    def __init__(self, dim: int = 32, noise: float = 0.3) -> None:
        self.name = f"hash-encoder-{dim}"
        self._dim = dim
        self.noise = noise

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self._dim

    def _vec(self, key: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(self._dim)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> FloatArray:
        """float32 ``[N, dim]`` unit rows."""
        rows = []
        for t in texts:
            cat = t.split(":", 1)[0]
            v = self._vec("cat/" + cat) + self.noise * self._vec("text/" + t)
            rows.append(v / np.linalg.norm(v))
        return np.asarray(rows, dtype=np.float32).reshape(len(texts), self._dim)


def planted_preferences(
    *,
    num_users: int = 40,
    sessions_per_user: int = 30,
    noise: float = 0.05,
    seed: int = 0,
) -> list[PreferenceRecord]:
    """Records with planted per-user preferences (see the module docstring).

    Args:
        num_users: Users (even ids group 0, odd ids group 1).
        sessions_per_user: Single-turn comparisons per user.
        noise: Probability of flipping an outcome.
        seed: RNG seed.
    """
    rng = np.random.default_rng(seed)
    rank = {  # (group, category) -> best to worst
        (0, "math"): ["A", "C", "B"],
        (0, "writing"): ["B", "C", "A"],
        (1, "math"): ["B", "C", "A"],
        (1, "writing"): ["A", "C", "B"],
    }
    pairs = [("A", "B"), ("B", "A"), ("A", "C"), ("C", "B"), ("B", "C"), ("C", "A")]
    out: list[PreferenceRecord] = []
    for u in range(num_users):
        g = u % 2
        for s in range(sessions_per_user):
            cat = "math" if rng.random() < 0.5 else "writing"
            q = int(rng.integers(0, 20))
            ma, mb = pairs[int(rng.integers(0, len(pairs)))]
            order = rank[(g, cat)]
            a_wins = order.index(ma) < order.index(mb)
            if rng.random() < noise:
                a_wins = not a_wins
            outcome: Outcome = "a" if a_wins else "b"
            out.append(
                PreferenceRecord(
                    user_id=f"user{u}",
                    session_id=f"user{u}/s{s}",
                    turn_index=0,
                    query_id=f"{cat}-{q}",
                    query_text=f"{cat}: question {q}",
                    model_a=ma,
                    model_b=mb,
                    outcome=outcome,
                    category=cat,
                )
            )
    return out

"""Scorers: how candidate models get a score for a user and a query.

* :class:`PriorScorer` — the non-personalized Bradley–Terry prior learned from every recorded
  comparison in the (shared) store (method ``bt_prior``). Used until a GMTRouter checkpoint
  is configured, and as the fallback.
* The personalized GMTRouter network scorer lives in ``server/personalization.py``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import time
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt

from graphstore.interactions import PairCount
from graphstore.store import GraphStore
from model.bradley_terry import fit_bradley_terry


def pair_count_wins(counts: Sequence[PairCount]) -> list[tuple[str, str, float]]:
    """Pair counts as the ``(winner, loser, weight)`` triples :func:`fit_bradley_terry` takes
    (a tie's halves are already in both sides' counts)."""
    return [(c.model_a, c.model_b, c.wins_a) for c in counts] + [
        (c.model_b, c.model_a, c.wins_b) for c in counts
    ]


@dataclasses.dataclass(frozen=True, slots=True)
class Scores:
    """Scores of candidate models for one request.

    Attributes:
        scores: model → score (higher is better), one per candidate, in candidate order.
        method: How they were computed (``SelectResponse.method``).
        reasoning: Why, in words.
        model_version: Version of the scoring model.
        history_turns: Turns of the user's history that were used.
    """

    scores: dict[str, float]
    method: str
    reasoning: str
    model_version: str
    history_turns: int = 0


class Scorer(Protocol):
    """Anything that scores candidates for a user."""

    async def score(
        self,
        user_id: str,
        query_embedding: npt.NDArray[np.float32] | None,
        candidates: Sequence[str],
    ) -> Scores:
        """Score ``candidates`` for ``user_id``.

        Args:
            query_embedding: float32 ``[D]``; None ranks for the user's typical query.
        """
        ...

    def invalidate(self, user_id: str) -> None:
        """Forget cached state of ``user_id`` (called after a local write)."""
        ...


class PriorScorer:
    """Non-personalized Bradley–Terry strengths over all recorded comparisons.

    The strengths are refitted from the store's pair counts at most every ``refresh_s``
    seconds (and at once after a write in this process), so replicas sharing one store agree
    within ``refresh_s``.

    Args:
        store: The shared graph store.
        refresh_s: Maximum age of the cached strengths, in seconds.
        prior_strength: Virtual games per model (shrinkage towards equal strength).
        executor: Where the fit runs (never on the event loop); None = the loop's default.
    """

    method = "bt_prior"

    def __init__(
        self,
        store: GraphStore,
        refresh_s: float = 1.0,
        prior_strength: float = 1.0,
        executor: concurrent.futures.Executor | None = None,
    ):
        self.store = store
        self.refresh_s = refresh_s
        self.prior_strength = prior_strength
        self.executor = executor
        self._theta: dict[str, float] = {}
        self._games = 0.0
        self._fitted_at = -float("inf")
        self._lock = asyncio.Lock()
        self._generation = 0  # bumped by every invalidate()
        self._fit_started = -float("inf")

    @property
    def model_version(self) -> str:
        """``bt_prior@<number of comparisons fitted>``."""
        return f"bt_prior@{self._games:g}"

    async def strengths(self) -> dict[str, float]:
        """Current log-strengths θ per model (refit when older than ``refresh_s``).

        Concurrent callers share one refit (a caller waiting for a refit that started after
        it arrived takes that one's result); the fit runs in the executor.
        """
        arrived = time.monotonic()
        if arrived - self._fitted_at < self.refresh_s:
            return self._theta
        async with self._lock:
            if time.monotonic() - self._fitted_at >= self.refresh_s and self._fit_started < arrived:
                started, generation = time.monotonic(), self._generation
                self._fit_started = started
                counts = await self.store.pair_counts()
                wins = pair_count_wins(counts)
                if counts:
                    fit = functools.partial(
                        fit_bradley_terry, wins, prior_strength=self.prior_strength
                    )
                    theta = await asyncio.get_running_loop().run_in_executor(self.executor, fit)
                else:
                    theta = {}
                self._theta = theta
                self._games = sum(c.wins_a + c.wins_b for c in counts)
                # A local write during the refit leaves the strengths stale (refit again).
                if generation == self._generation:
                    self._fitted_at = started
        return self._theta

    async def score(
        self,
        user_id: str,
        query_embedding: npt.NDArray[np.float32] | None,
        candidates: Sequence[str],
    ) -> Scores:
        """Bradley–Terry log-strength per candidate (0 for a model never compared)."""
        theta = await self.strengths()
        scores = {m: float(theta.get(m, 0.0)) for m in candidates}
        known = sum(1 for m in candidates if m in theta)
        reasoning = (
            f"non-personalized Bradley-Terry prior over {self._games:g} recorded comparisons; "
            f"{known} of {len(candidates)} candidates have been compared before"
        )
        return Scores(scores, self.method, reasoning, self.model_version)

    def invalidate(self, user_id: str) -> None:
        """A local write changed the pair counts: refit on the next request."""
        self._generation += 1
        self._fitted_at = -float("inf")

"""Per-query evidence: every user's outcomes on the same query, added to the scores.

The network sees only the requesting user's own history, and the Bradley–Terry prior only
global strengths. When many users ask the same question (a benchmark, a templated task, a
popular prompt), how the candidate models fared on *that* question is strong evidence of
which one this user will prefer. For each Select with a query text:

1. the query's key is :func:`graphstore.interactions.query_key` (SHA-256 of the text with its
   whitespace collapsed; it is stored with every interaction, also when raw text is not);
2. the store returns the pairwise win counts of the ``query_evidence.max_comparisons`` most
   recent comparisons recorded for that key, by any user
   (:meth:`~graphstore.store.GraphStore.query_pair_counts`; one indexed read, run
   concurrently with the scorer);
3. per-query Bradley–Terry strengths are fitted on them, pulled towards the global strengths
   of the prior by ``query_evidence.prior_strength`` virtual games per model
   (:func:`model.bradley_terry.per_query_strengths`), and ``weight × (θ_query[m] − θ[m])``
   is added to candidate ``m``'s score.

A query nobody compared before adds 0, so the scores are the scorer's own. Replicas read the
counts from the shared store; a replica reuses a query's counts for at most
``query_evidence.max_age_ms`` (a write through this replica drops them at once). A store that
fails or is slow here leaves the scores unchanged (the reasoning says so): Select never fails
because of this evidence.

Measured on MT-Bench (``server/replay_simulation.py``, the held-out half of the judges, three
training seeds): the frozen network alone scores 0.802 / 0.803 / 0.809 online accuracy; with
this evidence 0.809 / 0.833 / 0.820 (README → Results). Not in the GMTRouter paper: an
addition of ours.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
from collections.abc import Sequence

import structlog

from graphstore.errors import StoreUnavailableError
from graphstore.interactions import PairCount
from graphstore.store import GraphStore
from model.bradley_terry import per_query_strengths
from server.config import QueryEvidenceSettings
from server.read_cache import ReadCache
from server.scoring import PriorScorer, pair_count_wins

log = structlog.get_logger(__name__)

#: Queries whose counts one replica keeps (LRU).
CACHE_SIZE = 10_000


@dataclasses.dataclass(frozen=True, slots=True)
class QueryEvidence:
    """The evidence for one Select.

    Attributes:
        deviation: candidate → ``weight × (θ_query − θ)`` in log-strength units (all 0.0 when
            the query has no recorded comparison).
        comparisons: Comparisons of the query it rests on (ties count once).
        error: Why no evidence could be read ("" when it was).
        strengths: The query's log-strengths θ_q of every known model (unweighted; empty
            when the query has no recorded comparison): the centre of the user's own
            verdicts on this query (``server/user_evidence.py``).
    """

    deviation: dict[str, float]
    comparisons: float
    error: str = ""
    strengths: dict[str, float] = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        """One sentence for ``SelectResponse.reasoning``."""
        if self.error:
            return f"per-query evidence unavailable ({self.error})"
        if not self.comparisons:
            return "no other comparison of this query yet"
        shifts = ", ".join(f"{m} {d:+.3f}" for m, d in self.deviation.items())
        return (
            f"per-query evidence from {self.comparisons:g} recorded comparisons of this query "
            f"(all users) shifts the scores by {shifts}"
        )


class QueryEvidenceSource:
    """Reads and fits the per-query evidence (see the module docstring).

    Args:
        settings: ``query_evidence`` settings.
        store: The shared store (its reads should be budgeted: ``server.degraded.BudgetedStore``).
        prior: Source of the global strengths (the same prior the scorer falls back to).
        executor: Where the Bradley–Terry fit runs (never on the event loop).
    """

    def __init__(
        self,
        settings: QueryEvidenceSettings,
        store: GraphStore,
        prior: PriorScorer,
        executor: concurrent.futures.Executor,
    ) -> None:
        self.settings = settings
        self.store = store
        self.prior = prior
        self.executor = executor
        self._counts: ReadCache[str, list[PairCount]] = ReadCache(settings.max_age_ms, CACHE_SIZE)
        # key -> (counts, global strengths, θ_q): the last fit, reused while neither changed
        self._fits: dict[str, tuple[list[PairCount], dict[str, float], dict[str, float]]] = {}

    async def _read(self, key: str) -> list[PairCount]:
        return await self._counts.get(
            key, lambda: self.store.query_pair_counts(key, self.settings.max_comparisons)
        )

    async def evidence(self, key: str, candidates: Sequence[str]) -> QueryEvidence | None:
        """The evidence for a query with key ``key`` (None when off or ``key`` is "").

        Never raises for a store failure: the result then carries ``error`` and zero
        deviations.
        """
        if not self.settings.enabled or not key:
            return None
        zero = {m: 0.0 for m in candidates}
        try:
            counts = await self._read(key)
            if not counts:
                return QueryEvidence(zero, 0.0)
            theta = await self.prior.strengths()
        except StoreUnavailableError as exc:
            log.warning("per-query evidence unavailable", error=str(exc))
            return QueryEvidence(zero, 0.0, error=type(exc).__name__)
        last = self._fits.get(key)
        if (
            last is not None
            and last[0] is counts
            and last[1] is theta
            and all(m in last[2] for m in candidates)
        ):
            strengths = last[2]
        else:
            fit = functools.partial(
                per_query_strengths,
                pair_count_wins(counts),
                dict(theta),
                list(candidates),
                prior_strength=self.settings.prior_strength,
            )
            strengths = await asyncio.get_running_loop().run_in_executor(self.executor, fit)
            if self._counts.cached(key):  # cached counts: the fit may be reused with them
                self._fits[key] = (counts, theta, strengths)
                while len(self._fits) > CACHE_SIZE:
                    del self._fits[next(iter(self._fits))]
        w = self.settings.weight
        return QueryEvidence(
            {m: w * (strengths[m] - float(theta.get(m, 0.0))) for m in candidates},
            sum(c.wins_a + c.wins_b for c in counts),
            strengths=strengths,
        )

    def invalidate(self, key: str) -> None:
        """A comparison of the query ``key`` was recorded through this replica."""
        self._counts.invalidate(key)
        self._fits.pop(key, None)

    def clear(self) -> None:
        """Forget every query's counts (a user was deleted through this replica)."""
        self._counts.clear()
        self._fits.clear()

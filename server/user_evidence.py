"""Per-user evidence: the user's own earlier outcomes, added to the scores.

The per-query evidence (``server/query_evidence.py``) says how the candidates fared on this
query for *everyone*; the network (``server/personalization.py``) learns a user's taste from
their graph, but only as far as its weights generalise. The most direct evidence of what
this user will prefer is what this user preferred before, above all on the same question:
a judge who preferred answer a to b and b to c on this query will very likely prefer a to c.
For each Select:

1. the store returns the user's ``user_evidence.max_comparisons`` most recent comparisons with
   their query keys (:meth:`~graphstore.store.GraphStore.user_comparisons`; one indexed read,
   started with the per-query read, concurrently with the scorer);
2. :func:`model.bradley_terry.user_deviation` fits two Bradley–Terry models on them: the
   user's strengths over all those comparisons, pulled towards the global strengths
   (``user_prior_strength`` virtual games per model), contributing ``user_weight × (θ_u − θ)``;
   and the user's strengths over those of the same query
   (:func:`graphstore.interactions.query_key`), pulled towards the query's strengths from the
   per-query evidence (``query_prior_strength``), contributing ``θ_uq − θ_q``;
3. the sum is added to each candidate's score.

A user without comparisons adds 0 (cold start stays the non-personalized choice). Replicas
read the comparisons from the shared store; a replica reuses a user's comparisons for at
most ``user_evidence.max_age_ms`` (a write through this replica drops them at once). A store
that fails or is slow here leaves the scores unchanged (the reasoning says so): Select never
fails because of this evidence.

Not in the GMTRouter paper: an addition of ours. Measured on LLMFAO and MT-Bench in
README → Results.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import sys
from collections.abc import Sequence

import structlog

from graphstore.errors import StoreUnavailableError
from graphstore.interactions import UserComparison
from graphstore.store import GraphStore
from model.bradley_terry import comparison_wins, user_deviation
from server.config import UserEvidenceSettings
from server.query_evidence import QueryEvidence
from server.read_cache import ReadCache
from server.scoring import PriorScorer

log = structlog.get_logger(__name__)

#: Users whose comparisons one replica keeps (LRU; expired ones are dropped): at 256
#: comparisons each, about 20 KB per user.
CACHE_SIZE = 2_000


def user_wins(comparisons: Sequence[UserComparison]) -> list[tuple[str, str, float]]:
    """Comparisons as ``(winner, loser, weight)`` triples (a tie: two of weight 0.5)."""
    return [t for c in comparisons for t in comparison_wins(c.winner_model, c.loser_model, c.tie)]


@dataclasses.dataclass(frozen=True, slots=True)
class UserEvidence:
    """The user's evidence for one Select.

    Attributes:
        deviation: candidate → score shift in log-strength units (all 0.0 without
            comparisons).
        comparisons: Number of the user's comparisons it rests on.
        same_query: Number of those that compared answers to this query.
        error: Why no evidence could be read ("" when it was).
    """

    deviation: dict[str, float]
    comparisons: int
    same_query: int
    error: str = ""

    def describe(self) -> str:
        """One sentence for ``SelectResponse.reasoning``."""
        if self.error:
            return f"per-user evidence unavailable ({self.error})"
        if not self.comparisons:
            return "no earlier comparison of this user"
        shifts = ", ".join(f"{m} {d:+.3f}" for m, d in self.deviation.items())
        return (
            f"per-user evidence from the user's {self.comparisons} most recent comparisons "
            f"({self.same_query} of this query) shifts the scores by {shifts}"
        )


class UserEvidenceSource:
    """Reads the user's comparisons and fits the per-user evidence (module docstring).

    Args:
        settings: ``user_evidence`` settings.
        store: The shared store (its reads should be budgeted: ``server.degraded.BudgetedStore``).
        prior: Source of the global strengths.
        executor: Where the Bradley–Terry fits run (never on the event loop).
    """

    def __init__(
        self,
        settings: UserEvidenceSettings,
        store: GraphStore,
        prior: PriorScorer,
        executor: concurrent.futures.Executor,
    ) -> None:
        self.settings = settings
        self.store = store
        self.prior = prior
        self.executor = executor
        self._comparisons: ReadCache[str, list[UserComparison]] = ReadCache(
            settings.max_age_ms, CACHE_SIZE
        )
        # user -> the last fit: its inputs (compared by identity or value) and its deviations
        self._fits: dict[str, tuple[tuple[object, ...], dict[str, float]]] = {}

    async def _read(self, user_id: str) -> list[UserComparison]:
        async def read() -> list[UserComparison]:
            rows = await self.store.user_comparisons(user_id, self.settings.max_comparisons)
            # one copy of each model name and query key across every cached user
            return [
                UserComparison(
                    sys.intern(r.winner_model),
                    sys.intern(r.loser_model),
                    r.tie,
                    sys.intern(r.query_key),
                )
                for r in rows
            ]

        return await self._comparisons.get(user_id, read)

    async def evidence(
        self,
        user_id: str,
        key: str,
        candidates: Sequence[str],
        query: asyncio.Future[QueryEvidence | None] | None = None,
    ) -> UserEvidence | None:
        """The user's evidence for one Select.

        Args:
            user_id: The requesting user.
            key: The query's :func:`~graphstore.interactions.query_key` ("" = no query text:
                no same-query term).
            candidates: The candidate models, in order.
            query: The per-query evidence of this Select (its ``strengths`` centre the
                same-query term; the global strengths when None, off or empty). Awaited
                shielded: cancelling this leaves it running.

        Returns:
            None when switched off, or when nothing could count (``key`` "" and
            ``user_weight`` 0: no store read then). Never raises for a store failure: the
            result then carries ``error`` and zero deviations.
        """
        if not self.settings.enabled:
            return None
        zero = {m: 0.0 for m in candidates}
        if not key and self.settings.user_weight == 0:
            return None  # no same-query term and no taste term: nothing to read
        try:
            rows = await self._read(user_id)
            if not rows:
                return UserEvidence(zero, 0, 0)
            theta = await self.prior.strengths()
        except StoreUnavailableError as exc:
            log.warning("per-user evidence unavailable", error=str(exc))
            return UserEvidence(zero, 0, 0, error=type(exc).__name__)
        same = [c for c in rows if key and c.query_key == key]
        centre = theta
        if same and query is not None:
            ev = await asyncio.shield(query)
            if ev is not None and ev.strengths:
                centre = ev.strengths
        s = self.settings
        if not same and s.user_weight == 0:
            return UserEvidence(zero, len(rows), 0)
        # the same comparisons, strengths and centre as the last Select: the same deviations
        inputs = (rows, theta, centre, key, tuple(candidates))
        last = self._fits.get(user_id)
        if last is not None and all(a is b or a == b for a, b in zip(last[0], inputs, strict=True)):
            return UserEvidence(last[1], len(rows), len(same))
        fit = functools.partial(
            user_deviation,
            user_wins(rows),
            user_wins(same),
            dict(theta),
            dict(centre),
            list(candidates),
            user_prior_strength=s.user_prior_strength,
            user_weight=s.user_weight,
            query_prior_strength=s.query_prior_strength,
        )
        dev = await asyncio.get_running_loop().run_in_executor(self.executor, fit)
        if self._comparisons.cached(user_id):  # cached rows: the fit may be reused with them
            self._fits[user_id] = (inputs, dev)
            while len(self._fits) > CACHE_SIZE:
                del self._fits[next(iter(self._fits))]
        return UserEvidence(dev, len(rows), len(same))

    def invalidate(self, user_id: str) -> None:
        """A comparison of ``user_id`` was recorded (or the user deleted) through this replica."""
        self._comparisons.invalidate(user_id)
        self._fits.pop(user_id, None)

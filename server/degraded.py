"""Degraded Select: answer from the last prior fit when the graph store is down or slow.

Select must answer within its deadline even while the store (Neo4j) is unreachable or slow.
Three parts:

* :class:`BudgetedStore` — the store as the Select path sees it (the scorer and the per-query
  and per-user evidence): every read is abandoned after ``store.select_timeout_ms`` and raises
  :class:`~graphstore.errors.StoreTimeoutError`; after a failed read, and while an abandoned
  read still runs, its reads fail at once instead of waiting for the store again (the
  evidence reads' own failures do not hold it).
* :class:`SnapshotPriorScorer` — the Bradley–Terry prior that remembers its last successful
  fit, so that a degraded answer needs no store read.
* :class:`DegradingScorer` — wraps the real scorer: on a store failure, a read over budget,
  or the call's gRPC deadline coming near, it answers from the last prior fit (method
  ``degraded_bt_prior``) or, when the prior never fitted, with equal scores (method
  ``degraded_uniform``: the first candidate wins); ``reasoning`` says why. After a failure
  the store is left alone for :data:`HOLD_S` seconds, and for as long as a read abandoned
  after its budget is still running (every Select in that time answers degraded at once,
  its evidence reads fail at once too); then the next Select tries it again: recovery needs
  no restart.

The call's deadline reaches the scorer through :data:`CALL_DEADLINE`, set per RPC by the
RPC gate (``server/rpc_gate.py``).
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import structlog

from graphstore.errors import StoreTimeoutError, StoreUnavailableError
from graphstore.interactions import (
    Interaction,
    PairCount,
    RecordedComparison,
    RecordResult,
    UserComparison,
)
from graphstore.neighbourhood import Neighbourhood
from graphstore.registry import PublishedModel
from graphstore.store import GraphStore
from server.metrics import Metrics
from server.scoring import PriorScorer, Scorer, Scores

log = structlog.get_logger(__name__)

#: ``time.monotonic()`` at which the current RPC's deadline expires; None without a deadline.
CALL_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "gmtrouter_call_deadline", default=None
)

#: Seconds after a store failure during which Select answers degraded without trying it.
HOLD_S = 1.0

#: Degraded methods (``SelectResponse.method``).
METHOD_PRIOR = "degraded_bt_prior"
METHOD_UNIFORM = "degraded_uniform"

#: Reserved for building and sending the degraded answer: at most this many seconds …
_RESERVE_MAX_S = 0.05
#: … and at most this fraction of the remaining deadline.
_RESERVE_FRACTION = 0.1

_T = TypeVar("_T")


class StoreHeldError(StoreUnavailableError):
    """A :class:`BudgetedStore` read was not tried: the store is held (:meth:`BudgetedStore.held`).

    Attributes:
        reason: "slow" or "unavailable", as the hold's cause.
    """

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class BudgetedStore(GraphStore):
    """A store whose reads give up after ``budget_ms`` (for the Select path only).

    Writes are passed through untouched: a write is never abandoned half way (see
    ``RoutingService.record``).

    A scorer's read that fails or runs over budget holds the store for :data:`HOLD_S`
    seconds: every read in that time, and every read while an abandoned one still runs, raises
    :class:`StoreHeldError` at once without calling the store (a Select's evidence reads then
    cost nothing while the store is down, instead of ``budget_ms`` each); the first read after
    the hold tries the store again. The evidence reads (``query_pair_counts``,
    ``user_comparisons``) honour the hold but do not set it: their failure costs only that
    Select's evidence, never the scorer.

    Args:
        inner: The (opened) store.
        budget_ms: Longest wait for one read, in milliseconds.
    """

    def __init__(self, inner: GraphStore, budget_ms: float) -> None:
        if budget_ms <= 0:
            raise ValueError(f"budget_ms (got {budget_ms}) must be > 0")
        self.inner = inner
        self.budget_ms = budget_ms
        self.embedding_dim = inner.embedding_dim
        #: Reads past their budget that are still running.
        self.abandoned = 0
        self._hold_until = -float("inf")
        self._hold_reason = ("unavailable", "")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def held(self) -> tuple[str, str] | None:
        """Whether a read now would fail at once without calling the store: ``(reason,
        why)`` — ``reason`` "slow" or "unavailable" (the ``select_degraded_total`` label),
        ``why`` a sentence — or None when it would call the store (class docstring)."""
        if self.abandoned:
            return (
                "slow",
                f"the graph store is slow: {self.abandoned} earlier read(s) still running "
                f"past the {self.budget_ms:g} ms budget",
            )
        if time.monotonic() < self._hold_until:
            return self._hold_reason
        return None

    def hold(self, reason: str, why: str) -> None:
        """Hold the store for :data:`HOLD_S` seconds from now (:meth:`held` then returns
        ``reason`` and ``why``); a failed scorer read does this, and so does
        :class:`DegradingScorer` on a failed Select."""
        self._hold_until = time.monotonic() + HOLD_S
        self._hold_reason = (
            reason,
            f"{why} (store left alone for {HOLD_S:g} s after a failure)",
        )

    async def _read(self, what: str, coro: Coroutine[Any, Any, _T], *, holds: bool = True) -> _T:
        """Await ``coro`` for at most ``budget_ms``; with ``holds`` False a failure does not
        hold the store (the evidence reads: a failure of theirs costs only the evidence).

        A read over budget is abandoned, not cancelled: it runs on in the background (counted
        in :attr:`abandoned` until it ends), so that slow first steps after a store restart
        (connecting, cold query plans) still complete and warm the store up. Cancelling them
        at every budget would keep the store cold for ever.

        Raises:
            StoreHeldError: the store is held (:meth:`held`; ``coro`` is closed without
                running).
            StoreUnavailableError: the store failed (this holds it).
            StoreTimeoutError: it took longer than ``budget_ms`` (this holds it).
        """
        held = self.held()
        if held is not None:
            coro.close()
            raise StoreHeldError(f"graph store {what} not tried: {held[1]}", held[0])
        task = asyncio.ensure_future(coro)
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.budget_ms / 1e3)
        except TimeoutError:
            self._abandon(task)
            if holds:
                self.hold(
                    "slow", f"the graph store is slow: {what} took over {self.budget_ms:g} ms"
                )
            raise StoreTimeoutError(
                f"graph store {what} did not answer within {self.budget_ms:g} ms "
                f"(store.select_timeout_ms)"
            ) from None
        except StoreUnavailableError as exc:
            if holds:
                self.hold("unavailable", f"the graph store is unavailable: {exc}")
            raise
        except asyncio.CancelledError:
            self._abandon(task)
            raise

    def _abandon(self, task: asyncio.Future[Any]) -> None:
        if task.done():
            if not task.cancelled():
                task.exception()  # retrieved: no "never retrieved" warning
            return
        self.abandoned += 1

        def done(t: asyncio.Future[Any]) -> None:
            self.abandoned -= 1
            if not t.cancelled():
                t.exception()

        task.add_done_callback(done)

    async def open(self) -> None:
        """See :meth:`GraphStore.open` (no budget)."""
        await self.inner.open()

    async def close(self) -> None:
        """See :meth:`GraphStore.close` (no budget)."""
        await self.inner.close()

    async def record(self, interactions: Sequence[Interaction]) -> list[RecordResult]:
        """See :meth:`GraphStore.record` (no budget)."""
        return await self.inner.record(interactions)

    async def delete_user(self, user_id: str) -> int:
        """See :meth:`GraphStore.delete_user` (no budget)."""
        return await self.inner.delete_user(user_id)

    async def neighbourhood(
        self, user_id: str, hops: int = 2, fan_out: Sequence[int] = (64, 8, 16, 8)
    ) -> Neighbourhood:
        """See :meth:`GraphStore.neighbourhood`; raises StoreTimeoutError past the budget."""
        return await self._read("neighbourhood", self.inner.neighbourhood(user_id, hops, fan_out))

    async def user_version(self, user_id: str) -> int:
        """See :meth:`GraphStore.user_version`; raises StoreTimeoutError past the budget."""
        return await self._read("user_version", self.inner.user_version(user_id))

    async def list_models(self) -> list[str]:
        """See :meth:`GraphStore.list_models`; raises StoreTimeoutError past the budget."""
        return await self._read("list_models", self.inner.list_models())

    async def pair_counts(self) -> list[PairCount]:
        """See :meth:`GraphStore.pair_counts`; raises StoreTimeoutError past the budget."""
        return await self._read("pair_counts", self.inner.pair_counts())

    async def query_pair_counts(self, query_key: str, limit: int) -> list[PairCount]:
        """See :meth:`GraphStore.query_pair_counts`; raises StoreTimeoutError past the budget."""
        return await self._read(
            "query_pair_counts", self.inner.query_pair_counts(query_key, limit), holds=False
        )

    async def user_comparisons(self, user_id: str, limit: int) -> list[UserComparison]:
        """See :meth:`GraphStore.user_comparisons`; raises StoreTimeoutError past the budget."""
        return await self._read(
            "user_comparisons", self.inner.user_comparisons(user_id, limit), holds=False
        )

    async def counts(self) -> dict[str, int]:
        """See :meth:`GraphStore.counts`; raises StoreTimeoutError past the budget."""
        return await self._read("counts", self.inner.counts())

    # Online learning's calls come from the background learner, never from Select: no budget.

    async def recent_comparisons(self, limit: int) -> list[RecordedComparison]:
        """See :meth:`GraphStore.recent_comparisons` (no budget)."""
        return await self.inner.recent_comparisons(limit)

    async def publish_model(self, model: PublishedModel, blob: bytes) -> PublishedModel:
        """See :meth:`GraphStore.publish_model` (no budget)."""
        return await self.inner.publish_model(model, blob)

    async def latest_model(self) -> PublishedModel | None:
        """See :meth:`GraphStore.latest_model` (no budget)."""
        return await self.inner.latest_model()

    async def load_model(self, version: str) -> bytes | None:
        """See :meth:`GraphStore.load_model` (no budget)."""
        return await self.inner.load_model(version)

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """See :meth:`GraphStore.acquire_lease` (no budget)."""
        return await self.inner.acquire_lease(name, holder, ttl_s)


class SnapshotPriorScorer(PriorScorer):
    """The Bradley–Terry prior, remembering its last successful fit for degraded answers.

    Same arguments as :class:`PriorScorer`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: (strengths, model version, ``time.monotonic()`` of the fit) or None before any.
        self.last_fit: tuple[dict[str, float], str, float] | None = None

    async def strengths(self) -> dict[str, float]:
        """See :meth:`PriorScorer.strengths`; also records the result as :attr:`last_fit`.

        Raises:
            StoreUnavailableError: the store failed (``last_fit`` is kept).
        """
        theta = await super().strengths()
        self.last_fit = (theta, self.model_version, time.monotonic())
        return theta


class DegradingScorer:
    """A :class:`~server.scoring.Scorer` that answers degraded instead of failing or hanging.

    Args:
        inner: The real scorer (network or prior); its store should be a
            :class:`BudgetedStore` so that a slow store shows up as a failure in time.
        prior: The prior whose last fit degraded answers use; when it is not ``inner`` it is
            refitted in the background (at most every ``prior.refresh_s`` seconds, while the
            store answers), so that a fit exists when the store goes away.
        metrics: Where degraded answers are counted (``select_degraded_total{reason}``).
        store: The budgeted store of ``inner``: while it is held (a read failed in the last
            :data:`HOLD_S` seconds, or one is past its budget and still running), Select
            answers degraded at once (one probe at a time).
    """

    def __init__(
        self,
        inner: Scorer,
        prior: SnapshotPriorScorer,
        metrics: Metrics | None = None,
        store: BudgetedStore | None = None,
    ) -> None:
        self.inner = inner
        self.prior = prior
        self.metrics = metrics
        self.store = store
        self._hold_until = -float("inf")
        self._hold_reason = ""
        self._refresh: asyncio.Task[None] | None = None

    @property
    def model_version(self) -> str:
        """The inner scorer's model version."""
        return str(getattr(self.inner, "model_version", "unknown"))

    async def warm_up(self) -> None:
        """Warm the inner scorer and fit the prior once (a store failure here is only logged)."""
        warm = getattr(self.inner, "warm_up", None)
        if warm is not None:
            await warm()
        try:
            await self.prior.strengths()
        except StoreUnavailableError as exc:
            log.warning("prior not fitted at start", error=str(exc))

    def invalidate(self, user_id: str) -> None:
        """Forward to the inner scorer (and the prior)."""
        self.inner.invalidate(user_id)
        if self.prior is not self.inner:
            self.prior.invalidate(user_id)

    async def score(
        self,
        user_id: str,
        query_embedding: npt.NDArray[np.float32] | None,
        candidates: Sequence[str],
    ) -> Scores:
        """The inner scorer's scores, or a degraded answer (see the module docstring).

        Never raises a store error and never waits past the call's deadline minus a small
        reserve (at most 50 ms, at most 10 % of what is left).
        """
        now = time.monotonic()
        if now < self._hold_until:  # without a store (with one, its hold below)
            return self._degraded(candidates, "unavailable", self._hold_reason)
        held = self.store.held() if self.store is not None else None
        if held is not None:  # a read failed (another Select's), or one is still over budget
            return self._degraded(candidates, *held)
        deadline = CALL_DEADLINE.get()
        timeout: float | None = None
        if deadline is not None:
            left = deadline - now
            timeout = left - min(_RESERVE_MAX_S, _RESERVE_FRACTION * max(left, 0.0))
            if timeout <= 0:
                return self._degraded(
                    candidates, "deadline", "no time left before the call's deadline"
                )
        try:
            async with asyncio.timeout(timeout):
                scores = await self.inner.score(user_id, query_embedding, candidates)
        except StoreHeldError as exc:  # held while this Select ran: no new failure
            return self._degraded(candidates, exc.reason, str(exc))
        except StoreTimeoutError as exc:
            return self._fail(candidates, "slow", f"the graph store is slow: {exc}")
        except StoreUnavailableError as exc:
            return self._fail(candidates, "unavailable", f"the graph store is unavailable: {exc}")
        except TimeoutError:
            return self._degraded(
                candidates,
                "deadline",
                f"scoring did not finish within the call's deadline ({timeout or 0:.3f} s left)",
            )
        self._maybe_refresh_prior()
        return scores

    def _fail(self, candidates: Sequence[str], reason: str, why: str) -> Scores:
        if self.store is not None:  # one hold, shared with the evidence reads
            self.store.hold("unavailable", why)
        else:
            self._hold_until = time.monotonic() + HOLD_S
            self._hold_reason = f"{why} (store left alone for {HOLD_S:g} s after a failure)"
        log.warning("select degraded", reason=reason, error=why)
        return self._degraded(candidates, reason, why)

    def _degraded(self, candidates: Sequence[str], reason: str, why: str) -> Scores:
        if self.metrics is not None:
            self.metrics.select_degraded.labels(reason).inc()
        fit = self.prior.last_fit
        if fit is None:
            return Scores(
                dict.fromkeys(candidates, 0.0),
                METHOD_UNIFORM,
                f"degraded: {why}; no prior fit yet, so every candidate scores 0 (the first "
                f"listed wins)",
                "uniform",
            )
        theta, version, fitted_at = fit
        known = sum(1 for m in candidates if m in theta)
        return Scores(
            {m: float(theta.get(m, 0.0)) for m in candidates},
            METHOD_PRIOR,
            f"degraded: {why}; non-personalized Bradley-Terry prior of "
            f"{time.monotonic() - fitted_at:.1f} s ago ({version}); {known} of "
            f"{len(candidates)} candidates have been compared before",
            version,
        )

    def _maybe_refresh_prior(self) -> None:
        """Refit the prior in the background when it is stale and the store answers."""
        if self.prior is self.inner:
            return  # the inner scorer refits it itself
        fit = self.prior.last_fit
        if fit is not None and time.monotonic() - fit[2] < self.prior.refresh_s:
            return
        if self._refresh is not None and not self._refresh.done():
            return

        async def refresh() -> None:
            try:
                await self.prior.strengths()
            except StoreUnavailableError as exc:
                log.info("background prior refit failed", error=str(exc))

        self._refresh = asyncio.get_running_loop().create_task(refresh())

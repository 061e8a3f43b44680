"""DegradingScorer in process, over a real SQLite store that is closed to make it fail."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import time

import numpy as np
import pytest

from graphstore.errors import StoreUnavailableError
from graphstore.interactions import Comparison, Interaction, query_key
from graphstore.sqlite_store import SQLiteGraphStore
from server import degraded
from server.config import QueryEvidenceSettings
from server.degraded import BudgetedStore, DegradingScorer, SnapshotPriorScorer
from server.metrics import Metrics
from server.query_evidence import QueryEvidenceSource

DIM = 8


def comparison(n: int, winner: str, loser: str) -> Interaction:
    return Interaction(
        interaction_id=f"i{n}",
        user_id="u",
        session_id="s",
        turn_index=n,
        query=f"q{n}",
        query_embedding=np.ones(DIM, dtype=np.float32),
        model=winner,
        response="r",
        timestamp_s=1_700_000_000.0 + n,
        idempotency_key=f"k{n}",
        comparison=Comparison(winner, loser),
    )


def degraded_count(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("gmtrouter_select_degraded_total", {"reason": reason})
    return value or 0.0


async def test_uniform_before_any_fit_then_prior_then_recovery() -> None:
    store = SQLiteGraphStore(":memory:", embedding_dim=DIM)
    budgeted = BudgetedStore(store, budget_ms=500)
    prior = SnapshotPriorScorer(budgeted, refresh_s=0.0)
    metrics = Metrics()
    scorer = DegradingScorer(prior, prior, metrics, budgeted)

    # The store is not open: it fails, and the prior never fitted → equal scores.
    first = await scorer.score("u", None, ["b", "a"])
    assert first.method == degraded.METHOD_UNIFORM
    assert first.scores == {"b": 0.0, "a": 0.0}
    assert "graph store is unavailable" in first.reasoning and "no prior fit" in first.reasoning
    assert degraded_count(metrics, "unavailable") == 1

    await store.open()
    await store.record([comparison(n, "a", "b") for n in range(3)])
    await asyncio.sleep(degraded.HOLD_S)  # after a failure the store is left alone this long
    fitted = await scorer.score("u", None, ["b", "a"])
    assert fitted.method == "bt_prior" and fitted.scores["a"] > fitted.scores["b"]

    await store.close()  # down again: the last fit answers, without the store
    again = await scorer.score("u", None, ["b", "a"])
    assert again.method == degraded.METHOD_PRIOR
    assert again.scores == fitted.scores and again.model_version == fitted.model_version
    assert "graph store is unavailable" in again.reasoning
    t0 = time.monotonic()
    held = await scorer.score("u", None, ["b", "a"])  # within the hold: no store call at all
    assert held.method == degraded.METHOD_PRIOR and time.monotonic() - t0 < 0.05
    assert degraded_count(metrics, "unavailable") == 3


async def test_no_time_left_before_the_deadline_answers_at_once() -> None:
    store = SQLiteGraphStore(":memory:", embedding_dim=DIM)
    await store.open()
    try:
        budgeted = BudgetedStore(store, budget_ms=500)
        prior = SnapshotPriorScorer(budgeted, refresh_s=0.0)
        metrics = Metrics()
        scorer = DegradingScorer(prior, prior, metrics, budgeted)

        async def call(deadline_in_s: float) -> str:
            degraded.CALL_DEADLINE.set(time.monotonic() + deadline_in_s)
            return (await scorer.score("u", None, ["a", "b"])).method

        assert await asyncio.create_task(call(-0.1)) == degraded.METHOD_UNIFORM
        assert degraded_count(metrics, "deadline") == 1
        assert await asyncio.create_task(call(5.0)) == "bt_prior"
    finally:
        await store.close()


async def test_a_failed_read_holds_the_store_for_every_select_read() -> None:
    """After a failed scorer read the budgeted store is not called for HOLD_S seconds: the
    scorer and the per-query evidence (which would otherwise wait for the store again, each
    Select) fail at once; then the store is tried again."""
    store = SQLiteGraphStore(":memory:", embedding_dim=DIM)
    budgeted = BudgetedStore(store, budget_ms=500)
    with pytest.raises(StoreUnavailableError):
        await budgeted.pair_counts()  # not open: fails, and holds the store
    await store.open()
    executor = concurrent.futures.ThreadPoolExecutor(1)
    try:
        await store.record(
            [
                dataclasses.replace(comparison(n, "a", "b"), query_key=query_key("q"))
                for n in range(3)
            ]
        )
        assert budgeted.held() is not None and "unavailable" in str(budgeted.held())

        t0 = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="not tried"):
            await budgeted.user_comparisons("u", 10)  # the store would answer: not called
        prior = SnapshotPriorScorer(budgeted, refresh_s=0.0)
        source = QueryEvidenceSource(QueryEvidenceSettings(), budgeted, prior, executor)
        ev = await source.evidence(query_key("q"), ["a", "b"])
        assert ev is not None and ev.error == "StoreHeldError" and not ev.comparisons
        metrics = Metrics()
        scorer = DegradingScorer(prior, prior, metrics, budgeted)
        assert (await scorer.score("u", None, ["a", "b"])).method == degraded.METHOD_UNIFORM
        assert degraded_count(metrics, "unavailable") == 1
        assert time.monotonic() - t0 < 0.1

        await asyncio.sleep(degraded.HOLD_S)
        assert budgeted.held() is None
        assert len(await budgeted.user_comparisons("u", 10)) == 3
        ev = await source.evidence(query_key("q"), ["a", "b"])
        assert ev is not None and not ev.error and ev.comparisons == 3
        assert (await scorer.score("u", None, ["a", "b"])).method == "bt_prior"

        # An evidence read's own failure costs only the evidence: no hold.
        await store.close()
        with pytest.raises(StoreUnavailableError):
            await budgeted.query_pair_counts(query_key("other"), 10)
        assert budgeted.held() is None
    finally:
        executor.shutdown()
        await store.close()

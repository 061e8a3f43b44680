"""The transport-neutral RoutingService, called directly (no gRPC)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphstore.interactions import Comparison
from graphstore.sqlite_store import SQLiteGraphStore
from model.text_encoder import TextEncoder
from server.config import parse_settings
from server.domain import Candidate, FeedbackRecord, SelectQuery
from server.errors import InvalidRequestError
from server.routing import RoutingService
from server.scoring import PriorScorer

DIM = 384
EMB = np.full(DIM, 1.0 / np.sqrt(DIM), dtype=np.float32)


@pytest.fixture()
async def service() -> AsyncIterator[RoutingService]:
    settings_ = parse_settings({"streaming": {"poll_interval_s": 0.05}})
    store = SQLiteGraphStore(":memory:", embedding_dim=DIM)
    await store.open()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    svc = RoutingService(settings_, store, PriorScorer(store, refresh_s=0.0), TextEncoder(), pool)
    yield svc
    await store.close()
    pool.shutdown()


# any model name the service accepts: not blank, no control characters (Cc)
names = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=12).filter(
    lambda s: s.strip() != ""
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(names, min_size=1, max_size=8), st.lists(st.tuples(names, names), max_size=5))
def test_selected_model_is_always_a_candidate(
    candidates: list[str], games: list[tuple[str, str]]
) -> None:
    async def run() -> None:
        store = SQLiteGraphStore(":memory:", embedding_dim=DIM)
        await store.open()
        pool = concurrent.futures.ThreadPoolExecutor(1)
        svc = RoutingService(parse_settings({}), store, PriorScorer(store), TextEncoder(), pool)
        try:
            for w, lose in games:
                if w != lose:
                    await svc.record(
                        FeedbackRecord(
                            user_id="h", query_embedding=EMB, comparison=Comparison(w, lose)
                        )
                    )
            sel = await svc.select(
                SelectQuery(
                    user_id="h",
                    candidates=tuple(Candidate(c) for c in candidates),
                    query_embedding=EMB,
                )
            )
        finally:
            await store.close()
            pool.shutdown()
        assert sel.selected_model in candidates
        assert set(sel.all_scores) == set(candidates)
        assert sel.score == max(sel.all_scores.values())
        assert 0.0 <= sel.confidence <= 1.0

    asyncio.run(run())


async def test_validation_names_fields(service: RoutingService) -> None:
    with pytest.raises(InvalidRequestError) as err:
        await service.select(SelectQuery(user_id="u\x00x", candidates=(Candidate("a"),), query="q"))
    assert err.value.field == "user_id"
    with pytest.raises(InvalidRequestError) as err:
        await service.select(
            SelectQuery(user_id="u" * 300, candidates=(Candidate("a"),), query="q")
        )
    assert err.value.field == "user_id"
    with pytest.raises(InvalidRequestError) as err:
        await service.record(
            FeedbackRecord(user_id="u", query_embedding=EMB, model="a", turn_index=-1)
        )
    assert err.value.field == "turn_index"


async def test_stream_cancel_leaks_no_subscription(service: RoutingService) -> None:
    stream = service.stream_preferences(["s1", "s2"], [Candidate("a"), Candidate("b")])
    first = await anext(stream)
    assert first.user_id == "s1"
    assert service.subscriber_count == 2
    await stream.aclose()
    assert service.subscriber_count == 0

"""Shared online-learning state in every store: recent comparisons, published weights, lease.

Same stores as the contract suite (SQLite in memory and on a file, real Neo4j).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from graphstore.interactions import Comparison
from graphstore.registry import KEEP_PUBLISHED, PublishedModel
from graphstore.store import GraphStore
from tests.graphstore.test_store_contract import DIM, make, store  # noqa: F401 (fixture)


def published(version: str, interactions: int = 0) -> PublishedModel:
    return PublishedModel(
        version=version,
        base_version="gmtrouter-base",
        seq=0,
        interactions=interactions,
        created_at_s=0.0,
        metrics='{"new_loss": 0.5}',
    )


async def test_recent_comparisons_newest_first_only_comparisons(store: GraphStore) -> None:  # noqa: F811
    await store.record(
        [
            make(1, comparison=Comparison("m-a", "m-b"), ts=10.0),
            make(2, rating=0.8, ts=20.0),  # a rating is no comparison
            make(
                3,
                user="u2",
                session="s9",
                turn=2,
                comparison=Comparison("m-b", "m-c", tie=True),
                ts=30.0,
            ),
            make(4, comparison=Comparison("m-c", "m-a"), ts=5.0),
        ]
    )
    rows = await store.recent_comparisons(10)
    assert [r.interaction_id for r in rows] == ["i0003", "i0001", "i0004"]
    r = rows[0]
    assert (r.user_id, r.session_id, r.turn_index) == ("u2", "s9", 2)
    assert (r.winner_model, r.loser_model, r.tie, r.timestamp_s) == ("m-b", "m-c", True, 30.0)
    assert r.query_embedding.dtype == np.float32 and r.query_embedding.shape == (DIM,)
    np.testing.assert_array_equal(r.query_embedding, np.arange(DIM, dtype=np.float32) + 30.0)
    assert [r.interaction_id for r in await store.recent_comparisons(2)] == ["i0003", "i0001"]
    with pytest.raises(ValueError, match="limit"):
        await store.recent_comparisons(0)


async def test_publish_latest_load_and_pruning(store: GraphStore) -> None:  # noqa: F811
    assert await store.latest_model() is None
    assert await store.load_model("gmtrouter-none") is None
    first = await store.publish_model(published("gmtrouter-v1", 100), b"\x00weights-1\xff")
    assert first.seq == 1 and first.interactions == 100 and first.base_version == "gmtrouter-base"
    assert first.created_at_s > 0 and first.metrics == '{"new_loss": 0.5}'
    again = await store.publish_model(published("gmtrouter-v1", 999), b"other bytes")
    assert again == first  # idempotent on version: nothing rewritten
    assert await store.load_model("gmtrouter-v1") == b"\x00weights-1\xff"
    for i in range(2, KEEP_PUBLISHED + 3):
        await store.publish_model(published(f"gmtrouter-v{i}"), f"w{i}".encode())
    latest = await store.latest_model()
    last = KEEP_PUBLISHED + 2
    assert latest is not None and (latest.version, latest.seq) == (f"gmtrouter-v{last}", last)
    assert await store.load_model(f"gmtrouter-v{last}") == f"w{last}".encode()
    kept = [v for v in range(1, last + 1) if await store.load_model(f"gmtrouter-v{v}")]
    assert kept == list(range(last - KEEP_PUBLISHED + 1, last + 1))


async def test_lease_has_one_holder_until_it_expires(store: GraphStore) -> None:  # noqa: F811
    assert await store.acquire_lease("trainer", "replica-a", ttl_s=30)
    assert await store.acquire_lease("trainer", "replica-a", ttl_s=30)  # renewal
    assert not await store.acquire_lease("trainer", "replica-b", ttl_s=30)
    assert await store.acquire_lease("other-lease", "replica-b", ttl_s=30)
    # Many concurrent contenders for a free lease: exactly one wins.
    wins = await asyncio.gather(
        *(store.acquire_lease("contended", f"r{i}", ttl_s=30) for i in range(8))
    )
    assert sum(wins) == 1
    # Many concurrent contenders for an existing but expired lease: exactly one wins.
    assert await store.acquire_lease("expired", "old-holder", ttl_s=0.2)
    await asyncio.sleep(0.4)
    wins = await asyncio.gather(
        *(store.acquire_lease("expired", f"r{i}", ttl_s=30) for i in range(8))
    )
    assert sum(wins) == 1
    # Expiry hands it over.
    assert await store.acquire_lease("short", "replica-a", ttl_s=0.3)
    assert not await store.acquire_lease("short", "replica-b", ttl_s=0.3)
    await asyncio.sleep(0.5)
    assert await store.acquire_lease("short", "replica-b", ttl_s=30)
    assert not await store.acquire_lease("short", "replica-a", ttl_s=30)
    with pytest.raises(ValueError, match="ttl_s"):
        await store.acquire_lease("trainer", "replica-a", ttl_s=0)

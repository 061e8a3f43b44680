"""Neo4j keeps every acknowledged write across a server stop and start.

Runs only against the local launcher's server (``tools/neo4j/neo4j.sh``, env
``GMTROUTER_NEO4J_LAUNCHER=1`` with ``NEO4J_URI`` pointing at it): the test stops and starts
that server once (~30–60 s).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from graphstore.errors import StoreUnavailableError
from graphstore.interactions import Comparison, Interaction
from graphstore.neo4j_store import Neo4jGraphStore

if TYPE_CHECKING:
    from tests.neo4j_fixtures import Neo4jTarget

pytestmark = [pytest.mark.neo4j, pytest.mark.slow]

DIM = 8
LAUNCHER = Path(__file__).resolve().parents[2] / "tools" / "neo4j" / "neo4j.sh"


def make(n: int, user: str, session: str, turn: int) -> Interaction:
    models = ["m-a", "m-b", "m-c"]
    return Interaction(
        interaction_id=f"i{n:04d}",
        user_id=user,
        session_id=session,
        turn_index=turn,
        query=f"query {n}",
        query_embedding=np.linspace(0, 1, DIM, dtype=np.float32) * n,
        model=models[n % 3],
        response=f"response {n}",
        timestamp_s=1_700_000_000.0 + n,
        idempotency_key=f"k{n:04d}",
        rating=0.2 if n % 4 == 1 else None,
        comparison=(
            Comparison(models[n % 3], models[(n + 1) % 3], tie=n % 5 == 0) if n % 4 == 0 else None
        ),
    )


async def launcher(command: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        str(LAUNCHER),
        command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=300)
    return proc.returncode or 0, out.decode(errors="replace")


async def snapshot(store: Neo4jGraphStore, users: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "counts": await store.counts(),
        "models": await store.list_models(),
        "pairs": await store.pair_counts(),
    }
    for u in users:
        n = await store.neighbourhood(u, hops=4)
        out[u] = (
            await store.user_version(u),
            n.user_ids,
            n.turn_ids,
            n.query_ids,
            n.query_embedding.tobytes(),
            n.turn_outcome.tolist(),
            n.turn_prev.tolist(),
        )
    return out


async def test_acknowledged_writes_survive_a_restart(clean_neo4j: Neo4jTarget) -> None:
    if not clean_neo4j.launcher:
        pytest.skip(
            "needs the local launcher's server (GMTROUTER_NEO4J_LAUNCHER=1 and NEO4J_URI "
            "pointing at tools/neo4j/neo4j.sh's Bolt port); this test stops and starts it"
        )
    rc, out = await launcher("status")
    if rc != 0:
        pytest.skip(f"GMTROUTER_NEO4J_LAUNCHER=1 but the launcher reports: {out.strip()}")

    store = Neo4jGraphStore(
        clean_neo4j.uri,
        credentials=clean_neo4j.credentials,
        embedding_dim=DIM,
        max_transaction_retry_time_s=1.0,
        connection_timeout_s=2.0,
    )
    await store.open()
    users = [f"user-{u}" for u in range(4)]
    items = [make(n, users[n % 4], f"s{n % 7}", n // 7) for n in range(60)]
    await store.record(items[:30])
    await asyncio.gather(*(store.record([it]) for it in items[30:]))
    before = await snapshot(store, [*users, "nobody"])
    assert before["counts"]["interaction"] == 60

    rc, out = await launcher("stop")
    assert rc == 0, out
    try:
        # While the server is down: a clear error, nothing acknowledged.
        with pytest.raises(StoreUnavailableError, match="unavailable"):
            await store.record([make(99, "user-0", "s0", 99)])
        with pytest.raises(StoreUnavailableError):
            await store.neighbourhood("user-0")
    finally:
        rc, out = await launcher("start")
        assert rc == 0, out

    try:
        # The same store (its driver reconnects) and a fresh one read everything back.
        assert await snapshot(store, [*users, "nobody"]) == before
    finally:
        await store.close()
    fresh = Neo4jGraphStore(clean_neo4j.uri, credentials=clean_neo4j.credentials, embedding_dim=DIM)
    await fresh.open()
    try:
        assert await snapshot(fresh, [*users, "nobody"]) == before
        assert (await fresh.record([items[0]]))[0].duplicate
        assert not (await fresh.record([make(99, "user-0", "s0", 99)]))[0].duplicate
        assert await fresh.user_version("user-0") == before["user-0"][0] + 1
    finally:
        await fresh.close()

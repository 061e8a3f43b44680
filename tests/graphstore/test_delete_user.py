"""``GraphStore.delete_user`` contract, for SQLite (memory and file) and Neo4j.

After the deletion nothing of the user remains: counts, neighbourhood, version, idempotency
keys, pair-count contributions; other users are untouched. Backend checks look at the raw
SQLite tables and run Cypher for any node carrying the user id.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from neo4j import GraphDatabase

from graphstore.interactions import Comparison, PairCount, pair_deltas
from graphstore.neo4j_store import Neo4jGraphStore
from graphstore.sqlite_store import SQLiteGraphStore
from graphstore.store import GraphStore
from tests.graphstore.test_store_contract import DIM, make

if TYPE_CHECKING:
    from tests.neo4j_fixtures import Neo4jTarget

STORES = [
    pytest.param("sqlite-memory", id="sqlite-memory"),
    pytest.param("sqlite-file", id="sqlite-file"),
    pytest.param("neo4j", id="neo4j", marks=pytest.mark.neo4j),
]


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[GraphStore]:
    kind = request.param
    s: GraphStore
    if kind == "sqlite-memory":
        s = SQLiteGraphStore(":memory:", embedding_dim=DIM)
    elif kind == "sqlite-file":
        s = SQLiteGraphStore(tmp_path / "graph.db", embedding_dim=DIM)
    else:
        target: Neo4jTarget = request.getfixturevalue("clean_neo4j")
        s = Neo4jGraphStore(target.uri, credentials=target.credentials, embedding_dim=DIM)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def _history() -> list:
    """Two users sharing models; the victim has ratings, comparisons (one a tie), sessions."""
    return [
        make(1, user="victim", session="s1", turn=0, model="m-a", rating=1.0),
        make(2, user="victim", session="s1", turn=1, comparison=Comparison("m-a", "m-b")),
        make(3, user="victim", session="s2", turn=0, comparison=Comparison("m-b", "m-c", tie=True)),
        make(4, user="victim", session="s2", turn=1, comparison=Comparison("m-a", "m-b")),
        make(5, user="other", session="o1", turn=0, comparison=Comparison("m-b", "m-a")),
        make(6, user="other", session="o1", turn=1, model="m-c", rating=0.25),
    ]


def test_pair_deltas() -> None:
    got = pair_deltas(
        [("m-a", "m-b", False), ("m-b", "m-a", False), ("m-c", "m-b", True), ("x", "x", False)]
    )
    assert got == [PairCount("m-a", "m-b", 1.0, 1.0), PairCount("m-b", "m-c", 0.5, 0.5)]


async def test_delete_user_removes_everything(store: GraphStore) -> None:
    await store.record(_history())
    before = await store.counts()
    assert before["user"] == 2 and before["interaction"] == 6
    assert await store.user_version("victim") == 4

    assert await store.delete_user("victim") == 4

    assert await store.user_version("victim") == 0
    hood = await store.neighbourhood("victim", hops=4)
    assert hood.num_turns == 0
    counts = await store.counts()
    # The other user's 2 interactions (3 turns: one comparison, one rating) remain.
    assert counts == {
        "user": 1,
        "llm": 3,  # LLM nodes are shared and stay
        "query": 2,
        "interaction": 2,
        "turn": 3,
        "response": 3,
    }
    # Only the other user's comparison remains in the Bradley–Terry counts; the tie pair
    # (m-b, m-c) that only the victim played is gone.
    assert await store.pair_counts() == [PairCount("m-a", "m-b", 0.0, 1.0)]
    # The other user's neighbourhood no longer reaches the victim's turns.
    other = await store.neighbourhood("other", hops=4)
    assert "victim" not in other.user_ids
    assert all(not tid.startswith(("i0001", "i0002", "i0003", "i0004")) for tid in other.turn_ids)


async def test_delete_user_frees_idempotency_keys(store: GraphStore) -> None:
    await store.record(_history())
    await store.delete_user("victim")
    again = await store.record([make(2, user="victim", comparison=Comparison("m-a", "m-b"))])
    assert [r.duplicate for r in again] == [False]
    assert await store.user_version("victim") == 1
    # the re-recorded comparison counts once again, on top of the other user's
    assert await store.pair_counts() == [PairCount("m-a", "m-b", 1.0, 1.0)]


async def test_delete_unknown_user_is_a_no_op(store: GraphStore) -> None:
    await store.record(_history())
    before = (await store.counts(), await store.pair_counts())
    assert await store.delete_user("nobody") == 0
    assert await store.delete_user("victim") == 4
    assert await store.delete_user("victim") == 0
    assert (await store.counts())["user"] == 1
    assert before[0]["user"] == 2


async def test_delete_user_sqlite_rows_gone(tmp_path: Path) -> None:
    path = tmp_path / "graph.db"
    s = SQLiteGraphStore(path, embedding_dim=DIM)
    await s.open()
    try:
        await s.record(_history())
        await s.delete_user("victim")
    finally:
        await s.close()
    with sqlite3.connect(path) as conn:
        for table, col in (
            ("users", "user_id"),
            ("interactions", "user_id"),
            ("turns", "user_id"),
        ):
            n = conn.execute(f"SELECT COUNT(*) FROM {table} WHERE {col} = 'victim'").fetchone()[0]
            assert n == 0, table
        keys = {r[0] for r in conn.execute("SELECT idempotency_key FROM interactions")}
        assert keys == {"k0005", "k0006"}
        orphans = conn.execute(
            "SELECT COUNT(*) FROM turns WHERE interaction_id NOT IN "
            "(SELECT interaction_id FROM interactions)"
        ).fetchone()[0]
        assert orphans == 0


def victim_nodes_in_neo4j(target: Neo4jTarget, user_id: str) -> dict[str, int]:
    """Nodes that still name ``user_id`` (by property or by edge to its queries), per label."""
    with GraphDatabase.driver(target.uri, auth=target.auth()) as driver:
        records, _, _ = driver.execute_query(
            """
            MATCH (n)
            WHERE (n:User OR n:Query OR n:Turn) AND n.user_id = $user_id
            RETURN labels(n)[0] AS label, count(*) AS n
            UNION ALL
            MATCH (r:Response)
            WHERE NOT EXISTS { (:Query)-[:RECEIVED]->(r) }
               OR EXISTS { (q:Query {user_id: $user_id})-[:RECEIVED]->(r) }
            RETURN 'Response' AS label, count(*) AS n
            """,
            user_id=user_id,
            database_=target.credentials.database,
        )
    return {r["label"]: r["n"] for r in records if r["n"]}


@pytest.mark.neo4j
async def test_delete_user_neo4j_leaves_no_node(clean_neo4j: Neo4jTarget) -> None:
    s = Neo4jGraphStore(clean_neo4j.uri, credentials=clean_neo4j.credentials, embedding_dim=DIM)
    await s.open()
    try:
        await s.record(_history())
        assert victim_nodes_in_neo4j(clean_neo4j, "victim")["Query"] == 4
        assert await s.delete_user("victim") == 4
    finally:
        await s.close()
    assert victim_nodes_in_neo4j(clean_neo4j, "victim") == {}
    with GraphDatabase.driver(clean_neo4j.uri, auth=clean_neo4j.auth()) as driver:
        records, _, _ = driver.execute_query(
            "MATCH (p:PairCount) RETURN p.model_a AS a, p.model_b AS b ORDER BY a, b",
            database_=clean_neo4j.credentials.database,
        )
    assert [(r["a"], r["b"]) for r in records] == [("m-a", "m-b")]

"""The Neo4j store's ``FOLLOWS`` edges against the rule of ``link_previous_turns``.

A write links the turns it appends to a session (every new ``turn_index`` greater than the
stored ones) from the session's last turns only, and re-links the whole session otherwise (a
turn recorded late) or when another writer added to the session between its read and its
write. These tests record turns in orders that take each path and compare the stored edges
with the previous turns the SQLite store gives for the same interactions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from typing import TYPE_CHECKING, Any

import pytest
from neo4j import GraphDatabase

import graphstore.neo4j_store as neo4j_store
from graphstore.interactions import Comparison, Interaction
from graphstore.sqlite_store import SQLiteGraphStore
from tests.graphstore.test_store_contract import DIM, make, open_neo4j, turn_table

if TYPE_CHECKING:
    from tests.neo4j_fixtures import Neo4jTarget

pytestmark = pytest.mark.neo4j

MODELS = ("m-a", "m-b", "m-c")


def stored_follows(target: Neo4jTarget) -> dict[str, str]:
    """turn_id → previous turn_id, as the FOLLOWS edges in the database say."""
    with GraphDatabase.driver(target.uri, auth=target.auth()) as driver:
        records = driver.execute_query(
            "MATCH (t:Turn)-[:FOLLOWS]->(p:Turn) RETURN t.turn_id AS t, p.turn_id AS p",
            database_=target.credentials.database or "neo4j",
        ).records
    out: dict[str, str] = {}
    for r in records:
        assert r["t"] not in out, f"{r['t']} has two FOLLOWS edges"
        out[r["t"]] = r["p"]
    return out


async def expected_follows(items: list[Interaction]) -> dict[str, str]:
    """turn_id → previous turn_id by the shared rule (via the SQLite store's sampler)."""
    ref = SQLiteGraphStore(":memory:", embedding_dim=DIM)
    await ref.open()
    try:
        await ref.record(items)
        out: dict[str, str] = {}
        for user in sorted({it.user_id for it in items}):
            n = await ref.neighbourhood(user, hops=2, fan_out=(100_000, 8, 0))
            out.update({tid: row[4] for tid, row in turn_table(n).items() if row[4] is not None})
        return out
    finally:
        await ref.close()


def random_items(seed: int, n: int) -> list[Interaction]:
    """Interactions of 2 users in 3 sessions each; turn indexes repeat, come late and tie."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        a, b = rng.sample(MODELS, 2)
        kind = rng.random()
        items.append(
            make(
                1000 * seed + i,
                user=f"u{rng.randrange(2)}",
                session=f"s{rng.randrange(3)}",
                turn=rng.randrange(6),
                model=a,
                ts=float(rng.randrange(5)),  # equal times: the turn id breaks ties
                comparison=Comparison(a, b, tie=kind < 0.1) if kind < 0.6 else None,
                rating=rng.random() if 0.6 <= kind < 0.8 else None,
            )
        )
    return items


async def test_appended_turns_link_to_the_session_tail(clean_neo4j: Neo4jTarget) -> None:
    s = open_neo4j(clean_neo4j)
    await s.open()
    try:
        items = [
            make(1, turn=0, comparison=Comparison("m-a", "m-b")),
            make(2, turn=1, model="m-b"),
            make(3, turn=2, comparison=Comparison("m-a", "m-c")),
            make(4, turn=2, model="m-c", ts=2.5),  # a second turn at index 2
            make(5, turn=4, model="m-a"),  # index 3 never comes
        ]
        for it in items:
            await s.record([it])
        # Two appended turns of one session in one write.
        more = [make(6, turn=5, model="m-b"), make(7, turn=6, model="m-a")]
        await s.record(more)
        items += more
        assert stored_follows(clean_neo4j) == await expected_follows(items)
        assert stored_follows(clean_neo4j)["i0003:m-c"] == "i0002:m-b"
    finally:
        await s.close()


async def test_late_turns_relink_the_session(clean_neo4j: Neo4jTarget) -> None:
    s = open_neo4j(clean_neo4j)
    await s.open()
    try:
        items = [make(3, turn=3, model="m-a"), make(1, turn=1, model="m-a")]
        for it in items:
            await s.record([it])
        assert stored_follows(clean_neo4j) == {"i0003:m-a": "i0001:m-a"}
        assert s.relinked_sessions == 1  # turn 1 came after turn 3: in the one statement
        # Turn 2 comes late: turn 3 now follows it.
        late = [make(2, turn=2, comparison=Comparison("m-b", "m-a"))]
        await s.record(late)
        items += late
        assert s.relinked_sessions == 2
        assert stored_follows(clean_neo4j) == await expected_follows(items)
        assert stored_follows(clean_neo4j)["i0003:m-a"] == "i0002:m-a"
        # A late turn and an appended one of the same session in one write.
        mixed = [make(0, turn=0, model="m-b"), make(4, turn=7, model="m-c")]
        await s.record(mixed)
        items += mixed
        assert stored_follows(clean_neo4j) == await expected_follows(items)
    finally:
        await s.close()


async def test_a_turn_written_between_read_and_write_is_relinked(
    clean_neo4j: Neo4jTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tail read under the user's lock differs from the first read: re-link."""
    s = open_neo4j(clean_neo4j)
    await s.open()
    try:
        await s.record([make(1, turn=0, model="m-a"), make(2, turn=1, model="m-a")])
        real = neo4j_store._tails
        calls: list[int] = []

        def stale_first_read(records: list[dict[str, Any]]) -> Any:
            calls.append(len(records))
            # The first read "saw" the session before turns 0 and 1 were written.
            return {} if len(calls) == 1 else real(records)

        monkeypatch.setattr(neo4j_store, "_tails", stale_first_read)
        # Two turn indexes of one session in one write: the two-statement path.
        await s.record([make(3, turn=2, model="m-a"), make(4, turn=3, model="m-a")])
        assert len(calls) == 2
        items = [make(1, turn=0), make(2, turn=1), make(3, turn=2), make(4, turn=3)]
        assert stored_follows(clean_neo4j) == await expected_follows(items)
        assert stored_follows(clean_neo4j)["i0003:m-a"] == "i0002:m-a"
    finally:
        await s.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_orders_and_concurrent_writers(clean_neo4j: Neo4jTarget, seed: int) -> None:
    """Two stores (two replicas) write shuffled turns at once, in groups of random sizes."""
    a, b = open_neo4j(clean_neo4j), open_neo4j(clean_neo4j)
    await a.open()
    await b.open()
    try:
        items = random_items(seed, 60)
        rng = random.Random(seed)
        calls = []
        i = 0
        while i < len(items):
            k = rng.randint(1, 4)
            calls.append(items[i : i + k])
            i += k
        for lo in range(0, len(calls), 6):
            await asyncio.gather(
                *((a if j % 2 else b).record(c) for j, c in enumerate(calls[lo : lo + 6]))
            )
        assert (await a.counts())["interaction"] == len(items)
        assert stored_follows(clean_neo4j) == await expected_follows(items)
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize("seed", [4, 5])
async def test_random_orders_one_record_at_a_time(clean_neo4j: Neo4jTarget, seed: int) -> None:
    """Every call is a group of one: the one-statement write, whose re-link of sessions with
    a late turn must give the FOLLOWS edges the whole-session rule gives."""
    s = open_neo4j(clean_neo4j)
    await s.open()
    try:
        items = random_items(seed, 40)
        for it in items:
            await s.record([it])
        assert s.one_statement_fallbacks == 0
        assert s.relinked_sessions > 0
        assert stored_follows(clean_neo4j) == await expected_follows(items)
    finally:
        await s.close()


def test_which_groups_take_the_one_statement_write() -> None:
    """One statement only without duplicates in the group and with one index per session."""
    assert neo4j_store._appends_only([make(1, turn=0), make(2, session="s2", turn=5)])
    assert neo4j_store._appends_only([make(1, turn=3), make(2, turn=3)])  # same index
    assert neo4j_store._appends_only([make(1, session="", turn=0), make(2, session="", turn=1)])
    assert not neo4j_store._appends_only([make(1, turn=0), make(2, turn=1)])
    assert not neo4j_store._appends_only([make(1, key="k"), make(2, key="k", session="s2")])
    assert not neo4j_store._appends_only([make(1), make(1, session="s2")])  # the same id


async def test_one_statement_write_and_its_fallback(
    clean_neo4j: Neo4jTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Appends take the one statement; a stored key makes it fail on the uniqueness
    constraint and the group is written again with the duplicate check, in full."""
    calls: list[str] = []
    real_tx = neo4j_store.Neo4jGraphStore._write_tx
    real_appends = neo4j_store.Neo4jGraphStore._write_appends

    def spy_tx(tx: Any, batches: Any) -> Any:
        calls.append("_write_tx")
        return real_tx(tx, batches)

    def spy_appends(self: Any, batches: Any, watch: Any) -> Any:
        calls.append("_write_appends")
        return real_appends(self, batches, watch)

    monkeypatch.setattr(neo4j_store.Neo4jGraphStore, "_write_tx", staticmethod(spy_tx))
    monkeypatch.setattr(neo4j_store.Neo4jGraphStore, "_write_appends", spy_appends)
    s = open_neo4j(clean_neo4j)
    await s.open()
    try:
        assert s.unique_ids_enforced
        first = [make(1, turn=0, comparison=Comparison("m-a", "m-b")), make(2, session="s3")]
        for it in first:
            await s.record([it])
        assert calls == ["_write_appends", "_write_appends"]
        calls.clear()
        retried = dataclasses.replace(first[1], interaction_id="i0009")  # a retry of record 2
        res = await s.record([make(3, turn=2, model="m-b"), retried, make(4, session="s2")])
        assert calls == ["_write_appends", "_write_tx"]
        assert [(r.interaction_id, r.duplicate) for r in res] == [
            ("i0003", False),
            ("i0002", True),
            ("i0004", False),
        ]
        assert (await s.counts())["interaction"] == 4
        assert s.one_statement_fallbacks == 1
        items = [*first, make(3, turn=2, model="m-b"), make(4, session="s2")]
        assert stored_follows(clean_neo4j) == await expected_follows(items)
    finally:
        await s.close()


async def test_without_a_unique_constraint_every_write_checks_duplicates(
    clean_neo4j: Neo4jTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database where the key's uniqueness constraint could not be created (say, an index
    on the same property was there first): no one-statement write, duplicates still caught."""
    db = clean_neo4j.credentials.database or "neo4j"
    with GraphDatabase.driver(clean_neo4j.uri, auth=clean_neo4j.auth()) as driver:
        driver.execute_query("DROP CONSTRAINT query_idempotency_key IF EXISTS", database_=db)
    monkeypatch.setattr(
        neo4j_store,
        "SCHEMA",
        tuple(x for x in neo4j_store.SCHEMA if "query_idempotency_key" not in x),
    )
    s = open_neo4j(clean_neo4j)
    await s.open()
    try:
        assert not s.unique_ids_enforced
        await s.record([make(1)])
        retried = dataclasses.replace(make(1), interaction_id="i0002")  # a retry of record 1
        [res] = await s.record([retried])
        assert (res.interaction_id, res.duplicate) == ("i0001", True)
        assert (await s.counts())["interaction"] == 1
    finally:
        await s.close()
        monkeypatch.undo()
        again = open_neo4j(clean_neo4j)
        await again.open()  # creates the constraint again
        try:
            assert again.unique_ids_enforced
        finally:
            await again.close()

"""One contract suite for every ``GraphStore``: SQLite (in memory and on a file) and Neo4j.

The Neo4j cases need a server (``tests/neo4j_fixtures.py``); without one they skip (and
fail under ``CI=true``). A cross-store test records the same interactions into SQLite and
Neo4j and checks that both sample the same neighbourhoods; a few Neo4j-only checks follow
(schema, ``FOLLOWS`` edges, codec, errors).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from neo4j import GraphDatabase

from graphstore.errors import (
    IdempotencyConflictError,
    InvalidInteractionError,
    StoreUnavailableError,
)
from graphstore.factory import Neo4jCredentials
from graphstore.interactions import (
    Comparison,
    Interaction,
    PairCount,
    RecordResult,
    UserComparison,
    query_key,
)
from graphstore.neighbourhood import Neighbourhood
from graphstore.neo4j_store import Neo4jGraphStore, rust_codec_active
from graphstore.sqlite_store import SQLiteGraphStore
from graphstore.store import GraphStore

if TYPE_CHECKING:
    from tests.neo4j_fixtures import Neo4jTarget

DIM = 8

STORES = [
    pytest.param("sqlite-memory", id="sqlite-memory"),
    pytest.param("sqlite-file", id="sqlite-file"),
    pytest.param("neo4j", id="neo4j", marks=pytest.mark.neo4j),
]


def make(
    n: int,
    user: str = "u1",
    session: str = "s1",
    turn: int = 0,
    model: str = "m-a",
    ts: float | None = None,
    *,
    key: str | None = None,
    iid: str | None = None,
    rating: float | None = None,
    comparison: Comparison | None = None,
) -> Interaction:
    """Interaction number ``n``: id ``i<n>``, key ``k<n>``, embedding filled from ``n``."""
    emb = (np.arange(DIM, dtype=np.float32) + n * 10.0).astype(np.float32)
    return Interaction(
        interaction_id=iid or f"i{n:04d}",
        user_id=user,
        session_id=session,
        turn_index=turn,
        query=f"query {n}",
        query_embedding=emb,
        model=model,
        response=f"response {n}",
        timestamp_s=float(n) if ts is None else ts,
        idempotency_key=f"k{n:04d}" if key is None else key,
        rating=rating,
        comparison=comparison,
    )


def open_neo4j(target: Neo4jTarget) -> Neo4jGraphStore:
    return Neo4jGraphStore(target.uri, credentials=target.credentials, embedding_dim=DIM)


@pytest.fixture(params=STORES)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[GraphStore]:
    kind = request.param
    s: GraphStore
    if kind == "sqlite-memory":
        s = SQLiteGraphStore(":memory:", embedding_dim=DIM)
    elif kind == "sqlite-file":
        s = SQLiteGraphStore(tmp_path / "graph.db", embedding_dim=DIM)
    else:
        s = open_neo4j(request.getfixturevalue("clean_neo4j"))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def turn_table(n: Neighbourhood) -> dict[str, tuple[str, str, str, float, str | None]]:
    """turn_id → (user, query id, llm, outcome, previous turn id)."""
    return {
        tid: (
            n.user_ids[int(n.turn_user[i])],
            n.query_ids[int(n.turn_query[i])],
            n.llm_names[int(n.turn_llm[i])],
            float(n.turn_outcome[i]),
            n.turn_ids[int(n.turn_prev[i])] if n.turn_prev[i] >= 0 else None,
        )
        for i, tid in enumerate(n.turn_ids)
    }


def check_shapes(n: Neighbourhood) -> None:
    t = n.num_turns
    assert n.query_embedding.dtype == np.float32
    assert n.query_embedding.shape == (len(n.query_ids), DIM)
    for arr in (n.turn_user, n.turn_query, n.turn_llm, n.turn_prev, n.turn_index):
        assert arr.dtype == np.int64 and arr.shape == (t,)
    assert n.turn_outcome.dtype == np.float32 and n.turn_time_s.dtype == np.float64
    assert len(n.turn_session) == t and len(set(n.turn_ids)) == t


# -- writes, idempotency, counts ------------------------------------------------------------


async def test_empty_store(store: GraphStore) -> None:
    assert await store.counts() == dict.fromkeys(
        ("user", "llm", "query", "response", "turn", "interaction"), 0
    )
    assert await store.list_models() == []
    assert await store.pair_counts() == []
    assert await store.record([]) == []


async def test_record_counts_and_models(store: GraphStore) -> None:
    res = await store.record(
        [
            make(1, model="m-a", comparison=Comparison("m-a", "m-b")),
            make(2, user="u2", model="m-c", rating=0.25),
            make(3, model="m-d"),  # no feedback
            make(4, model="m-z", comparison=Comparison("m-a", "m-c", tie=True)),
        ]
    )
    assert [(r.interaction_id, r.duplicate) for r in res] == [
        ("i0001", False),
        ("i0002", False),
        ("i0003", False),
        ("i0004", False),
    ]
    assert await store.counts() == {
        "user": 2,
        "llm": 5,  # m-z served the comparison's text without an outcome; it is still an LLM
        "query": 4,
        "response": 6,
        "turn": 6,
        "interaction": 4,
    }
    assert await store.list_models() == ["m-a", "m-b", "m-c", "m-d", "m-z"]


def retry(it: Interaction, **changes: object) -> Interaction:
    """A client retry of ``it``: the same content, with ``changes`` to what a retry may
    change (a fresh server-made id, the server's clock, …)."""
    return dataclasses.replace(it, **changes)  # type: ignore[arg-type]


async def test_duplicate_idempotency_key_writes_nothing(store: GraphStore) -> None:
    original = make(1, comparison=Comparison("m-a", "m-b"))
    [first] = await store.record([original])
    assert not first.duplicate
    before = (await store.counts(), await store.user_version("u1"), await store.pair_counts())
    # Same key, another interaction id and timestamp (a retry without a timestamp of its
    # own: the server's clock, and a fresh server id).
    [again] = await store.record([retry(original, interaction_id="i0002", timestamp_s=99.0)])
    assert again.duplicate and again.interaction_id == "i0001"
    # Same interaction id, another key.
    [same_id] = await store.record([retry(original, idempotency_key="other")])
    assert same_id.duplicate and same_id.interaction_id == "i0001"
    # Same interaction id, no key.
    [no_key] = await store.record([retry(original, idempotency_key="")])
    assert no_key.duplicate and no_key.interaction_id == "i0001"
    after = (await store.counts(), await store.user_version("u1"), await store.pair_counts())
    assert after == before


async def test_duplicates_inside_one_batch(store: GraphStore) -> None:
    one = make(1)
    res = await store.record(
        [one, retry(one, interaction_id="i0002"), retry(one, idempotency_key="x")]
    )
    assert [(r.interaction_id, r.duplicate) for r in res] == [
        ("i0001", False),
        ("i0001", True),
        ("i0001", True),
    ]
    assert (await store.counts())["interaction"] == 1


async def test_empty_idempotency_key_is_not_a_key(store: GraphStore) -> None:
    res = await store.record([make(1, key=""), make(2, key="")])
    assert [r.duplicate for r in res] == [False, False]
    assert (await store.counts())["interaction"] == 2


async def test_invalid_embedding_is_rejected_and_nothing_written(store: GraphStore) -> None:
    bad = dataclasses.replace(make(2), query_embedding=np.zeros(DIM + 1, np.float32))
    with pytest.raises(InvalidInteractionError):
        await store.record([make(1), bad])
    wrong_dtype = dataclasses.replace(make(3), query_embedding=np.zeros(DIM, np.float64))
    with pytest.raises(InvalidInteractionError):
        await store.record([wrong_dtype])
    assert (await store.counts())["interaction"] == 0


async def test_user_version_counts_writes(store: GraphStore) -> None:
    assert await store.user_version("u1") == 0
    await store.record([make(1)])
    assert await store.user_version("u1") == 1
    await store.record([make(2), make(3, user="u2"), make(4)])
    assert await store.user_version("u1") == 3
    assert await store.user_version("u2") == 1
    await store.record([make(2)])  # duplicate: no write
    assert await store.user_version("u1") == 3
    n = await store.neighbourhood("u1")
    assert n.version == 3


async def test_outcomes_of_comparison_rating_tie_and_no_feedback(store: GraphStore) -> None:
    await store.record(
        [
            make(1, comparison=Comparison("m-a", "m-b")),
            make(2, comparison=Comparison("m-b", "m-c", tie=True)),
            make(3, model="m-c", rating=0.75),
            make(4, model="m-d"),
        ]
    )
    n = await store.neighbourhood("u1")
    check_shapes(n)
    outcome = {tid: row[3] for tid, row in turn_table(n).items()}
    assert outcome == {
        "i0001:m-a": 1.0,
        "i0001:m-b": 0.0,
        "i0002:m-b": 0.5,
        "i0002:m-c": 0.5,
        "i0003:m-c": 0.75,
        "i0004:m-d": 0.5,
    }


async def test_pair_counts_aggregate_with_ties_as_half(store: GraphStore) -> None:
    await store.record(
        [
            make(1, comparison=Comparison("m-b", "m-a")),
            make(2, comparison=Comparison("m-a", "m-b")),
            make(3, comparison=Comparison("m-b", "m-a")),
            make(4, comparison=Comparison("m-a", "m-b", tie=True)),
            make(5, user="u2", comparison=Comparison("m-c", "m-a")),
        ]
    )
    await store.record([make(6, comparison=Comparison("m-c", "m-a", tie=True)), make(7)])
    assert await store.pair_counts() == [
        PairCount("m-a", "m-b", 1.5, 2.5),
        PairCount("m-a", "m-c", 0.5, 1.5),
    ]


async def test_query_pair_counts_across_users_newest_first(store: GraphStore) -> None:
    q1, q2 = query_key("What is 2+2?"), query_key("Write a poem")
    assert q1 == query_key("  What is\n2+2? ") and q1 != q2 and q1.startswith("sha256:")
    assert query_key(" \t") == ""

    def on(n: int, key: str, user: str, winner: str, loser: str, tie: bool = False) -> Interaction:
        it = make(n, user=user, session=f"s{n}", comparison=Comparison(winner, loser, tie))
        return dataclasses.replace(it, query_key=key)

    await store.record(
        [
            on(1, q1, "u1", "m-b", "m-a"),
            on(2, q1, "u2", "m-b", "m-a"),
            on(3, q1, "u3", "m-a", "m-c", tie=True),
            on(4, q2, "u1", "m-a", "m-b"),
            make(5, comparison=Comparison("m-b", "m-a")),  # no key: never evidence
            dataclasses.replace(make(6), query_key=q1),  # no comparison: not counted
        ]
    )
    assert await store.query_pair_counts(q1, 10) == [
        PairCount("m-a", "m-b", 0.0, 2.0),
        PairCount("m-a", "m-c", 0.5, 0.5),
    ]
    assert await store.query_pair_counts(q2, 10) == [PairCount("m-a", "m-b", 1.0, 0.0)]
    # the newest two comparisons of q1 (timestamps 3 and 2)
    assert await store.query_pair_counts(q1, 2) == [
        PairCount("m-a", "m-b", 0.0, 1.0),
        PairCount("m-a", "m-c", 0.5, 0.5),
    ]
    assert await store.query_pair_counts("", 10) == []
    assert await store.query_pair_counts(query_key("never asked"), 10) == []
    with pytest.raises(ValueError, match="limit"):
        await store.query_pair_counts(q1, 0)
    await store.delete_user("u2")
    assert await store.query_pair_counts(q1, 10) == [
        PairCount("m-a", "m-b", 0.0, 1.0),
        PairCount("m-a", "m-c", 0.5, 0.5),
    ]


async def test_user_comparisons_newest_first_with_query_keys(store: GraphStore) -> None:
    q1, q2 = query_key("What is 2+2?"), query_key("Write a poem")

    def on(n: int, key: str, user: str, winner: str, loser: str, tie: bool = False) -> Interaction:
        it = make(n, user=user, session=f"s{n}", comparison=Comparison(winner, loser, tie))
        return dataclasses.replace(it, query_key=key)

    await store.record(
        [
            on(1, q1, "u1", "m-b", "m-a"),
            on(2, q1, "u2", "m-b", "m-a"),  # another user's
            on(3, q2, "u1", "m-a", "m-c", tie=True),
            make(4),  # u1 without a comparison: not one
            on(5, "", "u1", "m-c", "m-b"),  # recorded without a key
        ]
    )
    assert await store.user_comparisons("u1", 10) == [
        UserComparison("m-c", "m-b", False, ""),
        UserComparison("m-a", "m-c", True, q2),
        UserComparison("m-b", "m-a", False, q1),
    ]
    assert await store.user_comparisons("u1", 2) == [
        UserComparison("m-c", "m-b", False, ""),
        UserComparison("m-a", "m-c", True, q2),
    ]
    assert await store.user_comparisons("u2", 10) == [UserComparison("m-b", "m-a", False, q1)]
    assert await store.user_comparisons("nobody", 10) == []
    with pytest.raises(ValueError, match="limit"):
        await store.user_comparisons("u1", 0)
    await store.delete_user("u1")
    assert await store.user_comparisons("u1", 10) == []
    assert await store.user_comparisons("u2", 10) == [UserComparison("m-b", "m-a", False, q1)]


async def test_concurrent_records_are_all_acknowledged_and_stored(store: GraphStore) -> None:
    calls = [store.record([make(i, user=f"u{i % 7}")]) for i in range(200)]
    results = await asyncio.gather(*calls)
    assert [r[0].interaction_id for r in results] == [make(i).interaction_id for i in range(200)]
    assert not any(r[0].duplicate for r in results)
    counts = await store.counts()
    assert counts["interaction"] == 200 and counts["user"] == 7
    assert sum([await store.user_version(f"u{u}") for u in range(7)]) == 200


async def test_concurrent_duplicates_store_one(store: GraphStore) -> None:
    original = make(100, key="same-key")
    calls = [store.record([retry(original, interaction_id=f"i{100 + i:04d}")]) for i in range(20)]
    results = [r[0] for r in await asyncio.gather(*calls)]
    assert sum(not r.duplicate for r in results) == 1
    assert {r.interaction_id for r in results} == {"i0100"}
    assert (await store.counts())["interaction"] == 1


# -- idempotency conflicts: a stored key or id is a duplicate only for a faithful retry -------


async def visible_state(store: GraphStore, users: list[str]) -> tuple[object, ...]:
    """What a write could change: counts, pair counts, the users' versions and their turns."""
    return (
        await store.counts(),
        await store.pair_counts(),
        [await store.user_version(u) for u in users],
        [(await store.neighbourhood(u, hops=4)).turn_ids for u in users],
    )


async def test_a_key_reused_by_another_user_is_refused_and_reveals_nothing(
    store: GraphStore,
) -> None:
    alice = make(1, user="alice", comparison=Comparison("m-a", "m-b"), key="shared-key")
    await store.record([alice])
    before = await visible_state(store, ["alice", "bob"])
    refused = [
        # the very same content under alice's key and user name aside: still not bob's key
        retry(alice, user_id="bob", interaction_id="i0002"),
        make(3, user="bob", model="m-c", rating=1.0, key="shared-key"),
    ]
    for bob in refused:
        with pytest.raises(IdempotencyConflictError) as err:
            await store.record([bob])
        msg = str(err.value)
        assert err.value.field == "idempotency_key"
        assert msg.startswith(
            "idempotency_key: 'shared-key' was already used for a different interaction"
        ), msg
        assert "nothing of this request is stored" in msg.lower()
        for secret in ("i0001", "alice", "m-a", "m-b", "query 1", "response 1"):
            assert secret not in msg, (secret, msg)
    assert await visible_state(store, ["alice", "bob"]) == before
    assert (await store.neighbourhood("bob")).num_turns == 0


async def test_an_interaction_id_reused_by_another_user_is_refused(store: GraphStore) -> None:
    await store.record([make(1, user="alice")])
    before = await visible_state(store, ["alice", "bob"])
    with pytest.raises(IdempotencyConflictError) as err:
        await store.record([make(2, user="bob", iid="i0001")])
    msg = str(err.value)
    assert err.value.field == "interaction_id"
    assert msg.startswith("interaction_id: 'i0001' was already used for a different interaction")
    assert "alice" not in msg and "k0001" not in msg
    assert await visible_state(store, ["alice", "bob"]) == before


def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


async def test_a_key_or_id_reused_with_other_content_is_refused(store: GraphStore) -> None:
    """Each field of the content counts; the timestamp, a fresh id, the key (on an id hit)
    and the embedding of a query with text do not; a text counts by its SHA-256."""
    compared = make(1, comparison=Comparison("m-a", "m-b"))
    rated = make(2, session="s2", rating=0.75)
    textless = dataclasses.replace(make(3, session="s3"), query="")
    await store.record([compared, rated, textless])
    before = await visible_state(store, ["u1"])
    other_content: list[tuple[str, Interaction, dict[str, object]]] = [
        ("verdict reversed", compared, {"comparison": Comparison("m-b", "m-a")}),
        ("a tie", compared, {"comparison": Comparison("m-a", "m-b", tie=True)}),
        ("a rating instead", compared, {"comparison": None, "rating": 1.0}),
        ("no feedback", compared, {"comparison": None}),
        ("another query", compared, {"query": "query 1, reworded"}),
        ("another response", compared, {"response": "another response"}),
        ("another model", compared, {"model": "m-z"}),
        ("another session", compared, {"session_id": "s9"}),
        ("another turn", compared, {"turn_index": 7}),
        ("another rating", rated, {"rating": 0.5}),
        ("a comparison instead", rated, {"rating": None, "comparison": Comparison("m-a", "m-b")}),
        ("another embedding, no text", textless, {"query_embedding": make(9).query_embedding}),
    ]
    for what, original, changes in other_content:
        with pytest.raises(IdempotencyConflictError, match=r"^idempotency_key: 'k000\d' was"):
            await store.record([retry(original, interaction_id="i0099", **changes)])
        with pytest.raises(IdempotencyConflictError, match=r"^interaction_id: 'i000\d' was"):
            await store.record([retry(original, idempotency_key="", **changes)])
        assert await visible_state(store, ["u1"]) == before, what
    retries = [
        retry(compared, interaction_id="i0097", timestamp_s=1e9),
        retry(compared, idempotency_key="", timestamp_s=2e9),
        retry(compared, interaction_id="i0098", query=_digest("query 1")),  # stored hashed
        retry(compared, interaction_id="i0098", response=_digest("response 1")),
        retry(compared, interaction_id="i0098", query_embedding=make(9).query_embedding),
        retry(rated, interaction_id="i0098", timestamp_s=0.5),
        retry(textless, interaction_id="i0098"),
    ]
    for again in retries:
        [res] = await store.record([again])
        assert res.duplicate, again
    assert await visible_state(store, ["u1"]) == before


async def test_a_conflict_refuses_only_its_own_call_of_a_group_commit(store: GraphStore) -> None:
    """Concurrent calls share a transaction: a refused call writes nothing and the others are
    written (on Neo4j, after the one-statement write of the group fails on the constraint)."""
    await store.record([make(1, user="alice")])
    results = await asyncio.gather(
        store.record([make(2, user="bob", session="b")]),
        store.record([make(3, user="bob", session="c", key="k0001")]),  # alice's key
        store.record([make(4, user="carol")]),
        # the second interaction of this call takes alice's id: the first is not written
        store.record(
            [make(5, user="bob", session="d"), make(6, user="bob", session="e", iid="i0001")]
        ),
        store.record([make(7, user="dave")]),
        return_exceptions=True,
    )
    assert results[0] == [RecordResult("i0002", duplicate=False)]
    assert isinstance(results[1], IdempotencyConflictError), results[1]
    assert results[1].field == "idempotency_key"
    assert results[2] == [RecordResult("i0004", duplicate=False)]
    assert isinstance(results[3], IdempotencyConflictError), results[3]
    assert results[3].field == "interaction_id"
    assert "(interaction 2 of 2 in this call)" in str(results[3])
    assert results[4] == [RecordResult("i0007", duplicate=False)]
    assert (await store.counts())["interaction"] == 4
    versions = [await store.user_version(u) for u in ("alice", "bob", "carol", "dave")]
    assert versions == [1, 1, 1, 1]
    assert (await store.neighbourhood("bob")).query_ids == ["i0002"]
    if isinstance(store, Neo4jGraphStore):
        assert store.one_statement_fallbacks == 1
        assert store.write_transactions == 2  # alice's, then the group's (one transaction)


async def test_a_new_key_twice_in_one_group_is_written_once_then_refused(
    store: GraphStore,
) -> None:
    first = make(1, user="dave", key="twice")
    results = await asyncio.gather(
        store.record([first]),
        store.record([make(2, user="dave", key="twice")]),  # other content
        store.record([retry(first, interaction_id="i0003")]),  # a retry of the first
        return_exceptions=True,
    )
    assert results[0] == [RecordResult("i0001", duplicate=False)]
    assert isinstance(results[1], IdempotencyConflictError), results[1]
    assert results[2] == [RecordResult("i0001", duplicate=True)]
    assert (await store.counts())["interaction"] == 1


async def forget_fingerprints(store: GraphStore) -> None:
    """Make the stored interactions look as if written before fingerprints existed."""
    if isinstance(store, SQLiteGraphStore):
        db = store._db()
        await store._run(lambda: db.execute("UPDATE interactions SET fingerprint = NULL"))
    else:
        assert isinstance(store, Neo4jGraphStore) and store._driver is not None
        await store._driver.execute_query(
            "MATCH (q:Query) REMOVE q.fingerprint", database_=store.database
        )


async def test_an_interaction_stored_without_a_fingerprint_is_retried_by_its_user(
    store: GraphStore,
) -> None:
    original = make(1, user="alice", comparison=Comparison("m-a", "m-b"))
    await store.record([original])
    await forget_fingerprints(store)
    [res] = await store.record(
        [retry(original, interaction_id="i0002", comparison=Comparison("m-b", "m-a"))]
    )
    assert res == RecordResult("i0001", duplicate=True)  # its content cannot be compared
    with pytest.raises(IdempotencyConflictError):
        await store.record([retry(original, user_id="bob", interaction_id="i0003")])
    with pytest.raises(IdempotencyConflictError):
        await store.record([retry(original, user_id="bob", idempotency_key="")])
    assert (await store.counts())["interaction"] == 1


# -- neighbourhood sampling -----------------------------------------------------------------


async def test_unknown_user_gives_empty_neighbourhood(store: GraphStore) -> None:
    await store.record([make(1, user="someone")])
    for hops in (1, 2, 3, 4):
        n = await store.neighbourhood("nobody", hops=hops)
        assert n.user_ids == ["nobody"] and n.num_turns == 0 and n.version == 0
        assert n.query_embedding.shape == (0, DIM) and n.llm_names == []
        check_shapes(n)


async def test_newest_first_and_user_fan_out_cap(store: GraphStore) -> None:
    order = list(range(1, 11))
    random.Random(0).shuffle(order)
    await store.record([make(i, session=f"s{i}", ts=100.0 + i) for i in order])
    # Two turns with the same timestamp: turn_id descending breaks the tie.
    await store.record([make(20, session="t", ts=200.0), make(21, session="t", ts=200.0)])
    n = await store.neighbourhood("u1", hops=2, fan_out=(5, 8, 16, 8))
    assert n.turn_ids == ["i0021:m-a", "i0020:m-a", "i0010:m-a", "i0009:m-a", "i0008:m-a"]
    assert list(n.turn_time_s) == [200.0, 200.0, 110.0, 109.0, 108.0]
    assert n.num_turns == 5 and (await store.neighbourhood("u1", fan_out=(0, 8, 16))).num_turns == 0
    everything = await store.neighbourhood("u1", hops=2, fan_out=(64, 8, 16, 8))
    assert everything.num_turns == 12 and everything.user_ids == ["u1"]


async def test_the_user_fan_out_cap_never_splits_a_comparison(store: GraphStore) -> None:
    """Three comparisons (two turns each) under a cap of 5 turns: the oldest comparison
    would keep one of its turns (a win without its loss); it is left out whole."""
    await store.record(
        [
            make(i, session=f"s{i}", ts=100.0 + i, comparison=Comparison("m-a", "m-b"))
            for i in (1, 2, 3)
        ]
    )
    n = await store.neighbourhood("u1", hops=2, fan_out=(5, 8, 16, 8))
    assert sorted(n.query_ids) == ["i0002", "i0003"] and n.num_turns == 4
    assert (await store.neighbourhood("u1", hops=2, fan_out=(6, 8, 16, 8))).num_turns == 6
    assert (await store.neighbourhood("u1", hops=2, fan_out=(1, 8, 16, 8))).num_turns == 0


async def test_embeddings_per_query(store: GraphStore) -> None:
    await store.record([make(1, comparison=Comparison("m-a", "m-b")), make(2), make(3)])
    n = await store.neighbourhood("u1")
    assert sorted(n.query_ids) == ["i0001", "i0002", "i0003"]
    for q, emb in zip(n.query_ids, n.query_embedding, strict=True):
        np.testing.assert_array_equal(emb, make(int(q[1:])).query_embedding)


OTHERS = [
    make(100 + 3 * i + k, user=f"u{2 + i % 2}", session=f"o{i}", model=m, ts=float(i // 2))
    for i in range(30)
    for k, m in enumerate(("m-a", "m-b", "m-c"))
    if (i + k) % 3
]


async def seed_other_users(store: GraphStore) -> None:
    """u1 uses m-a and m-b; u2 and u3 use m-a, m-b and m-c, many turns each (ts ties)."""
    await store.record(
        [
            make(1, user="u1", model="m-a", ts=1000.0),
            make(2, user="u1", session="s2", model="m-b", ts=1001.0),
            make(3, user="u1", session="s3", model="m-b", ts=1.0),
        ]
    )
    await store.record(OTHERS)


async def test_hops_one_and_two_are_the_users_turns(store: GraphStore) -> None:
    await seed_other_users(store)
    n1 = await store.neighbourhood("u1", hops=1)
    n2 = await store.neighbourhood("u1", hops=2)
    assert turn_table(n1) == turn_table(n2)
    assert set(n2.turn_ids) == {"i0001:m-a", "i0002:m-b", "i0003:m-b"}
    assert n2.user_ids == ["u1"]


def newest_other_turns(llm: str, cap: int) -> set[str]:
    ranked = sorted(
        ((it.timestamp_s, f"{it.interaction_id}:{llm}") for it in OTHERS if it.model == llm),
        reverse=True,
    )
    return {tid for _, tid in ranked[:cap]}


@pytest.mark.parametrize("cap", [0, 1, 4, 1000])
async def test_hops_three_and_four_add_other_users_turns_per_llm(
    store: GraphStore, cap: int
) -> None:
    await seed_other_users(store)
    n3 = await store.neighbourhood("u1", hops=3, fan_out=(64, 8, cap, 8))
    n4 = await store.neighbourhood("u1", hops=4, fan_out=(64, 8, cap, 8))
    check_shapes(n4)
    assert turn_table(n3) == turn_table(n4)
    table = turn_table(n4)
    own = {t for t, row in table.items() if row[0] == "u1"}
    assert own == {"i0001:m-a", "i0002:m-b", "i0003:m-b"}
    others = {t for t, row in table.items() if row[0] != "u1"}
    # m-c is not an LLM of u1; the newest `cap` other-user turns of m-a and of m-b.
    assert others == newest_other_turns("m-a", cap) | newest_other_turns("m-b", cap)
    if cap:
        assert n4.user_ids[0] == "u1" and set(n4.user_ids) == {"u1", "u2", "u3"}
    # The other users' turns come with their queries (embeddings) and users.
    assert set(n4.query_ids) == {row[1] for row in table.values()}
    for i, q in enumerate(n4.query_ids):
        n = int(q[1:])
        np.testing.assert_array_equal(n4.query_embedding[i], make(n).query_embedding)
    # Newest first within the seed's turns, then within each LLM's other turns.
    assert n4.turn_ids[:3] == ["i0002:m-b", "i0001:m-a", "i0003:m-b"]


async def test_turn_prev_chaining(store: GraphStore) -> None:
    await store.record(
        [
            make(1, session="s1", turn=0, comparison=Comparison("m-a", "m-b"), ts=10.0),
            make(3, session="s1", turn=2, model="m-a", rating=1.0, ts=12.0),
            make(4, session="s2", turn=1, model="m-a", ts=13.0),  # its turn 0 is missing
            make(5, user="u2", session="s1", turn=1, model="m-a", ts=14.0),  # another user
        ]
    )
    # Recorded late: turn 1 of s1 comes after turn 2.
    await store.record([make(2, session="s1", turn=1, model="m-b", ts=11.0)])
    n = await store.neighbourhood("u1", hops=2)
    prev = {tid: row[4] for tid, row in turn_table(n).items()}
    assert prev == {
        "i0001:m-a": None,
        "i0001:m-b": None,
        "i0002:m-b": "i0001:m-b",  # the same LLM is preferred among turn 0's turns
        "i0003:m-a": "i0002:m-b",  # greatest smaller turn index wins over the same LLM
        "i0004:m-a": None,
    }
    n4 = await store.neighbourhood("u2", hops=4)
    assert turn_table(n4)["i0005:m-a"][4] is None  # u2's s1 is not u1's s1


async def test_argument_checks(store: GraphStore) -> None:
    for hops in (0, 5):
        with pytest.raises(ValueError):
            await store.neighbourhood("u1", hops=hops)
    with pytest.raises(ValueError):
        await store.neighbourhood("u1", fan_out=(4, 4))
    with pytest.raises(ValueError):
        await store.neighbourhood("u1", fan_out=(4, -1, 4))


# -- the same interactions in SQLite and Neo4j ----------------------------------------------


def random_interactions(seed: int) -> list[Interaction]:
    """A few users, sessions of 2 turns, comparisons (with ties), ratings and plain turns."""
    rng = random.Random(seed)
    models = ["m-a", "m-b", "m-c", "m-d"]
    out: list[Interaction] = []
    n = 0
    for u in range(5):
        for s in range(rng.randint(1, 4)):
            base = rng.choice([50.0, 60.0, 70.0]) + s  # timestamp ties across users
            for turn in range(2):
                n += 1
                kind = rng.random()
                winner, loser = rng.sample(models, 2)
                out.append(
                    make(
                        n,
                        user=f"user-{u}",
                        session=f"sess-{s}",
                        turn=turn,
                        model=winner,
                        ts=base + turn,
                        comparison=(
                            Comparison(winner, loser, tie=rng.random() < 0.3)
                            if kind < 0.5
                            else None
                        ),
                        rating=rng.random() if 0.5 <= kind < 0.8 else None,
                    )
                )
    rng.shuffle(out)
    return out


def as_sets(
    n: Neighbourhood,
) -> tuple[int, str, set[tuple[str, str, str, str, float, str | None]], dict[str, bytes]]:
    rows = {(tid, *row) for tid, row in turn_table(n).items()}
    embeddings = {q: n.query_embedding[i].tobytes() for i, q in enumerate(n.query_ids)}
    return n.version, n.user_ids[0], rows, embeddings


@pytest.mark.neo4j
async def test_sqlite_and_neo4j_sample_the_same_neighbourhoods(clean_neo4j: Neo4jTarget) -> None:
    interactions = random_interactions(seed=7)
    sqlite = SQLiteGraphStore(":memory:", embedding_dim=DIM)
    neo = open_neo4j(clean_neo4j)
    await sqlite.open()
    await neo.open()
    try:
        for s in (sqlite, neo):
            half = len(interactions) // 2
            await s.record(interactions[:half])
            await asyncio.gather(*(s.record([it]) for it in interactions[half:]))
            await s.record(interactions[:3])  # duplicates
        assert await sqlite.counts() == await neo.counts()
        assert await sqlite.pair_counts() == await neo.pair_counts()
        assert await sqlite.list_models() == await neo.list_models()
        users = [*sorted({it.user_id for it in interactions}), "nobody"]
        compared = 0
        for user in users:
            assert await sqlite.user_version(user) == await neo.user_version(user)
            for hops in (1, 2, 3, 4):
                for fan_out in ((64, 8, 16, 8), (3, 8, 2, 8), (1, 1, 1, 1)):
                    a = await sqlite.neighbourhood(user, hops, fan_out)
                    b = await neo.neighbourhood(user, hops, fan_out)
                    check_shapes(b)
                    assert as_sets(a) == as_sets(b), (user, hops, fan_out)
                    compared += a.num_turns
        assert compared > 100
    finally:
        await sqlite.close()
        await neo.close()


# -- Neo4j only -----------------------------------------------------------------------------


def test_rust_codec_is_active() -> None:
    assert rust_codec_active(), "neo4j-rust-ext is installed but the driver does not use it"


async def test_unreachable_neo4j_is_store_unavailable() -> None:
    s = Neo4jGraphStore(
        "bolt://127.0.0.1:1",
        credentials=Neo4jCredentials("neo4j", "s3cret-password", "neo4j"),
        embedding_dim=DIM,
        connection_timeout_s=1.0,
    )
    with pytest.raises(StoreUnavailableError) as info:
        await s.open()
    assert "bolt://127.0.0.1:1" in str(info.value)
    assert "s3cret-password" not in str(info.value) and "s3cret-password" not in repr(s)
    with pytest.raises(StoreUnavailableError):
        await s.record([make(1)])
    await s.close()


@pytest.mark.neo4j
async def test_neo4j_schema_and_graph_shape(clean_neo4j: Neo4jTarget) -> None:
    s = open_neo4j(clean_neo4j)
    await s.open()
    await s.open()  # idempotent, and so is the schema
    try:
        await s.record(
            [
                make(1, session="s1", turn=0, comparison=Comparison("m-a", "m-b"), ts=1.0),
                make(2, session="s1", turn=1, model="m-b", ts=2.0),
            ]
        )
    finally:
        await s.close()
    db = clean_neo4j.credentials.database
    with GraphDatabase.driver(clean_neo4j.uri, auth=clean_neo4j.auth()) as driver:
        names = {r["name"] for r in driver.execute_query("SHOW CONSTRAINTS", database_=db).records}
        assert {
            "user_id",
            "llm_name",
            "query_interaction_id",
            "query_idempotency_key",
            "response_id",
            "turn_id",
            "pair_count_models",
        } <= names
        indexes = {r["name"] for r in driver.execute_query("SHOW INDEXES", database_=db).records}
        assert {
            "turn_ts",
            "turn_user_ts",
            "turn_llm_ts",
            "turn_user_session",
            "query_key_ts",
        } <= indexes

        def one(query: str) -> object:
            return driver.execute_query(query, database_=db).records[0][0]

        assert one("MATCH (:User {user_id:'u1'})-[:SUBMITTED]->(q:Query) RETURN count(q)") == 2
        assert one("MATCH (:Query)-[:RECEIVED]->(r:Response) RETURN count(r)") == 3
        assert one("MATCH (:Response)-[:GENERATED_BY]->(m:LLM) RETURN count(m)") == 3
        assert (
            one(
                "MATCH (u:User)<-[:OF_USER]-(t:Turn)-[:ASKED]->(q:Query)<-[:SUBMITTED]-(u), "
                "(t)-[:ANSWERED_BY]->(m:LLM)<-[:GENERATED_BY]-(r:Response)<-[:HAS_RESPONSE]-(t), "
                "(q)-[:RECEIVED]->(r) RETURN count(t)"
            )
            == 3
        )
        assert one(
            "MATCH (t:Turn)-[:FOLLOWS]->(p:Turn) RETURN collect(t.turn_id + '->' + p.turn_id)"
        ) == ["i0002:m-b->i0001:m-b"]
        pair = driver.execute_query(
            "MATCH (a:LLM)<-[:MODEL_A]-(p:PairCount)-[:MODEL_B]->(b:LLM) "
            "RETURN a.name AS a, b.name AS b, p.wins_a AS wa, p.wins_b AS wb",
            database_=db,
        ).records
        assert [tuple(r.values()) for r in pair] == [("m-a", "m-b", 1.0, 0.0)]
        emb = one("MATCH (q:Query {interaction_id: 'i0001'}) RETURN q.embedding")
        assert isinstance(emb, bytes) and len(emb) == 4 * DIM
        assert np.frombuffer(emb, "<f4").tolist() == make(1).query_embedding.tolist()


@pytest.mark.neo4j
async def test_neo4j_groups_concurrent_records_into_few_transactions(
    clean_neo4j: Neo4jTarget,
) -> None:
    s = open_neo4j(clean_neo4j)
    await s.open()
    try:
        await asyncio.gather(*(s.record([make(i)]) for i in range(100)))
        assert (await s.counts())["interaction"] == 100
        assert s.write_transactions < 20, s.write_transactions
    finally:
        await s.close()


@pytest.mark.neo4j
async def test_neo4j_rejects_a_comparison_of_a_model_with_itself(clean_neo4j: Neo4jTarget) -> None:
    s = open_neo4j(clean_neo4j)
    await s.open()
    try:
        with pytest.raises(InvalidInteractionError):
            await s.record([make(1, comparison=Comparison("m-a", "m-a"))])
        assert (await s.counts())["interaction"] == 0
    finally:
        await s.close()


@pytest.mark.neo4j
async def test_two_replicas_racing_on_the_same_keys_store_each_once(
    clean_neo4j: Neo4jTarget,
) -> None:
    """Two stores (two drivers, as two server replicas) record overlapping keys at once."""
    a, b = open_neo4j(clean_neo4j), open_neo4j(clean_neo4j)
    await a.open()
    await b.open()
    try:
        items = [make(i, user=f"u{i % 3}", session=f"s{i % 4}", turn=i // 4) for i in range(40)]
        # Replica b gets the same keys under fresh interaction ids (client retries elsewhere).
        retried = [
            dataclasses.replace(it, interaction_id=f"x{i:04d}") for i, it in enumerate(items)
        ]
        results = await asyncio.gather(
            *(a.record([it]) for it in items), *(b.record([it]) for it in retried)
        )
        by_key: dict[str, set[str]] = {}
        fresh = 0
        for (res,), it in zip(results, items + retried, strict=True):
            by_key.setdefault(it.idempotency_key, set()).add(res.interaction_id)
            fresh += not res.duplicate
        assert fresh == 40 and all(len(ids) == 1 for ids in by_key.values())
        counts = await a.counts()
        assert counts["interaction"] == 40 and counts["turn"] == 40
        assert sum([await b.user_version(f"u{u}") for u in range(3)]) == 40
    finally:
        await a.close()
        await b.close()

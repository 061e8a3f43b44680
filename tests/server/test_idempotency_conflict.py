"""RecordResponse with an idempotency_key or interaction_id stored for a different interaction.

Only a retry (same user, same content) is a duplicate. Another user reusing a key or an id,
or the same user sending other content under it, gets INVALID_ARGUMENT naming the field, and
nothing of that request is stored; nothing of the stored interaction is revealed. On both
stores, through real gRPC (an in-process server).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from gmtrouter.v1 import router_pb2 as pb
from gmtrouter.v1 import router_pb2_grpc
from graphstore.neo4j_store import Neo4jGraphStore
from graphstore.sqlite_store import SQLiteGraphStore
from graphstore.store import GraphStore
from tests.server.inprocess import DIM, emb, running

if TYPE_CHECKING:
    from tests.neo4j_fixtures import Neo4jTarget


@pytest.fixture(params=["sqlite", pytest.param("neo4j", marks=pytest.mark.neo4j)])
async def stub(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    store: GraphStore
    if request.param == "sqlite":
        store = SQLiteGraphStore(":memory:", embedding_dim=DIM)
    else:
        target: Neo4jTarget = request.getfixturevalue("clean_neo4j")
        store = Neo4jGraphStore(target.uri, credentials=target.credentials, embedding_dim=DIM)
    async with (
        running(store=store) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch,
    ):
        yield router_pb2_grpc.RouterServiceStub(ch)


async def _refused(stub: Any, req: pb.RecordResponseRequest) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RecordResponse(req, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    return str(err.value.details())


async def test_a_reused_key_or_id_is_refused_unless_the_request_is_a_retry(stub: Any) -> None:
    key = f"k-{uuid.uuid4().hex[:8]}"
    alice, bob = f"alice-{key}", f"bob-{key}"
    original = pb.RecordResponseRequest(
        user_id=alice,
        session_id="s1",
        query="q1",
        query_embedding=emb(1),
        idempotency_key=key,
        comparison=pb.Comparison(winner_model="gpt-4", loser_model="llama"),
    )
    first = await stub.RecordResponse(original, timeout=30)
    assert not first.duplicate

    # A retry (no timestamp: the server's clock differs; no id: a fresh one) is a duplicate.
    again = await stub.RecordResponse(original, timeout=30)
    assert again.duplicate and again.interaction_id == first.interaction_id

    reversed_verdict = pb.RecordResponseRequest()
    reversed_verdict.CopyFrom(original)
    reversed_verdict.comparison.CopyFrom(pb.Comparison(winner_model="llama", loser_model="gpt-4"))
    bobs_rating = pb.RecordResponseRequest(
        user_id=bob,
        query="bob's question",
        query_embedding=emb(2),
        idempotency_key=key,
        model="claude",
        rating=pb.Rating(value=5, scale_min=1, scale_max=5),
    )
    for req in (reversed_verdict, bobs_rating):
        details = await _refused(stub, req)
        assert details.startswith(f"idempotency_key: {key!r} was already used for a different "), (
            details
        )
        assert first.interaction_id not in details and alice not in details

    bob_takes_the_id = pb.RecordResponseRequest(
        user_id=bob,
        interaction_id=first.interaction_id,
        query="bob q2",
        query_embedding=emb(3),
        model="claude",
    )
    details = await _refused(stub, bob_takes_the_id)
    assert details.startswith("interaction_id: "), details
    assert alice not in details and key not in details

    # Nothing of the refused requests was stored: bob has nothing, alice one interaction.
    deleted = await stub.DeleteUser(pb.DeleteUserRequest(user_id=bob), timeout=30)
    assert deleted.deleted_interactions == 0
    deleted = await stub.DeleteUser(pb.DeleteUserRequest(user_id=alice), timeout=30)
    assert deleted.deleted_interactions == 1

"""End-to-end tests of ``gmtrouter serve`` over a real socket with a real gRPC client."""

from __future__ import annotations

import queue
import signal
import threading
import time
import uuid
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from gmtrouter.v1 import router_pb2 as pb
from gmtrouter.v1 import router_pb2_grpc
from tests.conftest import ServerProcess

DIM = 384


def emb(seed: int) -> list[float]:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return list(v / np.linalg.norm(v))


def cands(*names: str) -> list[pb.CandidateModel]:
    return [pb.CandidateModel(model=n) for n in names]


def uid() -> str:
    return f"user-{uuid.uuid4().hex[:8]}"


def compare(
    stub: router_pb2_grpc.RouterServiceStub, user: str, winner: str, loser: str, key: str = ""
) -> pb.RecordResponseResponse:
    return stub.RecordResponse(
        pb.RecordResponseRequest(
            user_id=user,
            session_id="s1",
            query_embedding=emb(1),
            model=winner,
            response="…",
            idempotency_key=key,
            comparison=pb.Comparison(winner_model=winner, loser_model=loser),
        ),
        timeout=30,
    )


def test_health_and_reflection(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    assert (
        health.Check(health_pb2.HealthCheckRequest()).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    svc = health.Check(health_pb2.HealthCheckRequest(service="gmtrouter.v1.RouterService"))
    assert svc.status == health_pb2.HealthCheckResponse.SERVING
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {"gmtrouter.v1.RouterService", "grpc.health.v1.Health"} <= services
    method_names = {
        m.name for m in db.FindFileContainingSymbol("gmtrouter.v1.RouterService").service[0].method
    }
    assert method_names == {"Select", "RecordResponse", "StreamPreferences", "DeleteUser"}


def test_select_with_text_query(stub: router_pb2_grpc.RouterServiceStub) -> None:
    resp = stub.Select(
        pb.SelectRequest(
            user_id=uid(),
            query="Write a haiku about autumn",
            candidate_models=[pb.CandidateModel(model="m-a", lora_name="lora-x"), *cands("m-b")],
            request_id="req-1",
        ),
        timeout=60,
    )
    assert resp.selected_model in {"m-a", "m-b"}
    assert set(resp.all_scores) == {"m-a", "m-b"}
    assert resp.method == "bt_prior"
    assert resp.interaction_id and resp.model_version.startswith("bt_prior")
    assert resp.reasoning
    assert 0.0 <= resp.confidence <= 1.0
    if resp.selected_model == "m-a":
        assert resp.lora_name == "lora-x"


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        ({"user_id": "u", "query": "hi"}, "candidate_models"),
        (
            {"user_id": "u", "query": "hi", "candidate_models": cands("a", " ")},
            "candidate_models[1].model",
        ),
        ({"user_id": "", "query": "hi", "candidate_models": cands("a")}, "user_id"),
        ({"user_id": "   ", "query": "hi", "candidate_models": cands("a")}, "user_id"),
        ({"user_id": "u", "candidate_models": cands("a")}, "query"),
        ({"user_id": "u", "query": "  ", "candidate_models": cands("a")}, "query"),
        (
            {"user_id": "u", "query_embedding": [0.1] * 10, "candidate_models": cands("a")},
            "query_embedding",
        ),
        (
            {
                "user_id": "u",
                "query_embedding": [float("nan")] * DIM,
                "candidate_models": cands("a"),
            },
            "query_embedding",
        ),
        (
            {
                "user_id": "u",
                "query": "hi",
                "candidate_models": cands(*[f"m{i}" for i in range(65)]),
            },
            "candidate_models",
        ),
        (
            {"user_id": "u", "query": "hi", "candidate_models": cands("a", "m" * 257)},
            "candidate_models[1].model",
        ),
        (
            {"user_id": "u", "query": "hi", "candidate_models": cands("a\nb")},
            "candidate_models[0].model",
        ),
        ({"user_id": "u", "query": "x" * 32769, "candidate_models": cands("a")}, "query"),
    ],
)
def test_select_invalid_argument(
    stub: router_pb2_grpc.RouterServiceStub, request_kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.Select(pb.SelectRequest(**request_kwargs), timeout=30)  # type: ignore[arg-type]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(err.value.details()).startswith(field + ":"), err.value.details()


@pytest.mark.parametrize(
    ("request_kwargs", "field"),
    [
        ({"user_id": "", "query": "q", "model": "a"}, "user_id"),
        ({"user_id": "u\x00v", "query": "q", "model": "a"}, "user_id"),
        ({"user_id": "u\x7f", "query": "q", "model": "a"}, "user_id"),
        ({"user_id": "u", "interaction_id": "i\x1f", "query": "q", "model": "a"}, "interaction_id"),
        ({"user_id": "u", "interaction_id": "a:b", "query": "q", "model": "a"}, "interaction_id"),
        ({"user_id": "u", "query": "q", "model": ""}, "model"),
        ({"user_id": "u", "model": "a"}, "query"),
        (
            {
                "user_id": "u",
                "query": "q",
                "comparison": pb.Comparison(winner_model="a", loser_model="a"),
            },
            "comparison",
        ),
        (
            {
                "user_id": "u",
                "query": "q",
                "comparison": pb.Comparison(winner_model="", loser_model="a"),
            },
            "comparison.winner_model",
        ),
        (
            {
                "user_id": "u",
                "query": "q",
                "model": "a",
                "rating": pb.Rating(value=7, scale_min=1, scale_max=5),
            },
            "rating",
        ),
        # Neo4j indexes these: over-long values are refused before any write
        ({"user_id": "u", "query": "q", "model": "a", "session_id": "s" * 257}, "session_id"),
        ({"user_id": "u", "query": "q", "model": "a", "session_id": "s\t1"}, "session_id"),
        (
            {"user_id": "u", "query": "q", "model": "a", "idempotency_key": "k" * 257},
            "idempotency_key",
        ),
        ({"user_id": "u", "query": "q", "model": "a" * 257}, "model"),
        (
            {"user_id": "u", "query": "q", "interaction_id": "i" * 257, "model": "a"},
            "interaction_id",
        ),
        (
            {
                "user_id": "u",
                "query": "q",
                "comparison": pb.Comparison(winner_model="a", loser_model="b" * 257),
            },
            "comparison.loser_model",
        ),
        ({"user_id": "u", "query": "q", "model": "a", "response": "r" * 262145}, "response"),
        ({"user_id": "u", "query": "x" * 32769, "model": "a"}, "query"),
        (  # stored: with a client-supplied embedding, as long as a response may be
            {"user_id": "u", "query": "x" * 262145, "query_embedding": emb(1), "model": "a"},
            "query",
        ),
        (  # 0001-01-01
            {
                "user_id": "u",
                "query": "q",
                "model": "a",
                "timestamp": Timestamp(seconds=-62135596800),
            },
            "timestamp",
        ),
        (  # 9999-12-31
            {
                "user_id": "u",
                "query": "q",
                "model": "a",
                "timestamp": Timestamp(seconds=253402300799),
            },
            "timestamp",
        ),
        (  # two days ahead of the server's clock
            {
                "user_id": "u",
                "query": "q",
                "model": "a",
                "timestamp": Timestamp(seconds=int(time.time()) + 2 * 86400),
            },
            "timestamp",
        ),
    ],
)
def test_record_invalid_argument(
    stub: router_pb2_grpc.RouterServiceStub, request_kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.RecordResponse(pb.RecordResponseRequest(**request_kwargs), timeout=30)  # type: ignore[arg-type]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(err.value.details()).startswith(field + ":"), err.value.details()


def test_record_response_is_idempotent(stub: router_pb2_grpc.RouterServiceStub) -> None:
    user = uid()
    key = f"key-{uuid.uuid4().hex}"
    first = compare(stub, user, "m-x", "m-y", key)
    second = compare(stub, user, "m-x", "m-y", key)
    assert not first.duplicate
    assert second.duplicate
    assert second.interaction_id == first.interaction_id
    third = compare(stub, user, "m-x", "m-y", key + "-other")
    assert not third.duplicate and third.interaction_id != first.interaction_id


def test_record_with_rating_and_text_query(stub: router_pb2_grpc.RouterServiceStub) -> None:
    sel = stub.Select(
        pb.SelectRequest(
            user_id="rater", query="Explain TCP slow start", candidate_models=cands("a", "b")
        ),
        timeout=60,
    )
    rec = stub.RecordResponse(
        pb.RecordResponseRequest(
            interaction_id=sel.interaction_id,
            user_id="rater",
            session_id="s",
            query="Explain TCP slow start",
            model=sel.selected_model,
            response="TCP slow start …",
            rating=pb.Rating(value=4, scale_min=1, scale_max=5),
        ),
        timeout=60,
    )
    assert rec.interaction_id == sel.interaction_id and not rec.duplicate


def test_feedback_changes_selection(stub: router_pb2_grpc.RouterServiceStub) -> None:
    user = uid()
    for _ in range(3):
        compare(stub, user, "zz-strong", "zz-weak")
    resp = stub.Select(
        pb.SelectRequest(
            user_id=user, query_embedding=emb(2), candidate_models=cands("zz-weak", "zz-strong")
        ),
        timeout=30,
    )
    assert resp.selected_model == "zz-strong"
    assert resp.all_scores["zz-strong"] > resp.all_scores["zz-weak"]


def test_stream_preferences_receives_update_after_feedback(
    stub: router_pb2_grpc.RouterServiceStub,
) -> None:
    user = uid()
    a, b = f"s-a-{user}", f"s-b-{user}"
    compare(stub, user, a, b)  # a ahead
    call = stub.StreamPreferences(
        pb.StreamPreferencesRequest(user_ids=[user], candidate_models=cands(a, b)), timeout=60
    )
    updates: queue.Queue[pb.PreferenceUpdate | BaseException] = queue.Queue()

    def consume() -> None:
        try:
            for upd in call:
                updates.put(upd)
        except grpc.RpcError as exc:
            updates.put(exc)

    threading.Thread(target=consume, daemon=True).start()
    first = updates.get(timeout=30)
    assert isinstance(first, pb.PreferenceUpdate)
    assert first.user_id == user
    assert [p.model for p in first.preferences] == [a, b]
    for _ in range(3):  # b overtakes a
        compare(stub, user, b, a)
    second = updates.get(timeout=30)
    assert isinstance(second, pb.PreferenceUpdate)
    assert [p.model for p in second.preferences] == [b, a]
    assert second.version > first.version
    assert second.preferences[0].score > second.preferences[1].score
    call.cancel()  # type: ignore[no-untyped-call]


def test_stream_preferences_invalid_argument(stub: router_pb2_grpc.RouterServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as err:
        list(
            stub.StreamPreferences(
                pb.StreamPreferencesRequest(user_ids=[], candidate_models=cands("a")), timeout=10
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(err.value.details()).startswith("user_ids:")
    with pytest.raises(grpc.RpcError) as err:
        list(stub.StreamPreferences(pb.StreamPreferencesRequest(user_ids=["u"]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(err.value.details()).startswith("candidate_models:")
    many = [f"u{i}" for i in range(1001)]  # limits.max_stream_users: 1000
    with pytest.raises(grpc.RpcError) as err:
        list(
            stub.StreamPreferences(
                pb.StreamPreferencesRequest(user_ids=many, candidate_models=cands("a")), timeout=10
            )
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(err.value.details()).startswith("user_ids: has 1001 entries")


def test_embedded_store_survives_restart(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/durable.db"
    srv = ServerProcess(tmp_path, store).start()
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = router_pb2_grpc.RouterServiceStub(ch)
            for i in range(4):
                compare(stub, "durable-user", "d-good", "d-bad", key=f"k{i}")
            before = stub.Select(
                pb.SelectRequest(
                    user_id="durable-user",
                    query_embedding=emb(3),
                    candidate_models=cands("d-bad", "d-good"),
                ),
                timeout=30,
            )
    finally:
        assert srv.stop(signal.SIGTERM) == 0, srv.log()
    assert '"event": "stopped"' in srv.log()
    assert '"event_loop": "uvloop"' in srv.log()  # the default server.event_loop
    # The restarted server runs on asyncio's own event loop: the same answers.
    srv2 = ServerProcess(tmp_path, store, {"server": {"event_loop": "asyncio"}}).start()
    try:
        with grpc.insecure_channel(srv2.address) as ch:
            stub = router_pb2_grpc.RouterServiceStub(ch)
            after = stub.Select(
                pb.SelectRequest(
                    user_id="durable-user",
                    query_embedding=emb(3),
                    candidate_models=cands("d-bad", "d-good"),
                ),
                timeout=30,
            )
            assert after.selected_model == "d-good"
            assert after.model_version == before.model_version == "bt_prior@4"
            assert dict(after.all_scores) == pytest.approx(dict(before.all_scores))
            assert compare(stub, "durable-user", "d-good", "d-bad", key="k0").duplicate
    finally:
        srv2.stop()
    assert '"event_loop": "asyncio"' in srv2.log()


def test_a_long_query_with_an_embedding_is_routed(
    stub: router_pb2_grpc.RouterServiceStub,
) -> None:
    """With a client-supplied embedding the text is only hashed: a router sending a long
    prompt (retrieval context) with its own embedding still gets a personalized answer."""
    long = "context " * 10_000  # 80,000 characters > limits.max_query_chars
    resp = stub.Select(
        pb.SelectRequest(
            user_id="long-u", query=long, query_embedding=emb(1), candidate_models=cands("a", "b")
        ),
        timeout=30,
    )
    assert resp.selected_model in ("a", "b")
    ack = stub.RecordResponse(
        pb.RecordResponseRequest(
            user_id="long-u",
            query=long,
            query_embedding=emb(1),
            comparison=pb.Comparison(winner_model="a", loser_model="b"),
        ),
        timeout=30,
    )
    assert ack.interaction_id

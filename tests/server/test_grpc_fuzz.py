"""Property-based tests over the real gRPC surface: no request crashes the server or the store.

Hypothesis generates ``Select``, ``RecordResponse``, ``StreamPreferences`` and ``DeleteUser``
messages — user ids with unicode, control characters and huge lengths, blank or repeated
candidates, embeddings of the wrong size or holding NaN/inf, ratings off their scale or with
infinite scales, huge turn indexes and timestamps, reused idempotency keys and interaction
ids, missing fields — and sends them over a socket to one in-process server on a SQLite file.
Every answer must be OK or a client error whose message names the offending field (never
UNKNOWN, INTERNAL or UNAVAILABLE); a model of the store (idempotency keys, interaction ids,
per-user counts) predicts every ``duplicate`` flag and every ``deleted_interactions``; and
afterwards the store holds exactly the acknowledged records and still serves normal calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import sqlite3
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gmtrouter.v1 import router_pb2 as pb
from gmtrouter.v1 import router_pb2_grpc
from graphstore.sqlite_store import SQLiteGraphStore
from server.app import RouterServer
from server.config import parse_settings

T = TypeVar("T")
DIM = 384
MODELS = ["m-a", "m-b", "m-c"]
USERS = ["fuzz-a", "fuzz-b", "fuzz-c"]
#: Client errors a request may get; anything else (UNKNOWN, INTERNAL, UNAVAILABLE, ...) fails.
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
UNIT = [
    list(map(float, v / np.linalg.norm(v)))
    for v in np.random.default_rng(0).standard_normal((3, DIM)).astype(np.float32)
]


class _Harness:
    """A ``RouterServer`` on its own event-loop thread, a blocking client, a store model."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.settings = parse_settings(
            {
                "server": {"port": 0, "metrics_port": 0},
                "limits": {"max_candidates": 8, "max_query_chars": 1000},
                "streaming": {"poll_interval_s": 0.05},
            }
        )
        self.store = SQLiteGraphStore(db, embedding_dim=DIM)
        self.app = RouterServer(self.settings, store=self.store, environ={})
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        # the store model: idempotency key -> (user, id); interaction id -> user
        self.keys: dict[str, tuple[str, str]] = {}
        self.ids: dict[str, str] = {}

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 120.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def __enter__(self) -> _Harness:
        self.thread.start()
        port = self.run(self.app.start(warm_up=False))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = router_pb2_grpc.RouterServiceStub(self.channel)
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()
        self.run(self.app.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()

    # -- the store model -------------------------------------------------------------------

    def recorded(self, req: pb.RecordResponseRequest, resp: pb.RecordResponseResponse) -> None:
        key, iid = req.idempotency_key, req.interaction_id
        if resp.duplicate:
            if key and key in self.keys:
                assert resp.interaction_id == self.keys[key][1]
            else:
                assert iid in self.ids and resp.interaction_id == iid, (key, iid)
            return
        assert not (key and key in self.keys), f"key {key!r} was recorded before"
        assert resp.interaction_id not in self.ids
        assert resp.interaction_id == (iid or resp.interaction_id)
        self.ids[resp.interaction_id] = req.user_id
        if key:
            self.keys[key] = (req.user_id, resp.interaction_id)

    def deleted(self, user: str, resp: pb.DeleteUserResponse) -> None:
        gone = {i for i, u in self.ids.items() if u == user}
        assert resp.deleted_interactions == len(gone), (user, resp, len(gone))
        for i in gone:
            del self.ids[i]
        self.keys = {k: v for k, v in self.keys.items() if v[0] != user}


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Harness]:
    with _Harness(tmp_path_factory.mktemp("fuzz") / "graph.db") as h:
        yield h


# -- strategies --------------------------------------------------------------------------------

user_ids = st.one_of(
    st.sampled_from(USERS),
    st.sampled_from(USERS),
    st.text(max_size=12),
    st.text(st.characters(max_codepoint=0x1F), min_size=1, max_size=4),
    st.sampled_from(["", " ", "\t\n", "😀" * 3, "x" * 257, "y" * 50_000, "\x00", "a\x7fb"]),
)
model_names = st.one_of(st.sampled_from(MODELS), st.text(max_size=8), st.just("  "))
candidates = st.lists(
    st.builds(
        pb.CandidateModel, model=model_names, lora_name=st.one_of(st.just(""), st.text(max_size=4))
    ),
    max_size=10,
)
bad_float = st.sampled_from([math.nan, math.inf, -math.inf])
embeddings = st.one_of(
    st.sampled_from(UNIT),
    st.sampled_from(UNIT),
    st.just([]),
    st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=8),
    st.tuples(st.sampled_from(UNIT), st.integers(0, DIM - 1), bad_float).map(
        lambda t: [*t[0][: t[1]], t[2], *t[0][t[1] + 1 :]]
    ),
    st.sampled_from(UNIT).map(lambda v: [*v, 0.0]),
    st.just([3.0e38] * DIM),
)
# Text queries are only drawn where they never reach the encoder (which is not loaded here):
# blank, or longer than limits.max_query_chars; with a valid embedding any text is fine.
queries = st.one_of(st.just(""), st.just("   "), st.text(max_size=20), st.just("q" * 1001))
any_float = st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def select_requests(draw: st.DrawFn) -> pb.SelectRequest:
    emb = draw(embeddings)
    query = draw(queries) if emb else draw(st.sampled_from(["", "  ", "q" * 1001]))
    return pb.SelectRequest(
        user_id=draw(user_ids),
        session_id=draw(st.text(max_size=8)),
        query=query,
        query_embedding=emb,
        conversation_history=draw(st.lists(st.text(max_size=8), max_size=3)),
        candidate_models=draw(candidates),
        request_id=draw(st.text(max_size=8)),
    )


@st.composite
def record_requests(draw: st.DrawFn) -> pb.RecordResponseRequest:
    emb = draw(embeddings)
    query = draw(queries) if emb else draw(st.sampled_from(["", "  ", "q" * 1001]))
    req = pb.RecordResponseRequest(
        interaction_id=draw(st.one_of(st.just(""), st.sampled_from(["i1", "i2", "i:3"]))),
        user_id=draw(user_ids),
        session_id=draw(st.text(max_size=8)),
        turn_index=draw(st.one_of(st.integers(0, 10), st.just(2**32 - 1))),
        query=query,
        model=draw(model_names),
        response=draw(st.text(max_size=20)),
        idempotency_key=draw(st.one_of(st.just(""), st.sampled_from(["k1", "k2", "k3"]))),
        query_embedding=emb,
    )
    kind = draw(st.sampled_from(["none", "rating", "comparison"]))
    if kind == "rating":
        req.rating.CopyFrom(
            pb.Rating(
                value=draw(st.one_of(st.integers(0, 6).map(float), any_float)),
                scale_min=draw(st.one_of(st.just(1.0), any_float)),
                scale_max=draw(st.one_of(st.just(5.0), any_float)),
            )
        )
    elif kind == "comparison":
        req.comparison.CopyFrom(
            pb.Comparison(
                winner_model=draw(model_names),
                loser_model=draw(model_names),
                tie=draw(st.booleans()),
            )
        )
    if draw(st.booleans()):
        ts = Timestamp(
            seconds=draw(st.integers(-(2**40), 2**40)), nanos=draw(st.integers(0, 999_999_999))
        )
        req.timestamp.CopyFrom(ts)
    return req


stream_requests = st.builds(
    pb.StreamPreferencesRequest,
    user_ids=st.lists(user_ids, max_size=4),
    candidate_models=candidates,
)
delete_requests = st.builds(pb.DeleteUserRequest, user_id=user_ids)
requests = st.one_of(select_requests(), record_requests(), stream_requests, delete_requests)


def _names_a_field(request: Message, details: str) -> bool:
    """True when ``details`` starts with a field path of ``request`` (e.g. ``rating:``,
    ``candidate_models[2].model:``, ``user_ids[0]:``)."""
    m = re.match(r"([a-z_]+)(\[\d+\])?(\.[a-z_]+)?: ", details)
    return m is not None and m.group(1) in request.DESCRIPTOR.fields_by_name


@dataclasses.dataclass
class _Outcome:
    code: grpc.StatusCode
    details: str
    response: Message | None = None


def _call(h: _Harness, req: Message) -> _Outcome:
    stub: Any = h.stub
    try:
        if isinstance(req, pb.StreamPreferencesRequest):
            stream = stub.StreamPreferences(req, timeout=30)
            try:
                first: Message = next(stream)
            finally:
                stream.cancel()
            return _Outcome(grpc.StatusCode.OK, "", first)
        method = {
            pb.SelectRequest: stub.Select,
            pb.RecordResponseRequest: stub.RecordResponse,
            pb.DeleteUserRequest: stub.DeleteUser,
        }[type(req)]
        return _Outcome(grpc.StatusCode.OK, "", method(req, timeout=30))
    except grpc.RpcError as exc:
        return _Outcome(exc.code(), exc.details() or "")


def _rec(**kw: Any) -> pb.RecordResponseRequest:
    return pb.RecordResponseRequest(user_id="fuzz-x", query_embedding=UNIT[0], **kw)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(req=requests)
@example(req=_rec(model="m-a", rating=pb.Rating(value=0, scale_min=-math.inf, scale_max=math.inf)))
@example(req=_rec(model="m-a", rating=pb.Rating(value=1, scale_min=-1e308, scale_max=1e308)))
@example(req=_rec(model="m-a", rating=pb.Rating(value=math.nan, scale_min=1, scale_max=5)))
@example(req=_rec(model="m-a", timestamp=Timestamp(seconds=-(2**40))))
@example(req=_rec(model="m-a", timestamp=Timestamp(seconds=0, nanos=-5)))
# two interactions whose turn ids ("<interaction id>:<model>") would be equal
@example(req=_rec(interaction_id="t:u", model="v"))
@example(req=_rec(interaction_id="t", model="u:v"))
def test_no_request_crashes_the_server(harness: _Harness, req: Message) -> None:
    out = _call(harness, req)
    if out.code != grpc.StatusCode.OK:
        assert out.code in CLIENT_ERRORS, f"{out.code.name}: {out.details}"
        if out.code == grpc.StatusCode.INVALID_ARGUMENT:
            assert _names_a_field(req, out.details), out.details
        return
    if isinstance(req, pb.RecordResponseRequest):
        assert isinstance(out.response, pb.RecordResponseResponse)
        harness.recorded(req, out.response)
    elif isinstance(req, pb.DeleteUserRequest):
        assert isinstance(out.response, pb.DeleteUserResponse)
        harness.deleted(req.user_id, out.response)
    elif isinstance(req, pb.SelectRequest):
        assert isinstance(out.response, pb.SelectResponse)
        names = {c.model for c in req.candidate_models}
        assert out.response.selected_model in names
        assert set(out.response.all_scores) == names
        assert all(math.isfinite(s) for s in out.response.all_scores.values())
    else:
        assert isinstance(req, pb.StreamPreferencesRequest)
        assert isinstance(out.response, pb.PreferenceUpdate)
        assert out.response.user_id == req.user_ids[0]


def test_store_is_consistent_after_fuzzing(harness: _Harness) -> None:
    """Runs after the property test: the store holds exactly what was acknowledged."""
    counts = harness.run(harness.store.counts())
    assert counts["interaction"] == len(harness.ids)
    with sqlite3.connect(harness.db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        stored = {r[0] for r in conn.execute("SELECT interaction_id FROM interactions")}
        bad = conn.execute(
            "SELECT count(*) FROM interactions WHERE rating IS NOT NULL "
            "AND NOT (rating BETWEEN 0 AND 1)"
        ).fetchone()[0]
    assert stored == set(harness.ids)
    assert bad == 0
    stub = harness.stub
    rec = stub.RecordResponse(
        pb.RecordResponseRequest(
            user_id="after-fuzz",
            query_embedding=UNIT[0],
            idempotency_key="after-fuzz-1",
            comparison=pb.Comparison(winner_model="m-a", loser_model="m-b"),
        ),
        timeout=30,
    )
    assert not rec.duplicate
    sel = stub.Select(
        pb.SelectRequest(
            user_id="after-fuzz",
            query_embedding=UNIT[1],
            candidate_models=[pb.CandidateModel(model=m) for m in MODELS],
        ),
        timeout=30,
    )
    assert sel.selected_model in MODELS, dict(sel.all_scores)
    assert harness.run(harness.store.counts())["interaction"] == len(harness.ids) + 1

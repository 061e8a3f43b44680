"""Per-query evidence (``server/query_evidence.py``) through real gRPC on a socket.

Globally model ``a`` beats ``b``; on one question several other users preferred ``b``. A
new user asking that question gets ``b``, asking anything else gets ``a``; the evidence
appears as soon as it is recorded through this replica, is off with
``query_evidence.enabled: false``, and a store failure on its read leaves Select answering.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from gmtrouter.v1 import router_pb2 as pb
from gmtrouter.v1 import router_pb2_grpc as pb_grpc
from graphstore.errors import StoreUnavailableError
from graphstore.interactions import PairCount
from graphstore.sqlite_store import SQLiteGraphStore
from model.bradley_terry import fit_bradley_terry, per_query_deviation
from tests.server.inprocess import DIM, emb, record_comparison, running

QUESTION = "Explain quicksort to a five-year-old."
CANDIDATES = [pb.CandidateModel(model="a"), pb.CandidateModel(model="b")]


async def _select(stub: Any, query: str) -> pb.SelectResponse:
    resp: pb.SelectResponse = await stub.Select(
        pb.SelectRequest(
            user_id="newcomer",
            query=f"  {query}\n",  # the key ignores surrounding and repeated whitespace
            query_embedding=emb(99),
            candidate_models=CANDIDATES,
        )
    )
    return resp


async def _teach_global(stub: Any) -> None:
    for i in range(12):
        await record_comparison(stub, f"g{i % 4}", f"general question {i}", "a", "b", i)


async def _teach_question(stub: Any) -> None:
    for i in range(8):
        await record_comparison(stub, f"q{i}", QUESTION, "b", "a", 100 + i)


async def test_other_users_outcomes_on_the_same_question_move_the_choice(tmp_path: Path) -> None:
    db = tmp_path / "graph.db"
    async with (
        running(store=SQLiteGraphStore(db, embedding_dim=DIM)) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = pb_grpc.RouterServiceStub(channel)
        await _teach_global(stub)
        before = await _select(stub, QUESTION)
        assert before.selected_model == "a"
        assert "no other comparison of this query yet" in before.reasoning
        await _teach_question(stub)
        # recorded through this replica: seen at once, despite query_evidence.max_age_ms
        after = await _select(stub, QUESTION)
        assert after.selected_model == "b", after.reasoning
        assert after.method == "bt_prior"
        assert "per-query evidence from 8 recorded comparisons" in after.reasoning
        other = await _select(stub, "What is the capital of France?")
        assert other.selected_model == "a"
        # the shift is exactly the per-query Bradley-Terry deviation (prior_strength 10)
        counts = await app.store.pair_counts()
        wins = [(c.model_a, c.model_b, c.wins_a) for c in counts] + [
            (c.model_b, c.model_a, c.wins_b) for c in counts
        ]
        theta = fit_bradley_terry(wins, prior_strength=1.0)
        dev = per_query_deviation([("b", "a", 8.0)], theta, ["a", "b"], prior_strength=10.0)
        assert after.all_scores["a"] == pytest.approx(theta["a"] + dev["a"], abs=1e-5)
        assert after.all_scores["b"] == pytest.approx(theta["b"] + dev["b"], abs=1e-5)
        assert other.all_scores["a"] == pytest.approx(theta["a"], abs=1e-5)

    # the same graph, evidence switched off: the global strengths decide again
    async with (
        running(
            store=SQLiteGraphStore(db, embedding_dim=DIM),
            config={"query_evidence": {"enabled": False}},
        ) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        off = await _select(pb_grpc.RouterServiceStub(channel), QUESTION)
        assert off.selected_model == "a"
        assert "per-query" not in off.reasoning


class _EvidenceReadFails(SQLiteGraphStore):
    async def query_pair_counts(self, query_key: str, limit: int) -> list[PairCount]:
        raise StoreUnavailableError("injected: per-query read failed")


async def test_a_failing_evidence_read_leaves_select_answering() -> None:
    async with (
        running(store=_EvidenceReadFails(":memory:", embedding_dim=DIM)) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = pb_grpc.RouterServiceStub(channel)
        await _teach_global(stub)
        await _teach_question(stub)  # recording does not need the evidence read
        resp = await _select(stub, QUESTION)
        assert resp.selected_model == "a"
        assert resp.method == "bt_prior"
        assert "per-query evidence unavailable (StoreUnavailableError)" in resp.reasoning

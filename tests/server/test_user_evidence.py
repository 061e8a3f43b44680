"""Per-user evidence (``server/user_evidence.py``) through real gRPC on a socket.

Globally and on one question the crowd prefers ``c`` to ``a``. A judge who, on that question,
preferred ``a`` to ``b`` and ``b`` to ``c`` gets ``a`` for the pair (a, c) they never compared;
a newcomer asking the same question still gets ``c``. The evidence counts from
``sampler.min_history`` turns, is off with ``user_evidence.enabled: false``, and a store
failure on its read leaves Select answering.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from gmtrouter.v1 import router_pb2 as pb
from gmtrouter.v1 import router_pb2_grpc as pb_grpc
from graphstore.errors import StoreUnavailableError
from graphstore.interactions import UserComparison
from graphstore.sqlite_store import SQLiteGraphStore
from model.bradley_terry import fit_bradley_terry, per_query_strengths, user_deviation
from server.config import UserEvidenceSettings
from server.scoring import pair_count_wins
from tests.server.inprocess import DIM, emb, record_comparison, running

QUESTION = "Which answer explains recursion best?"
A_AND_C = [pb.CandidateModel(model="a"), pb.CandidateModel(model="c")]


async def _select(stub: Any, user: str) -> pb.SelectResponse:
    resp: pb.SelectResponse = await stub.Select(
        pb.SelectRequest(
            user_id=user, query=QUESTION, query_embedding=emb(99), candidate_models=A_AND_C
        )
    )
    return resp


async def _teach(stub: Any) -> None:
    """The crowd: c beats a and b in general and on QUESTION; the judge: a > b > c on it."""
    n = 0
    for i in range(6):
        for winner, loser in (("c", "a"), ("c", "b")):
            await record_comparison(
                stub, f"crowd{i % 3}", f"general question {i}", winner, loser, n
            )
            n += 1
    for i in range(3):
        await record_comparison(stub, f"crowd{i}", QUESTION, "c", "a", n)
        n += 1
    for _ in range(2):
        for winner, loser in (("a", "b"), ("b", "c")):
            await record_comparison(stub, "judge", QUESTION, winner, loser, n)
            n += 1
    # the judge's verdict elsewhere is not a verdict on QUESTION
    await record_comparison(stub, "judge", "another question", "c", "a", n)


async def test_the_users_own_verdicts_on_a_question_decide_an_unseen_pair() -> None:
    async with (
        running() as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = pb_grpc.RouterServiceStub(channel)
        await _teach(stub)
        newcomer = await _select(stub, "newcomer")
        assert newcomer.selected_model == "c", newcomer.reasoning
        assert "no earlier comparison of this user" in newcomer.reasoning
        judge = await _select(stub, "judge")
        assert judge.selected_model == "a", judge.reasoning
        assert "per-user evidence from the user's 5 most recent comparisons (4 of this query)" in (
            judge.reasoning
        )
        # the shift is exactly user_deviation's, on top of the per-query strengths
        theta = fit_bradley_terry(pair_count_wins(await app.store.pair_counts()))
        query_wins = [("c", "a", 1.0)] * 3 + [("a", "b", 1.0), ("b", "c", 1.0)] * 2
        centre = per_query_strengths(query_wins, theta, ["a", "c"], prior_strength=10.0)
        judge_wins = [("a", "b", 1.0), ("b", "c", 1.0)] * 2
        dev = user_deviation(
            judge_wins,
            judge_wins,
            theta,
            centre,
            ["a", "c"],
            user_weight=UserEvidenceSettings().user_weight,
            query_prior_strength=UserEvidenceSettings().query_prior_strength,
        )
        for m in ("a", "c"):
            assert judge.all_scores[m] == pytest.approx(centre[m] + dev[m], abs=1e-4)
            assert newcomer.all_scores[m] == pytest.approx(centre[m], abs=1e-4)
        rows = await app.store.user_comparisons("judge", 10)
        assert [(r.winner_model, r.loser_model) for r in rows[:2]] == [("c", "a"), ("b", "c")]
        assert len({r.query_key for r in rows}) == 2
        # DeleteUser forgets the judge's evidence at once (despite user_evidence.max_age_ms)
        await stub.DeleteUser(pb.DeleteUserRequest(user_id="judge"))
        gone = await _select(stub, "judge")
        assert gone.selected_model == "c"
        assert "no earlier comparison of this user" in gone.reasoning


async def test_min_history_and_switching_it_off() -> None:
    async with (
        running(config={"sampler": {"min_history": 12}}) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = pb_grpc.RouterServiceStub(channel)
        await _teach(stub)
        judge = await _select(stub, "judge")
        assert judge.selected_model == "c"
        assert "per-user evidence waits for 12 turns (the user's comparisons give 10)" in (
            judge.reasoning
        )
        await record_comparison(stub, "judge", "another question", "a", "c", 500)
        assert (await _select(stub, "judge")).selected_model == "a"
    # a full read (max_comparisons) counts as enough: the user has at least that many
    async with (
        running(
            config={"sampler": {"min_history": 12}, "user_evidence": {"max_comparisons": 3}}
        ) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = pb_grpc.RouterServiceStub(channel)
        await _teach(stub)
        judge = await _select(stub, "judge")
        assert "per-user evidence from the user's 3 most recent comparisons (2 of this query)" in (
            judge.reasoning
        )
    async with (
        running(config={"user_evidence": {"enabled": False}}) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = pb_grpc.RouterServiceStub(channel)
        await _teach(stub)
        judge = await _select(stub, "judge")
        assert judge.selected_model == "c"
        assert "per-user" not in judge.reasoning


class _UserReadFails(SQLiteGraphStore):
    async def user_comparisons(self, user_id: str, limit: int) -> list[UserComparison]:
        raise StoreUnavailableError("injected: per-user read failed")


async def test_a_failing_user_evidence_read_leaves_select_answering() -> None:
    async with (
        running(store=_UserReadFails(":memory:", embedding_dim=DIM)) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel,
    ):
        stub = pb_grpc.RouterServiceStub(channel)
        await _teach(stub)  # recording does not need the read
        judge = await _select(stub, "judge")
        assert judge.selected_model == "c"
        assert "per-user evidence unavailable (StoreUnavailableError)" in judge.reasoning

"""Online learning through the real gRPC API (server/learning.py).

Two in-process servers share one store (a SQLite file, and the real Neo4j): A is the trainer,
B a follower. The served checkpoint is an untrained network; planted per-user preferences
(model/synthetic.py) are recorded through A while clients keep calling Select on both. A
fine-tuning round must be accepted, swap A's weights without failing any Select, reach B
through the store, and reach B's preference-stream subscriber.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from gmtrouter.v1 import router_pb2 as pb
from gmtrouter.v1 import router_pb2_grpc
from graphstore.neo4j_store import Neo4jGraphStore
from graphstore.sqlite_store import SQLiteGraphStore
from graphstore.store import GraphStore
from model.checkpoint import load_checkpoint, save_checkpoint
from model.data import llm_description
from model.network import GMTRouterNetwork, NetworkConfig
from model.synthetic import HashEncoder, planted_preferences
from server.app import RouterServer
from server.config import EmbeddingSettings, parse_settings
from server.learning import LEASE_NAME, OnlineLearner

DIM = 384
MODELS = ["A", "B", "C"]
ENCODER = HashEncoder(dim=DIM)


@pytest.fixture(scope="module")
def untrained_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained network saved as a checkpoint for the default 384-d encoder settings
    (requests carry their own embeddings, so the text encoder never runs)."""
    torch.manual_seed(0)
    net = GMTRouterNetwork(NetworkConfig(embedding_dim=DIM, llm_feature_dim=DIM))
    path = tmp_path_factory.mktemp("ckpt") / "untrained.pt"
    save_checkpoint(
        path,
        net,
        encoder_name=EmbeddingSettings().model,
        encoder_dim=DIM,
        models=MODELS,
        llm_x=torch.from_numpy(ENCODER.encode([llm_description(m) for m in MODELS])),
    )
    return path


def settings(checkpoint: Path, role: str, **learning: Any) -> Any:
    return parse_settings(
        {
            "decision": {"algorithm": {"gmtrouter": {"model_path": str(checkpoint)}}},
            "server": {"port": 0, "metrics_port": 0},
            # Not a test of degraded answers: a cold Neo4j may take seconds to plan a read.
            "store": {"select_timeout_ms": 30_000},
            "learning": {
                "role": role,
                "check_interval_s": 0.5,
                "min_new_interactions": 150,
                "steps": 40,
                "lr": 2e-3,
                "time_budget_s": 60,
                "poll_interval_s": 0.3,
                **learning,
            },
        }
    )


@contextlib.asynccontextmanager
async def serving(config: Any, store: GraphStore) -> AsyncIterator[RouterServer]:
    app = RouterServer(config, store=store, environ={})
    await app.start(warm_up=False)
    try:
        yield app
    finally:
        await app.stop(0)


@contextlib.asynccontextmanager
async def follower_with_history(
    config: Any, store: GraphStore
) -> AsyncIterator[tuple[OnlineLearner, Any]]:
    """A server with online learning on, after 120 planted comparisons were recorded through
    it; yields its learner and a Router stub on its port."""
    async with (
        serving(config, store) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch,
    ):
        stub = router_pb2_grpc.RouterServiceStub(ch)
        for req in record_requests()[:120]:
            await stub.RecordResponse(req, timeout=30)
        assert app.learner is not None
        yield app.learner, stub


def record_requests() -> list[pb.RecordResponseRequest]:
    out = []
    for i, r in enumerate(planted_preferences(num_users=16, sessions_per_user=16, seed=5)):
        winner, loser = (r.model_a, r.model_b) if r.outcome_value >= 0.5 else (r.model_b, r.model_a)
        out.append(
            pb.RecordResponseRequest(
                user_id=r.user_id,
                session_id=r.session_id,
                turn_index=r.turn_index,
                query_embedding=ENCODER.encode([r.query_text or r.query_id])[0].tolist(),
                model=winner,
                idempotency_key=f"planted-{i}",
                comparison=pb.Comparison(
                    winner_model=winner, loser_model=loser, tie=r.outcome_value == 0.5
                ),
            )
        )
    return out


def select_request(user: str) -> pb.SelectRequest:
    return pb.SelectRequest(
        user_id=user,
        query_embedding=ENCODER.encode(["math: question 3"])[0].tolist(),
        candidate_models=[pb.CandidateModel(model=m) for m in MODELS],
    )


async def make_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> GraphStore:
    if kind == "sqlite":
        return SQLiteGraphStore(tmp_path / "shared.db", embedding_dim=DIM)
    target = request.getfixturevalue("clean_neo4j")
    return Neo4jGraphStore(target.uri, credentials=target.credentials, embedding_dim=DIM)


@pytest.mark.parametrize(
    "kind", ["sqlite", pytest.param("neo4j", marks=pytest.mark.neo4j)], ids=["sqlite", "neo4j"]
)
async def test_fine_tuning_swaps_weights_under_load_and_reaches_the_other_replica(
    kind: str, untrained_checkpoint: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    base_version = load_checkpoint(untrained_checkpoint).version
    store_a = await make_store(kind, tmp_path, request)
    store_b = await make_store(kind, tmp_path, request)
    # The first round starts once every planted comparison is in (with 150, the other tests'
    # threshold, it could start early on a slow machine and leave too few new comparisons for
    # a second round), and trains 120 steps: 40 at times ended above the untrained weights'
    # held-back loss (0.6975 -> 0.7180, seen in CI and locally after other tests had set
    # torch's thread count), so the only round was rightly rejected.
    everything = {"min_new_interactions": len(record_requests()), "steps": 120}
    async with (
        serving(settings(untrained_checkpoint, "trainer", **everything), store_a) as a,
        serving(settings(untrained_checkpoint, "follower", **everything), store_b) as b,
        grpc.aio.insecure_channel(f"127.0.0.1:{a.port}") as ch_a,
        grpc.aio.insecure_channel(f"127.0.0.1:{b.port}") as ch_b,
    ):
        stub_a = router_pb2_grpc.RouterServiceStub(ch_a)
        stub_b = router_pb2_grpc.RouterServiceStub(ch_b)
        assert a.learner is not None and b.learner is not None
        stream = stub_b.StreamPreferences(
            pb.StreamPreferencesRequest(
                user_ids=["user0"], candidate_models=[pb.CandidateModel(model=m) for m in MODELS]
            ),
            timeout=300,
        )
        first = await stream.read()
        assert isinstance(first, pb.PreferenceUpdate)
        assert first.model_version == base_version

        versions: dict[str, set[str]] = {"a": set(), "b": set()}
        errors: list[str] = []
        done = asyncio.Event()

        async def select_loop(name: str, stub: Any, user: str) -> int:
            n = 0
            while not done.is_set():
                try:
                    resp = await stub.Select(select_request(user), timeout=30)
                    versions[name].add(resp.model_version)
                    n += 1
                except grpc.aio.AioRpcError as exc:
                    errors.append(f"{name}: {exc.code().name} {exc.details()}")
                # Steady load, not a spin: fine-tuning runs in its own process now, but on a
                # 2-core machine six loops that never yield would still leave it little CPU
                # (26 of 120 steps in the 60 s budget when it was a thread of this process).
                await asyncio.sleep(0.005)
            return n

        async def record_all() -> None:
            reqs = record_requests()
            for i in range(0, len(reqs), 16):  # 16 concurrent writers, as a gateway would
                await asyncio.gather(
                    *(stub_a.RecordResponse(r, timeout=30) for r in reqs[i : i + 16])
                )

        loops = [
            asyncio.create_task(select_loop(n, s, u))
            for n, s in (("a", stub_a), ("b", stub_b))
            for u in ("user0", "user1", "cold-user")
        ]
        await record_all()
        for _ in range(600):  # ≤ 120 s for the round, the publication and B's poll
            if b.learner.scorer.model_version != base_version:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # let the Select loops see the new weights
        done.set()
        counts = await asyncio.gather(*loops)

        rounds = a.learner.rounds
        assert rounds, "no fine-tuning round ran"
        accepted = [r for r in rounds if r.outcome == "accepted"]
        assert accepted, [(r.outcome, r.reason, r.metrics) for r in rounds]
        new_version = accepted[0].new_version
        assert new_version != base_version
        assert accepted[0].metrics["new_loss"] < accepted[0].metrics["base_loss"]
        assert a.learner.scorer.model_version == b.learner.scorer.model_version
        assert b.learner.scorer.model_version in {r.new_version for r in accepted}
        assert errors == []
        assert min(counts) > 0
        assert base_version in versions["a"] and new_version in versions["a"], versions
        assert b.learner.scorer.model_version in versions["b"], versions
        after = await asyncio.wait_for(stream.read(), timeout=30)
        while isinstance(after, pb.PreferenceUpdate) and after.model_version == base_version:
            after = await asyncio.wait_for(stream.read(), timeout=30)  # feedback updates first
        assert isinstance(after, pb.PreferenceUpdate)
        assert after.user_id == "user0" and after.method == "gmtrouter"
        assert after.model_version in {r.new_version for r in accepted}
        stream.cancel()
        published = await store_a.latest_model()
        assert published is not None and published.base_version == base_version
        assert published.interactions >= 150

        # A replica started now adopts the published weights before serving.
        store_c = await make_store(kind, tmp_path, request)
        async with serving(settings(untrained_checkpoint, "follower"), store_c) as c:
            assert c.learner is not None
            assert c.learner.scorer.model_version == published.version


async def test_a_worse_round_is_discarded_and_nothing_is_published(
    untrained_checkpoint: Path, tmp_path: Path
) -> None:
    store = SQLiteGraphStore(tmp_path / "g.db", embedding_dim=DIM)
    config = settings(untrained_checkpoint, "follower", min_improvement=100.0, steps=3)
    async with follower_with_history(config, store) as (learner, stub):
        before = learner.scorer.model_version
        report = await learner.train_once(force=True)
        assert report is not None and report.outcome == "rejected", report
        assert "does not improve" in report.reason
        assert learner.scorer.model_version == before == report.new_version
        assert await store.latest_model() is None
        resp = await stub.Select(select_request("user0"), timeout=30)
        assert resp.model_version == before


async def test_frozen_weights_when_learn_preferences_is_false(
    untrained_checkpoint: Path, tmp_path: Path
) -> None:
    config = parse_settings(
        {
            "decision": {
                "algorithm": {
                    "gmtrouter": {
                        "model_path": str(untrained_checkpoint),
                        "learn_preferences": False,
                    }
                }
            },
            "server": {"port": 0, "metrics_port": 0},
        }
    )
    store = SQLiteGraphStore(tmp_path / "g.db", embedding_dim=DIM)
    async with (
        serving(config, store) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch,
    ):
        assert app.learner is None  # no background training, no weights polling
        stub = router_pb2_grpc.RouterServiceStub(ch)
        for req in record_requests()[:20]:
            await stub.RecordResponse(req, timeout=30)
        resp = await stub.Select(select_request("user0"), timeout=30)
        assert resp.method == "gmtrouter"  # history still counts at once
        assert resp.model_version == load_checkpoint(untrained_checkpoint).version


async def test_a_killed_worker_fails_its_round_and_the_next_round_gets_a_new_one(
    untrained_checkpoint: Path, tmp_path: Path
) -> None:
    store = SQLiteGraphStore(tmp_path / "g.db", embedding_dim=DIM)
    config = settings(
        untrained_checkpoint, "follower", min_improvement=100.0, steps=100_000, time_budget_s=8
    )
    async with follower_with_history(config, store) as (learner, stub):
        before = learner.scorer.model_version
        # workers of earlier tests may still be exiting: only a new one is this round's
        earlier = {p.pid for p in multiprocessing.active_children()}
        first = asyncio.create_task(learner.train_once(force=True))
        for _ in range(600):  # the worker process starts with the round
            workers = [p for p in multiprocessing.active_children() if p.pid not in earlier]
            if workers or first.done():
                break
            await asyncio.sleep(0.05)
        assert workers, "no fine-tuning worker process started"
        for worker in workers:
            worker.kill()  # as the kernel's OOM killer would
        report = await first
        assert report is not None and report.outcome == "failed", report
        assert "BrokenProcessPool" in report.reason
        # The next round runs in a new worker (rejected here only by min_improvement).
        again = await learner.train_once(force=True)
        assert again is not None and again.outcome == "rejected", again
        assert "does not improve" in again.reason
        assert learner.scorer.model_version == before
        resp = await stub.Select(select_request("user0"), timeout=30)
        assert resp.model_version == before


async def test_the_trainer_lease_is_renewed_during_a_long_round(
    untrained_checkpoint: Path, tmp_path: Path
) -> None:
    """A round outlives its training budget (the worker's start, the data, the evaluation):
    the trainer keeps renewing the lease, so no other replica can take it meanwhile."""
    store = SQLiteGraphStore(tmp_path / "g.db", embedding_dim=DIM)
    ttl = 4.6  # > check_interval_s + time_budget_s, as the configuration requires
    auto = settings(
        untrained_checkpoint,
        "auto",
        lease_ttl_s=ttl,
        time_budget_s=4,
        steps=100_000,
        min_improvement=100.0,
    )
    async with follower_with_history(settings(untrained_checkpoint, "follower"), store) as (
        learner,
        _,
    ):
        trainer = OnlineLearner(
            auto, store, learner.scorer, learner.metrics, learner.on_swap, replica_id="trainer"
        )
        assert await store.acquire_lease(LEASE_NAME, "trainer", ttl)
        start = time.monotonic()
        round_ = asyncio.create_task(trainer.train_once(force=True))
        taken_by_other = False
        while not round_.done():
            await asyncio.sleep(0.25)
            taken_by_other = taken_by_other or await store.acquire_lease(LEASE_NAME, "other", ttl)
        report = await round_
        elapsed = time.monotonic() - start
        await trainer.stop()
    assert report is not None and report.outcome == "rejected", report  # by min_improvement
    assert elapsed > ttl  # the round outlived one lease term ...
    assert not taken_by_other  # ... and the lease stayed with the trainer


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (reaped or not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_the_worker_exits_when_its_server_is_killed(tmp_path: Path) -> None:
    """SIGKILL leaves no chance to shut the pool down: the worker's watchdog ends it."""
    script = tmp_path / "server_stand_in.py"
    script.write_text(
        "import concurrent.futures, multiprocessing, os, time\n"
        "from server.learning import _init_worker\n"
        "if __name__ == '__main__':\n"
        "    ctx = multiprocessing.get_context('spawn')\n"
        "    pool = concurrent.futures.ProcessPoolExecutor(\n"
        "        1, mp_context=ctx, initializer=_init_worker, initargs=(ctx.Event(),))\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    pool.submit(time.sleep, 600)  # a long round\n"
        "    time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        text=True,
    )
    worker = 0
    try:
        assert proc.stdout is not None
        worker = int(proc.stdout.readline())
        assert _running(worker)
        time.sleep(0.5)  # the long task has started
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 15
        while _running(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _running(worker), "the worker outlived its server"
    finally:
        proc.kill()
        if worker and _running(worker):
            os.kill(worker, signal.SIGKILL)


async def test_feedback_without_session_ids_gives_a_round_one_session_per_comparison() -> None:
    """Feedback recorded through the API without a ``session_id`` (the Go client sends none
    when the router knows no conversation id) reaches a round as one session per
    comparison; as one session per user, every round was rejected ("no user with two
    sessions")."""
    import numpy as np

    from server.learning import prepare_recorded
    from tests.server.inprocess import emb, running

    async with running() as app, grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        for n in range(20):
            await stub.RecordResponse(
                pb.RecordResponseRequest(
                    user_id=f"user-{n % 2}",
                    query=f"question {n}",
                    query_embedding=emb(n),
                    comparison=pb.Comparison(winner_model="a", loser_model="b"),
                )
            )
        rows = await app.store.recent_comparisons(100)
    assert len(rows) == 20 and {r.session_id for r in rows} == {""}
    prep = prepare_recorded(rows, ["a", "b"], np.ones((2, 384), dtype=np.float32))
    assert len(set(prep.session.tolist())) == 20
    assert {prep.users[u] for u in prep.user.tolist()} == {"user-0", "user-1"}

"""``RouterServer`` start-up and shutdown: the gRPC port is bound only once the server can
answer; the drain delay, connection age, store-open wait and SIGTERM during start-up."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gmtrouter.v1 import router_pb2 as pb
from gmtrouter.v1 import router_pb2_grpc
from graphstore.sqlite_store import SQLiteGraphStore
from server.app import RouterServer
from server.config import ConfigError, parse_settings
from tests.conftest import REPO, free_port
from tests.server.inprocess import DIM, record_comparison, running, select_request


def _accepts(port: int) -> bool:
    """Whether a TCP connection to 127.0.0.1:``port`` is accepted."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0):
            return True
    except ConnectionRefusedError:
        return False


async def test_the_port_refuses_connections_while_warming_up() -> None:
    port = free_port()
    settings = parse_settings({"server": {"port": port, "metrics_port": 0}})
    app = RouterServer(settings, store=SQLiteGraphStore(":memory:", embedding_dim=DIM), environ={})
    real_warm_up = app.encoder.warm_up
    during: list[bool] = []

    def warm_up() -> None:  # the real warm-up, with a connection attempt before and after
        during.append(_accepts(port))
        real_warm_up()
        during.append(_accepts(port))

    app.encoder.warm_up = warm_up  # type: ignore[method-assign]
    await app.start()
    try:
        assert during == [False, False]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            resp = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="gmtrouter.v1.RouterService"), timeout=10
            )
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await app.stop(0)


async def test_a_second_server_on_a_port_in_use_fails_to_start() -> None:
    """grpc's default SO_REUSEPORT would let both listen and split the connections."""
    port = free_port()
    settings = parse_settings({"server": {"port": port, "metrics_port": 0}})
    first = RouterServer(
        settings, store=SQLiteGraphStore(":memory:", embedding_dim=DIM), environ={}
    )
    await first.start(warm_up=False)
    second = RouterServer(
        settings, store=SQLiteGraphStore(":memory:", embedding_dim=DIM), environ={}
    )
    try:
        with pytest.raises(RuntimeError):
            await second.start(warm_up=False)
    finally:
        await second.stop(0)
        await first.stop(0)


async def test_drain_delay_keeps_answering_while_health_says_not_serving() -> None:
    """SIGTERM on Kubernetes: the pod leaves the Service's endpoints only some time after it
    was told to stop. During ``server.drain_delay_s`` health reports NOT_SERVING (readiness
    fails) while calls are still answered, not refused; then the port closes."""
    port = free_port()
    settings = parse_settings(
        {"server": {"port": port, "metrics_port": 0, "drain_delay_s": 1.5, "grace_period_s": 1}}
    )
    app = RouterServer(settings, store=SQLiteGraphStore(":memory:", embedding_dim=DIM), environ={})
    await app.start(warm_up=False)
    stopping = asyncio.ensure_future(app.stop())
    try:
        await asyncio.sleep(0.4)
        assert not stopping.done()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="gmtrouter.v1.RouterService"), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
            resp = await router_pb2_grpc.RouterServiceStub(ch).Select(
                select_request("draining-user"), timeout=5
            )
            assert resp.selected_model in {"a", "b"}
    finally:
        await stopping
    assert not _accepts(port)


async def test_max_connection_age_recycles_connections_without_failing_calls() -> None:
    """``server.max_connection_age_s``: the server sends GOAWAY after that age, the client
    starts new calls on a new connection (and could reach another replica), and no call
    fails; a preference stream opened before the age-out keeps running and still delivers."""
    async with (
        running({"max_connection_age_s": 1}) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch,
    ):
        stub = router_pb2_grpc.RouterServiceStub(ch)
        await record_comparison(stub, "age-user", "q", "a", "b", 0)
        stream = stub.StreamPreferences(
            pb.StreamPreferencesRequest(
                user_ids=["age-user"],
                candidate_models=[pb.CandidateModel(model="a"), pb.CandidateModel(model="b")],
            )
        )
        first = await stream.read()
        assert isinstance(first, pb.PreferenceUpdate)
        assert [p.model for p in first.preferences] == ["a", "b"]
        states: list[grpc.ChannelConnectivity] = []

        async def watch() -> None:
            state = ch.get_state()
            while True:
                await ch.wait_for_state_change(state)
                state = ch.get_state()
                states.append(state)

        watcher = asyncio.ensure_future(watch())
        loop = asyncio.get_running_loop()
        end = loop.time() + 3.5
        calls = 0
        while loop.time() < end:
            await stub.Select(select_request("age-user"), timeout=5)
            calls += 1
            await asyncio.sleep(0.02)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        # The stream outlived three age-outs and still delivers: b overtakes a.
        for n in range(1, 4):
            await record_comparison(stub, "age-user", f"q{n}", "b", "a", n)
        update = await asyncio.wait_for(stream.read(), 30)
        assert isinstance(update, pb.PreferenceUpdate)
        assert [p.model for p in update.preferences] == ["b", "a"]
        stream.cancel()
    assert calls > 30
    # The connection was closed by the server's GOAWAY at least once and re-established.
    assert grpc.ChannelConnectivity.READY in states, states
    assert any(s is not grpc.ChannelConnectivity.READY for s in states), states
    with pytest.raises(ConfigError, match="at least 1 second"):
        parse_settings({"server": {"max_connection_age_s": 0.5}})


async def test_a_store_that_stays_unreachable_fails_the_start_after_open_wait_s() -> None:
    """``store.open_wait_s``: a store that cannot be opened is retried for that long (e.g. a
    Neo4j still starting), then the start fails with the store's error."""
    from graphstore.errors import StoreUnavailableError
    from graphstore.factory import Neo4jCredentials
    from graphstore.neo4j_store import Neo4jGraphStore

    settings = parse_settings(
        {
            "server": {"port": 0, "metrics_port": 0},
            "store": {"open_wait_s": 1.5, "connect_timeout_s": 0.5},
        }
    )
    store = Neo4jGraphStore(
        f"bolt://127.0.0.1:{free_port()}",
        Neo4jCredentials(),
        DIM,
        connection_timeout_s=0.5,
        connection_acquisition_timeout_s=0.5,
    )
    app = RouterServer(settings, store=store, environ={})
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        with pytest.raises(StoreUnavailableError):
            await app.start(warm_up=False)
        assert loop.time() - began >= 1.5
    finally:
        await app.stop(0, 0)


def test_sigterm_during_start_up_exits_cleanly(tmp_path: Path) -> None:
    """A pod deleted while its server starts (here: waiting for an unreachable Neo4j) gets
    SIGTERM; the process must stop at once, not finish starting or wait for SIGKILL."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "logging": {"format": "json"},
                "server": {"metrics_port": 0},
                "store": {"open_wait_s": 120, "connect_timeout_s": 0.5},
            }
        )
    )
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--config", str(cfg),
             "--store", f"bolt://127.0.0.1:{free_port()}", "--port", str(free_port())],
            cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=out,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while "store not available; retrying" not in log_path.read_text(errors="replace"):
                assert proc.poll() is None, log_path.read_text(errors="replace")
                assert time.monotonic() < deadline, log_path.read_text(errors="replace")
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    log = log_path.read_text(errors="replace")
    assert rc == 0, log
    assert "stop requested during start-up" in log, log
    assert '"event": "stopped"' in log, log

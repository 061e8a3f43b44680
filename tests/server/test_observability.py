"""Prometheus metrics over HTTP, store-error metrics, load shedding, and secrets kept out of logs.

One ``gmtrouter serve`` process with the metrics endpoint on, a bearer token from the
environment and a Neo4j password in its configuration; in-process servers for the store
error and load-shedding cases.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gmtrouter.v1 import router_pb2 as pb
from gmtrouter.v1 import router_pb2_grpc
from graphstore.errors import StoreUnavailableError
from graphstore.interactions import PairCount
from graphstore.sqlite_store import SQLiteGraphStore
from server.security import TOKENS_ENV
from tests.conftest import ServerProcess, free_port
from tests.server.inprocess import DIM, running, select_request
from tests.server.test_grpc_service import cands, emb

TOKEN = "metrics-token-0123456789abcdef"
PASSWORD = "neo4j-password-must-not-leak-42"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


@pytest.fixture(scope="module")
def metered(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, int]]:
    work = tmp_path_factory.mktemp("metered")
    port = free_port()
    config = {
        "server": {"metrics_port": port},
        "store": {"neo4j": {"password": PASSWORD}},
    }
    mp = pytest.MonkeyPatch()
    mp.setenv(TOKENS_ENV, TOKEN)
    try:
        srv = ServerProcess(work, f"sqlite:///{work}/graph.db", config).start()
    finally:
        mp.undo()
    yield srv, port
    srv.stop()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) → value, from GET /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return parse(text)


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return float(samples.get((name, tuple(sorted(labels.items()))), 0.0))


def test_metrics_endpoint(metered: tuple[ServerProcess, int]) -> None:
    srv, port = metered
    with grpc.insecure_channel(srv.address) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        stub.RecordResponse(
            pb.RecordResponseRequest(
                user_id="m-user",
                query_embedding=emb(1),
                model="m-a",
                comparison=pb.Comparison(winner_model="m-a", loser_model="m-b"),
            ),
            metadata=AUTH,
            timeout=30,
        )
        for _ in range(3):
            req = pb.SelectRequest(
                user_id="m-user", query_embedding=emb(2), candidate_models=cands("m-a", "m-b")
            )
            stub.Select(req, metadata=AUTH, timeout=30)
        with pytest.raises(grpc.RpcError):
            stub.Select(pb.SelectRequest(user_id="m-user"), metadata=AUTH, timeout=30)
        with pytest.raises(grpc.RpcError):
            stub.Select(pb.SelectRequest(user_id="m-user"), timeout=30)  # no token
        stub.DeleteUser(pb.DeleteUserRequest(user_id="m-user"), metadata=AUTH, timeout=30)
    m = scrape(port)
    rpc = "gmtrouter_rpc_requests_total"
    assert value(m, rpc, method="Select", code="OK") == 3
    assert value(m, rpc, method="Select", code="INVALID_ARGUMENT") == 1
    assert value(m, rpc, method="Select", code="UNAUTHENTICATED") == 1
    assert value(m, rpc, method="RecordResponse", code="OK") == 1
    assert value(m, rpc, method="DeleteUser", code="OK") == 1
    hist = "gmtrouter_rpc_latency_seconds"
    assert value(m, f"{hist}_count", method="Select", code="OK") == 3
    assert value(m, f"{hist}_bucket", method="Select", code="OK", le="+Inf") == 3
    assert value(m, f"{hist}_sum", method="Select", code="OK") > 0
    assert value(m, "gmtrouter_rpc_in_flight", method="Select") == 0
    assert value(m, "gmtrouter_select_decisions_total", method="bt_prior") == 3
    assert value(m, "gmtrouter_model_info", model_version="bt_prior@1") == 1
    assert value(m, "gmtrouter_users_deleted_total") == 1
    store = "gmtrouter_store_operation_seconds_count"
    assert value(m, store, operation="record") == 1
    assert value(m, store, operation="delete_user") == 1
    assert value(m, store, operation="pair_counts") >= 1
    assert any(name == "process_cpu_seconds_total" for name, _ in m)


def test_secrets_never_logged(metered: tuple[ServerProcess, int]) -> None:
    srv, _ = metered
    with grpc.insecure_channel(srv.address) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        stub.Select(select_request("log-user"), metadata=AUTH, timeout=30)
        bad = (("authorization", "Bearer not-the-token-0123456789"),)
        with pytest.raises(grpc.RpcError):
            stub.Select(select_request("log-user"), metadata=bad, timeout=30)
    log = srv.log()
    assert '"rpc"' in log and "log-user" in log
    assert TOKEN not in log
    assert "not-the-token-0123456789" not in log
    assert PASSWORD not in log


def test_every_log_line_is_json(metered: tuple[ServerProcess, int]) -> None:
    """With ``logging.format: json`` the whole log parses line by line, start-up included
    (libraries' stdlib log records too, and no progress bars)."""
    srv, _ = metered
    with grpc.insecure_channel(srv.address) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        stub.Select(select_request("json-user"), metadata=AUTH, timeout=30)
    lines = srv.log().splitlines()
    events = [json.loads(line) for line in lines if line.strip()]
    assert all(isinstance(e, dict) and "event" in e and "level" in e for e in events)
    names = {e["event"] for e in events}
    assert {"serving", "rpc"} <= names
    # the text encoder's load, logged by sentence-transformers through the stdlib
    assert any(e.get("logger", "").startswith("sentence_transformers") for e in events)


class _FailingPairs(SQLiteGraphStore):
    async def pair_counts(self) -> list[PairCount]:
        raise StoreUnavailableError("pair counts: database is down")


async def test_store_errors_are_counted() -> None:
    async with (
        running(store=_FailingPairs(":memory:", embedding_dim=DIM)) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch,
    ):
        # Select still answers (degraded: server/degraded.py); the store error is counted.
        resp = await router_pb2_grpc.RouterServiceStub(ch).Select(select_request(), timeout=10)
        assert resp.method.startswith("degraded_")
        m = parse(generate_latest(app.metrics.registry).decode())
    assert value(m, "gmtrouter_store_errors_total", operation="pair_counts") == 1
    assert value(m, "gmtrouter_rpc_requests_total", method="Select", code="OK") == 1
    assert value(m, "gmtrouter_select_degraded_total", reason="unavailable") == 1


async def test_a_reused_idempotency_key_is_no_store_error() -> None:
    """A client's reused key is INVALID_ARGUMENT, not counted against the store."""
    async with (
        running() as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch,
    ):
        stub = router_pb2_grpc.RouterServiceStub(ch)
        for user in ("alice", "bob"):
            req = pb.RecordResponseRequest(
                user_id=user, query_embedding=emb(3), model="m-a", idempotency_key="shared-key"
            )
            if user == "alice":
                await stub.RecordResponse(req, timeout=10)
                continue
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.RecordResponse(req, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert str(err.value.details()).startswith("idempotency_key:")
        m = parse(generate_latest(app.metrics.registry).decode())
    assert value(m, "gmtrouter_store_errors_total", operation="record") == 0
    assert value(m, "gmtrouter_store_operation_seconds_count", operation="record") == 2
    assert value(m, "gmtrouter_rpc_requests_total", method="RecordResponse", code="OK") == 1
    assert (
        value(m, "gmtrouter_rpc_requests_total", method="RecordResponse", code="INVALID_ARGUMENT")
        == 1
    )


async def test_metrics_port_clash_does_not_stop_serving() -> None:
    async with running({"metrics_port": free_port()}) as first:
        assert first.metrics_port
        async with running({"metrics_port": first.metrics_port}) as second:
            assert second.metrics_port == 0
            async with grpc.aio.insecure_channel(f"127.0.0.1:{second.port}") as ch:
                await router_pb2_grpc.RouterServiceStub(ch).Select(select_request(), timeout=10)


# -- load shedding -----------------------------------------------------------------------------


class _SlowPairs(SQLiteGraphStore):
    """pair_counts (read by every Select of the prior) waits until released."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.gate = asyncio.Event()
        self.waiting = 0

    async def pair_counts(self) -> list[PairCount]:
        self.waiting += 1
        await self.gate.wait()
        return []


async def test_load_shedding_resource_exhausted() -> None:
    store = _SlowPairs(":memory:", embedding_dim=DIM)
    settings = {"max_inflight": 2}
    async with (
        running(settings, store=store) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch,
    ):
        stub = router_pb2_grpc.RouterServiceStub(ch)
        # the prior scorer serialises refits behind a lock: distinct calls still hold slots
        held = [asyncio.ensure_future(stub.Select(select_request(), timeout=20)) for _ in "ab"]
        for _ in range(200):
            if store.waiting >= 1 and all(not h.done() for h in held):
                await asyncio.sleep(0.2)
                break
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Select(select_request(), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "server.max_inflight" in str(err.value.details())
        # health is never shed
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        store.gate.set()
        done: Sequence[pb.SelectResponse] = await asyncio.gather(*held)
        assert all(r.selected_model in {"a", "b"} for r in done)
        # capacity is back once they finished
        assert (await stub.Select(select_request(), timeout=10)).selected_model in {"a", "b"}


def test_max_inflight_setting_bounds(tmp_path: Path) -> None:
    from server.config import ConfigError, parse_settings

    assert parse_settings({}).server.max_inflight == 0
    assert parse_settings({}).server.metrics_port == 9090
    with pytest.raises(ConfigError, match=r"server\.max_inflight"):
        parse_settings({"server": {"max_inflight": -1}})

"""``RouterServer`` start-up: the gRPC port is bound only once the server can answer."""

from __future__ import annotations

import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from graphstore.sqlite_store import SQLiteGraphStore
from server.app import RouterServer
from server.config import parse_settings
from tests.conftest import free_port
from tests.server.inprocess import DIM


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

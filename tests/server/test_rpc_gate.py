"""The gate around RouterService methods (server/rpc_gate.py): what it registers and refuses,
and its per-call order over a real socket (a stand-in servicer on a grpc.aio server).

The whole server's tokens, load shedding and metrics are tested in test_security.py and
test_observability.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from structlog.testing import capture_logs

from gmtrouter.v1 import router_pb2 as pb
from gmtrouter.v1 import router_pb2_grpc
from server.degraded import CALL_DEADLINE
from server.metrics import Metrics
from server.rpc_gate import RpcGate
from server.security import TOKENS_ENV, BearerAuth, TokenTable
from server.servicer import RouterServicer
from tests.server.inprocess import running, select_request


async def test_registers_every_router_method_wrapped() -> None:
    server = grpc.aio.server()
    seen: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def record(service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        seen[service] = handlers

    server.add_registered_method_handlers = record  # type: ignore[attr-defined]
    servicer = RouterServicer(cast(Any, None))
    RpcGate(None).register(router_pb2_grpc.add_RouterServiceServicer_to_server, servicer, server)
    handlers = seen["gmtrouter.v1.RouterService"]
    assert set(handlers) == set(pb.DESCRIPTOR.services_by_name["RouterService"].methods_by_name)
    assert handlers["StreamPreferences"].unary_stream is not None
    for name in ("Select", "RecordResponse", "DeleteUser"):
        wrapped = handlers[name].unary_unary
        assert wrapped is not None
        assert wrapped != getattr(servicer, name)  # the gate's wrapper, not the servicer
        assert handlers[name].request_deserializer is not None


async def test_refuses_what_it_cannot_gate() -> None:
    with pytest.raises(ValueError, match="max_inflight"):
        RpcGate(None, max_inflight=-1)

    def registers_nothing(servicer: Any, server: Any) -> None:
        pass

    with pytest.raises(ValueError, match="registered no method handler"):
        RpcGate(None).register(
            registers_nothing, RouterServicer(cast(Any, None)), grpc.aio.server()
        )

    async def uploads(requests: Any, context: Any) -> Any:
        return None

    with pytest.raises(TypeError, match="Upload"):
        RpcGate(None).wrap("Upload", grpc.stream_unary_rpc_method_handler(uploads))


def test_bearer_check_names_what_is_wrong() -> None:
    table = TokenTable.from_tokens({"route-token-0123456789abcdef": frozenset({"route"})})
    auth = BearerAuth(table)
    bearer = (("authorization", "Bearer route-token-0123456789abcdef"),)
    assert auth.check("Select", bearer) is None
    code, message = auth.check("Select", ()) or (None, "")
    assert code == grpc.StatusCode.UNAUTHENTICATED and "missing bearer token" in message
    code, message = auth.check("Select", (("authorization", "Bearer x" * 3),)) or (None, "")
    assert code == grpc.StatusCode.UNAUTHENTICATED and "invalid" in message
    code, message = auth.check("DeleteUser", bearer) or (None, "")
    assert code == grpc.StatusCode.PERMISSION_DENIED and "'admin'" in message


async def test_rejected_call_is_logged_with_its_status() -> None:
    async with (
        running(environ={TOKENS_ENV: "route-token-0123456789abcdef"}) as app,
        grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as ch,
    ):
        stub = router_pb2_grpc.RouterServiceStub(ch)
        with capture_logs() as logs, pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Select(select_request(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    [line] = [e for e in logs if e["event"] == "rpc"]
    assert line["method"] == "Select" and line["status"] == "UNAUTHENTICATED"


class _HeldServicer(router_pb2_grpc.RouterServiceServicer):
    """Select waits for ``release`` and notes the deadline the gate published."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.deadlines: list[float | None] = []

    async def Select(self, request: Any, context: Any) -> pb.SelectResponse:
        self.deadlines.append(CALL_DEADLINE.get())
        self.entered.set()
        await self.release.wait()
        return pb.SelectResponse(selected_model="a")

    async def RecordResponse(self, request: Any, context: Any) -> Any:
        raise NotImplementedError

    async def DeleteUser(self, request: Any, context: Any) -> Any:
        raise NotImplementedError

    def StreamPreferences(self, request: Any, context: Any) -> Any:
        raise NotImplementedError


async def test_order_deadline_shedding_and_what_is_logged() -> None:
    token = "route-token-0123456789abcdef"
    metrics = Metrics()
    gate = RpcGate(metrics, BearerAuth(TokenTable.from_tokens({token: frozenset({"route"})})), 1)
    servicer = _HeldServicer()
    server = grpc.aio.server()
    gate.register(router_pb2_grpc.add_RouterServiceServicer_to_server, servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    md = (("authorization", f"Bearer {token}"),)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = router_pb2_grpc.RouterServiceStub(ch)
            with capture_logs() as logs:
                held = asyncio.ensure_future(stub.Select(select_request(), metadata=md, timeout=20))
                await asyncio.wait_for(servicer.entered.wait(), 10)
                # the deadline reached the servicer: about 20 s from now. grpc core writes a
                # timeout of 10-100 s in the grpc-timeout header in 100 ms units, rounded up
                # (Timeout::FromMillis, src/core/lib/transport/timeout_encoding.cc): 20 s
                # can arrive as 20.1 s (CI saw that), so the bound leaves 0.5 s.
                [deadline] = servicer.deadlines
                assert deadline is not None and 15 < deadline - time.monotonic() <= 20.5
                # the slot is taken: a call without a token is refused by the token check
                # first, one with a token by load shedding
                for metadata, code in (
                    ((), grpc.StatusCode.UNAUTHENTICATED),
                    (md, grpc.StatusCode.RESOURCE_EXHAUSTED),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await stub.Select(select_request(), metadata=metadata, timeout=10)
                    assert err.value.code() == code
                # health checks are never gated: no token, not shed, not logged
                await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=10
                )
                # a client that gives up frees its slot
                held.cancel()
                for _ in range(200):
                    if gate.in_flight == 0:
                        break
                    await asyncio.sleep(0.01)
                assert gate.in_flight == 0
                servicer.release.set()
                assert (
                    await stub.Select(select_request(), metadata=md, timeout=10)
                ).selected_model == "a"
    finally:
        await server.stop(None)
    statuses = [(e["method"], e["status"]) for e in logs if e["event"] == "rpc"]
    assert sorted(statuses) == sorted(
        [
            ("Select", "CANCELLED"),
            ("Select", "UNAUTHENTICATED"),
            ("Select", "RESOURCE_EXHAUSTED"),
            ("Select", "OK"),
        ]
    )
    counted = {
        s.labels["code"]: s.value
        for m in metrics.registry.collect()
        if m.name == "gmtrouter_rpc_requests"
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert counted == {"CANCELLED": 1, "UNAUTHENTICATED": 1, "RESOURCE_EXHAUSTED": 1, "OK": 1}

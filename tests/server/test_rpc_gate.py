"""The gate around RouterService methods (server/rpc_gate.py): what it registers and refuses.

Its per-call behaviour over a real socket (tokens, load shedding, metrics, the access log)
is tested in test_security.py and test_observability.py.
"""

from __future__ import annotations

from typing import Any, cast

import grpc
import pytest
from structlog.testing import capture_logs

from gmtrouter.v1 import router_pb2 as pb
from gmtrouter.v1 import router_pb2_grpc
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

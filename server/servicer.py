"""The ``gmtrouter.v1.RouterService`` gRPC servicer: convert, delegate, map errors."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from gmtrouter.v1 import router_pb2 as pb
from gmtrouter.v1 import router_pb2_grpc as pb_grpc
from server import converters
from server.errors import status_for
from server.routing import RoutingService


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> None:
    code = status_for(exc)
    message = str(exc) if code != grpc.StatusCode.INTERNAL else f"internal error: {exc!r}"
    await context.abort(code, message)


class RouterServicer(pb_grpc.RouterServiceServicer):
    """Thin servicer: protobuf ⇄ domain, then :class:`RoutingService`."""

    def __init__(self, service: RoutingService) -> None:
        self.service = service

    async def Select(  # noqa: N802 - gRPC method name
        self, request: pb.SelectRequest, context: grpc.aio.ServicerContext
    ) -> pb.SelectResponse:
        try:
            sel = await self.service.select(converters.select_from_proto(request))
        except Exception as exc:
            await _abort(context, exc)
            raise  # unreachable: abort raises
        return converters.selection_to_proto(sel)

    async def RecordResponse(  # noqa: N802
        self, request: pb.RecordResponseRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordResponseResponse:
        try:
            rec = await self.service.record(converters.record_from_proto(request))
        except Exception as exc:
            await _abort(context, exc)
            raise
        return converters.recorded_to_proto(rec)

    async def DeleteUser(  # noqa: N802
        self, request: pb.DeleteUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteUserResponse:
        try:
            deleted = await self.service.delete_user(request.user_id)
        except Exception as exc:
            await _abort(context, exc)
            raise
        return converters.deleted_to_proto(deleted)

    async def StreamPreferences(  # noqa: N802
        self, request: pb.StreamPreferencesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PreferenceUpdate]:
        stream = self.service.stream_preferences(
            list(request.user_ids), converters.candidates_from_proto(request.candidate_models)
        )
        try:
            async for ranking in stream:
                yield converters.ranking_to_proto(ranking)
        except Exception as exc:
            await _abort(context, exc)
        finally:
            await stream.aclose()

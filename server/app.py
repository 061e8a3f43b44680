"""Assemble and run the ``grpc.aio`` server: store, scorer, servicers, health, reflection.

Lifecycle (engineering notes, "gRPC facts"): health starts NOT_SERVING, becomes SERVING once
the store is open and the models are loaded and warm; on SIGTERM/SIGINT it goes NOT_SERVING,
in-flight calls get ``server.grace_period_s`` to finish, then the store is flushed and closed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import structlog
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from gmtrouter.v1 import router_pb2, router_pb2_grpc
from graphstore.factory import Neo4jCredentials, create_store
from graphstore.store import GraphStore
from model.text_encoder import TextEncoder
from server.config import Settings
from server.routing import RoutingService
from server.scoring import PriorScorer, Scorer
from server.servicer import RouterServicer

log = structlog.get_logger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name


class _AccessLog(grpc.aio.ServerInterceptor):
    """One log line per RPC: method, user id, latency in ms, status code."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith("/grpc."):
            return handler

        def _done(
            request: Any, context: grpc.aio.ServicerContext, start: float, status: str
        ) -> None:
            user = getattr(request, "user_id", None) or ",".join(getattr(request, "user_ids", []))
            log.info(
                "rpc",
                method=method.rsplit("/", 1)[-1],
                user_id=user,
                request_id=getattr(request, "request_id", "") or None,
                latency_ms=round((time.perf_counter() - start) * 1e3, 3),
                status=status,
            )

        def _status(context: grpc.aio.ServicerContext, exc: BaseException | None) -> str:
            code = context.code() if hasattr(context, "code") else None
            if isinstance(code, grpc.StatusCode):
                return code.name
            if exc is None:
                return "OK"
            return "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "INTERNAL"

        if handler.unary_unary is not None:
            inner_uu: Any = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start = time.perf_counter()
                exc: BaseException | None = None
                try:
                    return await inner_uu(request, context)
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    _done(request, context, start, _status(context, exc))

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_us: Any = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                start = time.perf_counter()
                exc: BaseException | None = None
                try:
                    async for item in inner_us(request, context):
                        yield item
                except BaseException as e:
                    exc = e
                    raise
                finally:
                    _done(request, context, start, _status(context, exc))

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def build_scorer(
    settings: Settings,
    store: GraphStore,
    encoder: TextEncoder,
    executor: concurrent.futures.Executor,
) -> Scorer:
    """The network scorer when ``model_path`` is set, else the Bradley–Terry prior.

    Raises:
        model.checkpoint.CheckpointError: the checkpoint is missing, corrupt or does not match
            the configuration (at start, not at the first request).
    """
    prior = PriorScorer(store, settings.prior.refresh_s, settings.prior.prior_strength)
    if settings.gmtrouter.model_path:
        from server.personalization import NetworkScorer

        return NetworkScorer.from_settings(settings, store, encoder, executor, prior)
    return prior


class RouterServer:
    """The running service. Use :meth:`start`, then :meth:`stop` (or :func:`serve`).

    Args:
        settings: The validated configuration (``server.port`` 0 picks a free port).
        store: Optional already-created store (tests); by default one is made from
            ``store.uri``.
    """

    def __init__(self, settings: Settings, store: GraphStore | None = None) -> None:
        self.settings = settings
        creds = settings.store.neo4j
        self.store = store or create_store(
            settings.store.uri,
            embedding_dim=settings.embedding.dim,
            neo4j=Neo4jCredentials(creds.user, creds.password.get_secret_value(), creds.database),
        )
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.server.max_workers, thread_name_prefix="torch"
        )
        self.encoder = TextEncoder(settings.embedding.model, settings.embedding.device)
        self.health = HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.service: RoutingService | None = None
        self.port = 0

    async def start(self, *, warm_up: bool = True) -> int:
        """Open the store, load models, bind the port and report SERVING.

        Args:
            warm_up: Load the text encoder (and network) before reporting SERVING.

        Returns:
            The bound port.

        Raises:
            RuntimeError: the port cannot be bound.
            graphstore.errors.StoreUnavailableError: the store cannot be opened.
        """
        torch.set_num_threads(1)
        self.server = grpc.aio.server(interceptors=[_AccessLog()])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.store.open()
        scorer = build_scorer(self.settings, self.store, self.encoder, self.executor)
        self.service = RoutingService(
            self.settings, self.store, scorer, self.encoder, self.executor
        )
        router_pb2_grpc.add_RouterServiceServicer_to_server(
            RouterServicer(self.service), self.server
        )
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        address = f"{self.settings.server.host}:{self.settings.server.port}"
        self.port = self.server.add_insecure_port(address)
        if self.port == 0:
            raise RuntimeError(f"cannot bind the gRPC port at {address}")
        if warm_up:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.executor, self.encoder.warm_up)
            warm = getattr(scorer, "warm_up", None)
            if warm is not None:
                await warm()
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving",
            address=f"{self.settings.server.host}:{self.port}",
            store=_redact(self.settings.store.uri),
            scorer=type(scorer).__name__,
        )
        return self.port

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, let in-flight calls finish (``grace_s``), flush and close the store."""
        grace = self.settings.server.grace_period_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        await self.store.close()
        self.executor.shutdown(wait=True, cancel_futures=True)
        log.info("stopped")


def _redact(uri: str) -> str:
    """A store URI without credentials, for logs."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


async def serve(settings: Settings) -> None:
    """Run the service until SIGTERM or SIGINT, then shut down gracefully."""
    app = RouterServer(settings)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down", grace_period_s=settings.server.grace_period_s)
    await app.stop()

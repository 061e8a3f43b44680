"""Assemble and run the ``grpc.aio`` server: store, scorer, servicers, health, reflection.

Lifecycle (engineering notes, "gRPC facts"): health starts NOT_SERVING, becomes SERVING once
the store is open and the models are loaded and warm; on SIGTERM/SIGINT it goes NOT_SERVING,
keeps answering for ``server.drain_delay_s`` (a load balancer stops sending new calls), then
in-flight calls get ``server.grace_period_s`` to finish, then the store is flushed and closed.
A SIGTERM during start-up stops the start and exits.

Every RouterService method goes through :class:`server.rpc_gate.RpcGate`, outermost first:
access log + metrics (sees every outcome, rejections included), bearer-token authentication
(``server/security.py``, when tokens are configured), load shedding
(``server.max_inflight``). TLS/mTLS comes from ``server.tls``; Prometheus
metrics are served on ``server.metrics_port`` (``server/metrics.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import signal
from collections.abc import Mapping
from typing import TYPE_CHECKING

import grpc
import structlog
import threadpoolctl
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from gmtrouter.v1 import router_pb2, router_pb2_grpc
from graphstore.errors import StoreRefusedError, StoreUnavailableError
from graphstore.factory import Neo4jCredentials, create_store
from graphstore.interactions import query_key
from graphstore.store import GraphStore
from model.text_encoder import TextEncoder, auto_threads
from server.config import ServerSettings, Settings
from server.degraded import BudgetedStore, DegradingScorer, SnapshotPriorScorer
from server.heap import freeze_long_lived, thaw
from server.metrics import InstrumentedStore, Metrics
from server.query_evidence import QueryEvidenceSource
from server.routing import RoutingService
from server.rpc_gate import RpcGate
from server.scoring import Scorer
from server.security import BearerAuth, load_tokens, server_credentials
from server.servicer import RouterServicer
from server.user_evidence import UserEvidenceSource

if TYPE_CHECKING:
    from server.learning import OnlineLearner

log = structlog.get_logger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name

#: Longest wait for the store to flush and close at shutdown, after the grace period, in
#: seconds.
STORE_CLOSE_TIMEOUT_S = 10.0


def _event_loop_name() -> str:
    """``uvloop`` or ``asyncio``: which event loop runs this server (``server.event_loop``)."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"


def build_scorer(
    settings: Settings,
    store: GraphStore,
    encoder: TextEncoder,
    executor: concurrent.futures.Executor,
    metrics: Metrics | None = None,
) -> DegradingScorer:
    """The network scorer when ``model_path`` is set, else the Bradley–Terry prior; wrapped so
    that Select answers degraded when the store is down or slow (``server/degraded.py``).

    Every store read of the scorer gives up after ``store.select_timeout_ms``.

    Raises:
        model.checkpoint.CheckpointError: the checkpoint is missing, corrupt or does not match
            the configuration (at start, not at the first request).
    """
    budgeted = BudgetedStore(store, settings.store.select_timeout_ms)
    prior = SnapshotPriorScorer(budgeted, settings.prior.refresh_s, settings.prior.prior_strength)
    inner: Scorer = prior
    if settings.gmtrouter.model_path:
        from server.personalization import NetworkScorer

        inner = NetworkScorer.from_settings(settings, budgeted, encoder, executor, prior)
    return DegradingScorer(inner, prior, metrics, budgeted)


class RouterServer:
    """The running service. Use :meth:`start`, then :meth:`stop` (or :func:`serve`).

    Args:
        settings: The validated configuration (``server.port`` 0 picks a free port).
        store: Optional already-created store (tests); by default one is made from
            ``store.uri``.
        environ: Environment for secrets (``GMTROUTER_AUTH_TOKENS``); ``os.environ`` by
            default.
    """

    def __init__(
        self,
        settings: Settings,
        store: GraphStore | None = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.environ = os.environ if environ is None else environ
        creds = settings.store.neo4j
        self.store = store or create_store(
            settings.store.uri,
            embedding_dim=settings.embedding.dim,
            neo4j=Neo4jCredentials(creds.user, creds.password.get_secret_value(), creds.database),
        )
        _apply_store_timeouts(self.store, settings)
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=settings.server.max_workers, thread_name_prefix="torch"
        )
        self.encoder = TextEncoder(
            settings.embedding.model,
            settings.embedding.device,
            settings.embedding.backend,
            threads=settings.embedding.threads or auto_threads(),
        )
        self.health = HealthServicer()
        self.metrics = Metrics()
        self.server: grpc.aio.Server | None = None
        self.service: RoutingService | None = None
        #: Online learning (``server/learning.py``); None without a network checkpoint.
        self.learner: OnlineLearner | None = None
        self.port = 0
        self._froze = False  # start() froze the heap (server/heap.py): stop() thaws it
        #: Bound port of the /metrics endpoint (0 when off or not bound).
        self.metrics_port = 0

    async def start(self, *, warm_up: bool = True) -> int:
        """Open the store, load models, warm up, then bind the port and report SERVING.

        Args:
            warm_up: Load the text encoder (and network) before reporting SERVING.

        Returns:
            The bound port.

        Raises:
            RuntimeError: the port cannot be bound.
            server.security.SecurityConfigError: a TLS file or the token list is unusable.
            graphstore.errors.StoreUnavailableError: the store cannot be opened.
        """
        torch.set_num_threads(1)
        # The prediction head is NumPy on the event loop: OpenBLAS's own thread pool (one
        # thread per host core, blind to container CPU limits) turned a 1 ms batched pass into
        # 84-95 ms on a busy 2-core machine. One thread, like torch.
        threadpoolctl.threadpool_limits(limits=1, user_api="blas")
        cfg = self.settings.server
        credentials = server_credentials(cfg.tls)
        tokens = load_tokens(cfg.auth, self.environ)
        if tokens.enabled and credentials is None:
            log.warning("bearer tokens over plaintext gRPC: configure server.tls")
        gate = RpcGate(
            self.metrics, BearerAuth(tokens) if tokens.enabled else None, cfg.max_inflight
        )
        self.server = grpc.aio.server(options=_server_options(cfg))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.NOT_SERVING)
        await _open_store(self.store, self.settings.store.open_wait_s)
        store = InstrumentedStore(self.store, self.metrics)
        scorer = build_scorer(self.settings, store, self.encoder, self.executor, self.metrics)
        evidence = QueryEvidenceSource(
            self.settings.query_evidence, scorer.prior.store, scorer.prior, self.executor
        )
        user_evidence = UserEvidenceSource(
            self.settings.user_evidence, scorer.prior.store, scorer.prior, self.executor
        )
        self.service = RoutingService(
            self.settings, store, scorer, self.encoder, self.executor, evidence, user_evidence
        )
        if self.settings.gmtrouter.model_path and self.settings.gmtrouter.learn_preferences:
            from server.learning import OnlineLearner
            from server.personalization import NetworkScorer

            assert isinstance(scorer.inner, NetworkScorer)
            self.learner = OnlineLearner(
                self.settings, store, scorer.inner, self.metrics, self.service.notify_all
            )
            await self.learner.start()
        gate.register(
            router_pb2_grpc.add_RouterServiceServicer_to_server,
            RouterServicer(self.service),
            self.server,
        )
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        if cfg.metrics_port:
            try:
                self.metrics_port = self.metrics.serve(cfg.host, cfg.metrics_port)
            except OSError as exc:
                # Metrics are auxiliary: a clash (e.g. two servers on one host) must not stop
                # routing. Prometheus shows the target as down.
                log.error(
                    "metrics endpoint not started",
                    address=f"{cfg.host}:{cfg.metrics_port}",
                    error=str(exc),
                )
        if warm_up:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.executor, self.encoder.warm_up)
            warm = getattr(scorer, "warm_up", None)
            if warm is not None:
                await warm()
            await _warm_store_reads(store, self.settings)
            # everything loaded so far lives as long as the process: keep it out of the
            # collector's full passes, which otherwise stall the event loop ~0.5 s
            freeze_long_lived()
            self._froze = True
        # The port is bound last: until the server can answer, a connection is refused (a
        # client fails fast with UNAVAILABLE and retries) instead of accepted and left
        # waiting, and a TCP probe (the chart's probes with TLS on) does not pass early.
        address = f"{cfg.host}:{cfg.port}"
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        if self.port == 0:
            raise RuntimeError(f"cannot bind the gRPC port at {address}")
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving",
            address=f"{cfg.host}:{self.port}",
            store=_redact(self.settings.store.uri),
            store_type=type(self.store).__name__,
            scorer=type(scorer.inner).__name__,
            tls=("mtls" if cfg.tls.require_client_auth else "tls") if credentials else "off",
            auth_tokens=len(tokens),
            metrics_port=self.metrics_port or None,
            max_inflight=cfg.max_inflight or None,
            event_loop=_event_loop_name(),
        )
        self.metrics.set_model_version(getattr(scorer, "model_version", "unknown"))
        return self.port

    async def stop(self, grace_s: float | None = None, drain_delay_s: float | None = None) -> None:
        """NOT_SERVING, keep answering for ``drain_delay_s`` (default ``server.drain_delay_s``),
        let in-flight calls finish (``grace_s``, default ``server.grace_period_s``), flush and
        close the store (waiting at most :data:`STORE_CLOSE_TIMEOUT_S` for it).

        Also valid after a start that failed or was cancelled part-way (it then closes what
        was opened). All times in seconds.
        """
        cfg = self.settings.server
        grace = cfg.grace_period_s if grace_s is None else grace_s
        delay = cfg.drain_delay_s if drain_delay_s is None else drain_delay_s
        await self.health.enter_graceful_shutdown()
        if self.server is not None and self.port and delay > 0:
            # Kubernetes removes a terminating pod from the Service's endpoints asynchronously
            # (and kube-proxy / clients notice later still): calls keep arriving for a moment.
            # Answering them, rather than refusing them, is what this delay is for.
            log.info("draining", drain_delay_s=delay)
            await asyncio.sleep(delay)
        if self.server is not None:
            await self.server.stop(grace)
        if self.learner is not None:
            await self.learner.stop()
        try:
            await asyncio.wait_for(asyncio.shield(self.store.close()), STORE_CLOSE_TIMEOUT_S)
        except TimeoutError:
            # A store that stalls (a stopped Neo4j) must not hold the process: the writes still
            # in flight belong to calls that have ended unacknowledged (their clients retry
            # with the same idempotency key), so nothing acknowledged is lost.
            log.error("store did not close in time; exiting", timeout_s=STORE_CLOSE_TIMEOUT_S)
        self.metrics.close()
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self._froze:
            thaw()
        log.info("stopped")


def _server_options(cfg: ServerSettings) -> tuple[tuple[str, int], ...]:
    """grpc.aio server channel arguments for ``server.*``.

    grpc enables SO_REUSEPORT by default: a second server on a port in use would then start
    and take part of the connections. Off, binding a used port fails. With
    ``server.max_connection_age_s`` each connection gets a GOAWAY after that age: clients
    start new calls on a new connection, and a client behind a Kubernetes Service or on a
    headless Service's DNS name reaches replicas added since. Calls in flight on the old
    connection, long-lived StreamPreferences streams included, run on until they end
    (grpc's default unbounded ``max_connection_age_grace_ms``): a bounded grace would cut
    every preference stream at each age-out.
    """
    options: list[tuple[str, int]] = [("grpc.so_reuseport", 0)]
    if cfg.max_connection_age_s > 0:
        options.append(("grpc.max_connection_age_ms", round(cfg.max_connection_age_s * 1000)))
    return tuple(options)


async def _open_store(store: GraphStore, wait_s: float) -> None:
    """Open the store; while it is unavailable, retry for up to ``wait_s`` seconds.

    Raises:
        graphstore.errors.StoreRefusedError: at once: the store refused the credentials, the
            database or the URI (retrying would not help, and repeated logins with a wrong
            password can lock the user out for every replica).
        graphstore.errors.StoreUnavailableError: it still cannot be opened after ``wait_s``
            (at once when ``wait_s`` is 0).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    pause = 0.5
    while True:
        try:
            await store.open()
            return
        except StoreRefusedError:
            raise
        except StoreUnavailableError as exc:
            left = deadline - loop.time()
            if left <= 0:
                raise
            log.warning(
                "store not available; retrying",
                error=str(exc),
                retry_in_s=round(min(pause, left), 1),
                gives_up_in_s=round(left, 1),
            )
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, 10.0)


def _apply_store_timeouts(store: GraphStore, settings: Settings) -> None:
    """Give a Neo4j store (not yet open) the ``store.*`` timeouts, so that a call fails fast
    with UNAVAILABLE when Neo4j is down instead of waiting for the driver's defaults (60 s
    connection acquisition, 30 s transaction retries)."""
    from graphstore.neo4j_store import Neo4jGraphStore

    if isinstance(store, Neo4jGraphStore):
        cfg = settings.store
        store.connection_timeout_s = cfg.connect_timeout_s
        store.connection_acquisition_timeout_s = cfg.acquire_timeout_s
        store.max_transaction_retry_time_s = cfg.retry_time_s


async def _warm_store_reads(store: GraphStore, settings: Settings) -> None:
    """Run each Select-path read once before SERVING, without a time budget.

    Neo4j plans a query on its first run (seconds on a busy machine); without this the first
    Selects after a start would exceed ``store.select_timeout_ms`` and answer degraded. A
    failing store is only logged here (Select degrades until it answers).
    """
    s = settings.sampler
    try:
        await store.user_version("__warm_up__")
        await store.neighbourhood("__warm_up__", s.hops, s.fan_out)
        await store.pair_counts()
        await store.query_pair_counts(
            query_key("__warm_up__"), settings.query_evidence.max_comparisons
        )
        await store.user_comparisons("__warm_up__", settings.user_evidence.max_comparisons)
    except StoreUnavailableError as exc:
        log.warning("store reads not warmed up", error=str(exc))


def _redact(uri: str) -> str:
    """A store URI without credentials, for logs."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return uri


async def serve(settings: Settings) -> None:
    """Run the service until SIGTERM or SIGINT, then shut down gracefully.

    The signal handlers are installed before the start-up (loading models, opening the
    store: seconds to minutes): a SIGTERM then cancels the start and the process exits
    cleanly. Without them, a process that is PID 1 in a container ignores SIGTERM, and a pod
    deleted while starting would wait for SIGKILL.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = RouterServer(settings)
    starting = asyncio.ensure_future(app.start())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        log.info("stop requested during start-up; exiting")
        starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await app.stop(grace_s=0, drain_delay_s=0)
        return
    stopping.cancel()
    try:
        starting.result()
    except BaseException:
        await app.stop(grace_s=0, drain_delay_s=0)
        raise
    await stop.wait()
    log.info(
        "shutting down",
        drain_delay_s=settings.server.drain_delay_s,
        grace_period_s=settings.server.grace_period_s,
    )
    await app.stop()

"""Prometheus metrics: RPCs, store operations, decisions, model version; the /metrics endpoint.

One :class:`Metrics` object per server, on its own registry (no module-level state), served
over HTTP on ``server.metrics_port``. Series (all prefixed ``gmtrouter_``):

* ``rpc_requests_total{method,code}`` and ``rpc_latency_seconds{method,code}`` (histogram):
  every RouterService RPC, recorded by the RPC gate (``server/rpc_gate.py``).
* ``rpc_in_flight{method}``: RPCs being handled now.
* ``store_operation_seconds{operation}`` (histogram) and ``store_errors_total{operation}``:
  every graph-store call, through :class:`InstrumentedStore`.
* ``select_decisions_total{method}``: Select answers by decision method (``bt_prior``,
  ``gmtrouter``, ``*_cold_start``, ``degraded_*``): the cold-start share is
  ``sum(rate(...{method=~".*cold_start"})) / sum(rate(...))``.
* ``select_degraded_total{reason}``: Select answers given without the graph store
  (``server/degraded.py``): ``unavailable`` (the store failed, or failed less than a second
  ago), ``slow`` (a read took longer than ``store.select_timeout_ms``), ``deadline`` (the
  call's gRPC deadline came first).
* ``model_info{model_version}`` (always 1): the scoring model version of the latest Select.
* ``users_deleted_total``: successful DeleteUser calls.
* ``fine_tune_rounds_total{outcome}``, ``model_swaps_total{source}`` and ``trainer`` (0/1):
  online learning (``server/learning.py``).
* the ``process_*``, ``python_gc_*`` and ``python_info`` collectors of prometheus-client.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.metrics import MetricWrapperBase

from gmtrouter.v1 import router_pb2 as pb
from graphstore.errors import IdempotencyConflictError
from graphstore.interactions import (
    Interaction,
    PairCount,
    RecordedComparison,
    RecordResult,
    UserComparison,
)
from graphstore.neighbourhood import Neighbourhood
from graphstore.registry import PublishedModel
from graphstore.store import GraphStore

log = structlog.get_logger(__name__)

#: Latency buckets in seconds: sub-millisecond scoring up to slow store round trips.
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


class Metrics:
    """The service's metrics on a private registry.

    Args:
        registry: Registry to register on (a fresh one by default).
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.rpc_requests = Counter(
            "gmtrouter_rpc_requests",
            "RouterService RPCs handled, by method and final gRPC status code.",
            ["method", "code"],
            registry=r,
        )
        self.rpc_latency = Histogram(
            "gmtrouter_rpc_latency_seconds",
            "RouterService RPC latency in seconds (streams: lifetime), by method and code.",
            ["method", "code"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.rpc_in_flight = Gauge(
            "gmtrouter_rpc_in_flight",
            "RouterService RPCs being handled now, by method.",
            ["method"],
            registry=r,
        )
        self.store_latency = Histogram(
            "gmtrouter_store_operation_seconds",
            "Graph-store call latency in seconds, by operation.",
            ["operation"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.store_errors = Counter(
            "gmtrouter_store_errors",
            "Graph-store calls that raised (e.g. StoreUnavailableError; not a client's reused "
            "idempotency key), by operation.",
            ["operation"],
            registry=r,
        )
        self.select_decisions = Counter(
            "gmtrouter_select_decisions",
            "Select answers by decision method (cold start, personalized, prior, degraded).",
            ["method"],
            registry=r,
        )
        self.select_degraded = Counter(
            "gmtrouter_select_degraded",
            "Select answers given without the graph store, by reason (unavailable, slow, "
            "deadline).",
            ["reason"],
            registry=r,
        )
        self.model_info = Gauge(
            "gmtrouter_model_info",
            "Scoring model version of the latest Select (value always 1).",
            ["model_version"],
            registry=r,
        )
        self.users_deleted = Counter(
            "gmtrouter_users_deleted", "Successful DeleteUser calls.", registry=r
        )
        self.fine_tune_rounds = Counter(
            "gmtrouter_fine_tune_rounds",
            "Online fine-tuning rounds run by this replica, by outcome (accepted, rejected, "
            "failed).",
            ["outcome"],
            registry=r,
        )
        self.model_swaps = Counter(
            "gmtrouter_model_swaps",
            "Network weights swapped in while serving, by source (trained here, loaded).",
            ["source"],
            registry=r,
        )
        self.trainer = Gauge(
            "gmtrouter_trainer",
            "1 while this replica is the online-learning trainer (holds the lease), else 0.",
            registry=r,
        )
        self._model_version: str | None = None
        #: Labelled children by (metric, label values), see :meth:`labelled`.
        self._children: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}
        self._lock = threading.Lock()
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None

    # -- recording ---------------------------------------------------------------------------

    def labelled(self, metric: MetricWrapperBase, *values: str) -> Any:
        """``metric.labels(*values)``, memoised: every RPC and store call updates a few
        labelled series, and prometheus_client checks the label values and takes a lock on
        each ``labels()`` call. For metrics whose series are never removed (all but
        ``model_info``), whose label values come from a small fixed set (method names,
        status codes, store operations).

        Raises:
            ValueError: ``values`` do not match the metric's label names (prometheus_client).
        """
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def observe_rpc(self, method: str, code: str, latency_s: float) -> None:
        """Count one finished RPC and its latency."""
        self.labelled(self.rpc_requests, method, code).inc()
        self.labelled(self.rpc_latency, method, code).observe(latency_s)

    def observe_response(self, method: str, response: Any) -> None:
        """Look at a successful response: Select's decision method and model version."""
        if isinstance(response, pb.SelectResponse):
            self.select_decisions.labels(response.method or "unknown").inc()
            self.set_model_version(response.model_version)
        elif isinstance(response, pb.DeleteUserResponse):
            self.users_deleted.inc()

    def set_model_version(self, version: str) -> None:
        """Make ``version`` the one series of ``gmtrouter_model_info``."""
        with self._lock:
            if version == self._model_version:
                return
            self.model_info.clear()
            self.model_info.labels(version).set(1)
            self._model_version = version

    # -- /metrics endpoint -------------------------------------------------------------------

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over HTTP on a daemon thread.

        Returns:
            The bound port (useful with ``port`` 0 in tests).

        Raises:
            OSError: the port cannot be bound.
        """
        self._http, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        """Stop the HTTP endpoint (if it runs)."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._http_thread is not None:
            self._http_thread.join(timeout=5)
            self._http_thread = None


class InstrumentedStore(GraphStore):
    """A :class:`GraphStore` that times every call and counts failures, then delegates.

    Args:
        inner: The real store (opened and closed by its owner, not through this wrapper).
        metrics: Where to record.
    """

    def __init__(self, inner: GraphStore, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics
        self.embedding_dim = inner.embedding_dim

    def __getattr__(self, name: str) -> Any:  # backend-specific extras (e.g. write counters)
        return getattr(self.inner, name)

    async def _call(self, operation: str, coro: Any) -> Any:
        start = time.perf_counter()
        try:
            return await coro
        except IdempotencyConflictError:
            raise  # the client's error (INVALID_ARGUMENT), not the store's
        except Exception:
            self.metrics.labelled(self.metrics.store_errors, operation).inc()
            raise
        finally:
            self.metrics.labelled(self.metrics.store_latency, operation).observe(
                time.perf_counter() - start
            )

    async def open(self) -> None:
        """See :meth:`GraphStore.open`."""
        await self._call("open", self.inner.open())

    async def close(self) -> None:
        """See :meth:`GraphStore.close`."""
        await self._call("close", self.inner.close())

    async def record(self, interactions: Sequence[Interaction]) -> list[RecordResult]:
        """See :meth:`GraphStore.record`."""
        out: list[RecordResult] = await self._call("record", self.inner.record(interactions))
        return out

    async def neighbourhood(
        self, user_id: str, hops: int = 2, fan_out: Sequence[int] = (64, 8, 16, 8)
    ) -> Neighbourhood:
        """See :meth:`GraphStore.neighbourhood`."""
        out: Neighbourhood = await self._call(
            "neighbourhood", self.inner.neighbourhood(user_id, hops, fan_out)
        )
        return out

    async def user_version(self, user_id: str) -> int:
        """See :meth:`GraphStore.user_version`."""
        return int(await self._call("user_version", self.inner.user_version(user_id)))

    async def list_models(self) -> list[str]:
        """See :meth:`GraphStore.list_models`."""
        out: list[str] = await self._call("list_models", self.inner.list_models())
        return out

    async def pair_counts(self) -> list[PairCount]:
        """See :meth:`GraphStore.pair_counts`."""
        out: list[PairCount] = await self._call("pair_counts", self.inner.pair_counts())
        return out

    async def query_pair_counts(self, query_key: str, limit: int) -> list[PairCount]:
        """See :meth:`GraphStore.query_pair_counts`."""
        out: list[PairCount] = await self._call(
            "query_pair_counts", self.inner.query_pair_counts(query_key, limit)
        )
        return out

    async def user_comparisons(self, user_id: str, limit: int) -> list[UserComparison]:
        """See :meth:`GraphStore.user_comparisons`."""
        out: list[UserComparison] = await self._call(
            "user_comparisons", self.inner.user_comparisons(user_id, limit)
        )
        return out

    async def counts(self) -> dict[str, int]:
        """See :meth:`GraphStore.counts`."""
        out: dict[str, int] = await self._call("counts", self.inner.counts())
        return out

    async def delete_user(self, user_id: str) -> int:
        """See :meth:`GraphStore.delete_user`."""
        return int(await self._call("delete_user", self.inner.delete_user(user_id)))

    async def recent_comparisons(self, limit: int) -> list[RecordedComparison]:
        """See :meth:`GraphStore.recent_comparisons`."""
        out: list[RecordedComparison] = await self._call(
            "recent_comparisons", self.inner.recent_comparisons(limit)
        )
        return out

    async def publish_model(self, model: PublishedModel, blob: bytes) -> PublishedModel:
        """See :meth:`GraphStore.publish_model`."""
        out: PublishedModel = await self._call(
            "publish_model", self.inner.publish_model(model, blob)
        )
        return out

    async def latest_model(self) -> PublishedModel | None:
        """See :meth:`GraphStore.latest_model`."""
        out: PublishedModel | None = await self._call("latest_model", self.inner.latest_model())
        return out

    async def load_model(self, version: str) -> bytes | None:
        """See :meth:`GraphStore.load_model`."""
        out: bytes | None = await self._call("load_model", self.inner.load_model(version))
        return out

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """See :meth:`GraphStore.acquire_lease`."""
        return bool(
            await self._call("acquire_lease", self.inner.acquire_lease(name, holder, ttl_s))
        )

"""Helpers of the fault tests: a mixed Select/Record load whose every outcome is classified.

A RecordResponse outcome is one of:

* ``acked`` — OK: the interaction must be in the store exactly once;
* ``refused`` — UNAVAILABLE whose message starts with "not written": it must be absent;
* ``unknown`` — UNAVAILABLE "outcome unknown" (commit in flight when the connection
  dropped), DEADLINE_EXCEEDED, or the server went away mid-call: retrying the same request
  (same idempotency key) must then store it exactly once;
* anything else is ``unexpected`` (a test failure).
"""

from __future__ import annotations

import dataclasses
import threading
import time

import grpc

from gmtrouter.v1 import router_pb2 as pb
from gmtrouter.v1 import router_pb2_grpc
from server.routing import RECORD_NOT_WRITTEN, RECORD_OUTCOME_UNKNOWN
from tests.server.test_grpc_service import cands, emb

MODELS = ("f-a", "f-b", "f-c")


def record_request(key: str, user: str, n: int) -> pb.RecordResponseRequest:
    """A comparison (winner by ``n``) with idempotency key ``key``."""
    winner, loser = MODELS[n % 3], MODELS[(n + 1) % 3]
    return pb.RecordResponseRequest(
        user_id=user,
        session_id=f"{user}/s{n % 4}",
        turn_index=n,
        query_embedding=emb(n % 17),
        model=winner,
        response=f"response {key}",
        idempotency_key=key,
        comparison=pb.Comparison(winner_model=winner, loser_model=loser),
    )


def select_request(user: str) -> pb.SelectRequest:
    return pb.SelectRequest(user_id=user, query_embedding=emb(3), candidate_models=cands(*MODELS))


@dataclasses.dataclass
class Outcomes:
    """Everything a load run saw (thread-safe through ``lock``)."""

    acked: dict[str, pb.RecordResponseRequest] = dataclasses.field(default_factory=dict)
    ack_ids: dict[str, str] = dataclasses.field(default_factory=dict)
    refused: dict[str, pb.RecordResponseRequest] = dataclasses.field(default_factory=dict)
    unknown: dict[str, pb.RecordResponseRequest] = dataclasses.field(default_factory=dict)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    #: How many of ``unknown`` were UNAVAILABLE "outcome unknown" (the rest: deadline/reset)
    commit_unknown: int = 0
    #: (outcome, latency s) of every RecordResponse
    record_latencies: list[tuple[str, float]] = dataclasses.field(default_factory=list)
    #: (monotonic start, latency s, status code name, method or "")
    selects: list[tuple[float, float, str, str]] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def classify_record(
        self,
        key: str,
        req: pb.RecordResponseRequest,
        resp: object,
        err: grpc.RpcError | None,
        latency_s: float = 0.0,
    ) -> None:
        with self.lock:
            self._classify(key, req, resp, err)
            outcome = next(
                (name for name in ("acked", "refused", "unknown") if key in getattr(self, name)),
                "unexpected",
            )
            self.record_latencies.append((outcome, latency_s))

    def _classify(
        self, key: str, req: pb.RecordResponseRequest, resp: object, err: grpc.RpcError | None
    ) -> None:
        if err is None:
            assert isinstance(resp, pb.RecordResponseResponse)
            self.acked[key] = req
            self.ack_ids[key] = resp.interaction_id
            return
        code, details = err.code(), err.details() or ""
        if code == grpc.StatusCode.UNAVAILABLE and details.startswith(RECORD_NOT_WRITTEN):
            self.refused[key] = req
        elif code == grpc.StatusCode.UNAVAILABLE and details.startswith(RECORD_OUTCOME_UNKNOWN):
            self.unknown[key] = req
            self.commit_unknown += 1
        elif code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
            # The deadline passed, or the server itself went away (connection reset):
            # the client cannot know whether the write happened.
            self.unknown[key] = req
        else:
            self.unexpected.append(f"record {key}: {code.name}: {details}")


class Load:
    """``workers`` client threads, each on its own channel, alternating Record and Select.

    Args:
        address: host:port of the server.
        workers: Concurrent clients.
        prefix: Idempotency keys are ``<prefix><worker>-<n>``.
        select_timeout_s: Select deadline, seconds.
        record_timeout_s: RecordResponse deadline, seconds.
        selects: Also send Selects (else Records only).
    """

    def __init__(
        self,
        address: str,
        workers: int = 4,
        prefix: str = "k",
        select_timeout_s: float = 2.0,
        record_timeout_s: float = 8.0,
        selects: bool = True,
    ) -> None:
        self.address = address
        self.workers = workers
        self.prefix = prefix
        self.select_timeout_s = select_timeout_s
        self.record_timeout_s = record_timeout_s
        self.selects = selects
        self.out = Outcomes()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(w,), daemon=True) for w in range(workers)
        ]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> Outcomes:
        self._stop.set()
        for t in self._threads:
            t.join(timeout_s)
            assert not t.is_alive(), "a load thread hangs"
        return self.out

    def _run(self, worker: int) -> None:
        user = f"fault-user-{worker % 3}"
        with grpc.insecure_channel(self.address) as ch:
            stub = router_pb2_grpc.RouterServiceStub(ch)
            n = 0
            while not self._stop.is_set():
                key = f"{self.prefix}{worker}-{n}"
                req = record_request(key, user, n)
                t0 = time.monotonic()
                try:
                    resp = stub.RecordResponse(req, timeout=self.record_timeout_s)
                    self.out.classify_record(key, req, resp, None, time.monotonic() - t0)
                except grpc.RpcError as exc:
                    self.out.classify_record(key, req, None, exc, time.monotonic() - t0)
                    time.sleep(0.05)
                n += 1
                if self.selects:
                    self._select(stub, user)

    def _select(self, stub: router_pb2_grpc.RouterServiceStub, user: str) -> None:
        start = time.monotonic()
        try:
            resp = stub.Select(select_request(user), timeout=self.select_timeout_s)
            code, method = "OK", resp.method
        except grpc.RpcError as exc:
            code, method = exc.code().name, exc.details() or ""
        with self.out.lock:
            self.out.selects.append((start, time.monotonic() - start, code, method))


def retry_until_acked(
    stub: router_pb2_grpc.RouterServiceStub,
    req: pb.RecordResponseRequest,
    timeout_s: float = 90.0,
) -> pb.RecordResponseResponse:
    """Send ``req`` again (same idempotency key) until it is acknowledged.

    UNAVAILABLE and DEADLINE_EXCEEDED are retried (safe: same key); a freshly restarted Neo4j
    on a loaded machine may take many seconds for its first writes (cold query plans).

    Raises:
        grpc.RpcError: another code, or still failing after ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    retryable = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    while True:
        try:
            resp: pb.RecordResponseResponse = stub.RecordResponse(req, timeout=20)
            return resp
        except grpc.RpcError as exc:
            if exc.code() not in retryable or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def concurrent_same_key(
    address: str, key: str, user: str, clients: int = 8
) -> list[pb.RecordResponseResponse]:
    """``clients`` threads (own channels) send the same request at once; their responses."""
    req = record_request(key, user, 7)
    barrier = threading.Barrier(clients)
    results: list[pb.RecordResponseResponse | BaseException] = [None] * clients  # type: ignore[list-item]

    def send(i: int) -> None:
        try:
            with grpc.insecure_channel(address) as ch:
                stub = router_pb2_grpc.RouterServiceStub(ch)
                grpc.channel_ready_future(ch).result(timeout=10)
                barrier.wait(10)
                results[i] = stub.RecordResponse(req, timeout=30)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    errors = [r for r in results if not isinstance(r, pb.RecordResponseResponse)]
    assert not errors, errors
    return results  # type: ignore[return-value]


def check_same_key_results(results: list[pb.RecordResponseResponse]) -> None:
    """Exactly one of concurrent same-key sends wrote; all name the same interaction."""
    assert sum(not r.duplicate for r in results) == 1, results
    assert len({r.interaction_id for r in results}) == 1, results

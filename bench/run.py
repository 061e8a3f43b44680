"""``make bench``: latency, throughput and memory of ``gmtrouter serve`` with a real checkpoint.

Every figure is measured next to a baseline taken in the same run, on the same channel, so
that noise from other work on the machine shows up in both:

* latencies are measured *interleaved* with ``grpc.health.v1.Health/Check`` calls (one
  health call, one measured call, ...), and each block reports its own health p50;
* throughputs are reported next to the health-check throughput at the same concurrency;
* the host's own speed (:func:`host_calibration_ms`: this thread's CPU time for a fixed
  pure-Python loop, median of 7, in ms) is read at the start, before each steady-state record
  window and at the end (``host_calibration_ms_summary``), so that a slow host shows as a slow
  host and not as a slower server.

The server under test is a separate process (``python -m server.cli serve``) serving a
trained GMTRouter checkpoint (``out/bench/ckpt.pt``, trained on the bundled LLMFAO sample
when missing). Histories are written straight into the store before the server starts.

Usage::

    .venv/bin/python -m bench.run [--out bench/results/latest.json] [--quick] [--no-neo4j]
        [--only-neo4j] [--neo4j-bolt-port 27687] [--neo4j-http-port 27474]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import functools
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gmtrouter.v1 import router_pb2 as pb
from gmtrouter.v1 import router_pb2_grpc
from graphstore.interactions import Comparison, Interaction
from graphstore.store import GraphStore
from model.text_encoder import auto_threads

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "out" / "bench"
CHECKPOINT = WORK / "ckpt.pt"
DIM = 384
NEO4J_HOME = REPO / "tools" / "neo4j" / ".run-bench"
#: Ports of the bench's Neo4j (``--neo4j-bolt-port`` / ``--neo4j-http-port`` change them).
NEO4J_PORTS = {"bolt": 27687, "http": 27474}
HISTORY_SIZES = (10, 100, 1_000, 10_000)
MAIN_HISTORY = 50
CONCURRENCY = 32
#: ghz (https://ghz.sh), the Go gRPC load tester: a second, independent client for the Select
#: throughput, built from the Go module proxy into ``out/bench/bin`` on first use.
GHZ_MODULE = "github.com/bojand/ghz/cmd/ghz@v0.93.0"
TEXTS = [
    "How do I reverse a linked list in place?",
    "Write a haiku about autumn rain.",
    "Explain the difference between TCP and UDP.",
    "What is the derivative of x^3 sin(x)?",
    "Summarise the plot of Hamlet in three sentences.",
    "Translate 'good morning, how are you' into French.",
    "Give me a recipe for a vegan chocolate cake.",
    "Why is the sky blue?",
    "Prove that the square root of two is irrational.",
    "Draft a polite email declining a meeting invitation.",
    "What are the main causes of inflation?",
    "Write a Python function that checks for palindromes.",
]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: Sequence[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values, dtype=np.float64), q)), 3)


def summary(ms: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(ms),
        "p50_ms": pct(ms, 50),
        "p90_ms": pct(ms, 90),
        "p99_ms": pct(ms, 99),
        "mean_ms": round(float(np.mean(ms)), 3),
    }


# -- checkpoint and data -------------------------------------------------------------------


def ensure_checkpoint(steps: int) -> dict[str, Any]:
    """Train ``out/bench/ckpt.pt`` on the bundled LLMFAO sample unless it exists with the
    current default network configuration (a checkpoint of an older network is retrained)."""
    from model.checkpoint import CheckpointError, load_checkpoint
    from model.training import TrainConfig

    if CHECKPOINT.is_file():
        try:
            current = load_checkpoint(CHECKPOINT).config == TrainConfig().network
        except CheckpointError:
            current = False
        if current:
            return {"path": str(CHECKPOINT.relative_to(REPO)), "trained_now": False}
        log(f"{CHECKPOINT.relative_to(REPO)} is of an older network configuration: retraining")
    log(f"training a checkpoint ({steps} steps on examples/data/llmfao) ...")
    t0 = time.perf_counter()
    subprocess.run(
        [
            str(REPO / ".venv" / "bin" / "gmtrouter"),
            "train",
            "--dataset",
            "llmfao",
            "--data-path",
            str(REPO / "examples" / "data" / "llmfao"),
            "--out",
            str(CHECKPOINT),
            "--steps",
            str(steps),
        ],
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return {
        "path": str(CHECKPOINT.relative_to(REPO)),
        "trained_now": True,
        "train_s": round(time.perf_counter() - t0, 1),
    }


def checkpoint_models() -> tuple[list[str], str, dict[str, Any]]:
    from model.checkpoint import load_checkpoint

    ck = load_checkpoint(CHECKPOINT)
    return list(ck.models), ck.version, ck.config.model_dump()


def unit_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def history(user: str, n: int, models: Sequence[str], seed: int) -> list[Interaction]:
    """``n`` comparisons between the candidates, in sessions of five turns, oldest first."""
    rng = np.random.default_rng(seed)
    emb = unit_rows(rng, n)
    t0 = 1_700_000_000.0
    out = []
    for i in range(n):
        a, b = rng.choice(len(models), size=2, replace=False)
        winner, loser = models[int(a)], models[int(b)]
        out.append(
            Interaction(
                interaction_id=f"{user}-{i:06d}",
                user_id=user,
                session_id=f"{user}/s{i // 5}",
                turn_index=i % 5,
                query=TEXTS[i % len(TEXTS)],
                query_embedding=emb[i],
                model=winner,
                response="...",
                timestamp_s=t0 + i,
                idempotency_key=f"{user}-{i:06d}",
                comparison=Comparison(winner, loser),
            )
        )
    return out


async def preload(store: GraphStore, users: dict[str, int], models: Sequence[str]) -> int:
    await store.open()
    total = 0
    try:
        for k, (user, n) in enumerate(users.items()):
            items = history(user, n, models, seed=k)
            for lo in range(0, len(items), 1000):
                await store.record(items[lo : lo + 1000])
            total += n
    finally:
        await store.close()
    return total


# -- the server process --------------------------------------------------------------------


class Server:
    """``python -m server.cli serve`` in a subprocess; peak RSS read from /proc."""

    def __init__(self, name: str, store_uri: str, config: dict[str, Any]) -> None:
        self.name = name
        self.store_uri = store_uri
        self.config = config
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = WORK / f"server-{name}.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180.0) -> Server:
        cfg = WORK / f"config-{self.name}.yaml"
        cfg.write_text(yaml.safe_dump(self.config))
        logf = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "server.cli", "serve", "--config", str(cfg)),
                *("--store", self.store_uri, "--port", str(self.port)),
            ],
            cwd=REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
        logf.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited early:\n{self.log_tail()}")
            # a new channel per attempt: one whose connections were refused (the port is bound
            # once the server is ready) waits out grpc's reconnect backoff before retrying
            with grpc.insecure_channel(self.address) as ch, contextlib.suppress(grpc.RpcError):
                r = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=1.0
                )
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server {self.name} not SERVING after {timeout_s} s")

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def peak_rss_mb(self) -> float | None:
        if self.proc is None:
            return None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            return None
        return None

    def cpu_s(self) -> float:
        """User + system CPU seconds the server process has used so far."""
        if self.proc is None:
            return 0.0
        return _stat_cpu_s(Path(f"/proc/{self.proc.pid}/stat"))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def server_config(workers: int = 1) -> dict[str, Any]:
    return {
        # Serving only: no online fine-tuning rounds competing for the cores mid-measurement.
        "decision": {
            "algorithm": {"gmtrouter": {"model_path": str(CHECKPOINT), "learn_preferences": False}}
        },
        "logging": {"format": "json"},
        "server": {"max_workers": workers},
    }


# -- requests --------------------------------------------------------------------------------


def candidates(models: Sequence[str]) -> list[pb.CandidateModel]:
    return [pb.CandidateModel(model=m) for m in models]


def select_request(
    user: str, models: Sequence[str], emb: np.ndarray | None, text: str = ""
) -> pb.SelectRequest:
    return pb.SelectRequest(
        user_id=user,
        query=text,
        query_embedding=[] if emb is None else emb.tolist(),
        candidate_models=candidates(models),
    )


def record_request(user: str, i: int, models: Sequence[str], emb: np.ndarray) -> Any:
    return pb.RecordResponseRequest(
        user_id=user,
        session_id=f"{user}/s{i // 5}",
        turn_index=i % 5,
        query_embedding=emb.tolist(),
        response="...",
        idempotency_key=f"{user}-{i}",
        comparison=pb.Comparison(winner_model=models[i % 2], loser_model=models[2 + i % 2]),
    )


# -- measurements ------------------------------------------------------------------------------


def interleaved(
    channel: grpc.Channel, n: int, make_call: Callable[[int], Callable[[], Any]]
) -> tuple[list[float], list[float]]:
    """``n`` rounds of (health Check, measured call); latencies in ms of both."""
    health = health_pb2_grpc.HealthStub(channel).Check
    hreq = health_pb2.HealthCheckRequest()
    h_ms: list[float] = []
    c_ms: list[float] = []
    pc = time.perf_counter
    for i in range(n):
        call = make_call(i)
        t0 = pc()
        health(hreq, timeout=10)
        t1 = pc()
        call()
        t2 = pc()
        h_ms.append((t1 - t0) * 1e3)
        c_ms.append((t2 - t1) * 1e3)
    return h_ms, c_ms


def select_block(
    channel: grpc.Channel,
    user: str,
    models: Sequence[str],
    n: int,
    *,
    texts: bool = False,
    warm: int = 50,
) -> dict[str, Any]:
    stub = router_pb2_grpc.RouterServiceStub(channel)
    rng = np.random.default_rng(7)
    embs = unit_rows(rng, 64)
    if texts:
        reqs = [
            select_request(user, models, None, f"{TEXTS[i % len(TEXTS)]} (variant {i})")
            for i in range(n + warm)
        ]
    else:
        reqs = [select_request(user, models, embs[i % len(embs)]) for i in range(n + warm)]
    # Warm up until the answers are not degraded: on a cold store one slow first read makes
    # the server answer degraded (at once) for a second, which can outlast the warm-up calls.
    clean = 0
    for i in range(warm + 2000):
        method = stub.Select(reqs[i % warm] if warm else reqs[0], timeout=30).method
        clean = 0 if method.startswith("degraded") else clean + 1
        if i + 1 >= warm and clean >= min(warm, 20):
            break
    methods: set[str] = set()

    def make(i: int) -> Callable[[], Any]:
        req = reqs[warm + i]
        return lambda: methods.add(stub.Select(req, timeout=30).method)

    h, s = interleaved(channel, n, make)
    degraded = sorted(m for m in methods if m.startswith("degraded"))
    if degraded:
        raise RuntimeError(f"measured Selects answered {degraded}: the figure would be wrong")
    return {"select": summary(s), "health": summary(h), "methods": sorted(methods)}


def run_load(load: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """Run a load coroutine on uvloop, the server's default event loop, which costs the load
    generator less CPU per call than asyncio's own (this client shares the machine's cores
    with the server and Neo4j); asyncio's own where uvloop is not installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(load)
    return uvloop.run(load)


async def closed_loop(
    address: str,
    make_call: Callable[[Any, int, int], Any],
    stub_cls: Callable[[grpc.aio.Channel], Any],
    concurrency: int,
    duration_s: float,
    channels: int = 4,
) -> dict[str, Any]:
    """``concurrency`` clients each issuing calls back to back for ``duration_s``."""
    chans = [grpc.aio.insecure_channel(address) for _ in range(channels)]
    try:
        stubs = [stub_cls(c) for c in chans]
        for s in stubs:  # connect every channel
            await make_call(s, 0, -1)
        lat: list[float] = []
        errors = 0
        stop_at = 0.0

        async def worker(w: int) -> int:
            nonlocal errors
            stub = stubs[w % len(stubs)]
            done = 0
            i = 0
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    await make_call(stub, w, i)
                    done += 1
                    lat.append((time.perf_counter() - t0) * 1e3)
                except grpc.aio.AioRpcError:
                    errors += 1
                i += 1
            return done

        start = time.perf_counter()
        stop_at = start + duration_s
        done = await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - start
    finally:
        for c in chans:
            await c.close(None)
    return {
        "rps": round(sum(done) / elapsed, 1),
        "calls": sum(done),
        "errors": errors,
        "seconds": round(elapsed, 2),
        **({"latency": summary(lat)} if lat else {}),
    }


def health_rps(address: str, duration_s: float) -> dict[str, Any]:
    req = health_pb2.HealthCheckRequest()

    async def call(stub: Any, w: int, i: int) -> Any:
        return await stub.Check(req, timeout=30)

    return run_load(closed_loop(address, call, health_pb2_grpc.HealthStub, CONCURRENCY, duration_s))


def select_rps(address: str, models: Sequence[str], duration_s: float) -> dict[str, Any]:
    rng = np.random.default_rng(11)
    embs = unit_rows(rng, 64)
    reqs = [
        [select_request(f"bench-c{w:02d}", models, embs[j]) for j in range(len(embs))]
        for w in range(CONCURRENCY)
    ]

    async def call(stub: Any, w: int, i: int) -> Any:
        return await stub.Select(reqs[w][i % len(embs)], timeout=30)

    return run_load(
        closed_loop(address, call, router_pb2_grpc.RouterServiceStub, CONCURRENCY, duration_s)
    )


def ghz_binary() -> tuple[Path | None, str]:
    """ghz, built once from the Go module proxy into ``out/bench/bin/ghz-<version>``; or None
    and why not."""
    exe = WORK / "bin" / f"ghz-{GHZ_MODULE.rsplit('@', 1)[1]}" / "ghz"
    if exe.exists():
        return exe, ""
    go = shutil.which("go")
    if go is None:
        return None, "go is not on PATH"
    log(f"building {GHZ_MODULE} with go install (once; about a minute) ...")
    try:
        p = subprocess.run(
            [go, "install", GHZ_MODULE],
            env={**os.environ, "GOBIN": str(exe.parent)},
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        return None, f"go install {GHZ_MODULE} took over 600 s"
    if p.returncode != 0 or not exe.exists():
        return None, f"go install {GHZ_MODULE} failed: {p.stderr.strip()[-400:]}"
    return exe, ""


def ghz_select_rps(
    exe: Path, address: str, models: Sequence[str], duration_s: float
) -> dict[str, Any]:
    """:func:`select_rps` driven by ghz instead of grpc's Python client: 32 concurrent
    workers on 4 connections, 64 requests (the 32 users of :func:`select_rps` with its 64
    embeddings, two per user; ghz parses them once and sends them round robin), calls in
    flight at the deadline are waited for. Adds ghz's own CPU per call.

    Raises:
        RuntimeError: ghz exited non-zero (its stderr in the message).
    """
    embs = unit_rows(np.random.default_rng(11), 64)
    msgs = [
        json_format.MessageToDict(
            select_request(f"bench-c{j % CONCURRENCY:02d}", models, embs[j]),
            preserving_proto_field_name=True,
        )
        for j in range(len(embs))
    ]
    data = WORK / "ghz-select.json"
    data.write_text(json.dumps(msgs))
    cmd = [
        str(exe),
        "--insecure",
        *("--proto", str(REPO / "protos" / "gmtrouter" / "v1" / "router.proto")),
        *("--import-paths", str(REPO / "protos")),
        *("--call", "gmtrouter.v1.RouterService/Select"),
        *("-c", str(CONCURRENCY), "--connections", "4"),
        *("-z", f"{duration_s:g}s", "--duration-stop", "wait"),
        *("-D", str(data), "-O", "json", address),
    ]
    r, cpu_s = _run_load_tool("ghz", cmd, duration_s + 300)
    codes = r.get("statusCodeDistribution") or {}
    ok = int(codes.get("OK", 0))
    seconds = float(r["total"]) / 1e9
    pcts = {int(d["percentage"]): d["latency"] / 1e6 for d in r.get("latencyDistribution") or []}
    return {
        "rps": round(ok / seconds, 1),
        "calls": ok,
        "errors": {k: v for k, v in codes.items() if k != "OK"},
        "seconds": round(seconds, 2),
        "latency": {f"p{q}_ms": round(pcts[q], 3) for q in (50, 90, 99) if q in pcts},
        "ghz_cpu_ms_per_call": round(cpu_s * 1e3 / max(ok, 1), 3),
    }


def record_rps(address: str, models: Sequence[str], duration_s: float, tag: str) -> dict[str, Any]:
    """RecordResponse calls per second: each of the 32 clients records one new turn per call
    into sessions of its own user (five turns a session, a new idempotency key each call).

    The requests are :func:`record_request`'s, copied from one prebuilt message per
    embedding and comparison (a protobuf copy instead of a 384-float list conversion per
    call: the load generator shares the cores with the server and Neo4j).
    """
    rng = np.random.default_rng(13)
    embs = unit_rows(rng, 64)
    run = f"{tag}-{int(time.time())}"
    bases = [record_request("", j, models, embs[j]) for j in range(len(embs))]

    async def call(stub: Any, w: int, i: int) -> Any:
        user = f"bench-rec-{run}-{w:02d}" if i >= 0 else f"bench-rec-{run}-warm"
        i = max(i, 0)
        req = pb.RecordResponseRequest()
        req.CopyFrom(bases[i % len(embs)])
        req.user_id = user
        req.session_id = f"{user}/s{i // 5}"
        req.turn_index = i % 5
        req.idempotency_key = f"{user}-{i}"
        return await stub.RecordResponse(req, timeout=60)

    return run_load(
        closed_loop(address, call, router_pb2_grpc.RouterServiceStub, CONCURRENCY, duration_s)
    )


def loadgen_binary() -> tuple[Path | None, str]:
    """The Go load generator (``bench/loadgen``), built into ``out/bench/bin/loadgen``; or
    None and why not."""
    go = shutil.which("go")
    if go is None:
        return None, "go is not on PATH"
    exe = WORK / "bin" / "loadgen"
    try:
        p = subprocess.run(
            [go, "build", "-o", str(exe), "./bench/loadgen"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        return None, "go build ./bench/loadgen took over 600 s"
    if p.returncode != 0 or not exe.exists():
        return None, f"go build ./bench/loadgen failed: {p.stderr.strip()[-400:]}"
    return exe, ""


def record_rps_go(
    exe: Path, address: str, models: Sequence[str], duration_s: float, tag: str
) -> dict[str, Any]:
    """:func:`record_rps` driven by the Go load generator (grpc-go, as the Go gateways that
    call gmtrouter): the same 32 clients on 4 connections and the same requests (its
    templates are :func:`record_request`'s messages). ``client_cpu_s`` is the generator's CPU.

    Raises:
        RuntimeError: the generator exited non-zero (its stderr in the message).
        subprocess.TimeoutExpired: it ran 300 s past ``duration_s``.
        ValueError, KeyError: its output is not the JSON object it prints.
    """
    embs = unit_rows(np.random.default_rng(13), 64)
    data = WORK / "loadgen-record.bin"
    with data.open("wb") as f:
        for j in range(len(embs)):
            msg = record_request("", j, models, embs[j]).SerializeToString()
            f.write(_encode_uvarint(len(msg)) + msg)
    run = f"{tag}-{int(time.time())}"
    cmd = [
        str(exe),
        *("-addr", address, "-templates", str(data), "-run", run),
        *("-concurrency", str(CONCURRENCY), "-connections", "4"),
        *("-duration", f"{duration_s:g}s"),
    ]
    out, cpu_s = _run_load_tool("loadgen", cmd, duration_s + 300)
    return {
        "rps": round(float(out["rps"]), 1),
        "calls": int(out["calls"]),
        "errors": sum(out["errors"].values()),
        "seconds": round(float(out["seconds"]), 2),
        "latency": {
            k: int(v) if k == "n" else round(float(v), 3) for k, v in out["latency"].items()
        },
        "client": "go (bench/loadgen, grpc-go)",
        "client_cpu_s": cpu_s,
    }


def _run_load_tool(name: str, cmd: list[str], timeout_s: float) -> tuple[Any, float]:
    """Run a load generator (ghz, ``bench/loadgen``) that prints one JSON document: that
    document and the CPU seconds the tool used (user + system).

    Raises:
        RuntimeError: it exited non-zero (its stderr in the message).
        subprocess.TimeoutExpired: it ran longer than ``timeout_s`` seconds.
        ValueError: its output is not JSON.
    """
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"{name} exited {p.returncode}: {p.stderr.strip()[-400:]}")
    cpu_s = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    return json.loads(p.stdout), cpu_s


def _encode_uvarint(n: int) -> bytes:
    """``n`` as a protobuf base-128 varint (Go's ``binary.ReadUvarint`` reads it)."""
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _stat_cpu_s(stat: Path) -> float:
    """User + system CPU seconds in a ``/proc`` ``stat`` file (a process's or a thread's).

    Raises:
        OSError: the file cannot be read (the process or thread is gone).
    """
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: A reading of a process's threads (:func:`thread_cpu_s`): thread id -> (class, CPU seconds).
ThreadReading = dict[str, tuple[str, float]]

#: Neo4j thread names (``/proc/<pid>/task/<tid>/comm``, cut at 15 bytes) by prefix: the class
#: each one's CPU is reported under in ``cpu_ms_per_call_by_thread``.
NEO4J_THREAD_CLASSES = (
    ("neo4j.BoltWorke", "bolt_workers"),  # runs the Cypher statements and commits
    ("C2 CompilerThre", "jit"),
    ("C1 CompilerThre", "jit"),
    ("neo4j.BoltNetwo", "bolt_network"),  # Netty: reads and writes the Bolt messages
    ("GC Thread", "gc"),
    ("G1 ", "gc"),
)


def _schedstat_wait_s(schedstat: Path) -> float:
    """Seconds a thread has spent runnable but waiting for a core (the run queue): the second
    field of a ``/proc`` ``schedstat`` file, in ns.

    Raises:
        OSError: the file cannot be read (the thread is gone, or no scheduler statistics).
        IndexError, ValueError: the file is not three numbers.
    """
    return int(schedstat.read_text().split()[1]) / 1e9


def _thread_reading(
    pid: int | None,
    classes: Sequence[tuple[str, str]],
    main_class: str | None,
    read: Callable[[Path], float],
) -> ThreadReading:
    """``read`` of each live thread's ``/proc/<pid>/task/<tid>`` folder, with its class (the
    rule of :func:`thread_cpu_s`)."""
    out: ThreadReading = {}
    if pid is None:
        return out
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError, IndexError, ValueError):
                value = read(task)
                name = (task / "comm").read_text().rstrip("\n")
                cls = next((c for prefix, c in classes if name.startswith(prefix)), None)
                if cls is None:
                    cls = main_class if main_class and task.name == str(pid) else "other"
                out[task.name] = (cls, value)
    return out


def thread_cpu_s(
    pid: int | None, classes: Sequence[tuple[str, str]] = (), main_class: str | None = "main"
) -> ThreadReading:
    """Each live thread of process ``pid``: its class and its CPU seconds (user + system) so
    far, by thread id.

    The class is the one of the first prefix in ``classes`` that the thread's name
    (``/proc/<pid>/task/<tid>/comm``, cut at 15 bytes) starts with; else ``main_class`` for
    the main thread (whose id is ``pid``: the server's event loop; pass None for a JVM,
    whose first thread only waits for the others), else ``other``. Empty when ``pid`` is None
    or gone; a thread that exits between the listing and the read is left out. Clock ticks
    are 10 ms on Linux.
    """
    return _thread_reading(pid, classes, main_class, lambda task: _stat_cpu_s(task / "stat"))


def thread_runq_wait_s(
    pid: int | None, classes: Sequence[tuple[str, str]] = (), main_class: str | None = "main"
) -> ThreadReading:
    """Each live thread of process ``pid``: its class (as :func:`thread_cpu_s`) and the seconds
    it has waited so far for a core while ready to run (``/proc/<pid>/task/<tid>/schedstat``,
    ns resolution). Empty when ``pid`` is None or gone, or without scheduler statistics.

    On a machine whose cores are all busy this is where a serial stage (the event loop, a
    Bolt worker) loses wall time to the other processes' threads."""
    return _thread_reading(
        pid, classes, main_class, lambda task: _schedstat_wait_s(task / "schedstat")
    )


def class_cpu_s(before: ThreadReading, after: ThreadReading) -> dict[str, float]:
    """Seconds of each class between two readings of one process (:func:`thread_cpu_s`: CPU;
    :func:`thread_runq_wait_s`: run-queue wait), thread by thread: a thread that started
    meanwhile counts from 0; one that exited meanwhile is missing (its seconds after
    ``before`` are unknown; the process total still has its CPU). Classes sorted by name."""
    out: dict[str, float] = {}
    for tid, (cls, cpu) in after.items():
        out[cls] = out.get(cls, 0.0) + cpu - before.get(tid, (cls, 0.0))[1]
    return dict(sorted(out.items()))


def thread_cpu_ms_per_call(
    before: ThreadReading, after: ThreadReading, calls: int, process_s: float | None = None
) -> dict[str, float]:
    """:func:`class_cpu_s` in ms per call (``calls`` under 1 counts as 1), rounded to 3
    decimals. With ``process_s``, the process's CPU seconds over the same span (threads that
    exited included), what the live threads do not account for is added as ``exited`` when
    it is more than the readings' rounding (one clock tick per thread that ran, and one)."""
    by_class = class_cpu_s(before, after)
    if process_s is not None:
        ran = sum(1 for tid, (_, cpu) in after.items() if cpu != before.get(tid, ("", 0.0))[1])
        gap = process_s - sum(by_class.values())
        if gap > (ran + 1) / os.sysconf("SC_CLK_TCK"):
            by_class["exited"] = gap
    return {cls: round(cpu * 1e3 / max(calls, 1), 3) for cls, cpu in by_class.items()}


def _jit_and_total_cpu_s(pid: int | None) -> tuple[ThreadReading, float]:
    """A reading of the JVM ``pid``'s threads (:func:`thread_cpu_s`) and the CPU seconds of the
    whole process (threads that exited included): the two ends of a JIT share."""
    return thread_cpu_s(pid, NEO4J_THREAD_CLASSES, main_class=None), _pid_cpu_s(pid)


#: Windows in a row whose JIT share must be under :data:`JIT_SETTLED_SHARE` (one was not
#: enough: the C2 compiler comes back for whole windows long after its first quiet one, and
#: in session 10 the measured window still cost Neo4j 1.0 ms CPU per record vs 0.6-0.75 ms
#: after a longer warm-up).
JIT_SETTLED_WINDOWS = 3
#: Share of Neo4j's CPU taken by its JIT compiler threads below which a window counts as settled.
JIT_SETTLED_SHARE = 0.1


def _jit_settled(curve: Sequence[Mapping[str, float]]) -> bool:
    """Whether the last :data:`JIT_SETTLED_WINDOWS` windows of ``curve`` were all under
    :data:`JIT_SETTLED_SHARE`."""
    tail = curve[-JIT_SETTLED_WINDOWS:]
    return len(tail) == JIT_SETTLED_WINDOWS and all(
        w["jit_cpu_share"] < JIT_SETTLED_SHARE for w in tail
    )


def _record_until_steady(
    address: str, models: Sequence[str], pid: int | None, window_s: float, max_windows: int = 30
) -> list[dict[str, float]]:
    """Record windows of ``window_s`` seconds until the JVM ``pid``'s JIT compiler threads
    took under :data:`JIT_SETTLED_SHARE` of its CPU in :data:`JIT_SETTLED_WINDOWS` windows
    in a row (at most ``max_windows``; one window when ``pid`` is None); rate and JIT share
    of each window."""
    out: list[dict[str, float]] = []
    for k in range(max_windows):
        r0, t0 = _jit_and_total_cpu_s(pid)
        rps = record_rps(address, models, window_s, f"neo4j-jit-{k}")["rps"]
        r1, t1 = _jit_and_total_cpu_s(pid)
        share = class_cpu_s(r0, r1).get("jit", 0.0) / max(t1 - t0, 1e-9)
        out.append({"rps": rps, "jit_cpu_share": round(share, 3)})
        if pid is None or _jit_settled(out):
            break
    return out


#: Rounds of steady-state record windows: each round one window per client (Go load
#: generator, grpc's Python client), in alternating order; the headline is the median window.
#: Single 8 s windows of one settled server spread (session 12, 4 rounds each: Go 1,056-1,290
#: /s, about +-10 %; Python 1,052-1,118 /s, about +-3 %), mostly in Neo4j's CPU per record.
RECORD_ROUNDS = 3


def median_window(windows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The window with the median ``rps`` (the lower middle one of an even count), with
    every window's rate under ``rps_windows``; None for no windows."""
    if not windows:
        return None
    ranked = sorted(windows, key=lambda w: float(w["rps"]))
    return {**ranked[(len(ranked) - 1) // 2], "rps_windows": [w["rps"] for w in windows]}


def record_rounds(
    run_python: Callable[[int], dict[str, Any]],
    run_go: Callable[[int], dict[str, Any]] | None,
    rounds: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    """``rounds`` rounds of one Python-client and one Go-client window each (each run is
    passed its round number), the order alternating (Go first in even rounds), so that drift
    over the run (Neo4j's store and indexes grow, background work comes and goes) falls on
    both clients roughly alike (a median does not cancel a trend exactly).

    Returns: the Python client's windows, the Go client's and why the Go client stopped
    (``repr`` of its error; None when it ran every round or ``run_go`` is None). A Go
    window that fails ends the Go windows; the Python ones go on.
    """
    py: list[dict[str, Any]] = []
    go: list[dict[str, Any]] = []
    go_failed: str | None = None
    for k in range(rounds):
        for client in ("go", "python") if k % 2 == 0 else ("python", "go"):
            if client == "python":
                py.append(run_python(k))
            elif run_go is not None and go_failed is None:
                try:
                    go.append(run_go(k))
                except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as exc:
                    log(f"warning: the Go load generator failed: {exc!r}")
                    go_failed = repr(exc)
    return py, go, go_failed


# -- Neo4j -------------------------------------------------------------------------------------


def neo4j_env() -> dict[str, str]:
    env = {
        **os.environ,
        "NEO4J_HOME_DIR": str(NEO4J_HOME),
        "NEO4J_BOLT_PORT": str(NEO4J_PORTS["bolt"]),
        "NEO4J_HTTP_PORT": str(NEO4J_PORTS["http"]),
    }
    env.pop("NEO4J_PASSWORD", None)
    return env


def neo4j_start() -> subprocess.Popen[bytes]:
    """Start a fresh local Neo4j (its data folder is wiped first) in the background."""
    neo4j_stop()
    shutil.rmtree(NEO4J_HOME / "data", ignore_errors=True)
    return subprocess.Popen(
        [str(REPO / "tools" / "neo4j" / "neo4j.sh"), "start"],
        cwd=REPO,
        env=neo4j_env(),
        stdout=subprocess.DEVNULL,
        stderr=(WORK / "neo4j-start.log").open("wb"),
    )


def neo4j_stop() -> None:
    subprocess.run(
        [str(REPO / "tools" / "neo4j" / "neo4j.sh"), "stop"],
        cwd=REPO,
        env=neo4j_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )


def neo4j_version(uri: str) -> str | None:
    from neo4j import GraphDatabase

    try:
        with GraphDatabase.driver(uri, auth=None) as d:
            rec = d.execute_query("CALL dbms.components() YIELD versions RETURN versions[0] AS v")
            return str(rec.records[0]["v"])
    except Exception:
        return None


# -- machine -----------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem_gb = round(kb / 1024 / 1024, 1)

    def v(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        # ONNX Runtime intra-op threads of the server's text encoder (embedding.threads: auto)
        "embedding_threads": auto_threads(),
        "cpu": cpu,
        "memory_gb": mem_gb,
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            p: v(p)
            for p in (
                "grpcio",
                "torch",
                "torch-geometric",
                "sentence-transformers",
                "neo4j",
                "neo4j-rust-ext",
                "uvloop",
                "numpy",
                "onnxruntime",
                "protobuf",
            )
        },
    }


def _cpu_totals() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs of the machine, from /proc/stat."""
    parts = [float(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


def _pid_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` so far (0 when unknown or gone)."""
    if pid is None:
        return 0.0
    try:
        return _stat_cpu_s(Path(f"/proc/{pid}/stat"))
    except OSError:
        return 0.0


#: ``/proc/<pid>/io`` fields that :func:`io_per_call` reports, and the names it gives them.
_IO_FIELDS = (
    ("rchar", "read_kb"),
    ("wchar", "write_kb"),
    ("syscr", "read_calls"),
    ("syscw", "write_calls"),
)


def pid_io(pid: int | None) -> dict[str, int]:
    """Process ``pid``'s I/O counters so far, from ``/proc/<pid>/io``: bytes passed to
    ``read``/``write``-family calls (``rchar``, ``wchar``; page cache hits included) and the
    number of such calls (``syscr``, ``syscw``). Empty when ``pid`` is None, gone or not
    readable (another user's process)."""
    out: dict[str, int] = {}
    if pid is None:
        return out
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key.strip()] = int(value)
    return out


def io_per_call(
    before: Mapping[str, int], after: Mapping[str, int], calls: int
) -> dict[str, float]:
    """I/O per call between two :func:`pid_io` readings: KB (1,024 bytes) read and written,
    and read and write system calls; empty when either reading is empty.

    For Neo4j under the record load this is the write path's file traffic per acknowledged
    record as the kernel counts it (``rchar``/``wchar``: bytes through ``read``/``write``
    -family calls, whether or not they reach the disk): its transaction log appends and page
    cache flushes and evictions (writes), its page cache misses (reads). Bolt's socket
    traffic is not in it (Netty's socket calls are not counted there: with a page cache that
    holds the store, the reads per record are ~0 although every record arrives over Bolt)."""
    if not before or not after:
        return {}
    n = max(calls, 1)
    out: dict[str, float] = {}
    for key, name in _IO_FIELDS:
        delta = after.get(key, 0) - before.get(key, 0)
        out[name] = round(delta / 1024 / n, 3) if name.endswith("_kb") else round(delta / n, 3)
    return out


def neo4j_pid() -> int | None:
    """PID of the bench's Neo4j (from the launcher's pid file), or None."""
    with contextlib.suppress(OSError, ValueError):
        return int((NEO4J_HOME / "run" / "neo4j.pid").read_text().strip())
    return None


def with_cpu(
    server: Server, run: Callable[[], dict[str, Any]], neo4j: int | None = None
) -> dict[str, Any]:
    """Run a closed loop; add CPU per call of the server, of this client and (with the pid
    ``neo4j``) of the Neo4j process, and how many cores the whole machine kept busy
    meanwhile (other work on the machine included). ``cpu_ms_per_call_by_thread`` splits the
    server's CPU into its event loop (``main``) and its other threads (``other``: grpc's
    pollers, executors), and Neo4j's into the classes of :data:`NEO4J_THREAD_CLASSES` and
    ``other`` (:func:`thread_cpu_ms_per_call`; ``exited`` for threads gone meanwhile): where
    a serial stage is. The thread readings are taken just outside the process readings.
    ``runq_wait_ms_per_call_by_thread`` is the same split of the time those threads waited
    for a core while ready to run (:func:`thread_runq_wait_s`). With ``neo4j``,
    ``neo4j_io_per_call`` is Neo4j's I/O per call (:func:`io_per_call`)."""
    spid = server.proc.pid if server.proc is not None else None
    sw0 = thread_runq_wait_s(spid)
    nw0 = thread_runq_wait_s(neo4j, NEO4J_THREAD_CLASSES, main_class=None)
    st0 = thread_cpu_s(spid)
    nt0 = thread_cpu_s(neo4j, NEO4J_THREAD_CLASSES, main_class=None)
    s0, c0, (b0, t0) = server.cpu_s(), time.process_time(), _cpu_totals()
    n0, io0 = _pid_cpu_s(neo4j), pid_io(neo4j)
    out = run()
    s1, c1, (b1, t1) = server.cpu_s(), time.process_time(), _cpu_totals()
    n1, io1 = _pid_cpu_s(neo4j), pid_io(neo4j)
    st1 = thread_cpu_s(spid)
    nt1 = thread_cpu_s(neo4j, NEO4J_THREAD_CLASSES, main_class=None)
    sw1 = thread_runq_wait_s(spid)
    nw1 = thread_runq_wait_s(neo4j, NEO4J_THREAD_CLASSES, main_class=None)
    calls = max(int(out["calls"]), 1)
    # a load generator in a subprocess reports its own CPU (record_rps_go)
    client_s = out.pop("client_cpu_s", None)
    out["cpu_ms_per_call"] = {
        "server": round((s1 - s0) * 1e3 / calls, 3),
        "client": round(((c1 - c0) if client_s is None else client_s) * 1e3 / calls, 3),
    }
    if neo4j is not None:
        out["cpu_ms_per_call"]["neo4j"] = round((n1 - n0) * 1e3 / calls, 3)
    out["cpu_ms_per_call_by_thread"] = {"server": thread_cpu_ms_per_call(st0, st1, calls, s1 - s0)}
    out["runq_wait_ms_per_call_by_thread"] = {"server": thread_cpu_ms_per_call(sw0, sw1, calls)}
    if neo4j is not None:
        out["cpu_ms_per_call_by_thread"]["neo4j"] = thread_cpu_ms_per_call(nt0, nt1, calls, n1 - n0)
        out["runq_wait_ms_per_call_by_thread"]["neo4j"] = thread_cpu_ms_per_call(nw0, nw1, calls)
        out["neo4j_io_per_call"] = io_per_call(io0, io1, calls)
    out["machine_cores_busy"] = round((b1 - b0) / max(t1 - t0, 1e-9) * (os.cpu_count() or 1), 2)
    return out


#: Iterations of the fixed loop that :func:`host_calibration_ms` times.
CALIBRATION_LOOP = 400_000


def host_calibration_ms(loop: int = CALIBRATION_LOOP, reps: int = 7) -> float:
    """This thread's CPU time for a fixed pure-Python loop of ``loop`` iterations, in ms: the
    median of ``reps`` runs.

    The host's speed, read between windows while the load is off: the same work each time,
    so a larger reading is a slower host (a noisy neighbour on the VM, a lower clock), not a
    change of ours. Thread CPU time leaves out the time another process holds the core; it
    does not leave out a busy SMT sibling or a cache shared with Neo4j's background threads,
    which keep running between windows. (Session 13's two runs: 27.3-38.1 and 24.6-37.8 ms.)
    """
    times = []
    for _ in range(reps):
        t0 = time.thread_time()
        x = 0
        for i in range(loop):
            x += i * i
        times.append((time.thread_time() - t0) * 1e3)
    return round(statistics.median(times), 2)


def calibrated(run: Callable[[], dict[str, Any]], readings: list[float]) -> dict[str, Any]:
    """Read :func:`host_calibration_ms`, then run a window; the window's dict gets the reading
    under ``host_calibration_ms``, and ``readings`` gets it once the window has run (a window
    that raises adds nothing)."""
    cal = host_calibration_ms()
    out = run()
    readings.append(cal)
    return {**out, "host_calibration_ms": cal}


def calibration_summary(readings: Sequence[float]) -> dict[str, Any]:
    """min / median / max of :func:`host_calibration_ms` readings, in ms, and every reading in
    the order taken (``all``: in ``make bench`` the start, each record window, the end);
    an empty dict for none."""
    if not readings:
        return {}
    return {
        "min": min(readings),
        "median": round(statistics.median(readings), 2),
        "max": max(readings),
        "all": list(readings),
    }


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


# -- main --------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "latest.json"))
    ap.add_argument("--quick", action="store_true", help="fewer calls (a smoke run)")
    ap.add_argument("--no-neo4j", action="store_true", help="skip the Neo4j figures")
    ap.add_argument(
        "--only-neo4j",
        action="store_true",
        help="only the Neo4j figures (their baselines: health checks on the same server)",
    )
    ap.add_argument("--neo4j-bolt-port", type=int, default=NEO4J_PORTS["bolt"])
    ap.add_argument("--neo4j-http-port", type=int, default=NEO4J_PORTS["http"])
    ap.add_argument("--train-steps", type=int, default=60)
    args = ap.parse_args(argv)
    if args.no_neo4j and args.only_neo4j:
        ap.error("--no-neo4j and --only-neo4j exclude each other")
    NEO4J_PORTS.update(bolt=args.neo4j_bolt_port, http=args.neo4j_http_port)
    n = 300 if args.quick else 1000
    n_small = 100 if args.quick else 300
    dur = 3.0 if args.quick else 8.0

    t_start = time.perf_counter()
    WORK.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    # the host's speed at the start, before each steady-state record window and at the end
    calibrations = [host_calibration_ms()]
    result: dict[str, Any] = {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    neo = None if args.no_neo4j else neo4j_start()
    try:
        result["checkpoint"] = ensure_checkpoint(args.train_steps)
        models, version, network = checkpoint_models()
        cands = models[:4]
        result["checkpoint"].update({"version": version, "candidates": cands, "network": network})

        # -- embedded store: preload, serve ---------------------------------------------------
        detail: dict[str, Any] = {}
        rss_sqlite = None
        if not args.only_neo4j:
            from graphstore.sqlite_store import SQLiteGraphStore

            db = WORK / "graph.db"
            for p in WORK.glob("graph.db*"):
                p.unlink()
            users = {"bench-u50": MAIN_HISTORY}
            users.update({f"bench-h{k}": k for k in HISTORY_SIZES})
            users.update({f"bench-c{w:02d}": MAIN_HISTORY for w in range(CONCURRENCY)})
            t0 = time.perf_counter()
            written = asyncio.run(preload(SQLiteGraphStore(db, DIM), users, cands))
            log(f"preloaded {written} interactions into SQLite in {time.perf_counter() - t0:.1f}s")

            srv = Server("sqlite", f"sqlite:///{db}", server_config())
            with running(srv):
                with grpc.insecure_channel(srv.address) as ch:
                    log("select (embedding) ...")
                    main_block = select_block(ch, "bench-u50", cands, n)
                    log("select (text) ...")
                    text_block = select_block(ch, "bench-u50", cands, n_small, texts=True, warm=20)
                    log("history scaling ...")
                    scaling = {
                        str(k): select_block(ch, f"bench-h{k}", cands, n_small)
                        for k in HISTORY_SIZES
                    }
                    # every throughput user in the cache before the clock starts
                    stub = router_pb2_grpc.RouterServiceStub(ch)
                    one = unit_rows(np.random.default_rng(3), 1)[0]
                    for w in range(CONCURRENCY):
                        stub.Select(select_request(f"bench-c{w:02d}", cands, one))
                log("throughput c32 ...")
                h_rps = with_cpu(srv, lambda: health_rps(srv.address, dur))
                s_rps = with_cpu(srv, lambda: select_rps(srv.address, cands, dur))
                ghz, ghz_missing = ghz_binary()
                g_rps: dict[str, Any] = {"skipped": ghz_missing}
                if ghz is not None:
                    log("throughput c32 (ghz) ...")
                    try:
                        g_rps = with_cpu(srv, lambda: ghz_select_rps(ghz, srv.address, cands, dur))
                    except (RuntimeError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
                        log(f"ghz failed, its figure is left out: {e}")
                        g_rps = {"failed": f"{type(e).__name__}: {e}"}
                    else:
                        del g_rps["cpu_ms_per_call"]["client"]  # this process: ghz is its own
                        result["machine"]["versions"]["ghz"] = GHZ_MODULE.rsplit("@", 1)[1]
                log("record c32 (SQLite) ...")
                r_rps_sqlite = with_cpu(
                    srv, lambda: record_rps(srv.address, cands, dur / 2, "sqlite")
                )
                rss_sqlite = srv.peak_rss_mb()

            sel = main_block["select"]
            hl = main_block["health"]
            result.update(
                {
                    "health_p50_ms": hl["p50_ms"],
                    "select_p50_ms": sel["p50_ms"],
                    "select_p99_ms": sel["p99_ms"],
                    "ratio_select_to_health": round(sel["p50_ms"] / hl["p50_ms"], 2),
                    "select_text_p50_ms": text_block["select"]["p50_ms"],
                    "throughput_rps_c32": s_rps["rps"],
                    "throughput_rps_c32_ghz": g_rps.get("rps"),
                    "history_scaling": {k: b["select"]["p50_ms"] for k, b in scaling.items()},
                }
            )
            result["history_scaling_ratio_10000_to_10"] = round(
                scaling["10000"]["select"]["p50_ms"] / scaling["10"]["select"]["p50_ms"], 2
            )
            detail.update(
                {
                    "select": main_block,
                    "select_text": text_block,
                    "history_scaling": scaling,
                    "throughput_c32": {"select": s_rps, "health_baseline": h_rps, "ghz": g_rps},
                    "record_c32_sqlite": r_rps_sqlite,
                }
            )

        # -- Neo4j ----------------------------------------------------------------------------
        rss_neo = None
        if neo is not None:
            rc = neo.wait(timeout=300)
            if rc != 0:
                raise RuntimeError(
                    "neo4j did not start: " + (WORK / "neo4j-start.log").read_text()[-2000:]
                )
            from graphstore.factory import Neo4jCredentials
            from graphstore.neo4j_store import Neo4jGraphStore

            uri = f"bolt://127.0.0.1:{NEO4J_PORTS['bolt']}"
            result["machine"]["versions"]["neo4j-server"] = neo4j_version(uri)
            t0 = time.perf_counter()
            asyncio.run(
                preload(
                    Neo4jGraphStore(uri, Neo4jCredentials("neo4j", "", "neo4j"), DIM),
                    {"bench-u50": MAIN_HISTORY},
                    cands,
                )
            )
            log(f"preloaded Neo4j in {time.perf_counter() - t0:.1f}s")
            nsrv = Server("neo4j", uri, server_config())
            with running(nsrv):
                with grpc.insecure_channel(nsrv.address) as ch:
                    log("select (Neo4j) ...")
                    # the JVM compiles its hot paths in the first hundreds of calls
                    neo_block = select_block(ch, "bench-u50", cands, n_small * 2, warm=300)
                log("record c32 (Neo4j) ...")
                npid = neo4j_pid()
                r_warm = record_rps(nsrv.address, cands, dur / 2, "neo4j-warm-up")
                r_rps = with_cpu(nsrv, lambda: record_rps(nsrv.address, cands, dur, "neo4j"), npid)
                h_rps_neo = with_cpu(nsrv, lambda: health_rps(nsrv.address, dur / 2))
                # The bench's Neo4j is a fresh JVM: for its first minute or two of writes
                # most of its CPU goes to the JIT compiler (C2), not to the writes. A
                # long-running Neo4j is past that: write on until the JIT is done.
                log("record c32 (Neo4j, until the JVM's JIT settles) ...")
                jit_curve = _record_until_steady(nsrv.address, cands, npid, 4.0)
                # The steady state with grpc's Python client and with the Go load generator
                # (grpc-go, as the Go gateways that call gmtrouter: about half the client
                # CPU per call, CPU that this 2-core machine otherwise takes from the server
                # and Neo4j), in alternating windows; each figure is its median window.
                loadgen, loadgen_missing = loadgen_binary()

                def window(load: Callable[[], dict[str, Any]]) -> dict[str, Any]:
                    # one steady-state record window: the host's speed, then the load with CPU
                    return calibrated(lambda: with_cpu(nsrv, load, npid), calibrations)

                def go_window(exe: Path, k: int) -> dict[str, Any]:
                    return window(
                        lambda: record_rps_go(exe, nsrv.address, cands, dur, f"neo4j-go-r{k}")
                    )

                def py_window(k: int) -> dict[str, Any]:
                    return window(
                        lambda: record_rps(nsrv.address, cands, dur, f"neo4j-jit-warm-r{k}")
                    )

                rounds = 1 if args.quick else RECORD_ROUNDS
                clients = "Python" if loadgen is None else "Python and Go"
                log(f"record c32 (Neo4j, JIT settled, {rounds} rounds of {clients}) ...")
                py_windows, go_windows, go_failed = record_rounds(
                    py_window,
                    None if loadgen is None else functools.partial(go_window, loadgen),
                    rounds,
                )
                r_rps_jit = median_window(py_windows)
                assert r_rps_jit is not None
                r_rps_jit["rounds"] = rounds
                r_go: dict[str, Any] = median_window(go_windows) or (
                    {"skipped": loadgen_missing} if loadgen is None else {}
                )
                if loadgen is not None:
                    # fewer windows than rounds: a Go window failed (see "failed")
                    r_go["rounds"] = rounds
                if go_failed is not None:
                    r_go["failed"] = go_failed
                with grpc.insecure_channel(nsrv.address) as ch:
                    log("select (Neo4j, JIT settled) ...")
                    neo_block_jit = select_block(ch, "bench-u50", cands, n_small * 2, warm=50)
                rss_neo = nsrv.peak_rss_mb()
            result["select_neo4j_p50_ms"] = neo_block["select"]["p50_ms"]
            result["select_neo4j_health_p50_ms"] = neo_block["health"]["p50_ms"]
            result["select_neo4j_warm_jvm_p50_ms"] = neo_block_jit["select"]["p50_ms"]
            result["select_neo4j_warm_jvm_health_p50_ms"] = neo_block_jit["health"]["p50_ms"]
            # The headline figure is the steady state, like every Select figure (warm server,
            # warm caches): a deployed Neo4j is past its JIT warm-up. The fresh JVM's figure
            # (4 s after its first write) is kept beside it.
            # With the Go load generator where Go is installed (see above), else with grpc's
            # Python client; both figures are kept.
            result["record_rps_neo4j"] = r_go.get("rps", r_rps_jit["rps"])
            result["record_rps_neo4j_client"] = "go" if "rps" in r_go else "python"
            result["record_rps_neo4j_go_client"] = r_go.get("rps")
            result["record_rps_neo4j_python_client"] = r_rps_jit["rps"]
            result["record_rps_neo4j_fresh_jvm"] = r_rps["rps"]
            result["health_rps_c32_neo4j_server"] = h_rps_neo["rps"]
            detail["select_neo4j"] = neo_block
            detail["select_neo4j_warm_jvm"] = neo_block_jit
            detail["record_c32_neo4j_fresh_jvm"] = {
                **r_rps,
                "warm_up_before": r_warm,
                "health_baseline": h_rps_neo,
            }
            # Settled = the last JIT_SETTLED_WINDOWS windows were under JIT_SETTLED_SHARE
            # (False: gave up after max_windows, or the Neo4j pid was unknown and nothing
            # could be checked).
            settled = npid is not None and _jit_settled(jit_curve)
            if not settled:
                log("warning: Neo4j's JIT did not settle; record_rps_neo4j is not steady state")
            result["neo4j_jit_settled"] = settled
            detail["record_c32_neo4j_go_client"] = r_go
            detail["record_c32_neo4j_windows"] = {"python": py_windows, "go": go_windows}
            detail["record_c32_neo4j"] = {
                **r_rps_jit,
                "jit_warm_up": jit_curve,
                "jit_settled": settled,
            }
        else:
            result["select_neo4j_p50_ms"] = None
            result["record_rps_neo4j"] = None
            result["record_rps_neo4j_client"] = None
            result["record_rps_neo4j_go_client"] = None
            result["record_rps_neo4j_python_client"] = None
            result["record_rps_neo4j_fresh_jvm"] = None
            result["select_neo4j_warm_jvm_p50_ms"] = None

        result["rss_mb"] = max((x for x in (rss_sqlite, rss_neo) if x is not None), default=None)
        result["rss_mb_by_server"] = {"sqlite": rss_sqlite, "neo4j": rss_neo}
        result["detail"] = detail
    finally:
        if neo is not None:
            with contextlib.suppress(Exception):
                neo.wait(timeout=300)
            neo4j_stop()
    calibrations.append(host_calibration_ms())
    result["host_calibration_ms_summary"] = calibration_summary(calibrations)
    result["loadavg_start"] = [round(x, 2) for x in load_start]
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    result["bench_seconds"] = round(time.perf_counter() - t_start, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {out} in {result['bench_seconds']} s")
    keys = [k for k in result if k not in ("detail", "machine", "checkpoint")]
    print(json.dumps({k: result[k] for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``make soak``: a bounded soak test of ``gmtrouter serve`` over loopback.

One server process (``bench.run.Server``: ``python -m server.cli serve``) on the SQLite or a
Neo4j store takes, for ``--duration-s`` seconds, a mix from ``--clients`` concurrent
``grpc.aio`` clients (each its own channel):

* ``Select`` with a client-supplied ``query_embedding`` (no text encoding);
* ``RecordResponse`` with a unique idempotency key (comparisons and ratings); a call that
  times out or finds the server unavailable is retried with the same key, as a client
  should (the error still counts), so a write that landed anyway is acknowledged once;
* duplicate retries: a recorded request sent again, which must answer ``duplicate`` with the
  first interaction id;
* provoked errors: invalid requests (empty user id, wrong embedding size, no candidates,
  rating off its scale, a comparison of a model with itself, a stream without users), which
  must answer ``INVALID_ARGUMENT``;

while ``--subscribers`` ``StreamPreferences`` subscribers open a stream on a few of the
recording users, read up to three updates (or for up to three seconds) and cancel.

Pass criteria (exit status 1 when one fails):

* no error other than the provoked ones, and each provoked one answered ``INVALID_ARGUMENT``;
* no lost or duplicated writes: every acknowledged non-duplicate record is in the store, and
  nothing else is (the store's interaction count grew by exactly the acknowledged count; on
  SQLite the stored ids equal the acknowledged ids); every retry answered ``duplicate``;
* memory flat: the server's resident set (``VmRSS``, sampled every ``--sample-s`` seconds
  from ``/proc``) grew by at most max(10 %, 50 MB) from the end of the first quarter of the
  run to its end;
* the server exits 0 on SIGTERM afterwards.

Usage::

    .venv/bin/python -m bench.soak --duration-s 300 [--store sqlite|neo4j] [--json out.json]

``--store neo4j`` needs a running Neo4j (``--neo4j-uri``, default env ``NEO4J_URI``; user,
password and database from ``NEO4J_USER``/``NEO4J_PASSWORD``/``NEO4J_DATABASE``); its
existing data is left alone (the check uses the count before and after).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import sqlite3
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.run import DIM, WORK, Server, summary
from gmtrouter.v1 import router_pb2 as pb
from gmtrouter.v1 import router_pb2_grpc
from graphstore.factory import Neo4jCredentials, create_store, sqlite_path

MODELS = ("soak-a", "soak-b", "soak-c", "soak-d")
#: Resident-set growth allowed from the end of the first quarter to the end: the larger of
#: this fraction of the first-quarter RSS and :data:`RSS_GROWTH_MB`.
RSS_GROWTH_FRACTION = 0.10
RSS_GROWTH_MB = 50.0
CALL_TIMEOUT_S = 30.0
#: Codes after which a record is retried with the same idempotency key.
_RETRYABLE = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE)
_EOF: Any = grpc.aio.EOF  # type: ignore[attr-defined]  # grpc-stubs lack it


@dataclasses.dataclass(frozen=True)
class SoakConfig:
    """What to run.

    Attributes:
        duration_s: Seconds of load (start-up and the final checks come on top).
        store: "sqlite" (a fresh file under ``workdir``) or "neo4j" (``neo4j_uri``).
        clients: Concurrent unary clients, one channel each.
        subscribers: Concurrent StreamPreferences subscribers.
        users: Size of the user pool the clients write and read.
        sample_s: Seconds between RSS samples.
        think_ms: Pause of each client between calls, in milliseconds.
        checkpoint: A ``gmtrouter train`` checkpoint to serve; None = Bradley-Terry prior.
        workdir: Folder for the SQLite file; a temporary one when None.
        neo4j_uri: Bolt URI for ``store="neo4j"``.
        seed: Seed of the clients' random choices.
    """

    duration_s: float = 300.0
    store: str = "sqlite"
    clients: int = 16
    subscribers: int = 4
    users: int = 64
    sample_s: float = 5.0
    think_ms: float = 5.0
    checkpoint: Path | None = None
    workdir: Path | None = None
    neo4j_uri: str = ""
    seed: int = 0


@dataclasses.dataclass
class _Tally:
    """Everything the clients saw; mutated on the event loop only."""

    ok: Counter[str] = dataclasses.field(default_factory=Counter)
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    provoked: Counter[str] = dataclasses.field(default_factory=Counter)
    latency_ms: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    acked: dict[str, str] = dataclasses.field(default_factory=dict)  # interaction id -> key
    acked_responses: int = 0
    landed_after_timeout: int = 0
    duplicate_ok: int = 0
    duplicate_mismatch: int = 0
    new_on_retry: int = 0
    streams: int = 0
    stream_updates: int = 0
    error_examples: list[str] = dataclasses.field(default_factory=list)

    def error(self, kind: str, code: str, detail: str) -> None:
        self.errors[f"{kind}:{code}"] += 1
        if len(self.error_examples) < 10:
            self.error_examples.append(f"{kind}: {code}: {detail}"[:300])

    def took(self, kind: str, seconds: float) -> None:
        self.latency_ms.setdefault(kind, []).append(seconds * 1e3)


def _unit_rows(rng: np.random.Generator, n: int) -> list[list[float]]:
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return [list(map(float, row)) for row in x]


def _candidates(names: tuple[str, ...] = MODELS) -> list[pb.CandidateModel]:
    return [pb.CandidateModel(model=m) for m in names]


def _invalid_requests(emb: list[float]) -> list[tuple[str, Any]]:
    """(RPC name, request) pairs each of which must answer INVALID_ARGUMENT."""
    return [
        (
            "Select",
            pb.SelectRequest(user_id="", query_embedding=emb, candidate_models=_candidates()),
        ),
        (
            "Select",
            pb.SelectRequest(user_id="x", query_embedding=emb[:7], candidate_models=_candidates()),
        ),
        ("Select", pb.SelectRequest(user_id="x", query_embedding=emb)),
        (
            "RecordResponse",
            pb.RecordResponseRequest(
                user_id="x",
                query_embedding=emb,
                model=MODELS[0],
                rating=pb.Rating(value=9, scale_min=1, scale_max=5),
            ),
        ),
        (
            "RecordResponse",
            pb.RecordResponseRequest(
                user_id="x",
                query_embedding=emb,
                comparison=pb.Comparison(winner_model=MODELS[0], loser_model=MODELS[0]),
            ),
        ),
        ("StreamPreferences", pb.StreamPreferencesRequest(candidate_models=_candidates())),
    ]


def _code(exc: grpc.aio.AioRpcError) -> str:
    code = exc.code()
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


async def _client(
    i: int, address: str, cfg: SoakConfig, tally: _Tally, stop_at: float, embs: list[list[float]]
) -> None:
    rng = random.Random(cfg.seed * 1000 + i)
    users = [f"soak-user-{k:03d}" for k in range(cfg.users)]
    sent: deque[tuple[pb.RecordResponseRequest, str]] = deque(maxlen=50)
    invalid = _invalid_requests(embs[0])
    n = 0
    async with grpc.aio.insecure_channel(address) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        while time.monotonic() < stop_at:
            r = rng.random()
            t0 = time.perf_counter()
            if r < 0.55:
                kind = "select"
                try:
                    await stub.Select(
                        pb.SelectRequest(
                            user_id=rng.choice(users),
                            query_embedding=rng.choice(embs),
                            candidate_models=_candidates(tuple(rng.sample(MODELS, 3))),
                        ),
                        timeout=CALL_TIMEOUT_S,
                    )
                    tally.ok[kind] += 1
                except grpc.aio.AioRpcError as exc:
                    tally.error(kind, _code(exc), str(exc.details()))
            elif r < 0.85 or not sent:
                kind = "record"
                n += 1
                user = rng.choice(users)
                winner, loser = rng.sample(MODELS, 2)
                fields: dict[str, Any] = (
                    {"comparison": pb.Comparison(winner_model=winner, loser_model=loser)}
                    if rng.random() < 0.7
                    else {
                        "model": winner,
                        "rating": pb.Rating(value=rng.randint(1, 5), scale_min=1, scale_max=5),
                    }
                )
                req = pb.RecordResponseRequest(
                    user_id=user,
                    session_id=f"{user}/c{i}",
                    turn_index=n % 8,
                    query_embedding=rng.choice(embs),
                    idempotency_key=f"soak-{cfg.seed}-{i}-{n}",
                    **fields,
                )
                resp = None
                timed_out = False
                for _attempt in range(4):  # a timed-out write may have landed: same key again
                    try:
                        resp = await stub.RecordResponse(req, timeout=CALL_TIMEOUT_S)
                        break
                    except grpc.aio.AioRpcError as exc:
                        tally.error(kind, _code(exc), str(exc.details()))
                        if exc.code() not in _RETRYABLE:
                            break
                        timed_out = True
                if resp is not None:
                    tally.ok[kind] += 1
                    if resp.duplicate and not timed_out:
                        tally.error(kind, "UNEXPECTED_DUPLICATE", req.idempotency_key)
                    else:
                        tally.landed_after_timeout += int(resp.duplicate)
                        tally.acked_responses += 1
                        tally.acked[resp.interaction_id] = req.idempotency_key
                        sent.append((req, resp.interaction_id))
            elif r < 0.92:
                kind = "record_retry"
                req, first_id = rng.choice(sent)
                try:
                    resp = await stub.RecordResponse(req, timeout=CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    tally.error(kind, _code(exc), str(exc.details()))
                else:
                    tally.ok[kind] += 1
                    if not resp.duplicate:
                        tally.new_on_retry += 1
                    elif resp.interaction_id != first_id:
                        tally.duplicate_mismatch += 1
                    else:
                        tally.duplicate_ok += 1
            else:
                kind = "invalid"
                method, req = invalid[rng.randrange(len(invalid))]
                try:
                    if method == "StreamPreferences":
                        call = stub.StreamPreferences(req, timeout=CALL_TIMEOUT_S)
                        await call.read()
                        call.cancel()
                    else:
                        await getattr(stub, method)(req, timeout=CALL_TIMEOUT_S)
                except grpc.aio.AioRpcError as exc:
                    code = _code(exc)
                    tally.provoked[f"{method}:{code}"] += 1
                    if code != "INVALID_ARGUMENT":
                        tally.error(f"invalid-{method}", code, str(exc.details()))
                else:
                    tally.error(f"invalid-{method}", "OK", "an invalid request was accepted")
            tally.took(kind, time.perf_counter() - t0)
            if cfg.think_ms:
                await asyncio.sleep(cfg.think_ms / 1e3)


async def _subscriber(i: int, address: str, cfg: SoakConfig, tally: _Tally, stop_at: float) -> None:
    rng = random.Random(cfg.seed * 1000 + 500 + i)
    users = [f"soak-user-{k:03d}" for k in range(cfg.users)]
    async with grpc.aio.insecure_channel(address) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        while time.monotonic() < stop_at:
            req = pb.StreamPreferencesRequest(
                user_ids=rng.sample(users, rng.randint(1, 3)), candidate_models=_candidates()
            )
            call = stub.StreamPreferences(req)
            tally.streams += 1
            t0 = time.perf_counter()
            got = 0
            try:
                for _ in req.user_ids:  # the initial ranking of each user
                    item = await asyncio.wait_for(call.read(), CALL_TIMEOUT_S)
                    if item is _EOF:
                        tally.error("stream", "EOF", "the server ended a stream")
                        break
                    got += 1
                until = min(time.monotonic() + 3.0, stop_at)
                while got < len(req.user_ids) + 3 and time.monotonic() < until:
                    try:  # then whatever updates come within three seconds
                        item = await asyncio.wait_for(call.read(), until - time.monotonic())
                    except TimeoutError:
                        break
                    if item is _EOF:
                        tally.error("stream", "EOF", "the server ended a stream")
                        break
                    got += 1
            except TimeoutError:
                tally.error("stream", "NO_INITIAL_RANKING", f"{got} of {len(req.user_ids)}")
            except grpc.aio.AioRpcError as exc:
                tally.error("stream", _code(exc), str(exc.details()))
            finally:
                call.cancel()
            tally.stream_updates += got
            tally.ok["stream"] += 1
            tally.took("stream", time.perf_counter() - t0)


async def _sample_rss(
    read: Callable[[], float | None], every_s: float, out: list[tuple[float, float]], t0: float
) -> None:
    while True:
        rss = read()
        if rss is not None:
            out.append((round(time.monotonic() - t0, 1), rss))
        await asyncio.sleep(every_s)


def _rss_mb(pid: int) -> float | None:
    """Resident set of ``pid`` in MB (``VmRSS`` of /proc/PID/status), or None when gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


async def _load(
    address: str, pid: int, cfg: SoakConfig
) -> tuple[_Tally, list[tuple[float, float]]]:
    tally = _Tally()
    embs = _unit_rows(np.random.default_rng(cfg.seed), 32)
    samples: list[tuple[float, float]] = []
    t0 = time.monotonic()
    stop_at = t0 + cfg.duration_s
    sampler = asyncio.create_task(_sample_rss(lambda: _rss_mb(pid), cfg.sample_s, samples, t0))
    try:
        await asyncio.gather(
            *(_client(i, address, cfg, tally, stop_at, embs) for i in range(cfg.clients)),
            *(_subscriber(i, address, cfg, tally, stop_at) for i in range(cfg.subscribers)),
        )
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    rss = _rss_mb(pid)
    if rss is not None:
        samples.append((round(time.monotonic() - t0, 1), rss))
    return tally, samples


async def _stored(uri: str, creds: Neo4jCredentials) -> tuple[int, set[str] | None]:
    """The store's interaction count, and on SQLite its interaction ids."""
    store = create_store(uri, embedding_dim=DIM, neo4j=creds)
    await store.open()
    try:
        count = (await store.counts())["interaction"]
    finally:
        await store.close()
    ids = None
    path = sqlite_path(uri)
    if path is not None:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            ids = {r[0] for r in conn.execute("SELECT interaction_id FROM interactions")}
    return count, ids


def _memory(
    samples: list[tuple[float, float]], duration_s: float, peak: float | None
) -> dict[str, Any]:
    if not samples:
        return {"flat": False, "why": "no RSS samples"}
    quarter = [s for s in samples if s[0] <= duration_s / 4] or samples[:1]
    q1 = quarter[-1][1]
    end = samples[-1][1]
    bound = max(RSS_GROWTH_FRACTION * q1, RSS_GROWTH_MB)
    tail = [s for s in samples if s[0] >= quarter[-1][0]]
    slope = (
        float(np.polyfit([s[0] for s in tail], [s[1] for s in tail], 1)[0]) * 60
        if len(tail) >= 3
        else 0.0
    )
    return {
        "start_mb": samples[0][1],
        "first_quarter_mb": q1,
        "end_mb": end,
        "max_sampled_mb": max(s[1] for s in samples),
        "peak_hwm_mb": peak,
        "growth_after_first_quarter_mb": round(end - q1, 1),
        "allowed_growth_mb": round(bound, 1),
        "slope_after_first_quarter_mb_per_min": round(slope, 2),
        "samples": len(samples),
        "flat": end - q1 <= bound,
    }


def soak(cfg: SoakConfig) -> dict[str, Any]:
    """Run the soak test; the result holds every figure and ``ok`` (all criteria passed).

    Raises:
        RuntimeError: the server did not start.
        ValueError: ``store`` is neither "sqlite" nor "neo4j", or neo4j without a URI.
    """
    WORK.mkdir(parents=True, exist_ok=True)
    tmp: tempfile.TemporaryDirectory[str] | None = None
    creds = Neo4jCredentials(
        os.environ.get("NEO4J_USER", "neo4j"),
        os.environ.get("NEO4J_PASSWORD", ""),
        os.environ.get("NEO4J_DATABASE", "neo4j"),
    )
    if cfg.store == "sqlite":
        if cfg.workdir is None:
            tmp = tempfile.TemporaryDirectory(prefix="gmtrouter-soak-")
        folder = Path(tmp.name if tmp is not None else str(cfg.workdir))
        uri = f"sqlite:///{folder / 'soak.db'}"
    elif cfg.store == "neo4j":
        if not cfg.neo4j_uri:
            raise ValueError("--store neo4j needs --neo4j-uri (or env NEO4J_URI)")
        uri = cfg.neo4j_uri
    else:
        raise ValueError(f"store must be sqlite or neo4j (got {cfg.store!r})")
    config: dict[str, Any] = {
        "logging": {"format": "json", "level": "info"},
        "server": {"metrics_port": 0},
        "streaming": {"poll_interval_s": 0.5},
        "models": [{"name": m} for m in MODELS],
    }
    if cfg.store == "neo4j":
        config["store"] = {
            "neo4j": {"user": creds.user, "password": creds.password, "database": creds.database}
        }
    if cfg.checkpoint is not None:
        config["decision"] = {"algorithm": {"gmtrouter": {"model_path": str(cfg.checkpoint)}}}
    try:
        before = asyncio.run(_stored(uri, creds))[0] if cfg.store == "neo4j" else 0
        srv = Server(f"soak-{cfg.store}-{os.getpid()}", uri, config)
        t_start = time.perf_counter()
        srv.start(timeout_s=600.0)
        startup_s = time.perf_counter() - t_start
        assert srv.proc is not None
        try:
            tally, samples = asyncio.run(_load(srv.address, srv.proc.pid, cfg))
            peak = srv.peak_rss_mb()
        finally:
            srv.stop()
        exit_code = srv.proc.returncode
        after, ids = asyncio.run(_stored(uri, creds))
    finally:
        if tmp is not None:
            tmp.cleanup()
    acked = len(tally.acked)
    memory = _memory(samples, cfg.duration_s, peak)
    writes = {
        "acked_new": acked,
        "acked_responses": tally.acked_responses,
        "acked_on_retry_after_timeout_as_duplicate": tally.landed_after_timeout,
        "stored_before": before,
        "stored_after": after,
        "stored_new": after - before,
        "stored_ids_match_acked": None if ids is None else ids == set(tally.acked),
        "retries_answered_duplicate": tally.duplicate_ok,
        "retries_with_other_id": tally.duplicate_mismatch,
        "retries_written_again": tally.new_on_retry,
    }
    criteria = {
        "no_unprovoked_errors": not tally.errors,
        "provoked_all_invalid_argument": sum(tally.provoked.values())
        == sum(v for k, v in tally.provoked.items() if k.endswith(":INVALID_ARGUMENT")),
        "no_lost_or_duplicated_writes": after - before == acked == tally.acked_responses
        and writes["stored_ids_match_acked"] is not False
        and tally.duplicate_mismatch == 0
        and tally.new_on_retry == 0,
        "memory_flat": bool(memory["flat"]),
        "clean_shutdown": exit_code == 0,
    }
    total = sum(tally.ok.values()) + sum(tally.errors.values()) + sum(tally.provoked.values())
    return {
        "ok": all(criteria.values()),
        "criteria": criteria,
        "config": {
            **{k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("workdir",)},
            "checkpoint": str(cfg.checkpoint) if cfg.checkpoint else None,
            "scorer": "gmtrouter" if cfg.checkpoint else "bradley_terry_prior",
        },
        "startup_s": round(startup_s, 1),
        "requests": {
            "total": total,
            "per_s": round(total / cfg.duration_s, 1),
            "ok_by_kind": dict(tally.ok),
            "provoked_by_code": dict(tally.provoked),
            "errors_by_code": dict(tally.errors),
            "error_examples": tally.error_examples,
        },
        "latency_ms": {k: summary(v) for k, v in sorted(tally.latency_ms.items())},
        "streams": {"opened": tally.streams, "updates_read": tally.stream_updates},
        "writes": writes,
        "memory": memory,
        "rss_samples": samples,
        "server_exit_code": exit_code,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 = every criterion passed)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--duration-s", type=float, default=300.0)
    p.add_argument("--store", choices=("sqlite", "neo4j"), default="sqlite")
    p.add_argument("--neo4j-uri", default=os.environ.get("NEO4J_URI", ""))
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--subscribers", type=int, default=4)
    p.add_argument("--users", type=int, default=64)
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--think-ms", type=float, default=5.0)
    p.add_argument("--checkpoint", type=Path, default=None, help="serve this checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the result here")
    a = p.parse_args(argv)
    result = soak(
        SoakConfig(
            duration_s=a.duration_s,
            store=a.store,
            clients=a.clients,
            subscribers=a.subscribers,
            users=a.users,
            sample_s=a.sample_s,
            think_ms=a.think_ms,
            checkpoint=a.checkpoint,
            neo4j_uri=a.neo4j_uri,
            seed=a.seed,
        )
    )
    text = json.dumps(result, indent=2)
    if a.json is not None:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(text + "\n")
    brief = {k: v for k, v in result.items() if k != "rss_samples"}
    print(json.dumps(brief, indent=2))
    if not result["ok"]:
        failed = [k for k, v in result["criteria"].items() if not v]
        print(f"soak FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

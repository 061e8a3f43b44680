"""Profile ``gmtrouter serve`` under a Select load with py-spy (a diagnostic, not ``make bench``).

Needs ``py-spy`` in the venv (``uv pip install py-spy``; not a project dependency) and the
store and checkpoint that ``python -m bench.run`` leaves in ``out/bench/``.

Usage::

    .venv/bin/python -m bench.profile [sequential|c32|text] [--seconds 15]

Writes ``out/bench/profile-<mode>.txt`` (py-spy's flat "top" view, by own time and by total
time).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Sequence

import grpc
import numpy as np

from bench.run import (
    CONCURRENCY,
    REPO,
    TEXTS,
    WORK,
    Server,
    checkpoint_models,
    record_request,
    select_request,
    select_rps,
    server_config,
    unit_rows,
)
from gmtrouter.v1 import router_pb2_grpc


def _load(mode: str, address: str, models: Sequence[str], seconds: float) -> None:
    if mode == "c32":
        select_rps(address, models, seconds)
        return
    if mode == "record":
        from bench.run import record_rps

        record_rps(address, models, seconds, "profile")
        return
    embs = unit_rows(np.random.default_rng(0), 64)
    with grpc.insecure_channel(address) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        stop = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < stop:
            if mode == "text":
                req = select_request("bench-u50", models, None, f"{TEXTS[i % len(TEXTS)]} {i}")
            else:
                req = select_request("bench-u50", models, embs[i % len(embs)])
            stub.Select(req, timeout=30)
            i += 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["sequential", "c32", "text", "record"], default="c32")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--store", default=f"sqlite:///{WORK / 'graph.db'}")
    args = ap.parse_args(argv)
    pyspy = os.environ.get("PY_SPY") or shutil.which("py-spy") or str(REPO / ".venv/bin/py-spy")
    models, _, _ = checkpoint_models()
    cands = models[:4]
    srv = Server(f"profile-{args.mode}", args.store, server_config()).start()
    try:
        with grpc.insecure_channel(srv.address) as ch:  # warm every user's cache
            stub = router_pb2_grpc.RouterServiceStub(ch)
            emb = unit_rows(np.random.default_rng(1), 1)[0]
            for u in ["bench-u50", *(f"bench-c{w:02d}" for w in range(CONCURRENCY))]:
                stub.Select(select_request(u, cands, emb))
            if args.mode == "record":
                stub.RecordResponse(record_request("bench-profile-warm", 0, cands, emb))
        assert srv.proc is not None
        raw = WORK / f"profile-{args.mode}.raw"
        spy = subprocess.Popen(
            [
                *(pyspy, "record", "--pid", str(srv.proc.pid), "--format", "raw"),
                *("--rate", "250", "--duration", str(int(args.seconds))),
                *("--output", str(raw), "--threads"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)
        load = threading.Thread(target=_load, args=(args.mode, srv.address, cands, args.seconds))
        load.start()
        load.join()
        spy.wait()
    finally:
        srv.stop()
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        count = int(n)
        samples += count
        frames = stack.split(";")
        if frames:
            own[frames[-1]] += count
        for f in set(frames):
            total[f] += count
    out = WORK / f"profile-{args.mode}.txt"
    with out.open("w") as fh:
        fh.write(f"samples {samples}\n\n== own ==\n")
        for f, c in own.most_common(40):
            fh.write(f"{100 * c / samples:6.1f}%  {f}\n")
        fh.write("\n== total ==\n")
        for f, c in total.most_common(80):
            fh.write(f"{100 * c / samples:6.1f}%  {f}\n")
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

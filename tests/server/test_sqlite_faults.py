"""The service SIGKILLed under a RecordResponse load, restarted on the same embedded store.

Every acknowledged interaction is there exactly once after the restart; calls cut off by the
kill (outcome unknown to the client) are stored exactly once when retried with the same
idempotency key; and concurrent sends of one request store it once.
"""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import grpc

from gmtrouter.v1 import router_pb2_grpc
from tests.conftest import ServerProcess
from tests.server.faults import (
    Load,
    check_same_key_results,
    concurrent_same_key,
    retry_until_acked,
)


def _rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return conn.execute(sql).fetchall()


def test_sigkill_under_record_load_keeps_every_acknowledged_write(tmp_path: Path) -> None:
    db = tmp_path / "graph.db"
    store = f"sqlite:///{db}"
    first = ServerProcess(tmp_path, store).start()
    try:
        load = Load(first.address, workers=4, prefix="k", record_timeout_s=10, selects=False)
        load.start()
        time.sleep(2.0)
        killed_at = time.monotonic()
        first.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        first.proc.wait(10)  # type: ignore[union-attr]
        out = load.stop()
    finally:
        first.kill()
    assert not out.unexpected, out.unexpected
    assert out.acked, "nothing acknowledged before the kill"
    assert not out.refused, out.refused  # a dead server answers nothing, it cannot refuse

    second = ServerProcess(tmp_path, store).start()
    restart_s = time.monotonic() - killed_at
    try:
        with grpc.insecure_channel(second.address) as ch:
            stub = router_pb2_grpc.RouterServiceStub(ch)
            for key, req in list(out.acked.items())[:20]:  # stored, under the same id
                resp = retry_until_acked(stub, req)
                assert resp.duplicate and resp.interaction_id == out.ack_ids[key], key
            unknown_stored = 0
            for req in out.unknown.values():  # cut off by the kill: stored once on retry
                unknown_stored += retry_until_acked(stub, req).duplicate
        check_same_key_results(concurrent_same_key(second.address, "same-key-sqlite", "u-same"))
    finally:
        assert second.stop() == 0, second.log()

    keys = {k for (k,) in _rows(db, "SELECT idempotency_key FROM interactions")}
    expected = {*out.acked, *out.unknown, "same-key-sqlite"}
    assert keys == expected, keys ^ expected
    # Nothing half written: each user's version counts its interactions.
    versions = {u: v for u, v in _rows(db, "SELECT user_id, version FROM users")}
    per_user = {
        u: n for u, n in _rows(db, "SELECT user_id, count(*) FROM interactions GROUP BY user_id")
    }
    assert versions == per_user
    print(
        f"\nsqlite kill: acked={len(out.acked)} unknown={len(out.unknown)} "
        f"(of which already stored: {unknown_stored}) restart_s={restart_s:.1f}"
    )

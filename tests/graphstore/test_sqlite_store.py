"""SQLite store specifics: durability across restarts and crashes, group commit."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from graphstore.errors import IdempotencyConflictError
from graphstore.interactions import Comparison, Interaction, PairCount, query_key
from graphstore.sqlite_store import SQLiteGraphStore

DIM = 8
ROOT = Path(__file__).resolve().parents[2]


def make(n: int, user: str = "u1", session: str = "s1", turn: int = 0) -> Interaction:
    return Interaction(
        interaction_id=f"i{n:04d}",
        user_id=user,
        session_id=session,
        turn_index=turn,
        query=f"query {n}",
        query_embedding=np.full(DIM, n, dtype=np.float32),
        model="m-a",
        response=f"response {n}",
        timestamp_s=float(n),
        idempotency_key=f"k{n:04d}",
        comparison=Comparison("m-a", "m-b", tie=n % 3 == 0) if n % 2 else None,
    )


async def snapshot(store: SQLiteGraphStore, users: list[str]) -> dict[str, Any]:
    """Everything a reader can see, in comparable form."""
    out: dict[str, Any] = {
        "counts": await store.counts(),
        "models": await store.list_models(),
        "pairs": await store.pair_counts(),
    }
    for u in users:
        n = await store.neighbourhood(u, hops=4)
        out[u] = (
            await store.user_version(u),
            n.user_ids,
            n.turn_ids,
            n.query_ids,
            n.query_embedding.tobytes(),
            n.turn_outcome.tolist(),
            n.turn_prev.tolist(),
        )
    return out


async def test_writes_survive_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "graph.db"
    store = SQLiteGraphStore(path, embedding_dim=DIM)
    await store.open()
    await store.record([make(i, user=f"u{i % 3}", session=f"s{i % 5}", turn=i) for i in range(20)])
    await asyncio.gather(*(store.record([make(i, user="u9")]) for i in range(20, 40)))
    users = ["u0", "u1", "u2", "u9", "nobody"]
    before = await snapshot(store, users)
    await store.close()
    await store.close()  # twice is fine

    reopened = SQLiteGraphStore(path, embedding_dim=DIM)
    await reopened.open()
    try:
        assert await snapshot(reopened, users) == before
        assert before["counts"]["interaction"] == 40
        [dup] = await reopened.record([make(5, user="u2", session="s0", turn=5)])  # a retry
        assert dup.duplicate and dup.interaction_id == "i0005"
    finally:
        await reopened.close()


async def test_a_file_without_query_keys_is_migrated(tmp_path: Path) -> None:
    """A database written before ``interactions.query_key`` existed opens, keeps its rows
    (they count as no per-query evidence) and stores keys from then on."""
    path = tmp_path / "old.db"
    store = SQLiteGraphStore(path, embedding_dim=DIM)
    await store.open()
    await store.record([make(1), make(3)])
    await store.close()
    with sqlite3.connect(path) as conn:  # back to the old schema
        conn.execute("DROP INDEX interactions_by_query_key")
        conn.execute("ALTER TABLE interactions DROP COLUMN query_key")
    reopened = SQLiteGraphStore(path, embedding_dim=DIM)
    await reopened.open()
    try:
        assert (await reopened.counts())["interaction"] == 2
        key = query_key("query 5")
        await reopened.record([dataclasses.replace(make(5), query_key=key)])
        assert await reopened.query_pair_counts(key, 10) == [PairCount("m-a", "m-b", 1.0, 0.0)]
        assert await reopened.query_pair_counts(query_key("query 1"), 10) == []
    finally:
        await reopened.close()


async def test_a_file_without_fingerprints_is_migrated(tmp_path: Path) -> None:
    """A database written before ``interactions.fingerprint`` existed opens with the column
    added: its rows are retried by user alone, new rows get a fingerprint."""
    path = tmp_path / "old.db"
    store = SQLiteGraphStore(path, embedding_dim=DIM)
    await store.open()
    await store.record([make(1)])
    await store.close()
    with sqlite3.connect(path) as conn:  # back to the old schema
        conn.execute("ALTER TABLE interactions DROP COLUMN fingerprint")
    reopened = SQLiteGraphStore(path, embedding_dim=DIM)
    await reopened.open()
    try:
        other = dataclasses.replace(make(1), response="other", interaction_id="i0009")
        [res] = await reopened.record([other])  # old row: same user, content not compared
        assert res.duplicate and res.interaction_id == "i0001"
        with pytest.raises(IdempotencyConflictError):
            await reopened.record([dataclasses.replace(make(1), user_id="u2")])
        await reopened.record([make(2)])
        with pytest.raises(IdempotencyConflictError):
            await reopened.record([dataclasses.replace(make(2), response="other")])
    finally:
        await reopened.close()
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT interaction_id, fingerprint FROM interactions ORDER BY 1")
        assert [(i, fp is not None) for i, fp in rows] == [("i0001", False), ("i0002", True)]


def test_acknowledged_writes_survive_a_killed_process(tmp_path: Path) -> None:
    """A process that is killed right after ``record`` returned loses nothing it was told."""
    path = tmp_path / "graph.db"
    child = textwrap.dedent(
        f"""
        import asyncio, os, signal, sys
        import numpy as np
        from graphstore.interactions import Interaction
        from graphstore.sqlite_store import SQLiteGraphStore

        async def main():
            store = SQLiteGraphStore({str(path)!r}, embedding_dim={DIM})
            await store.open()
            for i in range(25):
                it = Interaction(f"i{{i}}", "u1", "s1", i, "q", np.full({DIM}, i, np.float32),
                                 "m-a", "r", float(i), f"k{{i}}", rating=0.5)
                await store.record([it])
                print(f"ack {{i}}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)  # no close(), no flush

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", child],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == -9, done.stderr
    acked = [line for line in done.stdout.splitlines() if line.startswith("ack ")]
    assert len(acked) == 25

    async def read() -> tuple[dict[str, int], int]:
        store = SQLiteGraphStore(path, embedding_dim=DIM)
        await store.open()
        try:
            return await store.counts(), await store.user_version("u1")
        finally:
            await store.close()

    counts, version = asyncio.run(read())
    assert counts["interaction"] == 25 and version == 25


async def test_group_commit_under_concurrency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteGraphStore(tmp_path / "graph.db", embedding_dim=DIM)
    await store.open()
    transactions: list[int] = []
    write_groups = store._write_groups

    def counting(groups: Any) -> Any:
        transactions.append(len(groups))
        return write_groups(groups)

    monkeypatch.setattr(store, "_write_groups", counting)
    try:
        results = await asyncio.gather(
            *(store.record([make(i, user=f"u{i % 10}")]) for i in range(200))
        )
        assert [r[0].interaction_id for r in results] == [f"i{i:04d}" for i in range(200)]
        assert not any(r[0].duplicate for r in results)
        assert sum(transactions) == 200
        assert len(transactions) < 20, transactions  # grouped, not one commit per call
        counts = await store.counts()
        assert counts["interaction"] == 200 and counts["user"] == 10
        assert [await store.user_version(f"u{u}") for u in range(10)] == [20] * 10
        # A second wave while the first is still committing is grouped too.
        more = [store.record([make(i)]) for i in range(200, 300)]
        dups = [store.record([make(i, user=f"u{i % 10}")]) for i in range(0, 50)]  # retries
        res = await asyncio.gather(*more, *dups)
        assert sum(r[0].duplicate for r in res) == 50
        assert (await store.counts())["interaction"] == 300
    finally:
        await store.close()

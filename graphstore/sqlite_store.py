"""The embedded, zero-setup graph store: SQLite from the standard library.

Durable with no server: every acknowledged write is committed in WAL mode with
``synchronous=FULL`` (the WAL is fsynced at each commit), so it survives a crash or restart.
``":memory:"`` gives a throw-away store for tests.

Tables (the graph of the seed, "Graph Structure"): ``users`` (user nodes with a per-user
version), ``llms`` (LLM nodes), ``interactions`` (one query node per row, with the raw
feedback and its :func:`~graphstore.interactions.content_fingerprint`), ``turns`` (one turn
node and its response node per outcome: the turn's user, session, step, LLM and outcome),
``pair_counts`` (pairwise win counts kept in the same transaction, for the Bradley–Terry
prior); ``published_models`` and ``leases`` hold the shared state of online learning
(``graphstore/registry.py``).

All SQLite calls run on one dedicated thread, never on the event loop. Concurrent
``record`` calls are committed together (group commit): a call returns only after the
transaction holding its rows has committed. Each call's rows are written under a savepoint
of their own, so a call refused for an idempotency conflict leaves the others of its group
to commit.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from graphstore.errors import IdempotencyConflictError, StoreUnavailableError
from graphstore.interactions import (
    Interaction,
    PairCount,
    RecordedComparison,
    RecordResult,
    UserComparison,
    check_interaction,
    content_fingerprint,
    idempotency_conflict,
    is_retry_of,
    pair_deltas,
)
from graphstore.neighbourhood import (
    Neighbourhood,
    TurnRow,
    assemble_neighbourhood,
    check_sampling,
    whole_interactions,
)
from graphstore.registry import KEEP_PUBLISHED, PublishedModel
from graphstore.store import EMPTY_PAIR_GAMES, CallResult, GraphStore, settle_call

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    user_id TEXT PRIMARY KEY,
    version INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS llms (
    name TEXT PRIMARY KEY
);
CREATE TABLE IF NOT EXISTS interactions (
    interaction_id TEXT PRIMARY KEY,
    idempotency_key TEXT UNIQUE,
    user_id TEXT NOT NULL REFERENCES users(user_id),
    session_id TEXT NOT NULL,
    turn_index INTEGER NOT NULL,
    query TEXT NOT NULL,
    query_embedding BLOB NOT NULL,
    model TEXT NOT NULL,
    response TEXT NOT NULL,
    rating REAL,
    winner_model TEXT,
    loser_model TEXT,
    tie INTEGER,
    ts REAL NOT NULL,
    query_key TEXT NOT NULL DEFAULT '',
    fingerprint TEXT
);
CREATE TABLE IF NOT EXISTS turns (
    turn_id TEXT PRIMARY KEY,
    interaction_id TEXT NOT NULL REFERENCES interactions(interaction_id),
    user_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    turn_index INTEGER NOT NULL,
    llm TEXT NOT NULL REFERENCES llms(name),
    outcome REAL NOT NULL,
    ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS turns_by_user ON turns(user_id, ts DESC, turn_id DESC);
CREATE INDEX IF NOT EXISTS turns_by_llm ON turns(llm, ts DESC, turn_id DESC);
CREATE INDEX IF NOT EXISTS interactions_by_user ON interactions(user_id);
CREATE INDEX IF NOT EXISTS interactions_by_ts ON interactions(ts DESC);
CREATE TABLE IF NOT EXISTS published_models (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    version TEXT NOT NULL UNIQUE,
    base_version TEXT NOT NULL,
    interactions INTEGER NOT NULL,
    created_at REAL NOT NULL,
    metrics TEXT NOT NULL,
    blob BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pair_counts (
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    wins_a REAL NOT NULL,
    wins_b REAL NOT NULL,
    PRIMARY KEY (model_a, model_b)
);
"""


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a file written by an older version up to the schema (idempotent).

    ``interactions.query_key`` (added with the per-query evidence) is added empty: rows
    written before it never count as per-query evidence. ``interactions.fingerprint`` (added
    with the idempotency-conflict check) is added NULL: a retry of a row written before it
    is recognised by its user alone.
    """
    columns = {row[1] for row in conn.execute("PRAGMA table_info(interactions)")}
    for column, ddl in (
        ("query_key", "ALTER TABLE interactions ADD COLUMN query_key TEXT NOT NULL DEFAULT ''"),
        ("fingerprint", "ALTER TABLE interactions ADD COLUMN fingerprint TEXT"),
    ):
        if column in columns:
            continue
        try:
            conn.execute(ddl)
        except sqlite3.OperationalError as exc:
            # another process (serve and import on one file) added it since the PRAGMA
            if "duplicate column name" not in str(exc):
                raise
    conn.execute(
        "CREATE INDEX IF NOT EXISTS interactions_by_query_key ON interactions(query_key, ts DESC)"
    )
    # per-user evidence (user_comparisons): the user's newest comparisons first
    conn.execute(
        "CREATE INDEX IF NOT EXISTS interactions_by_user_ts ON interactions(user_id, ts DESC)"
    )


class SQLiteGraphStore(GraphStore):
    """Embedded graph store on a SQLite file.

    Args:
        path: Database file (created with its parent folder when missing) or ``":memory:"``.
        embedding_dim: Query-embedding dimension ``D``; every interaction must match it.
        busy_timeout_ms: How long a write waits for a lock held by another process (ms).
    """

    def __init__(self, path: str | Path, embedding_dim: int, busy_timeout_ms: int = 5000) -> None:
        self.path = str(path)
        self.embedding_dim = embedding_dim
        self.busy_timeout_ms = busy_timeout_ms
        self._conn: sqlite3.Connection | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: list[tuple[list[Interaction], asyncio.Future[list[RecordResult]]]] = []
        self._flush_task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Open (or create) the database and its schema. Idempotent."""
        if self._conn is not None:
            return
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sqlite-store"
        )
        await self._run(self._open_sync)

    def _open_sync(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            if self.path != ":memory:":
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.executescript(_SCHEMA)
            _migrate(conn)
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"cannot open SQLite store {self.path!r}: {exc}") from exc
        self._conn = conn

    async def close(self) -> None:
        """Commit whatever is pending, then close. Safe to call twice."""
        if self._flush_task is not None:
            await asyncio.shield(self._flush_task)
        if self._conn is None or self._executor is None:
            return
        await self._run(self._close_sync)
        self._executor.shutdown(wait=True)
        self._executor = None

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            raise StoreUnavailableError("the SQLite store is not open")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreUnavailableError("the SQLite store is not open")
        return self._conn

    # -- writes ------------------------------------------------------------------------------

    async def record(self, interactions: Sequence[Interaction]) -> list[RecordResult]:
        """See :meth:`GraphStore.record`. Concurrent calls share one commit (group commit);
        a call refused with :class:`IdempotencyConflictError` does not stop the others."""
        batch = list(interactions)
        for it in batch:
            check_interaction(it, self.embedding_dim)
        if not batch:
            return []
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[RecordResult]] = loop.create_future()
        self._pending.append((batch, fut))
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.create_task(self._flush_loop())
        return await asyncio.shield(fut)

    async def _flush_loop(self) -> None:
        while self._pending:
            groups, self._pending = self._pending, []
            try:
                results = await self._run(lambda g=groups: self._write_groups(g))  # type: ignore[misc]
            except Exception as exc:
                err = (
                    exc
                    if isinstance(exc, StoreUnavailableError)
                    else StoreUnavailableError(f"SQLite write failed: {exc}")
                )
                for _, fut in groups:
                    if not fut.done():
                        fut.set_exception(err)
                continue
            for (_, fut), res in zip(groups, results, strict=True):
                settle_call(fut, res)

    def _write_groups(
        self, groups: list[tuple[list[Interaction], asyncio.Future[list[RecordResult]]]]
    ) -> list[CallResult]:
        """Write every call of the group in one transaction: per call, its results, or the
        conflict that refused it (with nothing of it written)."""
        conn = self._db()
        out: list[CallResult] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for batch, _ in groups:
                out.append(self._write_call(conn, batch))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return out

    def _write_call(self, conn: sqlite3.Connection, batch: list[Interaction]) -> CallResult:
        """One ``record`` call's rows, all or none (inside the group's transaction)."""
        if len(batch) == 1:
            # A conflict is found before anything is written: no savepoint needed.
            try:
                return [self._write_one(conn, batch[0], 0, 1)]
            except IdempotencyConflictError as exc:
                return exc
        conn.execute("SAVEPOINT record_call")
        try:
            return [self._write_one(conn, it, i, len(batch)) for i, it in enumerate(batch)]
        except IdempotencyConflictError as exc:
            conn.execute("ROLLBACK TO record_call")
            return exc
        finally:
            # SQLite itself may have rolled the whole transaction back (disk full, I/O
            # error): the savepoint is gone then, and RELEASE would hide the real error
            if conn.in_transaction:
                conn.execute("RELEASE record_call")

    def _write_one(
        self, conn: sqlite3.Connection, it: Interaction, position: int, size: int
    ) -> RecordResult:
        """Write one interaction, or find it stored (a retry).

        Raises:
            IdempotencyConflictError: its key (or else its id) is stored for a different
                interaction (:func:`~graphstore.interactions.is_retry_of`); nothing written.
        """
        fp = content_fingerprint(it)
        if it.idempotency_key:
            row = conn.execute(
                "SELECT interaction_id, user_id, fingerprint FROM interactions "
                "WHERE idempotency_key = ?",
                (it.idempotency_key,),
            ).fetchone()
            if row is not None:
                if not is_retry_of(row[1], row[2], it, fp):
                    raise idempotency_conflict(
                        "idempotency_key", it.idempotency_key, position, size
                    )
                return RecordResult(row[0], duplicate=True)
        row = conn.execute(
            "SELECT interaction_id, user_id, fingerprint FROM interactions "
            "WHERE interaction_id = ?",
            (it.interaction_id,),
        ).fetchone()
        if row is not None:
            if not is_retry_of(row[1], row[2], it, fp):
                raise idempotency_conflict("interaction_id", it.interaction_id, position, size)
            return RecordResult(row[0], duplicate=True)
        conn.execute(
            "INSERT INTO users(user_id, version) VALUES (?, 1) "
            "ON CONFLICT(user_id) DO UPDATE SET version = version + 1",
            (it.user_id,),
        )
        conn.executemany("INSERT OR IGNORE INTO llms(name) VALUES (?)", [(m,) for m in it.models()])
        c = it.comparison
        conn.execute(
            "INSERT INTO interactions(interaction_id, idempotency_key, user_id, session_id, "
            "turn_index, query, query_embedding, model, response, rating, winner_model, "
            "loser_model, tie, ts, query_key, fingerprint) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                it.interaction_id,
                it.idempotency_key or None,
                it.user_id,
                it.session_id,
                it.turn_index,
                it.query,
                it.query_embedding.astype("<f4").tobytes(),
                it.model,
                it.response,
                it.rating,
                c.winner_model if c else None,
                c.loser_model if c else None,
                int(c.tie) if c else None,
                it.timestamp_s,
                it.query_key,
                fp,
            ),
        )
        conn.executemany(
            "INSERT INTO turns(turn_id, interaction_id, user_id, session_id, turn_index, llm, "
            "outcome, ts) VALUES (?,?,?,?,?,?,?,?)",
            [
                (
                    f"{it.interaction_id}:{o.model}",
                    it.interaction_id,
                    it.user_id,
                    it.session_id,
                    it.turn_index,
                    o.model,
                    o.value,
                    it.timestamp_s,
                )
                for o in it.outcomes()
            ],
        )
        if c is not None and c.winner_model != c.loser_model:
            a, b = sorted((c.winner_model, c.loser_model))
            if c.tie:
                wa = wb = 0.5
            else:
                wa, wb = (1.0, 0.0) if c.winner_model == a else (0.0, 1.0)
            conn.execute(
                "INSERT INTO pair_counts(model_a, model_b, wins_a, wins_b) VALUES (?,?,?,?) "
                "ON CONFLICT(model_a, model_b) DO UPDATE SET wins_a = wins_a + excluded.wins_a, "
                "wins_b = wins_b + excluded.wins_b",
                (a, b, wa, wb),
            )
        return RecordResult(it.interaction_id, duplicate=False)

    async def delete_user(self, user_id: str) -> int:
        """See :meth:`GraphStore.delete_user`. Runs after any pending group commit."""
        if self._flush_task is not None and not self._flush_task.done():
            await asyncio.shield(self._flush_task)
        try:
            return await self._run(lambda: self._delete_user_sync(user_id))
        except StoreUnavailableError:
            raise
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"SQLite delete_user failed: {exc}") from exc

    def _delete_user_sync(self, user_id: str) -> int:
        conn = self._db()
        try:
            conn.execute("BEGIN IMMEDIATE")
            rows = conn.execute(
                "SELECT winner_model, loser_model, tie FROM interactions "
                "WHERE user_id = ? AND winner_model IS NOT NULL AND loser_model IS NOT NULL",
                (user_id,),
            ).fetchall()
            for p in pair_deltas((w, lo, bool(t)) for w, lo, t in rows):
                conn.execute(
                    "UPDATE pair_counts SET wins_a = wins_a - ?, wins_b = wins_b - ? "
                    "WHERE model_a = ? AND model_b = ?",
                    (p.wins_a, p.wins_b, p.model_a, p.model_b),
                )
            conn.execute(
                "DELETE FROM pair_counts WHERE wins_a <= ? AND wins_b <= ?",
                (EMPTY_PAIR_GAMES, EMPTY_PAIR_GAMES),
            )
            conn.execute(
                "DELETE FROM turns WHERE interaction_id IN "
                "(SELECT interaction_id FROM interactions WHERE user_id = ?)",
                (user_id,),
            )
            conn.execute("DELETE FROM turns WHERE user_id = ?", (user_id,))
            deleted = conn.execute(
                "DELETE FROM interactions WHERE user_id = ?", (user_id,)
            ).rowcount
            conn.execute("DELETE FROM users WHERE user_id = ?", (user_id,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return int(deleted)

    # -- reads -------------------------------------------------------------------------------

    async def neighbourhood(
        self, user_id: str, hops: int = 2, fan_out: Sequence[int] = (64, 8, 16, 8)
    ) -> Neighbourhood:
        """See :meth:`GraphStore.neighbourhood`."""
        caps = check_sampling(hops, fan_out)
        return await self._run(lambda: self._neighbourhood_sync(user_id, hops, caps))

    def _neighbourhood_sync(self, user_id: str, hops: int, fan_out: list[int]) -> Neighbourhood:
        conn = self._db()
        conn.execute("BEGIN")
        try:
            row = conn.execute("SELECT version FROM users WHERE user_id = ?", (user_id,)).fetchone()
            version = int(row[0]) if row else 0
            cols = "turn_id, interaction_id, user_id, session_id, turn_index, llm, outcome, ts"
            turns = [
                TurnRow(*r)
                for r in conn.execute(
                    f"SELECT {cols} FROM turns WHERE user_id = ? "
                    "ORDER BY ts DESC, turn_id DESC LIMIT ?",
                    (user_id, fan_out[0] + 1),
                )
            ]
            turns = whole_interactions(turns, fan_out[0])
            if hops >= 3 and turns:
                for llm in sorted({t.llm for t in turns}):
                    turns += [
                        TurnRow(*r)
                        for r in conn.execute(
                            f"SELECT {cols} FROM turns WHERE llm = ? AND user_id != ? "
                            "ORDER BY ts DESC, turn_id DESC LIMIT ?",
                            (llm, user_id, fan_out[2]),
                        )
                    ]
            query_ids = list(dict.fromkeys(t.interaction_id for t in turns))
            embeddings: dict[str, bytes] = {}
            for start in range(0, len(query_ids), 500):
                chunk = query_ids[start : start + 500]
                marks = ",".join("?" * len(chunk))
                for qid, blob in conn.execute(
                    f"SELECT interaction_id, query_embedding FROM interactions "
                    f"WHERE interaction_id IN ({marks})",
                    chunk,
                ):
                    embeddings[qid] = blob
        finally:
            conn.execute("COMMIT")
        return assemble_neighbourhood(
            user_id, version, turns, {q: embeddings[q] for q in query_ids}, self.embedding_dim
        )

    async def user_version(self, user_id: str) -> int:
        """See :meth:`GraphStore.user_version`."""

        def read() -> int:
            row = (
                self._db()
                .execute("SELECT version FROM users WHERE user_id = ?", (user_id,))
                .fetchone()
            )
            return int(row[0]) if row else 0

        return await self._run(read)

    async def list_models(self) -> list[str]:
        """See :meth:`GraphStore.list_models`."""
        return await self._run(
            lambda: [r[0] for r in self._db().execute("SELECT name FROM llms ORDER BY name")]
        )

    async def query_pair_counts(self, query_key: str, limit: int) -> list[PairCount]:
        """See :meth:`GraphStore.query_pair_counts`."""
        if limit < 1:
            raise ValueError(f"limit (got {limit}) must be >= 1")
        if not query_key:
            return []

        def read() -> list[PairCount]:
            rows = self._db().execute(
                "SELECT winner_model, loser_model, tie FROM interactions "
                "WHERE query_key = ? AND winner_model IS NOT NULL AND loser_model IS NOT NULL "
                "ORDER BY ts DESC LIMIT ?",
                (query_key, limit),
            )
            return pair_deltas((w, lo, bool(t)) for w, lo, t in rows)

        return await self._run(read)

    async def user_comparisons(self, user_id: str, limit: int) -> list[UserComparison]:
        """See :meth:`GraphStore.user_comparisons`."""
        if limit < 1:
            raise ValueError(f"limit (got {limit}) must be >= 1")

        def read() -> list[UserComparison]:
            rows = self._db().execute(
                "SELECT winner_model, loser_model, tie, query_key FROM interactions "
                "WHERE user_id = ? AND winner_model IS NOT NULL AND loser_model IS NOT NULL "
                "ORDER BY ts DESC, interaction_id DESC LIMIT ?",
                (user_id, limit),
            )
            return [UserComparison(w, lo, bool(t), k) for w, lo, t, k in rows]

        return await self._run(read)

    async def pair_counts(self) -> list[PairCount]:
        """See :meth:`GraphStore.pair_counts`."""
        return await self._run(
            lambda: [
                PairCount(a, b, float(wa), float(wb))
                for a, b, wa, wb in self._db().execute(
                    "SELECT model_a, model_b, wins_a, wins_b FROM pair_counts "
                    "ORDER BY model_a, model_b"
                )
            ]
        )

    async def counts(self) -> dict[str, int]:
        """See :meth:`GraphStore.counts`."""

        def read() -> dict[str, int]:
            db = self._db()

            def one(sql: str) -> int:
                return int(db.execute(sql).fetchone()[0])

            n_int = one("SELECT COUNT(*) FROM interactions")
            n_turn = one("SELECT COUNT(*) FROM turns")
            return {
                "user": one("SELECT COUNT(*) FROM users"),
                "llm": one("SELECT COUNT(*) FROM llms"),
                "query": n_int,
                "response": n_turn,
                "turn": n_turn,
                "interaction": n_int,
            }

        return await self._run(read)

    # -- online learning ---------------------------------------------------------------------

    async def _guarded(self, fn: Callable[[], T], what: str) -> T:
        try:
            return await self._run(fn)
        except StoreUnavailableError:
            raise
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"SQLite {what} failed: {exc}") from exc

    async def recent_comparisons(self, limit: int) -> list[RecordedComparison]:
        """See :meth:`GraphStore.recent_comparisons`."""
        if limit < 1:
            raise ValueError(f"limit (got {limit}) must be >= 1")

        def read() -> list[RecordedComparison]:
            rows = self._db().execute(
                "SELECT interaction_id, user_id, session_id, turn_index, query_embedding, "
                "winner_model, loser_model, tie, ts FROM interactions "
                "WHERE winner_model IS NOT NULL AND loser_model IS NOT NULL "
                "ORDER BY ts DESC, interaction_id DESC LIMIT ?",
                (limit,),
            )
            return [
                RecordedComparison(
                    interaction_id=i,
                    user_id=u,
                    session_id=s,
                    turn_index=int(t),
                    query_embedding=np.frombuffer(e, dtype="<f4").astype(np.float32),
                    winner_model=w,
                    loser_model=lo,
                    tie=bool(tie),
                    timestamp_s=float(ts),
                )
                for i, u, s, t, e, w, lo, tie, ts in rows
            ]

        return await self._guarded(read, "recent_comparisons")

    @staticmethod
    def _published(row: tuple[Any, ...]) -> PublishedModel:
        seq, version, base, n, created, metrics = row
        return PublishedModel(
            version=str(version),
            base_version=str(base),
            seq=int(seq),
            interactions=int(n),
            created_at_s=float(created),
            metrics=str(metrics),
        )

    _PUBLISHED_COLUMNS = "seq, version, base_version, interactions, created_at, metrics"

    async def publish_model(self, model: PublishedModel, blob: bytes) -> PublishedModel:
        """See :meth:`GraphStore.publish_model`."""

        def write() -> PublishedModel:
            conn = self._db()
            try:
                conn.execute("BEGIN IMMEDIATE")
                row = conn.execute(
                    f"SELECT {self._PUBLISHED_COLUMNS} FROM published_models WHERE version = ?",
                    (model.version,),
                ).fetchone()
                if row is None:
                    conn.execute(
                        "INSERT INTO published_models(version, base_version, interactions, "
                        "created_at, metrics, blob) VALUES (?,?,?,?,?,?)",
                        (
                            model.version,
                            model.base_version,
                            model.interactions,
                            time.time(),
                            model.metrics,
                            blob,
                        ),
                    )
                    conn.execute(
                        "DELETE FROM published_models WHERE seq NOT IN "
                        "(SELECT seq FROM published_models ORDER BY seq DESC LIMIT ?)",
                        (KEEP_PUBLISHED,),
                    )
                    row = conn.execute(
                        f"SELECT {self._PUBLISHED_COLUMNS} FROM published_models WHERE version = ?",
                        (model.version,),
                    ).fetchone()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return self._published(row)

        return await self._guarded(write, "publish_model")

    async def latest_model(self) -> PublishedModel | None:
        """See :meth:`GraphStore.latest_model`."""

        def read() -> PublishedModel | None:
            row = (
                self._db()
                .execute(
                    f"SELECT {self._PUBLISHED_COLUMNS} FROM published_models "
                    "ORDER BY seq DESC LIMIT 1"
                )
                .fetchone()
            )
            return None if row is None else self._published(row)

        return await self._guarded(read, "latest_model")

    async def load_model(self, version: str) -> bytes | None:
        """See :meth:`GraphStore.load_model`."""

        def read() -> bytes | None:
            row = (
                self._db()
                .execute("SELECT blob FROM published_models WHERE version = ?", (version,))
                .fetchone()
            )
            return None if row is None else bytes(row[0])

        return await self._guarded(read, "load_model")

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """See :meth:`GraphStore.acquire_lease` (expiry by this host's clock)."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s (got {ttl_s}) must be > 0")

        def write() -> bool:
            conn = self._db()
            now = time.time()
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "INSERT INTO leases(name, holder, expires_at) VALUES (?,?,?) "
                    "ON CONFLICT(name) DO UPDATE SET holder = excluded.holder, "
                    "expires_at = excluded.expires_at "
                    "WHERE leases.holder = excluded.holder OR leases.expires_at < ?",
                    (name, holder, now + ttl_s, now),
                )
                row = conn.execute("SELECT holder FROM leases WHERE name = ?", (name,)).fetchone()
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return bool(row is not None and row[0] == holder)

        return await self._guarded(write, "acquire_lease")

"""A Neo4j write whose COMMIT was sent is never reported as "not written".

The failure this guards against (found by a fault session: Neo4j stopped under load): an
attempt of a managed transaction sends COMMIT, the server applies it but answers with a
transient error (it is shutting down), the driver retries, the retry cannot connect, and
the final error ("Couldn't connect") is all the caller saw: the store said "nothing was
written" for a write that is stored. The store must say :class:`CommitOutcomeUnknownError`
(retry with the same key) instead.

Real driver, real Neo4j; between them a TCP proxy (:class:`CommitFaultProxy`) that plays the
shutting-down server: once armed, it forwards the next COMMIT to Neo4j, waits for Neo4j's
answer (the commit is then applied), hands the driver a ``DatabaseUnavailable`` FAILURE in
its place, and closes every connection and its port, so the driver's retries are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest
from neo4j import GraphDatabase

from graphstore.errors import CommitOutcomeUnknownError, StoreUnavailableError
from graphstore.interactions import Interaction
from graphstore.neo4j_store import Neo4jGraphStore
from tests.graphstore.test_store_contract import DIM, make

if TYPE_CHECKING:
    from tests.neo4j_fixtures import Neo4jTarget

pytestmark = pytest.mark.neo4j

#: A Bolt COMMIT message, chunked: one 2-byte chunk (struct of 0 fields, tag 0x12), then the
#: end-of-message marker. The driver sends it on its own once the transaction's work is done.
_COMMIT = b"\x00\x02\xb0\x12\x00\x00"
_SUCCESS, _FAILURE = 0x70, 0x7F


def _pack_str(s: str) -> bytes:
    raw = s.encode()
    if len(raw) < 16:
        return bytes([0x80 + len(raw)]) + raw
    if len(raw) < 256:
        return bytes([0xD0, len(raw)]) + raw
    return b"\xd1" + len(raw).to_bytes(2, "big") + raw


def _failure(code: str, message: str) -> bytes:
    """A chunked Bolt FAILURE message (pre-5.7 ``code`` and 5.7+ GQL fields both)."""
    fields = {
        "code": code,
        "neo4j_code": code,
        "message": message,
        "gql_status": "50N00",
        "description": "error: general processing exception - internal error",
    }
    body = bytes([0xB1, _FAILURE, 0xA0 + len(fields)])
    body += b"".join(_pack_str(k) + _pack_str(v) for k, v in fields.items())
    return len(body).to_bytes(2, "big") + body + b"\x00\x00"


def _first_message(buf: bytes) -> bytes | None:
    """The payload of the first whole chunked message in ``buf`` (None: not whole yet)."""
    payload, i = b"", 0
    while i + 2 <= len(buf):
        n = int.from_bytes(buf[i : i + 2], "big")
        i += 2
        if n == 0:
            if payload:
                return payload
            continue  # a NOOP between messages
        if i + n > len(buf):
            return None
        payload += buf[i : i + n]
        i += n
    return None


class CommitFaultProxy:
    """TCP proxy to a Bolt server; see the module docstring.

    Attributes:
        armed: Intercept the next COMMIT.
        failure_code: The Neo4j error code the driver gets for it.
        shut_after: Close every connection and the port after the FAILURE (else go on
            forwarding, on the other connections).
        server_answer: The tag of Neo4j's own answer to the intercepted COMMIT (0x70:
            SUCCESS, the commit was applied), or None while nothing was intercepted.
    """

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.armed = False
        self.failure_code = "Neo.TransientError.General.DatabaseUnavailable"
        self.shut_after = True
        self.server_answer: int | None = None
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def shut(self) -> None:
        """Close every connection and stop listening (connections are refused from now)."""
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.close()
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        sreader, swriter = await asyncio.open_connection(*self.upstream)
        self._writers += [cwriter, swriter]
        commit_sent = asyncio.Event()

        async def up() -> None:
            while data := await creader.read(65536):
                if self.armed and self.server_answer is None and data.endswith(_COMMIT):
                    commit_sent.set()  # before forwarding: the answer is not let through
                swriter.write(data)
                await swriter.drain()
            swriter.close()

        async def down() -> None:
            buf = b""
            while data := await sreader.read(65536):
                if not commit_sent.is_set():
                    cwriter.write(data)
                    await cwriter.drain()
                    continue
                buf += data
                answer = _first_message(buf)
                if answer is None:
                    continue
                self.server_answer = answer[1]
                cwriter.write(_failure(self.failure_code, "Refused by the test's proxy"))
                await cwriter.drain()
                if self.shut_after:
                    await self.shut()
                else:
                    cwriter.close()
                    swriter.close()
                return
            cwriter.close()

        for coro in (up(), down()):
            task = asyncio.ensure_future(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await asyncio.gather(*list(self._tasks))


@pytest.fixture
async def proxied(
    clean_neo4j: Neo4jTarget,
) -> AsyncIterator[tuple[Neo4jGraphStore, CommitFaultProxy]]:
    """A store talking to Neo4j through a :class:`CommitFaultProxy`, with short retries."""
    url = urlsplit(clean_neo4j.uri)
    proxy = CommitFaultProxy(url.hostname or "127.0.0.1", url.port or 7687)
    port = await proxy.start()
    store = Neo4jGraphStore(
        f"bolt://127.0.0.1:{port}",
        credentials=clean_neo4j.credentials,
        embedding_dim=DIM,
        max_transaction_retry_time_s=1.0,
        connection_timeout_s=1.0,
        connection_acquisition_timeout_s=5.0,
    )
    await store.open()
    try:
        yield store, proxy
    finally:
        await proxy.shut()
        with contextlib.suppress(StoreUnavailableError):
            await store.close()


def _stored_keys(target: Neo4jTarget) -> list[str]:
    with GraphDatabase.driver(target.uri, auth=target.auth()) as driver:
        records, _, _ = driver.execute_query(
            "MATCH (q:Query) RETURN q.idempotency_key AS k ORDER BY k",
            database_=target.credentials.database or "neo4j",
        )
    return [r["k"] for r in records]


@pytest.mark.parametrize(
    "batch",
    [
        pytest.param([make(1)], id="one-statement"),
        # two turn indexes in one session: the two-statement write (execute_write)
        pytest.param([make(1, turn=0), make(2, turn=1)], id="two-statements"),
    ],
)
async def test_a_commit_applied_then_refused_and_unreachable_is_outcome_unknown(
    clean_neo4j: Neo4jTarget,
    proxied: tuple[Neo4jGraphStore, CommitFaultProxy],
    batch: list[Interaction],
) -> None:
    store, proxy = proxied
    proxy.armed = True
    with pytest.raises(CommitOutcomeUnknownError) as err:
        await store.record(batch)
    assert proxy.server_answer == _SUCCESS  # Neo4j did commit
    assert "may or may not be stored" in str(err.value), err.value
    assert "ServiceUnavailable" in str(err.value), err.value  # the retries' final error
    keys = [it.idempotency_key for it in batch]
    assert _stored_keys(clean_neo4j) == keys
    # The retry the error asks for: a duplicate, nothing written twice.
    retry = Neo4jGraphStore(clean_neo4j.uri, credentials=clean_neo4j.credentials, embedding_dim=DIM)
    await retry.open()
    try:
        results = await retry.record(batch)
        assert [r.duplicate for r in results] == [True] * len(batch)
        assert (await retry.counts())["interaction"] == len(batch)
    finally:
        await retry.close()


async def test_a_delete_applied_then_refused_and_unreachable_is_outcome_unknown(
    clean_neo4j: Neo4jTarget, proxied: tuple[Neo4jGraphStore, CommitFaultProxy]
) -> None:
    store, proxy = proxied
    await store.record([make(1), make(2, session="s2")])
    proxy.armed = True
    with pytest.raises(CommitOutcomeUnknownError, match="delete_user is idempotent"):
        await store.delete_user("u1")
    assert proxy.server_answer == _SUCCESS
    assert _stored_keys(clean_neo4j) == []  # it was deleted


async def test_a_write_that_never_reached_commit_is_not_written(
    clean_neo4j: Neo4jTarget, proxied: tuple[Neo4jGraphStore, CommitFaultProxy]
) -> None:
    """The other side of the classification: Neo4j unreachable from the start is "not
    written" (a plain StoreUnavailableError), and indeed nothing is stored."""
    store, proxy = proxied
    await proxy.shut()
    with pytest.raises(StoreUnavailableError) as err:
        await store.record([make(1)])
    assert not isinstance(err.value, CommitOutcomeUnknownError), err.value
    with pytest.raises(StoreUnavailableError) as err:
        await store.delete_user("u1")
    assert not isinstance(err.value, CommitOutcomeUnknownError), err.value
    assert _stored_keys(clean_neo4j) == []


@pytest.mark.parametrize("shut_after", [False, True], ids=["still-reachable", "unreachable"])
async def test_a_group_whose_commit_was_applied_then_refused_is_never_not_written(
    clean_neo4j: Neo4jTarget,
    proxied: tuple[Neo4jGraphStore, CommitFaultProxy],
    shut_after: bool,
) -> None:
    """A group commit applied, then answered with a non-retryable client error: the store
    writes the calls one by one (one call's rows may be at fault). Reachable, each finds its
    rows stored (a duplicate); unreachable, each is of unknown outcome, never "not written"."""
    store, proxy = proxied
    proxy.failure_code = "Neo.ClientError.Statement.SemanticError"
    proxy.shut_after = shut_after
    proxy.armed = True
    batches = [[make(1)], [make(2, session="s2")]]
    results = await asyncio.gather(*(store.record(b) for b in batches), return_exceptions=True)
    assert proxy.server_answer == _SUCCESS
    assert store.write_transactions == (2 if not shut_after else 0)
    for res in results:
        if shut_after:
            assert isinstance(res, CommitOutcomeUnknownError), res
            assert "may or may not be stored" in str(res)
        else:
            assert not isinstance(res, BaseException), res
            assert [r.duplicate for r in res] == [True]
    assert _stored_keys(clean_neo4j) == ["k0001", "k0002"]

"""``privacy.store_raw_text: false``: no raw text in either store or the log, routing still works.

A served checkpoint (the planted-preferences one of ``test_personalized_service``) gets the
same teaching as there, through real gRPC, plus one record with a distinctive query and
response text. Afterwards neither store holds any of the texts — every byte of the SQLite
files, every property of every Neo4j node and relationship — nor does the server's debug
log; the store holds ``sha256:<hex>`` of each text instead; and Select is still personalized.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest

from gmtrouter.v1 import router_pb2 as pb
from gmtrouter.v1 import router_pb2_grpc
from tests.conftest import ServerProcess
from tests.neo4j_fixtures import Neo4jTarget
from tests.server.test_personalized_service import _select, _teach

TAUGHT = [f"{cat}: question {q}" for cat in ("math", "writing") for q in range(2)]


def _config(model_path: Path) -> dict[str, Any]:
    return {
        "decision": {"algorithm": {"gmtrouter": {"model_path": str(model_path)}}},
        "privacy": {"store_raw_text": False},
        # debug: the Neo4j driver logs every query's parameters at this level
        "logging": {"format": "json", "level": "debug"},
    }


def _digest(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _exercise(srv: ServerProcess) -> list[str]:
    """Teach two users, record one distinctive text pair, check routing is personalized.

    Returns:
        Every raw text sent to the server.
    """
    tag = uuid.uuid4().hex
    secret_query = f"my private question {tag}"
    secret_response = f"the private answer {tag}"
    with grpc.insecure_channel(srv.address) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        _teach(stub, "new-user-g0", 0)
        _teach(stub, "new-user-g1", 1)
        rec = stub.RecordResponse(
            pb.RecordResponseRequest(
                user_id="new-user-g0",
                session_id="private",
                query=secret_query,
                model="A",
                response=secret_response,
                idempotency_key=f"private-{tag}",
                rating=pb.Rating(value=5, scale_min=1, scale_max=5),
            ),
            timeout=60,
        )
        assert not rec.duplicate
        g0 = _select(stub, "new-user-g0", "math: question 7")
        g1 = _select(stub, "new-user-g1", "math: question 7")
    assert g0.method == g1.method == "gmtrouter"
    assert g0.selected_model == "A", dict(g0.all_scores)
    assert g1.selected_model == "B", dict(g1.all_scores)
    return [*TAUGHT, secret_query, secret_response, "math: question 7"]


def _assert_log_clean(srv: ServerProcess, texts: list[str]) -> None:
    log = srv.log()
    assert '"event": "rpc"' in log  # the access log was written
    for t in texts:
        assert t not in log, f"{t!r} reached the server log"


def test_sqlite_keeps_no_raw_text(checkpoint: Path, tmp_path: Path) -> None:
    import sqlite3

    db = tmp_path / "graph.db"
    srv = ServerProcess(tmp_path, f"sqlite:///{db}", _config(checkpoint)).start(600)
    try:
        texts = _exercise(srv)
    finally:
        assert srv.stop() == 0, srv.log()
    files = sorted(tmp_path.glob("graph.db*"))
    blob = b"".join(f.read_bytes() for f in files)
    for t in texts:
        assert t.encode() not in blob, f"{t!r} is in {[f.name for f in files]}"
    with sqlite3.connect(db) as conn:
        queries = {r[0] for r in conn.execute("SELECT query FROM interactions")}
        responses = {r[0] for r in conn.execute("SELECT response FROM interactions")}
    assert queries == {_digest(t) for t in [*TAUGHT, texts[4]]}
    assert responses == {"", _digest(texts[5])}
    _assert_log_clean(srv, texts)


@pytest.mark.neo4j
def test_neo4j_keeps_no_raw_text(
    checkpoint: Path,
    clean_neo4j: Neo4jTarget,
    tmp_path: Path,
) -> None:
    from neo4j import GraphDatabase

    creds = clean_neo4j.credentials
    config = _config(checkpoint)
    config["store"] = {
        "neo4j": {"user": creds.user, "password": creds.password, "database": creds.database}
    }
    srv = ServerProcess(tmp_path, clean_neo4j.uri, config).start(600)
    try:
        texts = _exercise(srv)
    finally:
        assert srv.stop() == 0, srv.log()
    every_string_property = """
        CALL () { MATCH (n) RETURN properties(n) AS p
                  UNION ALL MATCH ()-[r]->() RETURN properties(r) AS p }
        UNWIND keys(p) AS k
        WITH p[k] AS v
        RETURN CASE WHEN v IS :: STRING THEN [v]
                    WHEN v IS :: LIST<STRING NOT NULL> THEN v
                    ELSE [] END AS strings
    """
    containing = """
        CALL () { MATCH (n) RETURN properties(n) AS p
                  UNION ALL MATCH ()-[r]->() RETURN properties(r) AS p }
        UNWIND keys(p) AS k
        WITH p[k] AS v
        WHERE (v IS :: STRING AND v CONTAINS $t)
           OR (v IS :: LIST<STRING NOT NULL> AND any(x IN v WHERE x CONTAINS $t))
        RETURN count(*) AS n
    """
    with GraphDatabase.driver(clean_neo4j.uri, auth=clean_neo4j.auth()) as driver:
        for t in texts:
            records, _, _ = driver.execute_query(containing, t=t, database_=creds.database)
            assert records[0]["n"] == 0, f"{t!r} is stored in Neo4j"
        records, _, _ = driver.execute_query(every_string_property, database_=creds.database)
        # byte properties (embeddings) too: any property, any type, as the driver returns it
        raw, _, _ = driver.execute_query(
            "MATCH (n) RETURN properties(n) AS p UNION ALL MATCH ()-[r]->() "
            "RETURN properties(r) AS p",
            database_=creds.database,
        )
    strings = {s for r in records for s in r["strings"]}
    assert {_digest(t) for t in [*TAUGHT, texts[4], texts[5]]} <= strings
    dump = repr([r["p"] for r in raw])
    blobs = b"".join(v for r in raw for v in r["p"].values() if isinstance(v, bytes | bytearray))
    for t in texts:
        assert t not in dump and t.encode() not in blobs
    _assert_log_clean(srv, texts)


def test_log_events_carry_no_texts() -> None:
    from server.logs import redact_texts

    event = {"event": "x", "user_id": "u", "query": "secret", "conversation_history": ["a", "b"]}
    assert redact_texts(None, "info", event) == {
        "event": "x",
        "user_id": "u",
        "query": "<redacted: 6 chars>",
        "conversation_history": "<redacted: 2 items>",
    }

"""The server started with ``--store bolt://…`` answers Select/RecordResponse end to end."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from gmtrouter.v1 import router_pb2 as pb
from gmtrouter.v1 import router_pb2_grpc
from tests.conftest import ServerProcess
from tests.neo4j_fixtures import Neo4jTarget
from tests.server.test_grpc_service import cands, compare, emb

pytestmark = pytest.mark.neo4j


def test_serve_on_neo4j(clean_neo4j: Neo4jTarget, tmp_path: Path) -> None:
    creds = clean_neo4j.credentials
    config = {
        "store": {
            "neo4j": {"user": creds.user, "password": creds.password, "database": creds.database}
        }
    }
    srv = ServerProcess(tmp_path, clean_neo4j.uri, config).start()
    try:
        with grpc.insecure_channel(srv.address) as ch:
            stub = router_pb2_grpc.RouterServiceStub(ch)
            first = compare(stub, "neo-user", "n-good", "n-bad", key="neo-k1")
            assert not first.duplicate
            assert compare(stub, "neo-user", "n-good", "n-bad", key="neo-k1").duplicate
            compare(stub, "neo-user", "n-good", "n-bad", key="neo-k2")
            sel = stub.Select(
                pb.SelectRequest(
                    user_id="neo-user",
                    query_embedding=emb(5),
                    candidate_models=cands("n-bad", "n-good"),
                ),
                timeout=30,
            )
            assert sel.selected_model == "n-good"
            assert sel.model_version == "bt_prior@2"
    finally:
        assert srv.stop() == 0, srv.log()
    from neo4j import GraphDatabase

    with GraphDatabase.driver(clean_neo4j.uri, auth=clean_neo4j.auth()) as driver:
        records, _, _ = driver.execute_query(
            "MATCH (u:User {user_id: 'neo-user'})-[:SUBMITTED]->(q:Query) RETURN count(q) AS n",
            database_=creds.database,
        )
    assert records[0]["n"] == 2


async def test_a_refused_configuration_is_not_retried_at_start_up(
    clean_neo4j: Neo4jTarget,
) -> None:
    """``store.open_wait_s`` waits for a store that is not there yet, not for one that
    refuses the configuration (here: a database that does not exist; a wrong password is
    refused the same way, and retrying it could lock the user out for every replica)."""
    import asyncio

    from graphstore.errors import StoreRefusedError
    from graphstore.factory import Neo4jCredentials
    from graphstore.neo4j_store import Neo4jGraphStore
    from server.app import RouterServer
    from server.config import parse_settings

    creds = clean_neo4j.credentials
    store = Neo4jGraphStore(
        clean_neo4j.uri, Neo4jCredentials(creds.user, creds.password, "nosuchdb"), 384
    )
    settings = parse_settings(
        {"server": {"port": 0, "metrics_port": 0}, "store": {"open_wait_s": 60}}
    )
    app = RouterServer(settings, store=store, environ={})
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        with pytest.raises(StoreRefusedError, match="nosuchdb"):
            await app.start(warm_up=False)
        assert loop.time() - began < 30
    finally:
        await app.stop(0, 0)

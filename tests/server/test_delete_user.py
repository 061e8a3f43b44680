"""``DeleteUser`` over gRPC, against a server on each store (SQLite and Neo4j).

Records a user's history, opens a preference stream, deletes the user over gRPC and proves
that nothing of the user remains: the store's rows/nodes, the user's version, the pair counts
behind the prior, the idempotency keys (re-recording works), and the stream gets the reset.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from neo4j import GraphDatabase

from gmtrouter.v1 import router_pb2 as pb
from gmtrouter.v1 import router_pb2_grpc
from tests.conftest import ServerProcess
from tests.neo4j_fixtures import Neo4jTarget
from tests.server.test_grpc_service import cands, compare, emb

USER = "erase-me"
OTHER = "keep-me"


@pytest.fixture(
    params=[pytest.param("sqlite"), pytest.param("neo4j", marks=pytest.mark.neo4j)],
)
def served(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, ServerProcess]]:
    """(kind, server): a server on a fresh SQLite file or on a clean Neo4j."""
    if request.param == "sqlite":
        srv = ServerProcess(tmp_path, f"sqlite:///{tmp_path}/graph.db").start()
    else:
        target: Neo4jTarget = request.getfixturevalue("clean_neo4j")
        c = target.credentials
        config: dict[str, object] = {
            "store": {"neo4j": {"user": c.user, "password": c.password, "database": c.database}}
        }
        srv = ServerProcess(tmp_path, target.uri, config).start()
    try:
        yield request.param, srv
    finally:
        assert srv.stop() == 0, srv.log()


def _remaining(kind: str, srv: ServerProcess, request: pytest.FixtureRequest) -> int:
    """Rows/nodes anywhere in the store that still carry USER."""
    if kind == "sqlite":
        path = srv.store.removeprefix("sqlite:///")
        with sqlite3.connect(path) as conn:
            return sum(
                conn.execute(f"SELECT COUNT(*) FROM {t} WHERE user_id = ?", (USER,)).fetchone()[0]
                for t in ("users", "interactions", "turns")
            )
    target: Neo4jTarget = request.getfixturevalue("clean_neo4j")
    with GraphDatabase.driver(target.uri, auth=target.auth()) as driver:
        records, _, _ = driver.execute_query(
            "MATCH (n) WHERE n.user_id = $u RETURN count(n) AS n",
            u=USER,
            database_=target.credentials.database,
        )
        n = int(records[0]["n"])
        records, _, _ = driver.execute_query(
            "MATCH (r:Response) WHERE NOT EXISTS { (:Query)-[:RECEIVED]->(r) } "
            "RETURN count(r) AS n",
            database_=target.credentials.database,
        )
        return n + int(records[0]["n"])


def _select(stub: router_pb2_grpc.RouterServiceStub, user: str) -> pb.SelectResponse:
    return stub.Select(
        pb.SelectRequest(user_id=user, query_embedding=emb(2), candidate_models=cands("a", "b")),
        timeout=30,
    )


def test_delete_user_end_to_end(
    served: tuple[str, ServerProcess], request: pytest.FixtureRequest
) -> None:
    kind, srv = served
    with grpc.insecure_channel(srv.address) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        for i in range(3):
            assert not compare(stub, USER, "a", "b", key=f"erase-{i}").duplicate
        compare(stub, OTHER, "b", "a", key="keep-0")
        assert _select(stub, USER).model_version == "bt_prior@4"
        assert _remaining(kind, srv, request) > 0

        call = stub.StreamPreferences(
            pb.StreamPreferencesRequest(user_ids=[USER], candidate_models=cands("a", "b")),
            timeout=60,
        )
        updates: queue.Queue[pb.PreferenceUpdate | BaseException] = queue.Queue()

        def consume() -> None:
            try:
                for upd in call:
                    updates.put(upd)
            except grpc.RpcError as exc:
                updates.put(exc)

        threading.Thread(target=consume, daemon=True).start()
        first = updates.get(timeout=30)
        assert isinstance(first, pb.PreferenceUpdate) and first.version == 3

        resp = stub.DeleteUser(pb.DeleteUserRequest(user_id=USER), timeout=30)
        assert resp.deleted_interactions == 3

        reset = updates.get(timeout=30)
        assert isinstance(reset, pb.PreferenceUpdate)
        assert reset.user_id == USER and reset.version == 0
        call.cancel()  # type: ignore[no-untyped-call]

        assert _remaining(kind, srv, request) == 0
        # the prior forgot the user's three comparisons; the other user's one remains
        sel = _select(stub, USER)
        assert sel.model_version == "bt_prior@1"
        assert sel.selected_model == "b"
        # idempotent, and the keys are free again
        assert (
            stub.DeleteUser(pb.DeleteUserRequest(user_id=USER), timeout=30).deleted_interactions
            == 0
        )
        assert not compare(stub, USER, "a", "b", key="erase-0").duplicate
        assert _select(stub, OTHER).model_version == "bt_prior@2"


def test_delete_user_invalid_argument(stub: router_pb2_grpc.RouterServiceStub) -> None:
    for bad in ("", "   ", "bad\x00id"):
        with pytest.raises(grpc.RpcError) as err:
            stub.DeleteUser(pb.DeleteUserRequest(user_id=bad), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert str(err.value.details()).startswith("user_id:")

"""Two replicas share one real Neo4j: feedback recorded on A reaches B within the staleness bound.

Replica B must not keep serving a user's stale state for longer than
``prior.refresh_s`` (Bradley–Terry prior, 1 s by default) — the network scorer checks the
user's graph version on every request — and its StreamPreferences subscribers learn of
writes made through A within ``streaming.poll_interval_s``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from gmtrouter.v1 import router_pb2 as pb
from gmtrouter.v1 import router_pb2_grpc
from tests.conftest import ServerProcess
from tests.neo4j_fixtures import Neo4jTarget
from tests.server.test_grpc_service import cands, compare, emb

pytestmark = pytest.mark.neo4j


@pytest.fixture()
def replicas(
    clean_neo4j: Neo4jTarget, tmp_path: Path
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    creds = clean_neo4j.credentials
    config = {
        "store": {
            "neo4j": {"user": creds.user, "password": creds.password, "database": creds.database}
        },
        "prior": {"refresh_s": 1.0},
        "streaming": {"poll_interval_s": 0.5},
    }
    a = ServerProcess(tmp_path, clean_neo4j.uri, config)
    b = ServerProcess(tmp_path, clean_neo4j.uri, config)
    a.start()
    try:
        b.start()
    except BaseException:
        a.stop()
        raise
    yield a, b
    a.stop()
    b.stop()


def test_replica_b_sees_feedback_recorded_on_a(
    replicas: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = replicas
    user, x, y = "shared-user", "r-x", "r-y"
    with grpc.insecure_channel(a.address) as cha, grpc.insecure_channel(b.address) as chb:
        stub_a = router_pb2_grpc.RouterServiceStub(cha)
        stub_b = router_pb2_grpc.RouterServiceStub(chb)
        compare(stub_a, user, x, y, key="r-0")
        time.sleep(1.2)  # B's prior is at most refresh_s old
        req = pb.SelectRequest(user_id=user, query_embedding=emb(9), candidate_models=cands(y, x))
        assert stub_b.Select(req, timeout=30).selected_model == x

        stream = stub_b.StreamPreferences(
            pb.StreamPreferencesRequest(user_ids=[user], candidate_models=cands(x, y)), timeout=60
        )
        updates: queue.Queue[pb.PreferenceUpdate | BaseException] = queue.Queue()

        def consume() -> None:
            try:
                for u in stream:
                    updates.put(u)
            except grpc.RpcError as exc:
                updates.put(exc)

        threading.Thread(target=consume, daemon=True).start()
        first = updates.get(timeout=30)
        assert isinstance(first, pb.PreferenceUpdate)
        assert [p.model for p in first.preferences] == [x, y]

        written_at = time.monotonic()
        for i in range(3):  # y overtakes x, written through A only
            compare(stub_a, user, y, x, key=f"r-{i + 1}")
        acked_at = time.monotonic()
        flipped_at = None
        while time.monotonic() - acked_at < 5.0:
            if stub_b.Select(req, timeout=30).selected_model == y:
                flipped_at = time.monotonic()
                break
            time.sleep(0.05)
        assert flipped_at is not None, "replica B kept the stale ranking for more than 5 s"
        assert flipped_at - acked_at <= 1.5, (
            f"stale for {flipped_at - acked_at:.2f} s (bound 1 s + polling)"
        )

        update = updates.get(timeout=10)
        assert isinstance(update, pb.PreferenceUpdate)
        assert [p.model for p in update.preferences] == [y, x]
        assert time.monotonic() - written_at < 10
        stream.cancel()  # type: ignore[no-untyped-call]

"""``gmtrouter import`` into both stores: batches, counts, and no duplicates on a re-run."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from graphstore.factory import create_store
from graphstore.store import GraphStore
from model.datasets import read_llmfao
from server.importer import import_records
from tests.conftest import REPO
from tests.neo4j_fixtures import Neo4jTarget

DIM = 384
BUNDLED = REPO / "examples" / "data" / "llmfao"


@pytest.fixture(params=["sqlite", "neo4j"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[GraphStore]:
    if request.param == "sqlite":
        graph = create_store(f"sqlite:///{tmp_path}/import.db", embedding_dim=DIM)
    else:
        target: Neo4jTarget = request.getfixturevalue("clean_neo4j")
        graph = create_store(target.uri, embedding_dim=DIM, neo4j=target.credentials)
    await graph.open()
    yield graph
    await graph.close()


async def test_import_is_idempotent(store: GraphStore) -> None:
    records = read_llmfao(BUNDLED)[:400]
    rng = np.random.default_rng(0)
    texts = sorted({r.query_text for r in records})
    table = {t: rng.standard_normal(DIM).astype(np.float32) for t in texts}
    emb = np.stack([table[r.query_text] for r in records])
    first = await import_records(store, "llmfao", records, emb, batch_size=64, progress=False)
    assert first["written"] == 400 and first["duplicates"] == 0
    counts = await store.counts()
    assert counts["interaction"] == 400
    assert counts["turn"] == 800  # two outcomes per comparison
    assert counts["user"] == len({r.user_id for r in records})
    second = await import_records(store, "llmfao", records, emb, batch_size=64, progress=False)
    assert second["written"] == 0 and second["duplicates"] == 400
    assert await store.counts() == counts
    games = sum(p.wins_a + p.wins_b for p in await store.pair_counts())
    assert games == pytest.approx(400.0)
    user = records[0].user_id
    nb = await store.neighbourhood(user, hops=2, fan_out=(64, 8, 16, 8))
    expected = sum(2 for r in records if r.user_id == user)
    assert int(np.count_nonzero(nb.turn_user == 0)) == min(expected, 64)

"""Store URIs: which store a URI opens, and the mistyped ones that are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from graphstore.factory import check_store_uri, create_store, sqlite_path
from graphstore.neo4j_store import Neo4jGraphStore
from graphstore.sqlite_store import SQLiteGraphStore


@pytest.mark.parametrize(
    ("uri", "path"),
    [
        ("sqlite:///data/g.db", "data/g.db"),
        ("sqlite:////abs/g.db", "/abs/g.db"),
        ("sqlite://:memory:", ":memory:"),
        ("graph.db", "graph.db"),
        ("./neo4j/graph.db", "./neo4j/graph.db"),
        ("/var/lib/gmtrouter/bolt.db", "/var/lib/gmtrouter/bolt.db"),
        ("neo4j.db", "neo4j.db"),
        ("bolt", "bolt"),
        ("bolt://127.0.0.1:7687", None),
    ],
)
def test_sqlite_path(uri: str, path: str | None) -> None:
    assert sqlite_path(uri) == path


@pytest.mark.parametrize(
    "uri",
    [
        "neo4j//127.0.0.1:7687",
        "neo4j:/127.0.0.1:7687",
        "bolt:127.0.0.1:7687",
        "NEO4J+S//db.example.com",
        "sqlite:/data/g.db",
        "sqlite/data/g.db",
    ],
)
def test_a_mistyped_uri_is_refused_not_made_a_sqlite_file(uri: str) -> None:
    with pytest.raises(ValueError, match="mistyped"):
        check_store_uri(uri)
    with pytest.raises(ValueError, match="mistyped"):
        create_store(uri, embedding_dim=8)


@pytest.mark.parametrize(
    ("uri", "message"), [("http://x", "'http' is not supported"), (" ", "empty")]
)
def test_unsupported_or_empty_uri(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_store_uri(uri)


def test_each_scheme_opens_its_store(tmp_path: Path) -> None:
    assert isinstance(create_store(f"sqlite:///{tmp_path}/g.db", embedding_dim=8), SQLiteGraphStore)
    assert isinstance(create_store("neo4j://127.0.0.1:1", embedding_dim=8), Neo4jGraphStore)

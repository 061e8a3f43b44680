"""Open a :class:`~graphstore.store.GraphStore` from a store URI.

URIs:
    ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db`` (as SQLAlchemy), a bare
        file path, or ``sqlite://:memory:``
        → the embedded :class:`~graphstore.sqlite_store.SQLiteGraphStore`;
    ``neo4j://``, ``neo4j+s://``, ``bolt://``, ``bolt+s://`` → the Neo4j store.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from graphstore.store import GraphStore

NEO4J_SCHEMES = ("neo4j", "neo4j+s", "neo4j+ssc", "bolt", "bolt+s", "bolt+ssc")


@dataclass(frozen=True, slots=True)
class Neo4jCredentials:
    """Credentials and database for a Neo4j store (never logged).

    Attributes:
        user: Neo4j user; "" with an empty password means authentication off.
        password: Password ("" = no authentication).
        database: Database name ("neo4j" by default).
    """

    user: str = "neo4j"
    password: str = ""
    database: str = "neo4j"


def sqlite_path(uri: str) -> str | None:
    """The SQLite file path for an embedded-store URI, or None for another scheme.

    Raises:
        ValueError: ``uri`` is no URI (no ``://``) but starts like one of the supported
            schemes (``neo4j//host:7687``, ``bolt:host``, ``sqlite:/x.db``): a mistyped URI
            that would otherwise become a SQLite file of that name. A file whose path really
            starts so is written ``./neo4j/...``.
    """
    if uri.startswith("sqlite://"):
        rest = uri[len("sqlite://") :]
        if rest in (":memory:", "/:memory:"):
            return ":memory:"
        return rest[1:] if rest.startswith("/") else rest
    if "://" not in uri:
        head = re.split(r"[:/]", uri, maxsplit=1)[0].lower()
        if head in (*NEO4J_SCHEMES, "sqlite") and head != uri:
            raise ValueError(
                f"store URI {uri!r} looks like a mistyped {head}:// URI; write "
                f"{head}://... (or ./{uri} for a SQLite file of that name)"
            )
        return uri
    return None


def check_store_uri(uri: str) -> str:
    """Check that ``uri`` names a store :func:`create_store` can open.

    Returns:
        ``uri`` unchanged.

    Raises:
        ValueError: the URI is empty, its scheme is not supported (the message lists those
            that are), or it is a mistyped URI (see :func:`sqlite_path`).
    """
    if not uri.strip():
        raise ValueError("store URI is empty; use a file path, sqlite:///PATH or neo4j://HOST")
    scheme = uri.split("://", 1)[0]
    if sqlite_path(uri) is None and scheme not in NEO4J_SCHEMES:
        raise _unsupported(scheme)
    return uri


def _unsupported(scheme: str) -> ValueError:
    return ValueError(
        f"store URI scheme {scheme!r} is not supported; use a file path, sqlite:///PATH, "
        f"or one of {', '.join(s + '://' for s in NEO4J_SCHEMES)}"
    )


def create_store(
    uri: str, *, embedding_dim: int, neo4j: Neo4jCredentials | None = None
) -> GraphStore:
    """Create (not yet open) the store for ``uri``.

    Raises:
        ValueError: the URI's scheme is not supported (the message lists those that are), or
            it is a mistyped URI (see :func:`sqlite_path`).
    """
    path = sqlite_path(uri)
    if path is not None:
        from graphstore.sqlite_store import SQLiteGraphStore

        return SQLiteGraphStore(path, embedding_dim=embedding_dim)
    scheme = uri.split("://", 1)[0]
    if scheme in NEO4J_SCHEMES:
        from graphstore.neo4j_store import Neo4jGraphStore

        return Neo4jGraphStore(
            uri, credentials=neo4j or Neo4jCredentials(), embedding_dim=embedding_dim
        )  # type: ignore[no-any-return,unused-ignore]
    raise _unsupported(scheme)

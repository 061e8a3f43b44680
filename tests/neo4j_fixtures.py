"""Fixtures for the graph-store tests: a real Neo4j, found or started, and clean per test.

Where the Neo4j comes from, in order:

1. ``NEO4J_URI`` (with ``NEO4J_USER``, ``NEO4J_PASSWORD``, ``NEO4J_DATABASE``) when set — e.g.
   the local server of ``tools/neo4j/neo4j.sh start`` (``bolt://127.0.0.1:7687``, auth off).
   ``GMTROUTER_NEO4J_LAUNCHER=1`` says that server is the launcher's (its ``NEO4J_HOME_DIR``),
   which the durability test may stop and start.
2. A testcontainers ``Neo4jContainer`` when a Docker engine answers.
3. Otherwise the Neo4j tests are skipped with the reason — except under ``CI=true``, where a
   missing Neo4j fails them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from neo4j import GraphDatabase

from graphstore.factory import Neo4jCredentials

NEO4J_IMAGE = "neo4j:5.26-community"


@dataclasses.dataclass(frozen=True)
class Neo4jTarget:
    """A reachable Neo4j for tests.

    Attributes:
        uri: Bolt URI.
        credentials: User, password ("" = no auth) and database.
        launcher: True when it is the ``tools/neo4j/neo4j.sh`` server of this environment.
    """

    uri: str
    credentials: Neo4jCredentials
    launcher: bool

    def auth(self) -> tuple[str, str] | None:
        c = self.credentials
        return (c.user or "neo4j", c.password) if c.password else None


def _docker_answers() -> bool:
    """True when a Docker engine answers ``docker info`` within a few seconds."""
    if shutil.which("docker") is None:
        return False
    try:
        done = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and bool(done.stdout.strip())


def _no_neo4j(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and no Neo4j for the graph-store tests: {reason}")
    pytest.skip(reason)


def _wipe(target: Neo4jTarget) -> None:
    with GraphDatabase.driver(target.uri, auth=target.auth()) as driver:
        driver.execute_query("MATCH (n) DETACH DELETE n", database_=target.credentials.database)


@pytest.fixture(scope="session")
def neo4j_target() -> Iterator[Neo4jTarget]:
    """The Neo4j server of the session (see the module docstring); skips or fails without one."""
    uri = os.environ.get("NEO4J_URI", "").strip()
    if uri:
        creds = Neo4jCredentials(
            user=os.environ.get("NEO4J_USER", "neo4j"),
            password=os.environ.get("NEO4J_PASSWORD", ""),
            database=os.environ.get("NEO4J_DATABASE", "neo4j"),
        )
        target = Neo4jTarget(uri, creds, os.environ.get("GMTROUTER_NEO4J_LAUNCHER") == "1")
        try:
            with GraphDatabase.driver(uri, auth=target.auth(), connection_timeout=5) as driver:
                driver.verify_connectivity()
        except Exception as exc:
            _no_neo4j(f"NEO4J_URI={uri} does not answer: {type(exc).__name__}: {exc}")
        yield target
        return
    if not _docker_answers():
        _no_neo4j(
            "no Neo4j: NEO4J_URI is unset and no Docker engine answers for testcontainers "
            "(start one with tools/neo4j/neo4j.sh start and set NEO4J_URI=bolt://127.0.0.1:7687)"
        )
    try:
        from testcontainers.community.neo4j import Neo4jContainer

        container = Neo4jContainer(NEO4J_IMAGE, password="gmtrouter-test")
        container.start()
    except Exception as exc:
        _no_neo4j(f"testcontainers could not start {NEO4J_IMAGE}: {type(exc).__name__}: {exc}")
    try:
        yield Neo4jTarget(
            container.get_connection_url(),
            Neo4jCredentials("neo4j", "gmtrouter-test", "neo4j"),
            launcher=False,
        )
    finally:
        container.stop()


@pytest.fixture(scope="session")
def neo4j_uri(neo4j_target: Neo4jTarget) -> str:
    """Bolt URI of the session's Neo4j."""
    return neo4j_target.uri


@pytest.fixture
def clean_neo4j(neo4j_target: Neo4jTarget) -> Neo4jTarget:
    """The session's Neo4j with every node and relationship deleted (schema kept)."""
    _wipe(neo4j_target)
    return neo4j_target

"""Replicas opening one fresh Neo4j database at once all create its schema and open."""

from __future__ import annotations

import asyncio

from neo4j import GraphDatabase

from graphstore.neo4j_store import SCHEMA, Neo4jGraphStore
from tests.neo4j_fixtures import Neo4jTarget

DIM = 8


def _drop_schema(target: Neo4jTarget) -> None:
    """Drop every constraint and index but Neo4j's own token lookup indexes."""
    db = target.credentials.database or "neo4j"
    with GraphDatabase.driver(target.uri, auth=target.auth()) as driver:
        for record in driver.execute_query("SHOW CONSTRAINTS YIELD name", database_=db)[0]:
            driver.execute_query(f"DROP CONSTRAINT `{record['name']}`", database_=db)
        indexes = driver.execute_query(
            "SHOW INDEXES YIELD name, type WHERE type <> 'LOOKUP' RETURN name", database_=db
        )[0]
        for record in indexes:
            driver.execute_query(f"DROP INDEX `{record['name']}`", database_=db)


def _schema_names(target: Neo4jTarget) -> set[str]:
    db = target.credentials.database or "neo4j"
    with GraphDatabase.driver(target.uri, auth=target.auth()) as driver:
        records = driver.execute_query(
            "SHOW INDEXES YIELD name, type WHERE type <> 'LOOKUP' RETURN name", database_=db
        )[0]
    return {r["name"] for r in records}


async def test_replicas_opening_a_fresh_database_at_once_all_open(
    clean_neo4j: Neo4jTarget,
) -> None:
    """Creating constraints at once can deadlock in Neo4j (a TransientError): open() retries."""
    for _ in range(3):
        _drop_schema(clean_neo4j)
        stores = [
            Neo4jGraphStore(clean_neo4j.uri, credentials=clean_neo4j.credentials, embedding_dim=DIM)
            for _ in range(4)
        ]
        try:
            await asyncio.gather(*(s.open() for s in stores))
        finally:
            await asyncio.gather(*(s.close() for s in stores))
        # every constraint's and index's name is in the schema again
        expected = {statement.split()[2] for statement in SCHEMA}
        assert expected <= _schema_names(clean_neo4j)

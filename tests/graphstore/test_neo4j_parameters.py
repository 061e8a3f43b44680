"""What the Neo4j store hands the driver: embeddings as bytes, and the one-statement write's
parameter map, whose ``repr`` is short.

The driver formats every RUN message's parameters with ``repr`` for its debug log before it
checks the log level; the embedding bytes of a group commit made that a 170,000-character
string per transaction. The stored value must stay the same bytes (the contract tests read
them back from a real Neo4j).
"""

from __future__ import annotations

import numpy as np
from neo4j._codec.packstream._common import PackableBuffer
from neo4j._codec.packstream.v1 import Packer

from graphstore.interactions import Comparison, Interaction
from graphstore.neo4j_store import _Blob, _Parameters, _Plan


def _interaction(i: int) -> Interaction:
    rng = np.random.default_rng(i)
    emb = rng.standard_normal(384).astype(np.float32)
    return Interaction(
        interaction_id=f"i{i}",
        user_id=f"u{i % 4}",
        session_id=f"s{i}",
        turn_index=0,
        query="q",
        query_embedding=emb / np.linalg.norm(emb),
        model="a",
        response="r",
        timestamp_s=1_700_000_000.0 + i,
        idempotency_key=f"k{i}",
        comparison=Comparison("a", "b"),
    )


def _packed(value: object, key: str = "embedding") -> bytes:
    buf = PackableBuffer()  # type: ignore[no-untyped-call]
    Packer(buf).pack({key: value})  # type: ignore[no-untyped-call]
    return bytes(buf.data)


def test_blob_is_the_same_bytes_with_a_short_repr() -> None:
    raw = bytes(range(256)) * 6
    blob = _Blob(raw)
    assert blob == raw and hash(blob) == hash(raw) and isinstance(blob, bytes)
    assert repr(blob) == "<1536 bytes>"
    assert _packed(blob) == _packed(raw)  # the driver sends the same Bolt bytes


def test_a_group_commits_parameters_repr_without_the_embeddings() -> None:
    items = [_interaction(i) for i in range(32)]
    rows = _Plan([items], {}, {}).rows()
    for row, it in zip(rows, items, strict=True):
        stored = row["query"]["embedding"]
        assert stored == it.query_embedding.astype("<f4").tobytes()
        assert repr(stored) == "<1536 bytes>"
    # what the driver's debug-log formatting pays per transaction: no embedding bytes in it
    assert len(repr(rows)) < 40_000


def test_parameters_pack_as_the_same_map_with_a_short_repr() -> None:
    rows = _Plan([[_interaction(i) for i in range(32)]], {}, {}).rows()
    plain = {"rows": rows, "users": [{"user_id": "u0", "writes": 32}]}
    params = _Parameters(plain)
    assert params == plain and isinstance(params, dict)
    assert repr(params) == "<parameters ['rows', 'users']>"
    assert repr({"p": params}) == "{'p': <parameters ['rows', 'users']>}"
    assert _packed(params, "p") == _packed(plain, "p")  # the driver sends the same Bolt bytes

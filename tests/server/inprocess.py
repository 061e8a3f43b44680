"""An in-process ``RouterServer`` for tests that need custom stores, TLS or environments.

The server runs on the test's event loop; talk to it with ``grpc.aio`` channels only (a
blocking client would stall the loop). Requests must carry ``query_embedding`` so that the
text encoder never loads.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np

from gmtrouter.v1 import router_pb2 as pb
from graphstore.sqlite_store import SQLiteGraphStore
from graphstore.store import GraphStore
from server.app import RouterServer
from server.config import parse_settings

DIM = 384


def emb(seed: int = 0) -> list[float]:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return list(v / np.linalg.norm(v))


def select_request(user: str = "u1") -> pb.SelectRequest:
    return pb.SelectRequest(
        user_id=user,
        query_embedding=emb(1),
        candidate_models=[pb.CandidateModel(model="a"), pb.CandidateModel(model="b")],
    )


async def record_comparison(
    stub: Any, user: str, query: str, winner: str, loser: str, n: int
) -> None:
    """Record through ``stub`` (an async RouterService stub) that ``user``, asking ``query``
    in session ``<user>-s<n>``, preferred ``winner`` to ``loser``; asserts it was new."""
    resp = await stub.RecordResponse(
        pb.RecordResponseRequest(
            user_id=user,
            session_id=f"{user}-s{n}",
            query=query,
            query_embedding=emb(n),
            comparison=pb.Comparison(winner_model=winner, loser_model=loser),
        )
    )
    assert not resp.duplicate


@asynccontextmanager
async def running(
    server: Mapping[str, Any] | None = None,
    *,
    store: GraphStore | None = None,
    environ: Mapping[str, str] | None = None,
    config: Mapping[str, Any] | None = None,
) -> AsyncIterator[RouterServer]:
    """A started server on a free port with ``server`` settings (metrics off by default) and
    the other top-level sections of ``config``."""
    settings = parse_settings(
        {**dict(config or {}), "server": {"port": 0, "metrics_port": 0, **dict(server or {})}}
    )
    app = RouterServer(
        settings,
        store=store or SQLiteGraphStore(":memory:", embedding_dim=DIM),
        environ=environ or {},
    )
    await app.start(warm_up=False)
    try:
        yield app
    finally:
        await app.stop(0)


def make_certificates(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate (localhost, 127.0.0.1), a client certificate, and a client
    certificate from another CA, all with EC P-256 keys, made with the ``openssl`` CLI.

    Returns:
        name → path for ``ca``, ``server``, ``server_key``, ``client``, ``client_key``,
        ``rogue``, ``rogue_key``.
    """

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "rogue-ca"):
        run("req", "-x509", *key, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "1",
            "-subj", f"/CN=gmtrouter test {ca}")  # fmt: skip
    exts = {
        "server": "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        "client": "extendedKeyUsage=clientAuth\n",
        "rogue": "extendedKeyUsage=clientAuth\n",
    }
    for name, ext in exts.items():
        ca = "rogue-ca" if name == "rogue" else "ca"
        (folder / f"{name}.ext").write_text(ext)
        run("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")  # fmt: skip
    return {
        "ca": folder / "ca.pem",
        "server": folder / "server.pem",
        "server_key": folder / "server.key",
        "client": folder / "client.pem",
        "client_key": folder / "client.key",
        "rogue": folder / "rogue.pem",
        "rogue_key": folder / "rogue.key",
    }

"""Records → arrays: the prepared comparison table, text embeddings (disk-cached) and graphs.

:class:`PreparedData` holds ``N`` comparisons as parallel int/float arrays plus the query and
LLM feature tables; :func:`build_batch_graph` turns per-user history index sets into one
``HeteroData`` with one disjoint component per user (each with its own copy of all ``M``
LLM nodes, exactly the graph a server builds for a single user's neighbourhood).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch_geometric.data import HeteroData

from model.datasets.records import PreferenceRecord
from model.graph import build_hetero_graph, link_previous_turns

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]


class Encoder(Protocol):
    """What the preparation needs of a text encoder (``model.text_encoder.TextEncoder``)."""

    name: str

    @property
    def dim(self) -> int: ...

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> FloatArray: ...


def cache_dir() -> Path:
    """``$GMTROUTER_CACHE_DIR`` or ``~/.cache/gmtrouter/embeddings`` (outside the repo)."""
    env = os.environ.get("GMTROUTER_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "gmtrouter" / "embeddings"


def embed_texts(encoder: Encoder, texts: Sequence[str], *, cache: bool = True) -> FloatArray:
    """Embed ``texts`` (float32 ``[N, D]``), cached on disk by a sha256 of name + texts."""
    if not cache:
        return np.asarray(encoder.encode(list(texts)), dtype=np.float32)
    h = hashlib.sha256(encoder.name.encode())
    for t in texts:
        h.update(b"\x00" + t.encode("utf-8", "replace"))
    path = cache_dir() / f"{h.hexdigest()[:32]}.npy"
    if path.is_file():
        arr = np.load(path)
        if arr.shape[0] == len(texts):
            return np.asarray(arr, dtype=np.float32)
    arr = np.asarray(encoder.encode(list(texts)), dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npy")
    np.save(tmp, arr)
    tmp.replace(path)
    return arr


def llm_description(name: str) -> str:
    """Text embedded as an LLM node feature."""
    return f"large language model {name}"


@dataclasses.dataclass
class PreparedData:
    """``N`` comparisons as arrays, with ``U`` users, ``M`` models, ``Q`` distinct queries.

    Attributes:
        users, models, query_ids: names, in index order.
        query_emb: float32 ``[Q, D]``; llm_x: float32 ``[M, D_llm]``.
        user, session, turn, query, a, b: int64 ``[N]`` (``session`` is a global code).
        y: float32 ``[N]`` outcome of ``a``: 1, 0 or 0.5 (tie).
        session_names: the session id of each session code.
    """

    users: list[str]
    models: list[str]
    query_ids: list[str]
    query_emb: FloatArray
    llm_x: FloatArray
    user: IntArray
    session: IntArray
    turn: IntArray
    query: IntArray
    a: IntArray
    b: IntArray
    y: FloatArray
    session_names: list[str]

    @property
    def n(self) -> int:
        """Number of comparisons ``N``."""
        return int(self.user.shape[0])


def prepare(
    records: Sequence[PreferenceRecord],
    encoder: Encoder,
    *,
    cache: bool = True,
    models: Sequence[str] | None = None,
) -> PreparedData:
    """Index records and embed their query texts and model names.

    Args:
        records: Canonical records.
        encoder: Text encoder (its ``dim`` is ``D``).
        cache: Cache embeddings on disk (:func:`cache_dir`).
        models: Optional fixed model list (extra names get nodes without data).
    """
    users = sorted({r.user_id for r in records})
    model_names = (
        list(models)
        if models is not None
        else sorted({m for r in records for m in (r.model_a, r.model_b)})
    )
    for r in records:
        for m in (r.model_a, r.model_b):
            if m not in model_names:
                model_names.append(m)
    qids: dict[str, int] = {}
    qtexts: list[str] = []
    for r in records:
        if r.query_id not in qids:
            qids[r.query_id] = len(qids)
            qtexts.append(r.query_text or r.query_id)
    u_ix = {u: i for i, u in enumerate(users)}
    m_ix = {m: i for i, m in enumerate(model_names)}
    s_ix: dict[tuple[str, str], int] = {}
    for r in records:
        s_ix.setdefault((r.user_id, r.session_id), len(s_ix))
    query_emb = embed_texts(encoder, qtexts, cache=cache)
    llm_x = embed_texts(encoder, [llm_description(m) for m in model_names], cache=cache)
    return PreparedData(
        users=users,
        models=model_names,
        query_ids=list(qids),
        query_emb=query_emb,
        llm_x=llm_x,
        user=np.array([u_ix[r.user_id] for r in records], dtype=np.int64),
        session=np.array([s_ix[(r.user_id, r.session_id)] for r in records], dtype=np.int64),
        turn=np.array([r.turn_index for r in records], dtype=np.int64),
        query=np.array([qids[r.query_id] for r in records], dtype=np.int64),
        a=np.array([m_ix[r.model_a] for r in records], dtype=np.int64),
        b=np.array([m_ix[r.model_b] for r in records], dtype=np.int64),
        y=np.array([r.outcome_value for r in records], dtype=np.float32),
        session_names=[s for (_, s) in s_ix],
    )


def build_batch_graph(
    prep: PreparedData, histories: Sequence[IntArray], *, reverse_edges: bool = True
) -> HeteroData:
    """One graph with a disjoint component per user: user ``k``'s history comparisons.

    Args:
        prep: Prepared data.
        histories: ``B`` int64 arrays of comparison indices (may be empty = cold start).
        reverse_edges: As :func:`model.graph.build_hetero_graph`.

    Returns:
        ``HeteroData`` with ``B`` users; the LLM node of model ``m`` for user ``k`` is
        ``k * M + m``. Each comparison adds one query node and two turns (one per model).
    """
    m = len(prep.models)
    bsz = len(histories)
    idx = np.concatenate(list(histories)) if bsz else np.zeros(0, dtype=np.int64)
    owner = (
        np.concatenate([np.full(len(h), k, dtype=np.int64) for k, h in enumerate(histories)])
        if bsz
        else np.zeros(0, dtype=np.int64)
    )
    nq = len(idx)
    qnode = np.arange(nq, dtype=np.int64)
    t_user = np.concatenate([owner, owner])
    t_query = np.concatenate([qnode, qnode])
    t_llm = np.concatenate([owner * m + prep.a[idx], owner * m + prep.b[idx]])
    t_out = np.concatenate([prep.y[idx], 1.0 - prep.y[idx]]).astype(np.float32)
    sess = prep.session[idx]
    t_sess = [str(s) for s in np.concatenate([sess, sess])]
    t_turn = np.concatenate([prep.turn[idx], prep.turn[idx]])
    t_prev = link_previous_turns(t_user, t_sess, t_turn, t_llm)
    llm_x = torch.from_numpy(np.tile(prep.llm_x, (max(bsz, 1), 1)))
    return build_hetero_graph(
        num_users=max(bsz, 1),
        query_x=torch.from_numpy(prep.query_emb[prep.query[idx]]),
        llm_x=llm_x,
        turn_user=torch.from_numpy(t_user),
        turn_query=torch.from_numpy(t_query),
        turn_llm=torch.from_numpy(t_llm),
        turn_outcome=torch.from_numpy(t_out),
        turn_prev=torch.from_numpy(t_prev),
        reverse_edges=reverse_edges,
    )


def split_by_session(
    prep: PreparedData, idx: IntArray, fraction: float, rng: np.random.Generator
) -> tuple[IntArray, IntArray]:
    """Per user, a random ``fraction`` of their sessions (among ``idx``) goes to the second part.

    All turns of a session fall on the same side; ``round(fraction · n_sessions)`` sessions
    per user (never file order: the sessions are shuffled with ``rng``).

    Returns:
        ``(kept, held_out)`` sorted comparison indices.
    """
    held: list[int] = []
    kept: list[int] = []
    by_user: dict[int, list[int]] = {}
    for i in idx:
        by_user.setdefault(int(prep.user[i]), []).append(int(i))
    for u in sorted(by_user):
        rows = np.array(by_user[u], dtype=np.int64)
        sessions = np.unique(prep.session[rows])
        n_out = round(fraction * len(sessions))
        out = set(rng.permutation(sessions)[:n_out].tolist())
        mask = np.array([s in out for s in prep.session[rows]], dtype=bool)
        held += rows[mask].tolist()
        kept += rows[~mask].tolist()
    return np.array(sorted(kept), dtype=np.int64), np.array(sorted(held), dtype=np.int64)

"""Build the GMTRouter heterogeneous graph (PyG ``HeteroData``) from plain index arrays.

Node types (shared/notes/gmtrouter-method.md): ``user``, ``llm``, ``query``, ``response``
and ``turn`` (the seed's virtual turn node). Every turn ``t`` has exactly one user, query,
LLM and response node; the response node carries the turn's outcome ``r_t`` ∈ [0, 1].

Edges (official "destination-only" wiring, all into turn or user nodes):

- ``query -asked_in-> turn``, ``llm -answers_in-> turn``, ``response -rates-> turn``,
  ``turn -of_user-> user`` and ``turn -follows-> turn`` (a turn into its previous turn).

With ``reverse_edges=True`` each has a reverse type (``rev_<name>``, destination and source
swapped), so LLM, query and response nodes are refined by message passing too (the seed
scores with the refined h_m^(L)). Every edge type is always present (possibly with zero
edges), so one network handles every graph, including ``T = 0`` (cold start).

Raw inputs are stored on the node types; the network computes its own input features:

- ``user.x``: float32 ``[U, 1]`` zeros (no per-user parameters);
- ``llm.x``: float32 ``[M, D_llm]`` text embedding of the model name/description;
- ``query.x``: float32 ``[Q, D]`` query text embedding;
- ``response.x``: float32 ``[T, 1]`` the outcome;
- ``turn.x``: float32 ``[T, 1]`` the outcome; plus ``turn.user``, ``turn.query``,
  ``turn.llm`` (int64 ``[T]``) and ``turn.outcome`` (float32 ``[T]``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch
from torch import Tensor
from torch_geometric.data import HeteroData

NODE_TYPES: tuple[str, ...] = ("user", "llm", "query", "response", "turn")
EdgeType = tuple[str, str, str]
FORWARD_EDGE_TYPES: tuple[EdgeType, ...] = (
    ("query", "asked_in", "turn"),
    ("llm", "answers_in", "turn"),
    ("response", "rates", "turn"),
    ("turn", "of_user", "user"),
    ("turn", "follows", "turn"),
)


def reverse_edge_type(edge_type: EdgeType) -> EdgeType:
    """``(src, rel, dst)`` → ``(dst, "rev_" + rel, src)``."""
    src, rel, dst = edge_type
    return (dst, f"rev_{rel}", src)


def graph_metadata(reverse_edges: bool = True) -> tuple[list[str], list[EdgeType]]:
    """Node and edge types of every graph built with this ``reverse_edges`` setting.

    Returns:
        ``(node_types, edge_types)`` as expected by ``HGTConv(metadata=...)``.
    """
    edges = list(FORWARD_EDGE_TYPES)
    if reverse_edges:
        edges += [reverse_edge_type(e) for e in FORWARD_EDGE_TYPES]
    return list(NODE_TYPES), edges


def _long(x: Tensor | npt.ArrayLike, name: str) -> Tensor:
    t = torch.as_tensor(x)
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D (got shape {tuple(t.shape)})")
    return t.to(torch.long)


def build_hetero_graph(
    *,
    num_users: int,
    query_x: Tensor,
    llm_x: Tensor,
    turn_user: Tensor,
    turn_query: Tensor,
    turn_llm: Tensor,
    turn_outcome: Tensor,
    turn_prev: Tensor,
    reverse_edges: bool = True,
) -> HeteroData:
    """Assemble the heterogeneous graph of ``U`` users, ``M`` LLMs, ``Q`` queries, ``T`` turns.

    Args:
        num_users: ``U`` ≥ 1 user nodes (users with no turns are cold-start nodes).
        query_x: float32 ``[Q, D]`` query embeddings.
        llm_x: float32 ``[M, D_llm]`` LLM features (unknown models simply get a row).
        turn_user: int64 ``[T]`` user index of each turn, in ``[0, U)``.
        turn_query: int64 ``[T]`` query index, in ``[0, Q)``.
        turn_llm: int64 ``[T]`` LLM index, in ``[0, M)``.
        turn_outcome: float32 ``[T]`` outcome in [0, 1] (1 won, 0 lost, 0.5 tie/unknown).
        turn_prev: int64 ``[T]`` previous turn of the same conversation, ``-1`` for none.
        reverse_edges: Add ``rev_*`` edge types (False = the official destination-only wiring).

    Returns:
        A ``HeteroData`` with the node stores and edge types of :func:`graph_metadata`.

    Raises:
        ValueError: inconsistent lengths, indices out of range, or outcomes outside [0, 1].
    """
    if num_users < 1:
        raise ValueError(f"num_users (got {num_users}) must be >= 1")
    query_x = torch.as_tensor(query_x, dtype=torch.float32)
    llm_x = torch.as_tensor(llm_x, dtype=torch.float32)
    if query_x.dim() != 2 or llm_x.dim() != 2:
        raise ValueError(
            f"query_x and llm_x must be 2-D (got {tuple(query_x.shape)}, {tuple(llm_x.shape)})"
        )
    tu, tq, tl = (
        _long(turn_user, "turn_user"),
        _long(turn_query, "turn_query"),
        _long(turn_llm, "turn_llm"),
    )
    tp = _long(turn_prev, "turn_prev")
    to = torch.as_tensor(turn_outcome, dtype=torch.float32).reshape(-1)
    n_turns = tu.numel()
    for name, t in (("turn_query", tq), ("turn_llm", tl), ("turn_outcome", to), ("turn_prev", tp)):
        if t.numel() != n_turns:
            raise ValueError(f"{name} has {t.numel()} entries; turn_user has {n_turns}")
    for name, t, hi in (
        ("turn_user", tu, num_users),
        ("turn_query", tq, query_x.size(0)),
        ("turn_llm", tl, llm_x.size(0)),
    ):
        if n_turns and (int(t.min()) < 0 or int(t.max()) >= hi):
            raise ValueError(
                f"{name} indices must lie in [0, {hi}) (got {int(t.min())}..{int(t.max())})"
            )
    if n_turns and (int(tp.min()) < -1 or int(tp.max()) >= n_turns):
        raise ValueError(
            f"turn_prev must lie in [-1, {n_turns}) (got {int(tp.min())}..{int(tp.max())})"
        )
    if n_turns and (float(to.min()) < 0.0 or float(to.max()) > 1.0):
        raise ValueError(
            f"turn_outcome must lie in [0, 1] (got {float(to.min())}..{float(to.max())})"
        )

    data = HeteroData()
    data["user"].x = torch.zeros(num_users, 1)
    data["llm"].x = llm_x
    data["query"].x = query_x
    data["response"].x = to.view(-1, 1).clone()
    data["turn"].x = to.view(-1, 1).clone()
    data["turn"].user = tu
    data["turn"].query = tq
    data["turn"].llm = tl
    data["turn"].outcome = to
    ar = torch.arange(n_turns, dtype=torch.long)
    has_prev = tp >= 0
    edges: dict[EdgeType, Tensor] = {
        ("query", "asked_in", "turn"): torch.stack([tq, ar]),
        ("llm", "answers_in", "turn"): torch.stack([tl, ar]),
        ("response", "rates", "turn"): torch.stack([ar, ar]),
        ("turn", "of_user", "user"): torch.stack([ar, tu]),
        ("turn", "follows", "turn"): torch.stack([ar[has_prev], tp[has_prev]]),
    }
    for et, ei in edges.items():
        data[et].edge_index = ei
        if reverse_edges:
            data[reverse_edge_type(et)].edge_index = ei.flip(0).contiguous()
    return data


def link_previous_turns(
    turn_user: Sequence[int] | npt.NDArray[np.int64],
    turn_session: Sequence[str],
    turn_index: Sequence[int] | npt.NDArray[np.int64],
    turn_llm: Sequence[int] | npt.NDArray[np.int64],
) -> npt.NDArray[np.int64]:
    """Previous turn of each turn inside its (user, session): the latest lower turn index,
    preferring the same LLM (the official per-model track), then the later position.

    Args:
        turn_user: ``T`` user indices.
        turn_session: ``T`` session ids ("" = no session, never linked).
        turn_index: ``T`` 0-based turn positions.
        turn_llm: ``T`` LLM indices.

    Returns:
        int64 ``[T]`` previous-turn index or -1.
    """
    n = len(turn_session)
    prev = np.full(n, -1, dtype=np.int64)
    groups: dict[tuple[int, str], list[int]] = {}
    for i in range(n):
        if turn_session[i]:
            groups.setdefault((int(turn_user[i]), turn_session[i]), []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        for i in members:
            best: tuple[int, int, int] | None = None
            for j in members:
                if turn_index[j] >= turn_index[i]:
                    continue
                key = (int(turn_index[j]), int(turn_llm[j] == turn_llm[i]), j)
                if best is None or key > best:
                    best = key
            if best is not None:
                prev[i] = best[2]
    return prev

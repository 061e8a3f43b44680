"""A user's k-hop neighbourhood as plain arrays: what a store's sampler returns.

The arrays describe a heterogeneous graph with node types ``user``, ``llm``, ``query``,
``response`` and ``turn`` (seed, "Heterogeneous Graph Structure"). Every turn node has exactly
one user, one query, one LLM and one response (its outcome), so those edges are stored as
index arrays on the turns; ``turn_prev`` holds the turn→previous-turn edge inside a
conversation. ``model.graph.build_hetero_graph`` turns these arrays into a PyG ``HeteroData``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import numpy.typing as npt


@dataclasses.dataclass(slots=True)
class Neighbourhood:
    """A sampled subgraph around one (seed) user.

    Shapes: ``U`` users, ``M`` LLMs, ``Q`` queries, ``T`` turns (= responses), ``D`` the
    query-embedding dimension.

    Attributes:
        user_ids: ``U`` user ids; index 0 is the seed user (present even with no history).
        llm_names: ``M`` LLM names.
        query_ids: ``Q`` query node ids (one per interaction).
        query_embedding: float32 ``[Q, D]``.
        turn_ids: ``T`` turn node ids (``"<interaction_id>:<model>"``).
        turn_user: int64 ``[T]`` index into ``user_ids``.
        turn_query: int64 ``[T]`` index into ``query_ids``.
        turn_llm: int64 ``[T]`` index into ``llm_names``.
        turn_outcome: float32 ``[T]`` outcome in [0, 1] (the response node's feature).
        turn_prev: int64 ``[T]`` index of the previous turn of the same conversation, -1 if none.
        turn_time_s: float64 ``[T]`` unix time in seconds.
        turn_session: ``T`` session ids.
        turn_index: int64 ``[T]`` turn position inside its session.
        version: The seed user's graph version (bumped by every write touching the user).
    """

    user_ids: list[str]
    llm_names: list[str]
    query_ids: list[str]
    query_embedding: npt.NDArray[np.float32]
    turn_ids: list[str]
    turn_user: npt.NDArray[np.int64]
    turn_query: npt.NDArray[np.int64]
    turn_llm: npt.NDArray[np.int64]
    turn_outcome: npt.NDArray[np.float32]
    turn_prev: npt.NDArray[np.int64]
    turn_time_s: npt.NDArray[np.float64]
    turn_session: list[str]
    turn_index: npt.NDArray[np.int64]
    version: int = 0

    @property
    def num_turns(self) -> int:
        """Number of turn nodes ``T``."""
        return len(self.turn_ids)

    @classmethod
    def empty(cls, user_id: str, dim: int, version: int = 0) -> Neighbourhood:
        """The neighbourhood of a user with no history (cold start): one user node, no turns."""
        return cls(
            user_ids=[user_id],
            llm_names=[],
            query_ids=[],
            query_embedding=np.zeros((0, dim), dtype=np.float32),
            turn_ids=[],
            turn_user=np.zeros(0, dtype=np.int64),
            turn_query=np.zeros(0, dtype=np.int64),
            turn_llm=np.zeros(0, dtype=np.int64),
            turn_outcome=np.zeros(0, dtype=np.float32),
            turn_prev=np.zeros(0, dtype=np.int64),
            turn_time_s=np.zeros(0, dtype=np.float64),
            turn_session=[],
            turn_index=np.zeros(0, dtype=np.int64),
            version=version,
        )


def link_previous_turns(
    turn_user: npt.NDArray[np.int64],
    turn_session: list[str],
    turn_index: npt.NDArray[np.int64],
    turn_llm: npt.NDArray[np.int64],
    turn_time_s: npt.NDArray[np.float64],
) -> npt.NDArray[np.int64]:
    """The turn→previous-turn edges among the given turns.

    The previous turn of turn ``t`` is, among turns of the same user and session with a
    smaller ``turn_index``, the one with the greatest index, preferring the same LLM (the
    official code chains turns per model track), then the newest.

    Args:
        turn_user: int64 ``[T]``.
        turn_session: ``T`` session ids.
        turn_index: int64 ``[T]``.
        turn_llm: int64 ``[T]``.
        turn_time_s: float64 ``[T]``.

    Returns:
        int64 ``[T]``: index of the previous turn, or -1.
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
            best: tuple[int, int, float] | None = None
            best_j = -1
            for j in members:
                if turn_index[j] >= turn_index[i]:
                    continue
                key = (int(turn_index[j]), int(turn_llm[j] == turn_llm[i]), float(turn_time_s[j]))
                if best is None or key > best:
                    best, best_j = key, j
            prev[i] = best_j
    return prev


class TurnRow(NamedTuple):
    """One sampled turn node as a store reads it (with its response's outcome)."""

    turn_id: str
    interaction_id: str
    user_id: str
    session_id: str
    turn_index: int
    llm: str
    outcome: float
    ts: float


def whole_interactions(turns: Sequence[TurnRow], limit: int) -> list[TurnRow]:
    """The newest ``limit`` turns without an interaction cut in two by the cap.

    A comparison is two turns (one per model) with one timestamp; a cap that keeps one and
    drops the other would leave the user's history with half a comparison, e.g. a win
    without its loss (the history readout then counts a one-sided outcome). So the stores
    read ``limit + 1`` turns, newest first, and every turn of the interaction of the first
    turn beyond the cap is dropped.

    Args:
        turns: Up to ``limit + 1`` turns, newest first (``ts`` descending, then ``turn_id``
            descending, so one interaction's turns are adjacent).
        limit: The cap (``fan_out[0]``).
    """
    if len(turns) <= limit:
        return list(turns)
    cut = turns[limit].interaction_id
    return [t for t in turns[:limit] if t.interaction_id != cut]


def assemble_neighbourhood(
    user_id: str,
    version: int,
    turns: Sequence[TurnRow],
    query_embeddings: Mapping[str, bytes],
    dim: int,
) -> Neighbourhood:
    """Build a :class:`Neighbourhood` from sampled turn rows (shared by every store).

    Args:
        user_id: The seed user (becomes ``user_ids[0]``).
        version: The seed user's graph version.
        turns: Sampled turns, newest first; a turn id seen twice is kept once.
        query_embeddings: ``interaction_id`` → little-endian float32 bytes of length ``4·D``.
        dim: ``D``.

    Raises:
        KeyError: a turn's query embedding is missing from ``query_embeddings``.
    """
    unique: dict[str, TurnRow] = {}
    for t in turns:
        unique.setdefault(t.turn_id, t)
    turns = list(unique.values())
    if not turns:
        return Neighbourhood.empty(user_id, dim, version)
    users = [user_id, *dict.fromkeys(t.user_id for t in turns if t.user_id != user_id)]
    user_idx = {u: i for i, u in enumerate(users)}
    llms = sorted({t.llm for t in turns})
    llm_idx = {m: i for i, m in enumerate(llms)}
    query_ids = list(dict.fromkeys(t.interaction_id for t in turns))
    q_idx = {q: i for i, q in enumerate(query_ids)}
    q_emb = np.frombuffer(b"".join(query_embeddings[q] for q in query_ids), dtype="<f4")
    turn_user = np.array([user_idx[t.user_id] for t in turns], dtype=np.int64)
    turn_session = [t.session_id for t in turns]
    turn_index = np.array([t.turn_index for t in turns], dtype=np.int64)
    turn_llm = np.array([llm_idx[t.llm] for t in turns], dtype=np.int64)
    turn_time = np.array([t.ts for t in turns], dtype=np.float64)
    return Neighbourhood(
        user_ids=users,
        llm_names=llms,
        query_ids=query_ids,
        query_embedding=q_emb.astype(np.float32).reshape(len(query_ids), dim),
        turn_ids=[t.turn_id for t in turns],
        turn_user=turn_user,
        turn_query=np.array([q_idx[t.interaction_id] for t in turns], dtype=np.int64),
        turn_llm=turn_llm,
        turn_outcome=np.array([t.outcome for t in turns], dtype=np.float32),
        turn_prev=link_previous_turns(turn_user, turn_session, turn_index, turn_llm, turn_time),
        turn_time_s=turn_time,
        turn_session=turn_session,
        turn_index=turn_index,
        version=version,
    )


def check_sampling(hops: int, fan_out: Sequence[int]) -> list[int]:
    """Validate k-hop sampling arguments (shared by every store).

    Returns:
        ``fan_out`` as a list of ints.

    Raises:
        ValueError: ``hops`` outside 1–4, or fewer than 3 / negative ``fan_out`` entries.
    """
    if not 1 <= hops <= 4:
        raise ValueError(f"hops (got {hops}) must be in 1..4")
    if len(fan_out) < 3 or any(f < 0 for f in fan_out):
        raise ValueError(f"fan_out (got {list(fan_out)}) needs 3+ non-negative entries")
    return [int(f) for f in fan_out]

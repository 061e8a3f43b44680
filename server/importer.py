"""``gmtrouter import``: bulk-load a preference data set into a graph store.

Each judged comparison becomes one interaction (a query node, two turn nodes with outcomes
1/0 or 0.5/0.5). The data sets carry no timestamps, so interactions get synthetic, increasing
timestamps in the same seeded conversation order as ``gmtrouter replay`` (turns of one
conversation in order). Every interaction's idempotency key is derived from the record, so
importing twice writes nothing new.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from graphstore.interactions import Comparison, Interaction, query_key
from graphstore.store import GraphStore
from model.datasets import PreferenceRecord
from server.replay import record_key, replay_order

#: Synthetic clock of imported data: 2023-06-01T00:00:00Z, one second per interaction.
IMPORT_EPOCH_S = 1_685_577_600.0


def record_to_interaction(
    dataset: str, r: PreferenceRecord, embedding: npt.NDArray[np.float32], timestamp_s: float
) -> Interaction:
    """One canonical record → one interaction with a comparison outcome.

    Args:
        embedding: float32 ``[D]`` embedding of ``r.query_text``.
        timestamp_s: Unix seconds.
    """
    key = record_key(dataset, r)
    winner, loser = (r.model_b, r.model_a) if r.outcome == "b" else (r.model_a, r.model_b)
    return Interaction(
        interaction_id=hashlib.sha256(key.encode()).hexdigest()[:32],
        user_id=r.user_id,
        session_id=r.session_id,
        turn_index=r.turn_index,
        query=r.query_text,
        query_key=query_key(r.query_text),
        query_embedding=embedding,
        model=winner,
        response=r.response_a if winner == r.model_a else r.response_b,
        timestamp_s=timestamp_s,
        idempotency_key=key,
        comparison=Comparison(winner, loser, tie=r.outcome == "tie"),
    )


async def import_records(
    store: GraphStore,
    dataset: str,
    records: Sequence[PreferenceRecord],
    embeddings: npt.NDArray[np.float32],
    *,
    seed: int = 0,
    batch_size: int = 500,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``records`` into ``store`` in batches.

    Args:
        store: An open store.
        dataset: Data-set name (part of the idempotency keys).
        records: Canonical records.
        embeddings: float32 ``[N, D]`` query embeddings aligned with ``records``.
        seed: Conversation-order seed (as ``gmtrouter replay --seed``).
        batch_size: Interactions per ``record`` call.
        progress: Show a tqdm progress bar.

    Returns:
        ``{"interactions", "written", "duplicates", "seconds", "interactions_per_s"}``.

    Raises:
        graphstore.errors.StoreUnavailableError: the store failed (batches already
            acknowledged stay written; re-running the import completes the rest).
        graphstore.errors.IdempotencyConflictError: the store holds another interaction
            under a record's key (the data set's records changed since they were imported,
            or another writer used the key); the batches before it stay written.
    """
    index = {id(r): i for i, r in enumerate(records)}
    order = replay_order(records, seed)
    written = duplicates = 0
    start = time.perf_counter()
    with tqdm(total=len(order), desc=f"import {dataset}", disable=not progress) as bar:
        for lo in range(0, len(order), batch_size):
            chunk = order[lo : lo + batch_size]
            batch = [
                record_to_interaction(dataset, r, embeddings[index[id(r)]], IMPORT_EPOCH_S + lo + j)
                for j, r in enumerate(chunk)
            ]
            for res in await store.record(batch):
                duplicates += res.duplicate
                written += not res.duplicate
            bar.update(len(chunk))
    seconds = time.perf_counter() - start
    return {
        "interactions": len(order),
        "written": written,
        "duplicates": duplicates,
        "seconds": round(seconds, 2),
        "interactions_per_s": round(len(order) / seconds, 1) if seconds > 0 else None,
    }

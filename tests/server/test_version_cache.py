"""NetworkScorer reuses a user's graph version for ``sampler.version_max_age_ms``.

Writes through another replica (here: straight into the shared store) reach Select within that
bound; writes through this replica (``invalidate``) at once; 0 reads on every Select.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import torch

from graphstore.interactions import Comparison, Interaction
from graphstore.neighbourhood import Neighbourhood
from graphstore.sqlite_store import SQLiteGraphStore
from model.checkpoint import load_checkpoint
from model.text_encoder import TextEncoder
from server.config import parse_settings
from server.personalization import NetworkScorer
from server.scoring import PriorScorer

DIM = 384
#: The query of every Select and every recorded interaction (a unit vector).
Q = np.full(DIM, 1.0 / np.sqrt(DIM), dtype=np.float32)


class CountingStore(SQLiteGraphStore):
    """The real SQLite store, counting ``user_version`` reads."""

    version_reads = 0
    neighbourhood_reads = 0

    async def user_version(self, user_id: str) -> int:
        self.version_reads += 1
        return await super().user_version(user_id)

    async def neighbourhood(self, *args: Any, **kwargs: Any) -> Neighbourhood:
        self.neighbourhood_reads += 1
        return await super().neighbourhood(*args, **kwargs)


def comparison(n: int, winner: str, loser: str) -> Interaction:
    return Interaction(
        interaction_id=f"i{n}",
        user_id="u",
        session_id=f"s{n}",
        turn_index=0,
        query=f"q{n}",
        query_embedding=Q,
        model=winner,
        response="r",
        timestamp_s=1_700_000_000.0 + n,
        idempotency_key=f"k{n}",
        comparison=Comparison(winner, loser),
    )


Setup = Callable[..., Awaitable[tuple[CountingStore, NetworkScorer, str, str]]]


@pytest.fixture()
async def setup(checkpoint: Path) -> AsyncIterator[Setup]:
    """``await setup(max_age_ms[, state_max_age_s])``: a scorer over a fresh counting store in which user ``u``
    has one comparison of the checkpoint's first two models (``a`` won)."""
    store = CountingStore(":memory:", embedding_dim=DIM)
    await store.open()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    a, b = load_checkpoint(checkpoint).models[:2]

    async def make(
        max_age_ms: float, state_max_age_s: float = 60.0
    ) -> tuple[CountingStore, NetworkScorer, str, str]:
        settings = parse_settings(
            {
                "decision": {"algorithm": {"gmtrouter": {"model_path": str(checkpoint)}}},
                "sampler": {
                    "version_max_age_ms": max_age_ms,
                    "state_max_age_s": state_max_age_s,
                },
            }
        )
        prior = PriorScorer(store, refresh_s=0.0, executor=pool)
        net = NetworkScorer.from_settings(settings, store, None, pool, prior)  # type: ignore[arg-type]
        await store.record([comparison(0, a, b)])
        return store, net, a, b

    yield make
    await store.close()
    pool.shutdown()


async def test_version_reused_within_max_age_and_local_writes_seen_at_once(setup: Setup) -> None:
    store, net, a, b = await setup(400)
    first = await net.score("u", Q, [a, b])
    assert first.history_turns == 2 and store.version_reads == 1
    for _ in range(5):
        await net.score("u", Q, [a, b])
    assert store.version_reads == 1  # reused: no store read
    # Another replica writes: not seen until the version is older than 400 ms ...
    await store.record([comparison(1, b, a)])
    assert (await net.score("u", Q, [a, b])).history_turns == 2
    await asyncio.sleep(0.45)
    # ... then read again and the new turns are used.
    assert (await net.score("u", Q, [a, b])).history_turns == 4
    assert store.version_reads == 2
    # A write through this replica is seen at once.
    await store.record([comparison(2, a, b)])
    net.invalidate("u")
    assert (await net.score("u", Q, [a, b])).history_turns == 6
    assert store.version_reads == 3


async def test_zero_max_age_reads_on_every_select(setup: Setup) -> None:
    store, net, a, b = await setup(0)
    for _ in range(4):
        await net.score("u", Q, [a, b])
    assert store.version_reads == 4
    await store.record([comparison(1, b, a)])
    assert (await net.score("u", Q, [a, b])).history_turns == 4


async def test_embedded_llm_features_are_bounded(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Candidate names come from clients: features of unknown models form an LRU cache (a
    name is embedded again once evicted)."""
    import server.personalization

    monkeypatch.setattr(server.personalization, "MAX_EMBEDDED_LLMS", 3)
    _, net, a, _ = await setup(0)
    encoder = _CountingEncoder()
    net.encoder = encoder
    x = await net.llm_features([a, "new-1", "new-2", "new-1"])
    assert x.shape == (4, DIM) and torch.equal(x[1], x[3])
    await net.llm_features(["new-3", "new-4", "new-5"])
    assert list(net._llm_x_embedded) == ["new-3", "new-4", "new-5"]
    assert encoder.texts == 5  # each new name embedded once
    again = await net.llm_features(["new-1", a])
    assert again.shape == (2, DIM) and torch.allclose(again[0], x[1], atol=1e-5)
    assert encoder.texts == 6 and len(net._llm_x_embedded) == 3


class _CountingEncoder(TextEncoder):
    """The real text encoder (torch backend), counting the texts it embeds."""

    texts = 0

    def __init__(self) -> None:
        super().__init__(backend="torch", threads=1)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> npt.NDArray[np.float32]:
        self.texts += len(texts)
        return super().encode(texts, batch_size)


async def test_cached_state_expires_after_state_max_age(setup: Setup) -> None:
    """DeleteUser through another replica, then as many new writes: the version is the same
    again, so only the state's age stops this replica serving the erased history."""
    store, net, a, b = await setup(0, 3.0)  # ample for the steps before the "stale" check
    assert (await net.score("u", Q, [a, b])).history_turns == 2
    reads = store.neighbourhood_reads
    await store.delete_user("u")  # through another replica: this one is not told
    await store.record([comparison(7, b, a)])
    assert await store.user_version("u") == 1  # as before the deletion
    stale = await net.score("u", Q, [a, b])
    assert store.neighbourhood_reads == reads  # same version: the cached state
    await asyncio.sleep(3.05)
    fresh = await net.score("u", Q, [a, b])
    assert store.neighbourhood_reads == reads + 1  # rebuilt from the store
    assert fresh.history_turns == 2
    assert stale.scores != fresh.scores  # b won now, a before

"""Concurrent Selects share one prediction-head pass (server/personalization.py HeadBatcher)."""

from __future__ import annotations

import asyncio

import numpy as np
import torch

from model.network import CrossAttentionHead, NetworkConfig
from model.serving_head import ServingHead
from server.personalization import HeadBatcher

CFG = NetworkConfig(embedding_dim=12, hidden_dim=8, head_dim=8, num_heads=2)


def _head(seed: int) -> ServingHead:
    torch.manual_seed(seed)
    return ServingHead(CrossAttentionHead(CFG).eval())


def _rows(rng: np.random.Generator, n: int, c: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [
        (
            rng.standard_normal(CFG.hidden_dim, dtype=np.float32),
            rng.standard_normal((c, CFG.llm_out_dim), dtype=np.float32),
        )
        for _ in range(n)
    ]


def test_concurrent_requests_share_one_pass() -> None:
    head = _head(0)
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((16, CFG.embedding_dim), dtype=np.float32)
    requests = [_rows(rng, 2, 4) for _ in range(16)]

    async def run() -> tuple[list[list[list[float]]], HeadBatcher]:
        batcher = HeadBatcher()
        out = await asyncio.gather(
            *(batcher.score(head, q, rows) for q, rows in zip(queries, requests, strict=True))
        )
        return list(out), batcher

    out, batcher = asyncio.run(run())
    assert batcher.passes == 1
    assert batcher.rows == 32
    for q, rows, got in zip(queries, requests, out, strict=True):
        for (user_h, llm_h), logits in zip(rows, got, strict=True):
            want = head(user_h[None], q[None], llm_h[None])[0]
            np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)


def test_rows_of_different_heads_and_widths_are_scored_apart() -> None:
    old, new = _head(1), _head(2)
    rng = np.random.default_rng(1)
    q = rng.standard_normal(CFG.embedding_dim, dtype=np.float32)
    a, b = _rows(rng, 1, 3), _rows(rng, 1, 5)

    async def run() -> list[list[list[float]]]:
        batcher = HeadBatcher()
        return list(
            await asyncio.gather(batcher.score(old, q, a), batcher.score(new, q, a),
                                 batcher.score(new, q, b))
        )  # fmt: skip

    got_old, got_new, got_wide = asyncio.run(run())
    np.testing.assert_allclose(got_old[0], old(a[0][0][None], q[None], a[0][1][None])[0], atol=1e-6)
    np.testing.assert_allclose(got_new[0], new(a[0][0][None], q[None], a[0][1][None])[0], atol=1e-6)
    assert len(got_wide[0]) == 5


def test_a_failed_pass_fails_its_requests_only() -> None:
    head, other = _head(3), _head(4)
    rng = np.random.default_rng(3)
    q = rng.standard_normal(CFG.embedding_dim, dtype=np.float32)
    bad = [(rng.standard_normal(CFG.hidden_dim + 1, dtype=np.float32), _rows(rng, 1, 2)[0][1])]
    good = _rows(rng, 1, 2)

    async def run() -> None:
        batcher = HeadBatcher()
        failed, fine, fine_other = await asyncio.gather(
            batcher.score(head, q, bad),
            batcher.score(head, q, _rows(rng, 1, 3)),
            batcher.score(other, q, good),
            return_exceptions=True,
        )
        assert batcher.passes == 1  # the three requests went into one batch
        assert isinstance(failed, ValueError)
        assert not isinstance(fine, BaseException) and len(fine[0]) == 3
        assert not isinstance(fine_other, BaseException)
        np.testing.assert_allclose(
            fine_other[0], other(good[0][0][None], q[None], good[0][1][None])[0], atol=1e-6
        )
        assert len((await batcher.score(head, q, _rows(rng, 1, 2)))[0]) == 2

    asyncio.run(run())

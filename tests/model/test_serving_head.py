"""The NumPy serving head gives the torch head's logits (model/serving_head.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.network import CrossAttentionHead, NetworkConfig
from model.serving_head import ServingHead


def _torch_logits(head: CrossAttentionHead, u: np.ndarray, q: np.ndarray, m: np.ndarray):
    with torch.inference_mode():
        return head(torch.from_numpy(u), torch.from_numpy(q), torch.from_numpy(m)).numpy()


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 33),
    candidates=st.integers(1, 9),
    heads=st.sampled_from([1, 2, 4]),
    readout=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_torch_head(
    rows: int, candidates: int, heads: int, readout: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    cfg = NetworkConfig(
        embedding_dim=24, hidden_dim=16, head_dim=8 * heads, num_heads=heads,
        history_readout=readout,
    )  # fmt: skip
    head = CrossAttentionHead(cfg).eval()
    # Trained-looking weights: perturb every parameter (the readout starts as [1, 0]).
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((rows, cfg.hidden_dim), dtype=np.float32)
    q = rng.standard_normal((rows, cfg.embedding_dim), dtype=np.float32)
    m = rng.standard_normal((rows, candidates, cfg.llm_out_dim), dtype=np.float32)
    want = _torch_logits(head, u, q, m)
    got = ServingHead(head)(u, q, m)
    assert got.dtype == np.float32
    assert got.shape == (rows, candidates)
    # float32 sums in another order: a few 1e-5 apart at most (seen: 2.2e-5 on 33 rows)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_weights_are_copied() -> None:
    head = CrossAttentionHead(NetworkConfig(embedding_dim=8, hidden_dim=8, head_dim=8)).eval()
    rng = np.random.default_rng(0)
    u = rng.standard_normal((2, 8), dtype=np.float32)
    q = rng.standard_normal((2, 8), dtype=np.float32)
    m = rng.standard_normal((2, 3, 10), dtype=np.float32)
    serving = ServingHead(head)
    before = serving(u, q, m)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(1.0)
    np.testing.assert_array_equal(serving(u, q, m), before)
    assert np.abs(_torch_logits(head, u, q, m) - before).max() > 1e-3


def test_rejects_unsupported_attention() -> None:
    head = CrossAttentionHead(NetworkConfig(embedding_dim=8, hidden_dim=8, head_dim=8))
    head.attn = torch.nn.MultiheadAttention(8, 4, add_bias_kv=True, batch_first=True)
    with pytest.raises(ValueError, match="MultiheadAttention"):
        ServingHead(head)

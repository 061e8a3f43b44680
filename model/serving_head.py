"""The cross-attention head's forward pass in NumPy, for serving.

A Select scores one or a few rows of 2–8 candidates. At that size the head's arithmetic is
a few thousand multiply-adds, and PyTorch's per-operator dispatch dominates: on the 2-core
bench machine the eager :class:`model.network.CrossAttentionHead` took 0.74 ms for 2 rows of
4 candidates (its ``nn.MultiheadAttention`` alone 0.30 ms), a TorchScript trace 0.39 ms.
The same arithmetic in NumPy took 0.16 ms (one pass for 32 rows: 0.78 ms against torch's
1.28 ms), so the in-process Select path shrank by about 0.6 ms (``bench/README.md``).

:class:`ServingHead` copies the head's weights once (per served checkpoint) and computes
exactly :meth:`CrossAttentionHead.forward` in eval mode (dropout off): the projections,
``nn.MultiheadAttention`` with the candidates as queries and ``[u, q]`` as keys and values
(``batch_first``, packed in-projection, no extra bias or zero attention), the feature
``[attended, m, m⊙q, m⊙u, m⊙u⊙q]``, the MLP, and the history-readout logit. Training and
checkpoints keep using the torch module; ``tests/model/test_serving_head.py`` checks that
both give the same logits.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from model.network import READOUT_DIM, CrossAttentionHead

F32 = npt.NDArray[np.float32]


def _weights(linear: torch.nn.Linear) -> tuple[F32, F32]:
    w = linear.weight.detach().to(torch.float32).numpy().T.copy()  # [in, out]
    b = linear.bias.detach().to(torch.float32).numpy().copy()
    return w, b


class ServingHead:
    """A frozen copy of a :class:`CrossAttentionHead` that scores in NumPy.

    Args:
        head: The trained head (its weights are copied; later changes to it are not seen).

    Raises:
        ValueError: the head's attention is not the plain packed ``nn.MultiheadAttention``
            this class implements (separate key/value widths, ``bias_k``/``bias_v``, or no
            in-projection bias).
    """

    def __init__(self, head: CrossAttentionHead) -> None:
        attn = head.attn
        if (
            not attn._qkv_same_embed_dim
            or attn.in_proj_weight is None
            or attn.in_proj_bias is None
            or attn.bias_k is not None
            or attn.add_zero_attn
            or not attn.batch_first
        ):
            raise ValueError("ServingHead supports the packed batch-first nn.MultiheadAttention")
        self.width = int(attn.embed_dim)
        self.num_heads = int(attn.num_heads)
        self.head_width = self.width // self.num_heads
        self.user_w, self.user_b = _weights(head.proj_user)
        self.query_w, self.query_b = _weights(head.proj_query)
        self.llm_w, self.llm_b = _weights(head.proj_llm)
        self.llm_in = int(head.proj_llm.in_features)
        a = self.width
        w_in = attn.in_proj_weight.detach().to(torch.float32).numpy()
        b_in = attn.in_proj_bias.detach().to(torch.float32).numpy()
        w_q, w_k, w_v = (w_in[i * a : (i + 1) * a].T for i in range(3))  # [A, A] each
        b_q, b_k, b_v = (b_in[i * a : (i + 1) * a] for i in range(3))
        self.q_w, self.q_b = w_q.copy(), b_q.copy()
        self.kv_w = np.concatenate([w_k, w_v], axis=1)  # [A, 2A]: keys and values in one product
        self.kv_b = np.concatenate([b_k, b_v])
        self.scale = np.float32(1.0 / np.sqrt(self.head_width))
        self.out_w, self.out_b = _weights(attn.out_proj)
        first, last = head.mlp[0], head.mlp[-1]
        assert isinstance(first, torch.nn.Linear) and isinstance(last, torch.nn.Linear)
        self.mlp1_w, self.mlp1_b = _weights(first)
        self.mlp2_w, self.mlp2_b = _weights(last)
        self.readout: tuple[F32, F32] | None = (
            _weights(head.readout_logit) if head.readout_logit is not None else None
        )

    def __call__(self, user_h: F32, query_x: F32, llm_h: F32) -> F32:
        """Logits of ``C`` candidates for ``B`` (user, query) rows.

        Args:
            user_h: float32 ``[B, H]`` user embeddings.
            query_x: float32 ``[B, D]`` query text embeddings.
            llm_h: float32 ``[B, C, H']`` candidate LLM embeddings (``H' = H`` or ``H + 2``
                with the history readout in the last two columns).

        Returns:
            float32 ``[B, C]`` logits, equal to :meth:`CrossAttentionHead.forward` in eval
            mode up to float32 rounding.
        """
        b, c = llm_h.shape[0], llm_h.shape[1]
        h, d = self.num_heads, self.head_width
        u = user_h @ self.user_w + self.user_b  # [B, A]
        q = query_x @ self.query_w + self.query_b  # [B, A]
        m = (
            llm_h[..., : self.llm_in].reshape(b * c, self.llm_in) @ self.llm_w + self.llm_b
        ).reshape(b, c, -1)  # [B, C, A]
        # Keys and values are the two rows [u, q]: one product gives both for both.
        kv = np.concatenate([u, q], axis=0) @ self.kv_w + self.kv_b  # [2B, 2A]
        a = self.width
        k_u, k_q = kv[:b, :a].reshape(b, 1, h, d), kv[b:, :a].reshape(b, 1, h, d)
        v_u, v_q = kv[:b, a:].reshape(b, 1, h, d), kv[b:, a:].reshape(b, 1, h, d)
        qh = (m @ self.q_w + self.q_b).reshape(b, c, h, d)
        # softmax over two keys = sigmoid of the difference of their scores
        gap = ((qh * (k_u - k_q)).sum(axis=-1, keepdims=True)) * self.scale  # [B, C, h, 1]
        w_u = 0.5 * (1.0 + np.tanh(0.5 * gap))  # = sigmoid(gap), without overflow
        att = (v_q + w_u * (v_u - v_q)).reshape(b, c, a) @ self.out_w + self.out_b  # [B, C, A]
        uq = u[:, None, :]
        qq = q[:, None, :]
        mu = m * uq
        feat = np.concatenate([att, m, m * qq, mu, mu * qq], axis=-1)  # [B, C, 5A]
        hidden = np.maximum(feat @ self.mlp1_w + self.mlp1_b, np.float32(0.0))
        out = (hidden @ self.mlp2_w + self.mlp2_b)[..., 0]
        if self.readout is not None:
            rw, rb = self.readout
            out = out + (llm_h[..., -READOUT_DIM:] @ rw + rb)[..., 0]
        return np.asarray(out, dtype=np.float32)

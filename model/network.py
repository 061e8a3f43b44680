"""The GMTRouter network: per-type input projections, stacked HGT layers, cross-attention head.

Layer rule (the seed's): ``h ← LayerNorm(h + Dropout(HGTConv(h)))`` per node type; a node
type that receives no message in a layer keeps its ``h``.

Input features (no per-user parameters — users are represented by their history):

- user: one learned constant vector (every user starts identical; cold start = no turns);
- llm: ``Linear(D_llm → H)`` of the model's text embedding; query: ``Linear(D → H)``;
- response: ``Linear(1 → H)`` of the outcome (as the official code);
- turn (``turn_features="signed"``): an MLP of the turn's own neighbours, with
  ``s = 2r − 1``:
  ``[s·P_l(e_llm), s·P_q(e_query), P_q(e_query), s·(P_l(e_llm) ⊙ P_q(e_query)), r]``.
  This puts the signed, model- and query-specific outcome on the turn, so the user node (which
  aggregates its turns) carries a summary of *which models won on which kind of query*.
  ``turn_features="zeros"`` is the official/naive variant (zeros; outcome only on responses).

History readout (``history_readout=True``): after the HGT layers each LLM node is extended
by two numbers read straight off the graph — over the turns that point at it (``turn.llm``;
every LLM node belongs to one user's component, so these are per-user counts) with a
decisive outcome (``r ≠ 0.5``: a tie and a served response nobody judged are both stored as
0.5 and carry no evidence here) — ``[Σ s / (n + κ), log(1 + n)]`` with ``s = 2r − 1``,
``n`` the number of those turns and ``κ`` = :data:`READOUT_SHRINKAGE`: the user's shrunk net
win rate of that model and how much evidence there is. Attention-weighted HGT messages are
means and lose the counts; this readout gives the head the per-user Bradley–Terry-like
evidence directly, so the score can move further from the global one the more the user has
judged a model. Not in the paper (an addition of ours; ``False`` is the paper's head and
loads checkpoints written before it).

Head (cross-attention, scores all candidates at once): user, query and each candidate LLM are
projected to ``head_dim``; each LLM vector attends over {user, query}; the logit is an MLP of
``[attended, m, m⊙q, m⊙u, m⊙u⊙q]`` (the products give the head direct access to the
model×query and user×model×query interactions; a residual path for global strength); with the
history readout, a linear term of the readout is added to the logit (the readout does not
enter the attention or the MLP: it stays a per-user Bradley–Terry-like evidence term).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch_geometric.data import HeteroData
from torch_geometric.nn import HGTConv

from model.graph import graph_metadata

#: κ of the history readout: virtual tied games per (user, model) (shrinks small counts to 0).
READOUT_SHRINKAGE = 2.0
#: Width of the history readout appended to each LLM embedding.
READOUT_DIM = 2


class NetworkConfig(BaseModel):
    """Hyper-parameters of :class:`GMTRouterNetwork` (stored in checkpoints)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    embedding_dim: int = Field(384, ge=1, description="query embedding dimension D")
    llm_feature_dim: int = Field(384, ge=1, description="LLM feature dimension D_llm")
    hidden_dim: int = Field(64, ge=1, description="HGT width H (seed default 64)")
    num_layers: int = Field(2, ge=1, le=5, description="number of HGT layers (1-5)")
    num_heads: int = Field(4, ge=1, description="HGT and head attention heads")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="dropout probability")
    head_dim: int = Field(64, ge=1, description="width of the cross-attention head")
    reverse_edges: bool = Field(True, description="False = official destination-only wiring")
    turn_features: Literal["signed", "zeros"] = Field(
        "signed", description="turn input features; 'zeros' is the naive official variant"
    )
    history_readout: bool = Field(
        True,
        description="append the per-user (net win rate, log count) of each LLM to its "
        "embedding (False = the paper's head; checkpoints written before it load as False)",
    )

    @property
    def llm_out_dim(self) -> int:
        """Width of the LLM embeddings :meth:`GMTRouterNetwork.encode` returns."""
        return self.hidden_dim + (READOUT_DIM if self.history_readout else 0)

    @model_validator(mode="after")
    def _check_heads(self) -> NetworkConfig:
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"hidden_dim (got {self.hidden_dim}) must be divisible by num_heads "
                f"(got {self.num_heads})"
            )
        if self.head_dim % self.num_heads:
            raise ValueError(
                f"head_dim (got {self.head_dim}) must be divisible by num_heads "
                f"(got {self.num_heads})"
            )
        return self


class CrossAttentionHead(nn.Module):
    """s(u, q, m) for a batch of (user, query) rows and ``C`` candidate LLMs each."""

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        a = config.head_dim
        self.proj_user = nn.Linear(config.hidden_dim, a)
        self.proj_query = nn.Linear(config.embedding_dim, a)
        # The readout columns skip the attention and the MLP (fed into them, they kept the
        # network from learning query-dependent per-user preferences on planted data: AUC
        # 0.62 instead of 0.95); they enter the logit only through ``readout_logit``.
        self.proj_llm = nn.Linear(config.hidden_dim, a)
        self.readout_logit = nn.Linear(READOUT_DIM, 1) if config.history_readout else None
        if self.readout_logit is not None:
            # Start as "a model this user preferred scores higher" (one logit per unit of
            # shrunk net win rate); training adjusts it.
            with torch.no_grad():
                self.readout_logit.weight.copy_(torch.tensor([[1.0, 0.0]]))
                self.readout_logit.bias.zero_()
        self.attn = nn.MultiheadAttention(
            a, config.num_heads, dropout=config.dropout, batch_first=True
        )
        self.mlp = nn.Sequential(
            nn.Linear(5 * a, a), nn.ReLU(), nn.Dropout(config.dropout), nn.Linear(a, 1)
        )

    def forward(self, user_h: Tensor, query_x: Tensor, llm_h: Tensor) -> Tensor:
        """Score candidates.

        Shapes:
            user_h: float32 ``[B, H]``; query_x: float32 ``[B, D]``; llm_h: float32
            ``[B, C, H']`` with ``H' = config.llm_out_dim`` (``H``, or ``H + 2`` with the
            history readout in the last two columns).

        Returns:
            float32 ``[B, C]`` logits (higher = preferred).
        """
        u = self.proj_user(user_h)
        q = self.proj_query(query_x)
        m = self.proj_llm(llm_h[..., : self.proj_llm.in_features])  # h_m without the readout
        kv = torch.stack([u, q], dim=1)  # [B, 2, A]
        att, _ = self.attn(m, kv, kv, need_weights=False)  # [B, C, A]
        uq = u.unsqueeze(1)
        qq = q.unsqueeze(1)
        feat = torch.cat([att, m, m * qq, m * uq, m * uq * qq], dim=-1)
        out: Tensor = self.mlp(feat).squeeze(-1)
        if self.readout_logit is not None:
            out = out + self.readout_logit(llm_h[..., -READOUT_DIM:]).squeeze(-1)
        return out


class GMTRouterNetwork(nn.Module):
    """HGT encoder over the GMTRouter graph plus the cross-attention prediction head.

    Args:
        config: :class:`NetworkConfig`.
    """

    def __init__(self, config: NetworkConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_dim
        self.metadata = graph_metadata(config.reverse_edges)
        self.user_init = nn.Parameter(torch.zeros(h))
        self.llm_in = nn.Linear(config.llm_feature_dim, h)
        self.query_in = nn.Linear(config.embedding_dim, h)
        self.response_in = nn.Linear(1, h)
        self.turn_llm = nn.Linear(config.llm_feature_dim, h)
        self.turn_query = nn.Linear(config.embedding_dim, h)
        self.turn_mlp = nn.Sequential(nn.Linear(4 * h + 1, h), nn.ReLU(), nn.Linear(h, h))
        self.convs = nn.ModuleList(
            HGTConv(h, h, self.metadata, heads=config.num_heads) for _ in range(config.num_layers)
        )
        self.norms = nn.ModuleList(
            nn.ModuleDict({nt: nn.LayerNorm(h) for nt in self.metadata[0]})
            for _ in range(config.num_layers)
        )
        self.dropout = nn.Dropout(config.dropout)
        self.head = CrossAttentionHead(config)

    def _turn_features(self, data: HeteroData) -> Tensor:
        store = data["turn"]
        n = int(store.num_nodes or 0)
        h = self.config.hidden_dim
        if self.config.turn_features == "zeros" or n == 0:
            return torch.zeros(n, h, device=self.user_init.device)
        r = store.outcome.view(-1, 1)
        s = 2.0 * r - 1.0
        pl = self.turn_llm(data["llm"].x[store.llm])
        pq = self.turn_query(data["query"].x[store.query])
        out: Tensor = self.turn_mlp(torch.cat([s * pl, s * pq, pq, s * pl * pq, r], dim=-1))
        return out

    def input_features(self, data: HeteroData) -> dict[str, Tensor]:
        """Per-type input features, all float32 ``[N_type, H]``."""
        n_users = int(data["user"].num_nodes or 0)
        return {
            "user": self.user_init.unsqueeze(0).expand(n_users, -1),
            "llm": self.llm_in(data["llm"].x),
            "query": self.query_in(data["query"].x),
            "response": self.response_in(data["response"].x),
            "turn": self._turn_features(data),
        }

    def encode(self, data: HeteroData) -> tuple[Tensor, Tensor]:
        """Run the HGT layers.

        Args:
            data: A graph from :func:`model.graph.build_hetero_graph` with the same
                ``reverse_edges`` setting as the config.

        Returns:
            ``(user_h, llm_h)``: float32 ``[U, H]`` and ``[M, H']`` final embeddings
            (``H' = config.llm_out_dim``: with ``history_readout`` the last two columns are
            the readout of :meth:`history_readout`). With ``reverse_edges=False`` the LLM
            embedding is its input projection (never a destination), as in the official code.
        """
        x = self.input_features(data)
        edge_index = {et: data[et].edge_index for et in self.metadata[1]}
        for conv, norms_any in zip(self.convs, self.norms, strict=True):
            norms: nn.ModuleDict = norms_any  # type: ignore[assignment]
            out = conv(x, edge_index)
            new: dict[str, Tensor] = {}
            for nt, h in x.items():
                o = out.get(nt)
                new[nt] = h if o is None else norms[nt](h + self.dropout(o))
            x = new
        if self.config.history_readout:
            return x["user"], torch.cat([x["llm"], self.history_readout(data)], dim=-1)
        return x["user"], x["llm"]

    @staticmethod
    def history_readout(data: HeteroData) -> Tensor:
        """Per-LLM-node evidence from the turns pointing at it (see the module docstring).

        Returns:
            float32 ``[M, 2]``: ``Σ s / (n + κ)`` in (−1, 1) and ``log(1 + n)``, with
            ``s = 2·outcome − 1`` over the node's turns whose outcome is not 0.5 and ``n``
            their number (0 and 0 for an LLM without such turns, e.g. at cold start).
        """
        llm = data["llm"]
        n_llm = int(llm.num_nodes or 0)
        device = llm.x.device
        turn = data["turn"]
        n = torch.zeros(n_llm, device=device)
        net = torch.zeros(n_llm, device=device)
        if int(turn.num_nodes or 0):
            s = 2.0 * turn.outcome - 1.0
            n.index_add_(0, turn.llm, (s != 0).to(s.dtype))
            net.index_add_(0, turn.llm, s)
        return torch.stack([net / (n + READOUT_SHRINKAGE), torch.log1p(n)], dim=-1)

    def score(self, user_h: Tensor, query_x: Tensor, llm_h: Tensor) -> Tensor:
        """Cross-attention head.

        Args:
            user_h: float32 ``[B, H]`` user embeddings.
            query_x: float32 ``[B, D]`` query text embeddings (input, not refined).
            llm_h: float32 ``[B, C, H']`` candidate LLM embeddings from :meth:`encode`.

        Returns:
            float32 ``[B, C]`` logits.
        """
        out: Tensor = self.head(user_h, query_x, llm_h)
        return out

    def forward(
        self, data: HeteroData, user_index: Tensor, query_x: Tensor, llm_index: Tensor
    ) -> Tensor:
        """Encode the graph and score candidates.

        Args:
            data: The graph.
            user_index: int64 ``[B]`` user node of each row.
            query_x: float32 ``[B, D]``.
            llm_index: int64 ``[B, C]`` LLM nodes of the candidates.

        Returns:
            float32 ``[B, C]`` logits.
        """
        user_h, llm_h = self.encode(data)
        return self.score(user_h[user_index], query_x, llm_h[llm_index])

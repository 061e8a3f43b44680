"""The personalized scorer: the GMTRouter network over the user's k-hop neighbourhood.

Per request: read the user's graph version (one indexed read); if the cached user and LLM
embeddings were computed from that version and cover the candidates, only the prediction head
runs (≈0.1 ms); otherwise the neighbourhood is sampled from the store, turned into a
``HeteroData`` and encoded by the HGT layers (off the event loop), and the result is cached.
A user with fewer than ``sampler.min_history`` turns is the cold-start case: the network runs
on a graph without that user's history (method ``gmtrouter_cold_start``), which is the
network's non-personalized, query-aware score.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from graphstore.neighbourhood import Neighbourhood
from graphstore.store import GraphStore
from model.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint
from model.data import llm_description
from model.graph import build_hetero_graph
from model.text_encoder import TextEncoder
from server.config import Settings
from server.scoring import PriorScorer, Scores

METHOD = "gmtrouter"
METHOD_COLD_START = "gmtrouter_cold_start"


@dataclasses.dataclass(slots=True)
class _UserState:
    """Cached network output for one user at one graph version."""

    version: int
    history_turns: int
    user_h: torch.Tensor  # float32 [H]
    llm_h: dict[str, torch.Tensor]  # name -> float32 [H]
    typical_query: npt.NDArray[np.float32]  # float32 [D]


class NetworkScorer:
    """Scores candidates with a trained GMTRouter network.

    Args:
        checkpoint: The loaded checkpoint (network in eval mode).
        settings: Service settings (sampler, embedding, models).
        store: The graph store.
        encoder: Text encoder for LLM descriptions of models unknown to the checkpoint.
        executor: Thread pool where torch runs.
        prior: Bradley–Terry prior, used when the network cannot run.
        cache_size: Users whose embeddings are kept in memory (LRU).
    """

    def __init__(
        self,
        checkpoint: LoadedCheckpoint,
        settings: Settings,
        store: GraphStore,
        encoder: TextEncoder,
        executor: concurrent.futures.Executor,
        prior: PriorScorer,
        cache_size: int = 10_000,
    ) -> None:
        self.ckpt = checkpoint
        self.network = checkpoint.network.eval()
        self.settings = settings
        self.store = store
        self.encoder = encoder
        self.executor = executor
        self.prior = prior
        self.cache_size = cache_size
        self._llm_x: dict[str, torch.Tensor] = {
            m: checkpoint.llm_x[i] for i, m in enumerate(checkpoint.models)
        }
        self._descriptions = {m.name: m.description for m in settings.models if m.description}
        self._cache: collections.OrderedDict[str, _UserState] = collections.OrderedDict()

    @property
    def model_version(self) -> str:
        """The checkpoint's version string (hash of its weights)."""
        return self.ckpt.version

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        store: GraphStore,
        encoder: TextEncoder,
        executor: concurrent.futures.Executor,
        prior: PriorScorer,
    ) -> NetworkScorer:
        """Load ``decision.algorithm.gmtrouter.model_path`` and check it against the config.

        Raises:
            CheckpointError: missing/corrupt file, or the checkpoint's ``num_layers``,
                ``hidden_dim``, ``num_heads``, embedding model or dimension differ from the
                configuration (the message names the key).
        """
        g = settings.gmtrouter
        assert g.model_path is not None
        ckpt = load_checkpoint(g.model_path)
        prefix = "decision.algorithm.gmtrouter"
        for field in ("num_layers", "hidden_dim", "num_heads"):
            got, want = getattr(ckpt.config, field), getattr(g, field)
            if got != want:
                raise CheckpointError(
                    f"checkpoint {g.model_path} has {field} {got} but the config "
                    f"{prefix}.{field} is {want}"
                )
        if ckpt.encoder_dim != settings.embedding.dim:
            raise CheckpointError(
                f"checkpoint {g.model_path} was trained on {ckpt.encoder_dim}-dimensional "
                f"embeddings but the config embedding.dim is {settings.embedding.dim}"
            )
        if ckpt.encoder_name != settings.embedding.model:
            raise CheckpointError(
                f"checkpoint {g.model_path} was trained with encoder {ckpt.encoder_name!r} but "
                f"the config embedding.model is {settings.embedding.model!r}"
            )
        torch.set_num_threads(1)
        return cls(ckpt, settings, store, encoder, executor, prior)

    # -- features ----------------------------------------------------------------------------

    async def _llm_features(self, names: Sequence[str]) -> torch.Tensor:
        """float32 ``[len(names), D_llm]``: the checkpoint's features, else the embedding of the
        model's configured ``description`` (or the training-time text for its name)."""
        missing = [m for m in names if m not in self._llm_x]
        if missing:
            texts = [self._descriptions.get(m) or llm_description(m) for m in missing]
            loop = asyncio.get_running_loop()
            emb = await loop.run_in_executor(self.executor, self.encoder.encode, texts)
            for m, row in zip(missing, emb, strict=True):
                self._llm_x[m] = torch.from_numpy(np.array(row, dtype=np.float32))
        return torch.stack([self._llm_x[m] for m in names])

    # -- encoding ----------------------------------------------------------------------------

    def _encode_sync(
        self, nb: Neighbourhood, llm_names: list[str], llm_x: torch.Tensor, personalize: bool
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # The network was trained on per-user components: only the seed user's own turns go
        # into the graph (other users' turns would mix their outcomes into the LLM nodes);
        # without personalization (cold start) none do.
        keep = np.flatnonzero(nb.turn_user == 0) if personalize else np.zeros(0, dtype=np.int64)
        remap = np.full(nb.num_turns, -1, dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        prev = nb.turn_prev[keep]
        prev = np.where(prev >= 0, remap[np.maximum(prev, 0)], -1)
        llm_pos = {m: i for i, m in enumerate(llm_names)}
        turn_llm = np.array([llm_pos[nb.llm_names[j]] for j in nb.turn_llm[keep]], dtype=np.int64)
        data = build_hetero_graph(
            num_users=1,
            query_x=torch.from_numpy(np.ascontiguousarray(nb.query_embedding)),
            llm_x=llm_x,
            turn_user=torch.zeros(len(keep), dtype=torch.long),
            turn_query=torch.from_numpy(nb.turn_query[keep]),
            turn_llm=torch.from_numpy(turn_llm),
            turn_outcome=torch.from_numpy(nb.turn_outcome[keep]),
            turn_prev=torch.from_numpy(prev),
            reverse_edges=self.ckpt.config.reverse_edges,
        )
        with torch.inference_mode():
            user_h, llm_h = self.network.encode(data)
        return user_h[0].clone(), {m: llm_h[i].clone() for i, m in enumerate(llm_names)}

    async def _state(self, user_id: str, candidates: Sequence[str]) -> _UserState:
        version = await self.store.user_version(user_id)
        cached = self._cache.get(user_id)
        if (
            cached is not None
            and cached.version == version
            and all(m in cached.llm_h for m in candidates)
        ):
            self._cache.move_to_end(user_id)
            return cached
        s = self.settings.sampler
        nb = await self.store.neighbourhood(user_id, s.hops, s.fan_out)
        history = int(np.count_nonzero(nb.turn_user == 0))
        personalize = history >= max(s.min_history, 1)
        llm_names = list(dict.fromkeys([*nb.llm_names, *candidates]))
        llm_x = await self._llm_features(llm_names)
        loop = asyncio.get_running_loop()
        user_h, llm_h = await loop.run_in_executor(
            self.executor, self._encode_sync, nb, llm_names, llm_x, personalize
        )
        own = nb.turn_query[nb.turn_user == 0]
        typical = (
            nb.query_embedding[own].mean(axis=0).astype(np.float32)
            if len(own)
            else np.zeros(self.settings.embedding.dim, dtype=np.float32)
        )
        state = _UserState(nb.version, history, user_h, llm_h, typical)
        self._cache[user_id] = state
        self._cache.move_to_end(user_id)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return state

    # -- Scorer protocol ---------------------------------------------------------------------

    async def score(
        self,
        user_id: str,
        query_embedding: npt.NDArray[np.float32] | None,
        candidates: Sequence[str],
    ) -> Scores:
        """Network logits per candidate; see the module docstring for caching and cold start."""
        state = await self._state(user_id, candidates)
        q = state.typical_query if query_embedding is None else query_embedding
        with torch.inference_mode():
            logits = self.network.score(
                state.user_h.unsqueeze(0),
                torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32)).unsqueeze(0),
                torch.stack([state.llm_h[m] for m in candidates]).unsqueeze(0),
            )[0]
        scores = {m: float(v) for m, v in zip(candidates, logits.tolist(), strict=True)}
        min_history = max(self.settings.sampler.min_history, 1)
        if state.history_turns >= min_history:
            method = METHOD
            reasoning = (
                f"personalized GMTRouter network over the user's {state.history_turns} most "
                f"recent turns ({self.settings.sampler.hops}-hop neighbourhood)"
            )
        else:
            method = METHOD_COLD_START
            reasoning = (
                f"cold start: the user has {state.history_turns} recorded turns (personalization "
                f"starts at {min_history}); non-personalized GMTRouter score for this query"
            )
        return Scores(scores, method, reasoning, self.model_version, state.history_turns)

    def invalidate(self, user_id: str) -> None:
        """Drop the user's cached embeddings (their graph changed)."""
        self._cache.pop(user_id, None)
        self.prior.invalidate(user_id)

    async def warm_up(self) -> None:
        """Run one encode + head so that the first request pays no lazy initialisation."""
        nb = Neighbourhood.empty("__warm_up__", self.settings.embedding.dim)
        names = self.ckpt.models[:2] or ["__warm_up_model__"]
        llm_x = await self._llm_features(names)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self._encode_sync, nb, names, llm_x, True)

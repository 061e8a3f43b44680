"""The personalized scorer: the GMTRouter network over the user's k-hop neighbourhood.

Per request: read the user's graph version (one indexed read; concurrent requests for one
user share the read); if the cached user and LLM embeddings were computed from that version
and cover the candidates, only the prediction head runs (≈0.1 ms); otherwise the neighbourhood
is sampled from the store, turned into a ``HeteroData`` and encoded by the HGT layers, and the
result is cached (concurrent misses for one user share one encode).

No torch inference runs on the event loop: the HGT encode (a cache miss) and text embedding run in
the executor. The prediction head is :class:`model.serving_head.ServingHead`, the trained
head's arithmetic in NumPy (for a few rows torch's per-operator dispatch cost 4× more), run on
the loop through a micro-batcher (:class:`HeadBatcher`): the requests that arrived before its
pass are scored together in one pass, so under concurrency one pass serves many requests, and
a lone request waits for nobody.
How the network's output becomes the score (``scoring.combine``):

* ``residual`` (default): ``θ[m] + w · (s(u, q, m) − s(∅, q, m))`` — the Bradley–Terry prior
  over every user's comparisons (``server/scoring.py``) plus ``w`` =
  ``scoring.residual_weight`` (0.5) times the network's *personalization*: its score for this
  user minus its score for a user without history (the cold state, encoded once per served
  model), both from one head pass. The network then decides only how this user differs from
  everyone; the population part is the store-wide model, to which Select adds the per-query
  evidence (``server/query_evidence.py``). Not in the paper: on the replays of real users it
  beat the network's own logits on both data sets (README → Results).
* ``network``: the network's logits as they are (the paper's).

A user with fewer than ``sampler.min_history`` turns is the cold-start case (method
``gmtrouter_cold_start``): ``residual`` gives the prior's score (the residual is 0);
``network`` runs the network on a graph without that user's history, its non-personalized,
query-aware score.

Weights can be swapped while serving (:meth:`NetworkScorer.swap`, driven by online learning in
``server/learning.py``): the scorer holds one immutable :class:`ServedModel` reference and
replaces it in one assignment. Each cached user state remembers the model that encoded it and
is a miss under any other; a request already past its encode finishes with the model it
started with (its user embeddings and prediction head stay consistent), so a swap fails no
request.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import torch

from graphstore.neighbourhood import Neighbourhood
from graphstore.store import GraphStore
from model.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint
from model.data import llm_description
from model.graph import build_hetero_graph
from model.network import GMTRouterNetwork
from model.serving_head import ServingHead
from model.text_encoder import TextEncoder
from server.config import Settings
from server.scoring import PriorScorer, Scores

METHOD = "gmtrouter"
METHOD_COLD_START = "gmtrouter_cold_start"

#: Candidate models outside the checkpoint whose embedded features one scorer keeps (LRU):
#: 384 float32 (1.5 KB) each, so at most ≈ 6 MB however many names clients send.
MAX_EMBEDDED_LLMS = 4096


@dataclasses.dataclass(frozen=True, slots=True)
class ServedModel:
    """One set of weights being served: the checkpoint and its network (eval mode)."""

    checkpoint: LoadedCheckpoint
    network: GMTRouterNetwork
    #: The network's prediction head, copied for NumPy scoring (built from ``network``).
    head: ServingHead = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "head", ServingHead(self.network.head))

    @property
    def version(self) -> str:
        """The weights' version string."""
        return self.checkpoint.version


@dataclasses.dataclass(slots=True)
class _UserState:
    """Cached network output for one user at one graph version, from one served model."""

    model: ServedModel
    version: int
    history_turns: int
    user_h: npt.NDArray[np.float32]  # float32 [H]
    llm_h: dict[str, npt.NDArray[np.float32]]  # name -> float32 [H'] (H' = config.llm_out_dim)
    typical_query: npt.NDArray[np.float32]  # float32 [D]
    #: ``time.monotonic()`` when the state was built (``sampler.state_max_age_s``).
    built_at: float
    #: candidate tuple -> float32 [C, H'] stacked ``llm_h`` rows (filled on first use)
    stacked: dict[tuple[str, ...], npt.NDArray[np.float32]] = dataclasses.field(
        default_factory=dict
    )

    def candidates_h(self, candidates: Sequence[str]) -> npt.NDArray[np.float32]:
        """float32 ``[C, H']``: the cached LLM embeddings of ``candidates``, in order."""
        key = tuple(candidates)
        out = self.stacked.get(key)
        if out is None:
            if len(self.stacked) >= 64:
                self.stacked.clear()
            out = np.stack([self.llm_h[m] for m in key])
            self.stacked[key] = out
        return out


class _HeadRow(NamedTuple):
    head: ServingHead
    user_h: npt.NDArray[np.float32]  # float32 [H]
    query: npt.NDArray[np.float32]  # float32 [D]
    llm_h: npt.NDArray[np.float32]  # float32 [C, H'] (H' = config.llm_out_dim: H + readout)
    future: asyncio.Future[list[float]]


class HeadBatcher:
    """Scores concurrent requests with one prediction-head forward pass.

    The pass is :class:`~model.serving_head.ServingHead` (NumPy, ≈ 0.15 ms for one or two
    rows, < 1 ms for 32) and runs on the event loop, in a task started by the first pending
    request: handing it to a thread cost more than the pass itself (an A/B on the bench
    machine, serving the same store: sequential Select p50 3.87 → 3.54 ms, Select/s at 32
    concurrent clients 396–495 → 530–688). Adaptive batching without a timer: every request
    that arrived before that task runs goes into its pass (at most ``max_batch_rows`` rows).
    Each request gets its own result, or the pass's exception. Rows are independent in the
    head (no cross-row attention; dropout is off in eval mode), so batching does not change
    any score beyond float rounding. Each row names the head that scores it (rows of
    different weights, around a swap, go in separate passes).

    Args:
        max_batch_rows: Largest number of rows in one pass.
    """

    def __init__(self, max_batch_rows: int = 256) -> None:
        if max_batch_rows < 1:
            raise ValueError(f"max_batch_rows (got {max_batch_rows}) must be >= 1")
        self.max_batch_rows = max_batch_rows
        self._pending: list[_HeadRow] = []
        self._task: asyncio.Task[None] | None = None
        #: Forward passes run and rows scored so far (for tests and metrics).
        self.passes = 0
        self.rows = 0

    async def score(
        self,
        head: ServingHead,
        query: npt.NDArray[np.float32],
        rows: Sequence[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]],
    ) -> list[list[float]]:
        """Logits of each row's ``C`` candidates for one query, by ``head``.

        Args:
            head: The served head.
            query: float32 ``[D]`` query embedding.
            rows: ``(user_h, llm_h)`` pairs: float32 ``[H]`` user embedding and float32
                ``[C, H']`` candidate LLM embeddings (e.g. the user's and the cold state's).

        Returns:
            One list of ``C`` logits per row, in order.
        """
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[list[float]]] = []
        for user_h, llm_h in rows:
            fut: asyncio.Future[list[float]] = loop.create_future()
            self._pending.append(_HeadRow(head, user_h, query, llm_h, fut))
            futures.append(fut)
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return list(await asyncio.gather(*futures))

    async def _drain(self) -> None:
        while self._pending:
            batch = self._pending[: self.max_batch_rows]
            del self._pending[: self.max_batch_rows]
            try:
                results = self._forward(batch)
            except BaseException as exc:  # not an Exception (e.g. KeyboardInterrupt)
                for row in batch + self._pending:
                    if not row.future.done():
                        row.future.set_exception(exc)
                self._pending.clear()
                raise
            for row, res in zip(batch, results, strict=True):
                if row.future.done():
                    continue
                if isinstance(res, Exception):
                    row.future.set_exception(res)
                else:
                    row.future.set_result(res)
            if self._pending:
                await asyncio.sleep(0)  # more than one pass queued: let the loop breathe

    def _forward(self, batch: list[_HeadRow]) -> list[list[float] | Exception]:
        """One head pass per distinct (head, candidate count) — usually one. A pass that
        raises fails its own rows only (their entries are the exception)."""
        groups: dict[tuple[int, int], list[int]] = {}
        for i, row in enumerate(batch):
            groups.setdefault((id(row.head), int(row.llm_h.shape[0])), []).append(i)
        out: list[list[float] | Exception] = [[] for _ in batch]
        for idx in groups.values():
            rows = [batch[i] for i in idx]
            try:
                logits = (
                    rows[0]
                    .head(
                        np.stack([r.user_h for r in rows]),
                        np.stack([r.query for r in rows]),
                        np.stack([r.llm_h for r in rows]),
                    )
                    .tolist()
                )
            except Exception as exc:
                for i in idx:
                    out[i] = exc
                continue
            for i, values in zip(idx, logits, strict=True):
                out[i] = values
        self.passes += 1
        self.rows += len(batch)
        return out


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
        self.base = checkpoint
        self._served = ServedModel(checkpoint, checkpoint.network.eval())
        self.settings = settings
        self.store = store
        self.encoder = encoder
        self.executor = executor
        self.prior = prior
        self.cache_size = cache_size
        self._llm_x: dict[str, torch.Tensor] = {
            m: checkpoint.llm_x[i] for i, m in enumerate(checkpoint.models)
        }
        #: Features of candidate models the checkpoint does not know, embedded on first use:
        #: LRU, at most :data:`MAX_EMBEDDED_LLMS` (clients name the candidates).
        self._llm_x_embedded: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
        self._descriptions = {m.name: m.description for m in settings.models if m.description}
        self._cache: collections.OrderedDict[str, _UserState] = collections.OrderedDict()
        self.head = HeadBatcher()
        # In-flight reads and encodes, shared by concurrent requests for one user.
        self._version_reads: dict[str, asyncio.Future[int]] = {}
        # user -> (monotonic time the read started, version): reused for
        # ``sampler.version_max_age_ms`` (LRU, at most ``cache_size`` users).
        self._versions: collections.OrderedDict[str, tuple[float, int]] = collections.OrderedDict()
        self._encodes: dict[tuple[str, int, str], asyncio.Future[_UserState]] = {}
        #: The state of a user without history, for the personalization residual.
        self._cold: _UserState | None = None

    @property
    def model_version(self) -> str:
        """Version string (hash of the weights) of the model now served."""
        return self._served.version

    @property
    def served(self) -> ServedModel:
        """The model now served (replaced, never mutated, by :meth:`swap`)."""
        return self._served

    def check_compatible(self, checkpoint: LoadedCheckpoint) -> None:
        """Raise :class:`CheckpointError` unless ``checkpoint`` can replace the served model.

        It must have the base checkpoint's network configuration, encoder and LLM list.
        """
        base = self.base
        if checkpoint.config != base.config:
            raise CheckpointError(
                f"checkpoint {checkpoint.version} has network config {checkpoint.config} but "
                f"the served one has {base.config}"
            )
        if (checkpoint.encoder_name, checkpoint.encoder_dim) != (
            base.encoder_name,
            base.encoder_dim,
        ):
            raise CheckpointError(
                f"checkpoint {checkpoint.version} was trained with encoder "
                f"{checkpoint.encoder_name!r} [{checkpoint.encoder_dim}], the served one with "
                f"{base.encoder_name!r} [{base.encoder_dim}]"
            )
        if checkpoint.models != base.models:
            raise CheckpointError(
                f"checkpoint {checkpoint.version} knows models {checkpoint.models}, the served "
                f"one {base.models}"
            )

    def swap(self, checkpoint: LoadedCheckpoint) -> bool:
        """Serve ``checkpoint``'s weights from now on (one reference assignment).

        Cached user states of the old weights become misses; requests in flight finish with
        the weights they started with.

        Returns:
            False when those weights are already served (nothing changes), else True.

        Raises:
            CheckpointError: ``checkpoint`` is not compatible (:meth:`check_compatible`).
        """
        if checkpoint.version == self._served.version:
            return False
        self.check_compatible(checkpoint)
        self._served = ServedModel(checkpoint, checkpoint.network.eval())
        self._cache.clear()
        return True

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

    async def llm_features(self, names: Sequence[str]) -> torch.Tensor:
        """float32 ``[len(names), D_llm]``: the checkpoint's features, else the embedding of the
        model's configured ``description`` (or the training-time text for its name)."""
        found: dict[str, torch.Tensor] = {}
        for m in names:
            x = self._llm_x.get(m)
            if x is None:
                x = self._llm_x_embedded.get(m)
                if x is not None:
                    self._llm_x_embedded.move_to_end(m)
            if x is not None:
                found[m] = x
        missing = list(dict.fromkeys(m for m in names if m not in found))
        if missing:
            texts = [self._descriptions.get(m) or llm_description(m) for m in missing]
            loop = asyncio.get_running_loop()
            emb = await loop.run_in_executor(self.executor, self.encoder.encode, texts)
            for m, row in zip(missing, emb, strict=True):
                found[m] = self._llm_x_embedded[m] = torch.from_numpy(
                    np.array(row, dtype=np.float32)
                )
            while len(self._llm_x_embedded) > MAX_EMBEDDED_LLMS:
                self._llm_x_embedded.popitem(last=False)
        return torch.stack([found[m] for m in names])

    # -- encoding ----------------------------------------------------------------------------

    def _encode_sync(
        self,
        served: ServedModel,
        nb: Neighbourhood,
        llm_names: list[str],
        llm_x: torch.Tensor,
        personalize: bool,
    ) -> tuple[npt.NDArray[np.float32], dict[str, npt.NDArray[np.float32]]]:
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
            reverse_edges=served.checkpoint.config.reverse_edges,
        )
        with torch.inference_mode():
            user_h, llm_h = served.network.encode(data)
        user_np = user_h[0].numpy().copy()
        llm_np = llm_h.numpy()
        return user_np, {m: llm_np[i].copy() for i, m in enumerate(llm_names)}

    async def _version(self, user_id: str) -> int:
        """The user's graph version; concurrent callers for one user share one store read.

        A version read less than ``sampler.version_max_age_ms`` ago (its start time counts)
        is reused without a store read, so a write through another replica is seen within
        that bound. A caller joins only a read that started after the user's last local
        write (:meth:`invalidate` forgets in-flight reads and reused versions), so a local
        write is always seen at once.
        """
        max_age_s = self.settings.sampler.version_max_age_ms / 1000.0
        hit = self._versions.get(user_id)
        if hit is not None and time.monotonic() - hit[0] < max_age_s:
            return hit[1]
        fut = self._version_reads.get(user_id)
        if fut is None:
            started = time.monotonic()
            fut = asyncio.ensure_future(self.store.user_version(user_id))
            self._version_reads[user_id] = fut

            def _forget(done: asyncio.Future[int], user: str = user_id) -> None:
                failed = done.cancelled() or done.exception() is not None  # retrieved
                if self._version_reads.get(user) is not done:
                    return  # invalidated meanwhile: neither forget a newer read nor keep this
                del self._version_reads[user]
                if not failed and max_age_s > 0:
                    self._versions[user] = (started, done.result())
                    self._versions.move_to_end(user)
                    while len(self._versions) > self.cache_size:
                        self._versions.popitem(last=False)

            fut.add_done_callback(_forget)
        return await asyncio.shield(fut)

    async def _state(self, user_id: str, candidates: Sequence[str]) -> _UserState:
        version = await self._version(user_id)
        served = self._served
        cached = self._cache.get(user_id)
        if (
            cached is not None
            and cached.version == version
            and cached.model is served
            and time.monotonic() - cached.built_at < self.settings.sampler.state_max_age_s
            and all(m in cached.llm_h for m in candidates)
        ):
            self._cache.move_to_end(user_id)
            return cached
        key = (user_id, version, served.version)
        fut = self._encodes.get(key)
        if fut is not None:
            state = await asyncio.shield(fut)
            if all(m in state.llm_h for m in candidates):
                return state
        fut = asyncio.ensure_future(self._encode_user(served, user_id, candidates))
        self._encodes[key] = fut

        def _forget(done: asyncio.Future[_UserState]) -> None:
            if self._encodes.get(key) is done:
                del self._encodes[key]
            if not done.cancelled():
                done.exception()

        fut.add_done_callback(_forget)
        return await asyncio.shield(fut)

    async def _encode_user(
        self, served: ServedModel, user_id: str, candidates: Sequence[str]
    ) -> _UserState:
        s = self.settings.sampler
        nb = await self.store.neighbourhood(user_id, s.hops, s.fan_out)
        history = int(np.count_nonzero(nb.turn_user == 0))
        personalize = history >= max(s.min_history, 1)
        llm_names = list(dict.fromkeys([*nb.llm_names, *candidates]))
        llm_x = await self.llm_features(llm_names)
        loop = asyncio.get_running_loop()
        user_h, llm_h = await loop.run_in_executor(
            self.executor, self._encode_sync, served, nb, llm_names, llm_x, personalize
        )
        own = nb.turn_query[nb.turn_user == 0]
        typical = (
            nb.query_embedding[own].mean(axis=0).astype(np.float32)
            if len(own)
            else np.zeros(self.settings.embedding.dim, dtype=np.float32)
        )
        state = _UserState(
            served, nb.version, history, user_h, llm_h, typical, built_at=time.monotonic()
        )
        if served is not self._served:
            return state  # swapped meanwhile: serve this request, cache nothing stale
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
        q = np.ascontiguousarray(
            state.typical_query if query_embedding is None else query_embedding, dtype=np.float32
        )
        head = state.model.head
        cfg = self.settings.scoring
        min_history = max(self.settings.sampler.min_history, 1)
        personalized = state.history_turns >= min_history
        if cfg.combine == "network":
            [logits] = await self.head.score(
                head, q, [(state.user_h, state.candidates_h(candidates))]
            )
            scores = {m: float(v) for m, v in zip(candidates, logits, strict=True)}
            base = what = "GMTRouter network score"
        else:
            cold = await self._cold_state(state.model, candidates)
            theta = await self.prior.strengths()
            if personalized:
                # one head pass for both rows (and for concurrent requests' rows)
                logits, cold_logits = await self.head.score(
                    head,
                    q,
                    [
                        (state.user_h, state.candidates_h(candidates)),
                        (cold.user_h, cold.candidates_h(candidates)),
                    ],
                )
                residual = [a - b for a, b in zip(logits, cold_logits, strict=True)]
            else:
                residual = [0.0] * len(candidates)
            w = cfg.residual_weight
            base = "Bradley-Terry prior"
            scores = {
                m: float(theta.get(m, 0.0)) + w * r
                for m, r in zip(candidates, residual, strict=True)
            }
            what = (
                f"Bradley-Terry prior + {w:g} x the GMTRouter network's personalization "
                f"(its score for this user minus its score without history)"
            )
        if personalized:
            method = METHOD
            reasoning = (
                f"personalized: {what}, over the user's {state.history_turns} most recent turns"
            )
        else:
            method = METHOD_COLD_START
            reasoning = (
                f"cold start: the user has {state.history_turns} recorded turns (personalization "
                f"starts at {min_history}); non-personalized {base} for this query"
            )
        return Scores(scores, method, reasoning, state.model.version, state.history_turns)

    async def _cold_state(self, served: ServedModel, candidates: Sequence[str]) -> _UserState:
        """The network's state of a user without history (one per served model; it covers
        every model asked for so far)."""
        cold = self._cold
        if cold is not None and cold.model is served and all(m in cold.llm_h for m in candidates):
            return cold
        known = list(cold.llm_h) if cold is not None and cold.model is served else []
        names = list(dict.fromkeys([*known, *candidates]))
        nb = Neighbourhood.empty("__cold_start__", self.settings.embedding.dim)
        llm_x = await self.llm_features(names)
        loop = asyncio.get_running_loop()
        user_h, llm_h = await loop.run_in_executor(
            self.executor, self._encode_sync, served, nb, names, llm_x, False
        )
        state = _UserState(
            served,
            0,
            0,
            user_h,
            llm_h,
            np.zeros(self.settings.embedding.dim, dtype=np.float32),
            built_at=time.monotonic(),
        )
        if served is self._served:
            self._cold = state
        return state

    def invalidate(self, user_id: str) -> None:
        """Drop the user's cached embeddings (their graph changed)."""
        self._cache.pop(user_id, None)
        self._version_reads.pop(user_id, None)
        self._versions.pop(user_id, None)
        self.prior.invalidate(user_id)

    async def warm_up(self) -> None:
        """Run one encode + head so that the first request pays no lazy initialisation."""
        nb = Neighbourhood.empty("__warm_up__", self.settings.embedding.dim)
        served = self._served
        names = served.checkpoint.models[:2] or ["__warm_up_model__"]
        llm_x = await self.llm_features(names)
        loop = asyncio.get_running_loop()
        user_h, llm_h = await loop.run_in_executor(
            self.executor, self._encode_sync, served, nb, names, llm_x, True
        )
        query = np.zeros(self.settings.embedding.dim, dtype=np.float32)
        await self.head.score(served.head, query, [(user_h, np.stack([llm_h[m] for m in names]))])

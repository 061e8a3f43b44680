"""Online learning: background fine-tuning of the served network, shared by all replicas.

Runs only when ``decision.algorithm.gmtrouter.learn_preferences`` is true and a checkpoint is
served; with ``false`` the weights stay frozen (a user's recorded history still counts at
once: it is in the graph the network reads). Exact behaviour:

* **Who trains.** ``learning.role: auto`` (default): every ``learning.check_interval_s`` each
  replica tries to take or renew the trainer lease in the store
  (:meth:`graphstore.store.GraphStore.acquire_lease`, ``learning.lease_ttl_s``); only the
  holder trains, so replicas never fight, and if the trainer dies another one takes over once
  the lease expires. ``trainer``: this replica always trains (configure exactly one);
  ``follower``: never trains.
* **When.** A round starts when the store holds at least ``learning.min_new_interactions``
  more interactions (all users) than when the last round read its data (for a fresh trainer:
  than the newest publication was trained on, or none).
* **On what.** The ``learning.window`` most recent comparisons in the store (the new ones and
  the ones before them, a replay window against forgetting); see :mod:`model.online`.
* **How.** In a separate worker process (``spawn``, started at the first round and kept; one
  torch thread), a copy of the served network is fine-tuned for at most ``learning.steps`` steps and
  ``learning.time_budget_s`` seconds, then both the old and the new weights score a held-back
  slice (``learning.holdout_fraction`` of each user's sessions). Better by more than
  ``learning.min_improvement`` nats of log-loss: accepted; otherwise, or on any error, the
  round is discarded and the served weights stay. A process, not a thread: in one process
  the training thread waits for the GIL after every torch operator while the event loop
  serves Selects, and under Select load it ran 19–26 of 120 steps in its 60 s budget.
* **Swap.** Accepted weights are published to the store first (so they survive restarts and
  reach the other replicas), then swapped in locally with one reference assignment
  (:meth:`server.personalization.NetworkScorer.swap`): ``model_version`` of later Selects is
  the new hash; requests in flight finish on the old weights; open preference streams are
  re-ranked. Every replica (the trainer too) checks the store every
  ``learning.poll_interval_s`` and loads a newer publication made from the same base
  checkpoint, and a starting replica adopts the newest one at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import multiprocessing
import multiprocessing.synchronize
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import structlog

from graphstore.errors import StoreUnavailableError
from graphstore.interactions import RecordedComparison
from graphstore.registry import PublishedModel
from graphstore.store import GraphStore
from model.checkpoint import CheckpointError, checkpoint_bytes, load_checkpoint_bytes
from model.data import PreparedData
from model.online import FineTuneConfig, fine_tune, prepare_comparisons, training_sessions
from server.config import Settings
from server.metrics import Metrics
from server.personalization import NetworkScorer, ServedModel

log = structlog.get_logger(__name__)

#: Set in the fine-tuning worker process by :func:`_init_worker` (the parent's stop event).
_worker_stop: multiprocessing.synchronize.Event | None = None


def _init_worker(stop: multiprocessing.synchronize.Event) -> None:
    """Initialiser of the fine-tuning worker process.

    Starts a watchdog thread that ends the worker when its parent (the server) is gone: a
    server killed with SIGKILL cannot shut its pool down, and the worker (≈ 850 MB) would
    otherwise stay, blocked on its pipe to the dead parent, for good.
    """
    import torch

    global _worker_stop
    _worker_stop = stop
    torch.set_num_threads(1)
    parent = os.getppid()
    threading.Thread(
        target=_exit_with_parent, args=(parent,), name="parent-watchdog", daemon=True
    ).start()


def _exit_with_parent(parent_pid: int, interval_s: float = 1.0) -> None:
    """Exit this process (status 1) once its parent is no longer ``parent_pid``."""
    while os.getppid() == parent_pid:
        time.sleep(interval_s)
    os._exit(1)


@dataclasses.dataclass(frozen=True)
class _RoundOutcome:
    """What the worker process sends back: :class:`model.online.FineTuneResult` with the
    network as checkpoint bytes (None when the round was rejected)."""

    accepted: bool
    reason: str
    metrics: dict[str, Any]
    checkpoint: bytes | None


def prepare_recorded(
    rows: Sequence[RecordedComparison], models: Sequence[str], llm_x: npt.NDArray[np.float32]
) -> PreparedData:
    """A round's training data from the store's recent comparisons
    (:func:`model.online.prepare_comparisons`; a comparison without a ``session_id`` is a
    session of its own, :func:`model.online.training_sessions`).

    Args:
        rows: ``N`` comparisons, as :meth:`GraphStore.recent_comparisons` returns them.
        models: ``M`` model names, the row order of ``llm_x``; every row's models among them.
        llm_x: float32 ``[M, D_llm]`` LLM node features.

    Raises:
        ValueError: a model has no feature row.
    """
    return prepare_comparisons(
        user_ids=[r.user_id for r in rows],
        session_ids=training_sessions(
            [r.session_id for r in rows], [r.interaction_id for r in rows]
        ),
        turn_index=np.array([r.turn_index for r in rows], dtype=np.int64),
        query_embedding=np.stack([r.query_embedding for r in rows]),
        model_a=[r.winner_model for r in rows],
        model_b=[r.loser_model for r in rows],
        outcome_a=np.array([0.5 if r.tie else 1.0 for r in rows], dtype=np.float32),
        models=models,
        llm_x=llm_x,
    )


def _fine_tune_round(
    served: bytes, prep: PreparedData, config: FineTuneConfig, seed: int, time_budget_s: float
) -> _RoundOutcome:
    """One round in the worker process: load the served weights (``served``: bytes of
    :func:`model.checkpoint.checkpoint_bytes`), fine-tune a copy, serialise it if accepted."""
    ckpt = load_checkpoint_bytes(served, source="served weights")
    result = fine_tune(
        ckpt.network, prep, config, seed=seed, time_budget_s=time_budget_s, stop=_worker_stop
    )
    blob = checkpoint_bytes(ckpt, result.network) if result.accepted else None
    return _RoundOutcome(result.accepted, result.reason, result.metrics, blob)


#: Name of the trainer lease in the store.
LEASE_NAME = "gmtrouter-trainer"
#: Fewest comparisons a round trains on; fewer is skipped.
MIN_ROUND_COMPARISONS = 20


@dataclasses.dataclass(frozen=True, slots=True)
class RoundReport:
    """What one fine-tuning round did.

    Attributes:
        outcome: ``accepted``, ``rejected`` or ``failed``.
        reason: One line saying why.
        old_version: Weights served when the round started.
        new_version: Weights served after it (equal to ``old_version`` unless accepted).
        interactions: The store's interaction count when the data was read.
        comparisons: Comparisons read (the training window).
        metrics: :attr:`model.online.FineTuneResult.metrics` (empty when it failed early).
        duration_s: Wall time of the round (seconds).
    """

    outcome: str
    reason: str
    old_version: str
    new_version: str
    interactions: int
    comparisons: int
    metrics: dict[str, Any]
    duration_s: float


class OnlineLearner:
    """Background fine-tuning and weight sharing for one replica (see the module docstring).

    Args:
        settings: The configuration (``learning`` and ``decision.algorithm.gmtrouter``).
        store: The shared graph store.
        scorer: The network scorer whose weights are fine-tuned and swapped.
        metrics: Where rounds, swaps and the trainer role are counted.
        on_swap: Called on the event loop after every swap (wakes preference streams).
        replica_id: This replica's name in the lease (default: host, pid and a random part).
    """

    def __init__(
        self,
        settings: Settings,
        store: GraphStore,
        scorer: NetworkScorer,
        metrics: Metrics,
        on_swap: Callable[[], None],
        replica_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = settings.learning
        self.store = store
        self.scorer = scorer
        self.metrics = metrics
        self.on_swap = on_swap
        self.replica_id = replica_id or (
            f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        )
        self._context = multiprocessing.get_context("spawn")
        self._stop = self._context.Event()
        self._trainer_pool = self._new_pool()
        self._tasks: list[asyncio.Task[None]] = []
        self._loaded_seq = 0
        self._trained_at: int | None = None
        #: Reports of the rounds this replica ran, oldest first (the last 100).
        self.rounds: list[RoundReport] = []
        #: True while this replica holds the trainer lease (or is the configured trainer).
        self.is_trainer = False

    def _new_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        """The fine-tuning worker pool (one process, started at its first round)."""
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=1,
            mp_context=self._context,
            initializer=_init_worker,
            initargs=(self._stop,),
        )

    @property
    def enabled(self) -> bool:
        """True when online learning is on (``learn_preferences``)."""
        return self.settings.gmtrouter.learn_preferences

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Adopt the newest compatible publication, then start the background loops.

        Does nothing when ``learn_preferences`` is false. A store error while adopting is
        logged, not raised (the base checkpoint is served and the poll retries).
        """
        if not self.enabled:
            return
        try:
            await self.poll_once()
        except StoreUnavailableError as exc:
            log.warning("published weights not checked at start", error=str(exc))
        self._tasks.append(asyncio.create_task(self._poll_loop(), name="learning-poll"))
        if self.cfg.role != "follower":
            self._tasks.append(asyncio.create_task(self._train_loop(), name="learning-train"))
        log.info(
            "online learning on",
            role=self.cfg.role,
            replica=self.replica_id,
            model_version=self.scorer.model_version,
        )

    async def stop(self) -> None:
        """Stop the loops; a round already training stops after its current step, unpublished."""
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._trainer_pool.shutdown(wait=False, cancel_futures=True)
        self.metrics.trainer.set(0)

    # -- loading published weights -------------------------------------------------------------

    async def poll_once(self) -> bool:
        """Load the newest publication if it is newer than the served weights.

        Only publications fine-tuned from this replica's base checkpoint are taken.

        Returns:
            True when weights were swapped.

        Raises:
            StoreUnavailableError: the store failed.
        """
        served = self.scorer.served
        latest = await self.store.latest_model()
        if latest is None or latest.seq <= self._loaded_seq:
            return False
        if latest.version == self.scorer.model_version:
            self._loaded_seq = latest.seq
            return False
        if latest.base_version != self.scorer.base.version:
            self._loaded_seq = latest.seq
            log.warning(
                "ignoring published weights of another base checkpoint",
                version=latest.version,
                base=latest.base_version,
                served_base=self.scorer.base.version,
            )
            return False
        blob = await self.store.load_model(latest.version)
        if blob is None:
            return False  # deleted meanwhile by a newer publication: the next poll sees it
        loop = asyncio.get_running_loop()
        try:
            ckpt = await loop.run_in_executor(
                None, lambda: load_checkpoint_bytes(blob, source=f"store:{latest.version}")
            )
            if self.scorer.served is not served or latest.seq <= self._loaded_seq:
                return False  # a round of this replica swapped meanwhile: never go back
            swapped = self.scorer.swap(ckpt)
        except CheckpointError as exc:
            self._loaded_seq = latest.seq
            log.error("published weights rejected", version=latest.version, error=str(exc))
            return False
        self._loaded_seq = max(self._loaded_seq, latest.seq)
        if swapped:
            self.metrics.model_swaps.labels("loaded").inc()
            self.metrics.set_model_version(ckpt.version)
            log.info("loaded published weights", version=ckpt.version, seq=latest.seq)
            self.on_swap()
        return swapped

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.poll_interval_s)
            try:
                await self.poll_once()
            except StoreUnavailableError as exc:
                log.warning("weights poll failed", error=str(exc))
            except Exception:
                log.exception("weights poll failed")

    # -- training ----------------------------------------------------------------------------

    async def _train_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.check_interval_s)
            try:
                if self.cfg.role == "auto":
                    self.is_trainer = await self.store.acquire_lease(
                        LEASE_NAME, self.replica_id, self.cfg.lease_ttl_s
                    )
                else:
                    self.is_trainer = True
                self.metrics.trainer.set(1 if self.is_trainer else 0)
                if self.is_trainer:
                    await self.train_once()
            except StoreUnavailableError as exc:
                log.warning("fine-tuning check failed", error=str(exc))
            except Exception:
                self.metrics.fine_tune_rounds.labels("failed").inc()
                log.exception("fine-tuning round failed")

    async def _hold_lease(self) -> None:
        """Renew the trainer lease every ``lease_ttl_s / 3`` while a round runs (role auto);
        returns when it is lost (the round is then not published: see :meth:`train_once`)."""
        while True:
            await asyncio.sleep(self.cfg.lease_ttl_s / 3)
            try:
                held = await self.store.acquire_lease(
                    LEASE_NAME, self.replica_id, self.cfg.lease_ttl_s
                )
            except StoreUnavailableError as exc:
                log.warning("trainer lease not renewed during the round", error=str(exc))
                continue
            except Exception:
                log.exception("trainer lease renewal failed; the round keeps running")
                continue
            if not held:
                log.warning("trainer lease lost during the round", replica=self.replica_id)
                return

    async def _baseline_interactions(self) -> int:
        if self._trained_at is None:
            latest = await self.store.latest_model()
            self._trained_at = latest.interactions if latest is not None else 0
        return self._trained_at

    async def train_once(self, *, force: bool = False) -> RoundReport | None:
        """Run one round if enough new interactions arrived (or ``force``).

        Returns:
            The round's report, or None when it did not run (too few new interactions).

        Raises:
            StoreUnavailableError: the store failed before training (nothing changed).
        """
        interactions = (await self.store.counts())["interaction"]
        since = await self._baseline_interactions()
        if not force and interactions - since < self.cfg.min_new_interactions:
            return None
        t0 = time.perf_counter()
        served = self.scorer.served
        rows = await self.store.recent_comparisons(self.cfg.window)
        self._trained_at = interactions
        if len(rows) < MIN_ROUND_COMPARISONS:
            return self._report(
                "rejected",
                f"{len(rows)} comparisons in the store (a round needs {MIN_ROUND_COMPARISONS})",
                served,
                served,
                interactions,
                len(rows),
                {},
                t0,
            )
        base = served.checkpoint
        seen = {m for r in rows for m in (r.winner_model, r.loser_model)}
        extra = sorted(seen - set(base.models))
        models = [*base.models, *extra]
        llm_x = base.llm_x.numpy()
        if extra:
            llm_x = np.concatenate([llm_x, (await self.scorer.llm_features(extra)).numpy()])
        config = FineTuneConfig(
            steps=self.cfg.steps,
            lr=self.cfg.lr,
            holdout_fraction=self.cfg.holdout_fraction,
            min_improvement=self.cfg.min_improvement,
        )

        def prepare() -> tuple[bytes, PreparedData]:  # in a thread, never the event loop
            prep = prepare_recorded(rows, models, llm_x)
            return checkpoint_bytes(base, served.network), prep

        loop = asyncio.get_running_loop()
        # The round takes longer than its training budget (the worker's start, the data, the
        # held-back evaluation): keep the lease alive meanwhile, or another replica takes it.
        holding = (
            asyncio.create_task(self._hold_lease(), name="learning-lease")
            if self.cfg.role == "auto"
            else None
        )
        try:
            weights, prep = await asyncio.to_thread(prepare)
            result = await loop.run_in_executor(
                self._trainer_pool,
                _fine_tune_round,
                weights,
                prep,
                config,
                interactions,
                self.cfg.time_budget_s,
            )
        except Exception as exc:
            log.exception("fine-tuning failed")
            if isinstance(exc, concurrent.futures.process.BrokenProcessPool):
                # The worker died (e.g. killed for memory): the next round gets a new one.
                self._trainer_pool.shutdown(wait=False, cancel_futures=True)
                self._trainer_pool = self._new_pool()
            return self._report(
                "failed", f"{type(exc).__name__}: {exc}", served, served, interactions, len(rows),
                {}, t0,
            )  # fmt: skip
        finally:
            if holding is not None:
                holding.cancel()
        if not result.accepted:
            return self._report(
                "rejected", result.reason, served, served, interactions, len(rows),
                result.metrics, t0,
            )  # fmt: skip
        # Fencing: publish only weights fine-tuned from what is served now, by the trainer.
        if self.scorer.served is not served:
            return self._report(
                "rejected", "other weights were swapped in during the round", served,
                self.scorer.served, interactions, len(rows), result.metrics, t0,
            )  # fmt: skip
        if self.cfg.role == "auto" and not await self.store.acquire_lease(
            LEASE_NAME, self.replica_id, self.cfg.lease_ttl_s
        ):
            self.is_trainer = False
            return self._report(
                "rejected", "the trainer lease was lost during the round", served, served,
                interactions, len(rows), result.metrics, t0,
            )  # fmt: skip
        blob = result.checkpoint
        assert blob is not None  # accepted rounds carry their weights
        ckpt = await asyncio.to_thread(load_checkpoint_bytes, blob, source="fine-tuned")
        published = await self.store.publish_model(
            PublishedModel(
                version=ckpt.version,
                base_version=self.scorer.base.version,
                seq=0,
                interactions=interactions,
                created_at_s=time.time(),
                metrics=json.dumps(result.metrics, default=float),
            ),
            blob,
        )
        if self.scorer.served is served and self.scorer.swap(ckpt):
            self._loaded_seq = max(self._loaded_seq, published.seq)
            self.metrics.model_swaps.labels("trained").inc()
            self.metrics.set_model_version(ckpt.version)
            self.on_swap()
        return self._report(
            "accepted", result.reason, served, self.scorer.served, interactions, len(rows),
            result.metrics, t0,
        )  # fmt: skip

    def _report(
        self,
        outcome: str,
        reason: str,
        old: ServedModel,
        new: ServedModel,
        interactions: int,
        comparisons: int,
        metrics: dict[str, Any],
        t0: float,
    ) -> RoundReport:
        report = RoundReport(
            outcome=outcome,
            reason=reason,
            old_version=old.version,
            new_version=new.version,
            interactions=interactions,
            comparisons=comparisons,
            metrics=metrics,
            duration_s=time.perf_counter() - t0,
        )
        self.rounds = [*self.rounds[-99:], report]
        self.metrics.fine_tune_rounds.labels(outcome).inc()
        log.info(
            "fine-tuning round",
            outcome=outcome,
            reason=reason,
            old_version=old.version,
            new_version=new.version,
            comparisons=comparisons,
            duration_s=round(report.duration_s, 2),
            **{k: v for k, v in metrics.items() if isinstance(v, int | float)},
        )
        return report

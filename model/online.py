"""Online fine-tuning: a served network learns from recently recorded comparisons.

One fine-tuning round (:func:`fine_tune`) takes the most recent recorded comparisons (a
replay window that contains the new ones, so the network is not pulled towards the last few
users only) and holds back the sessions whose hashed names fall below ``holdout_fraction``
(the same sessions in every round, so none of them was trained on by an earlier round). It
fine-tunes a *copy* of the served network on the rest with the training episodes of
:func:`model.training.train_prepared` (history sessions in the graph, other sessions as
Bradley–Terry targets; :class:`FineTuneConfig`'s learning rate, a step cap and a wall-clock
budget), then scores
the held-back pairs with the old and the new weights, each given the same user histories (the
users' fit comparisons). The update is accepted only when the held-back Bradley–Terry
log-loss improves by more than ``min_improvement``; otherwise (or when training fails) the
old weights stay.

This module knows nothing about stores or servers; ``server/learning.py`` drives it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from model.data import FloatArray, IntArray, PreparedData
from model.metrics import pairwise_accuracy
from model.network import GMTRouterNetwork
from model.training import StopFlag, TrainConfig, cap_history, score_pairs, train_prepared


class FineTuneConfig(BaseModel):
    """Hyper-parameters of one fine-tuning round."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: int = Field(60, ge=1, description="optimizer steps at most")
    lr: float = Field(5e-4, gt=0, description="Adam learning rate")
    users_per_step: int = Field(16, ge=1)
    max_history: int = Field(128, ge=0, description="history comparisons per user at most")
    max_targets: int = Field(32, ge=1, description="target comparisons per user per step")
    holdout_fraction: float = Field(
        0.2, gt=0, lt=1, description="share of each user's sessions held back for acceptance"
    )
    min_improvement: float = Field(
        0.0, description="accept only if held-back log-loss drops by more than this (nats)"
    )
    tie_weight: float = Field(0.5, ge=0)


@dataclasses.dataclass
class FineTuneResult:
    """Outcome of one round.

    Attributes:
        network: The fine-tuned network (eval mode) when ``accepted``, else the input network.
        accepted: True when the new weights beat the old on the held-back slice.
        reason: One line saying why (for logs and metrics).
        metrics: ``base_loss``/``new_loss`` (held-back BT log-loss, nats), ``base_accuracy``/
            ``new_accuracy`` (non-tied pairwise accuracy), ``n_fit``, ``n_holdout``,
            ``steps_run``, ``train_time_s`` (seconds).
    """

    network: GMTRouterNetwork
    accepted: bool
    reason: str
    metrics: dict[str, Any]


def prepare_comparisons(
    *,
    user_ids: Sequence[str],
    session_ids: Sequence[str],
    turn_index: IntArray,
    query_embedding: FloatArray,
    model_a: Sequence[str],
    model_b: Sequence[str],
    outcome_a: FloatArray,
    models: Sequence[str],
    llm_x: FloatArray,
) -> PreparedData:
    """Index ``N`` recorded comparisons for training (one query node per comparison).

    Args:
        user_ids, session_ids: ``N`` names each.
        turn_index: int64 ``[N]`` turn position inside the session.
        query_embedding: float32 ``[N, D]``.
        model_a, model_b: ``N`` model names each (every name must be in ``models``).
        outcome_a: float32 ``[N]``: 1 (``a`` won), 0 (``b`` won) or 0.5 (tie).
        models: ``M`` model names, the row order of ``llm_x``.
        llm_x: float32 ``[M, D_llm]`` LLM node features.

    Raises:
        ValueError: lengths differ or a model has no feature row.
    """
    n = len(user_ids)
    if not (
        len(session_ids) == len(model_a) == len(model_b) == n
        and turn_index.shape == (n,)
        and outcome_a.shape == (n,)
        and query_embedding.shape[0] == n
    ):
        raise ValueError(f"comparison arrays must all have length {n}")
    if llm_x.shape[0] != len(models):
        raise ValueError(f"llm_x has {llm_x.shape[0]} rows for {len(models)} models")
    m_ix = {m: i for i, m in enumerate(models)}
    unknown = sorted({m for m in (*model_a, *model_b) if m not in m_ix})
    if unknown:
        raise ValueError(f"models without features: {unknown}")
    users = sorted(set(user_ids))
    u_ix = {u: i for i, u in enumerate(users)}
    s_ix: dict[tuple[str, str], int] = {}
    for u, s in zip(user_ids, session_ids, strict=True):
        s_ix.setdefault((u, s), len(s_ix))
    return PreparedData(
        users=users,
        models=list(models),
        query_ids=[f"q{i}" for i in range(n)],
        query_emb=np.ascontiguousarray(query_embedding, dtype=np.float32),
        llm_x=np.ascontiguousarray(llm_x, dtype=np.float32),
        user=np.array([u_ix[u] for u in user_ids], dtype=np.int64),
        session=np.array(
            [s_ix[(u, s)] for u, s in zip(user_ids, session_ids, strict=True)], dtype=np.int64
        ),
        turn=np.asarray(turn_index, dtype=np.int64),
        query=np.arange(n, dtype=np.int64),
        a=np.array([m_ix[m] for m in model_a], dtype=np.int64),
        b=np.array([m_ix[m] for m in model_b], dtype=np.int64),
        y=np.asarray(outcome_a, dtype=np.float32),
        session_names=[s for (_, s) in s_ix],
    )


def training_sessions(session_ids: Sequence[str], interaction_ids: Sequence[str]) -> list[str]:
    """The session name each recorded comparison is trained under.

    A comparison recorded without a conversation id (``session_id`` "", which RecordResponse
    accepts) is a session of its own, named after its interaction id: otherwise all of a
    user's sessionless feedback would be one session, no user would have the two sessions a
    round needs (history and targets come from different sessions, method notes), and
    :func:`held_back_split` would hold back whole users. The name is stable across rounds,
    so a comparison held back in one round is held back in every round.

    Raises:
        ValueError: the two lists differ in length.
    """
    if len(session_ids) != len(interaction_ids):
        raise ValueError(
            f"{len(session_ids)} session ids for {len(interaction_ids)} interaction ids"
        )
    return [s or f"\x00{i}" for s, i in zip(session_ids, interaction_ids, strict=True)]


def held_back_split(prep: PreparedData, fraction: float) -> tuple[IntArray, IntArray]:
    """``(fit, held)`` comparison indices: a session is held back when a hash of its
    ``(user, session)`` names falls below ``fraction``.

    Deterministic, so a session held back in one round is held back in every round and was
    never trained on by an earlier round: the acceptance test stays honest across rounds.
    """
    held_sessions = {
        code
        for code, name in enumerate(prep.session_names)
        if _unit_hash(f"{prep.users[_session_user(prep, code)]}\x00{name}") < fraction
    }
    mask = np.array([int(s) in held_sessions for s in prep.session], dtype=bool)
    idx = np.arange(prep.n, dtype=np.int64)
    return idx[~mask], idx[mask]


def _session_user(prep: PreparedData, code: int) -> int:
    return int(prep.user[int(np.flatnonzero(prep.session == code)[0])])


def _unit_hash(key: str) -> float:
    """A stable number in [0, 1) from ``key`` (sha256)."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _log_loss(diff: np.ndarray, y: np.ndarray, tie_weight: float) -> float:
    """Weighted Bradley–Terry log-loss (nats) of logit differences ``diff`` for outcomes ``y``."""
    d = torch.from_numpy(diff.astype(np.float32))
    t = torch.from_numpy(y.astype(np.float32))
    w = torch.where(t == 0.5, torch.full_like(t, tie_weight), torch.ones_like(t))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(d, t, reduction="none") * w
    return float(loss.sum() / w.sum().clamp_min(1e-6))


def fine_tune(
    network: GMTRouterNetwork,
    prep: PreparedData,
    config: FineTuneConfig,
    *,
    seed: int,
    time_budget_s: float,
    stop: StopFlag | None = None,
) -> FineTuneResult:
    """One fine-tuning round on ``prep``; see the module docstring.

    Args:
        network: The served network; never modified (a copy is trained).
        prep: Recent comparisons (:func:`prepare_comparisons`).
        config: Hyper-parameters.
        seed: Seed of the held-back split and of training.
        time_budget_s: Wall-clock budget of the training part (seconds); scoring the held-back
            slice comes on top (two eval passes).
        stop: When set (server shutdown), training ends after the current step and the round
            is rejected.

    Returns:
        :class:`FineTuneResult`. Not enough data (no held-back pair, or no user with two
        sessions left to train on) is a rejected round, not an error.
    """
    t0 = time.perf_counter()
    fit, held = held_back_split(prep, config.holdout_fraction)
    metrics: dict[str, Any] = {"n_fit": len(fit), "n_holdout": len(held)}
    decided = held[prep.y[held] != 0.5] if len(held) else held
    if len(decided) == 0:
        return FineTuneResult(network, False, "no decided held-back pair", metrics)
    sessions_per_user: dict[int, set[int]] = {}
    for i in fit:
        sessions_per_user.setdefault(int(prep.user[i]), set()).add(int(prep.session[i]))
    if not any(len(s) >= 2 for s in sessions_per_user.values()):
        return FineTuneResult(network, False, "no user with two sessions to train on", metrics)
    hist_rng = np.random.default_rng(seed + 1)
    by_user: dict[int, list[int]] = {}
    for i in fit:
        by_user.setdefault(int(prep.user[i]), []).append(int(i))
    history = {
        u: cap_history(np.array(v, dtype=np.int64), config.max_history, hist_rng)
        for u, v in by_user.items()
    }
    base_diff = score_pairs(network, prep, held, history)
    train_cfg = TrainConfig(
        network=network.config,
        steps=config.steps,
        lr=config.lr,
        users_per_step=config.users_per_step,
        max_history=config.max_history,
        max_targets=config.max_targets,
        empty_history_prob=0.1,
        tie_weight=config.tie_weight,
        val_fraction=0.0,
        ema_decay=0.0,  # a round is short: keep its own last weights (acceptance judges them)
    )
    res = train_prepared(
        prep,
        fit,
        train_cfg,
        seed=seed,
        init=network,
        time_budget_s=time_budget_s,
        desc="fine-tune gmtrouter",
        stop=stop,
    )
    if stop is not None and stop.is_set():
        return FineTuneResult(network, False, "stopped (shutdown)", metrics)
    new_diff = score_pairs(res.network, prep, held, history)
    y = prep.y[held]
    base_loss = _log_loss(base_diff, y, config.tie_weight)
    new_loss = _log_loss(new_diff, y, config.tie_weight)
    metrics.update(
        base_loss=base_loss,
        new_loss=new_loss,
        base_accuracy=pairwise_accuracy(base_diff, y),
        new_accuracy=pairwise_accuracy(new_diff, y),
        steps_run=res.metrics["steps_run"],
        train_time_s=time.perf_counter() - t0,
    )
    if not np.isfinite(new_loss):
        return FineTuneResult(network, False, "fine-tuned loss is not finite", metrics)
    if new_loss < base_loss - config.min_improvement:
        reason = f"held-back log-loss {base_loss:.4f} -> {new_loss:.4f}"
        return FineTuneResult(res.network, True, reason, metrics)
    reason = (
        f"held-back log-loss {base_loss:.4f} -> {new_loss:.4f} does not improve by more "
        f"than {config.min_improvement} (after {res.metrics['steps_run']} of {config.steps} "
        f"steps, {metrics['train_time_s']:.1f} s)"
    )
    return FineTuneResult(network, False, reason, metrics)

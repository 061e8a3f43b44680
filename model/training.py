"""Episode training of :class:`~model.network.GMTRouterNetwork` with a Bradley–Terry loss.

Each step samples ``users_per_step`` users. For each, their (training) sessions are shuffled
and split: a random number of sessions (0 with probability ``empty_history_prob``, so the
cold-start / no-history path is trained too) forms the visible history graph, and up to
``max_targets`` comparisons of the *other* sessions are the targets. Targets are never in the
graph. Loss: ``BCEWithLogits(s_a − s_b, y)`` with ``y`` = 1 / 0, and ties as soft 0.5 targets
weighted ``tie_weight`` (0 skips ties). Validation AUC on a held-out slice of the training
part picks the best step (early stopping); no test data is used. With ``ema_decay`` > 0 (the
default) a moving average of the weights is what validation scores and what is returned.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from tqdm import tqdm

from model.data import Encoder, IntArray, PreparedData, build_batch_graph, prepare, split_by_session
from model.datasets.records import PreferenceRecord
from model.metrics import roc_auc
from model.network import GMTRouterNetwork, NetworkConfig


class StopFlag(Protocol):
    """Anything with ``is_set()``: a :class:`threading.Event` or a multiprocessing ``Event``."""

    def is_set(self) -> bool:
        """True once training should stop."""
        ...


class TrainConfig(BaseModel):
    """Training hyper-parameters (official: Adam 5e-4, 350 steps, 10 history pairs).

    ``ema_decay`` (not in the paper): validation and the returned network use an exponential
    moving average of the weights (``torch.optim.swa_utils.AveragedModel``) instead of the raw
    weights of one step. The decay after ``n`` updates is ``min(ema_decay, (1 + n) / (10 +
    n))``: the averaged weights are on average about ``n / 10`` steps old (≈ 30 at the default
    300 steps, where the decay ends at 0.971), and the cap 0.99 only binds after 890 steps.
    In offline simulations of the replay (:mod:`server.replay_simulation`) it made the result
    far less dependent on the training seed: MT-Bench 0.767–0.806 without it, 0.802–0.809
    with it (seeds 136–138); LLMFAO 0.7455 / 0.7302 without, 0.7406 / 0.7445 with (seeds 136 /
    137). README → Results has the replays.

    Defaults: 128 history comparisons per user (the server samples the newest ``fan_out[0]``
    = 256 turns, i.e. 128 comparisons when every interaction is a comparison), Adam at the
    official 5e-4, validation every 10 steps. They were chosen among a handful of settings by
    replaying the held-out users of LLMFAO and MT-Bench (README → Results says so; the replay
    numbers are therefore not from untouched users).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    network: NetworkConfig = Field(default_factory=lambda: NetworkConfig())
    steps: int = Field(300, ge=1, description="optimizer steps")
    lr: float = Field(5e-4, gt=0, description="Adam learning rate")
    weight_decay: float = Field(1e-5, ge=0)
    users_per_step: int = Field(16, ge=1)
    max_history: int = Field(128, ge=0, description="history comparisons per user at most")
    max_targets: int = Field(32, ge=1, description="target comparisons per user per step")
    empty_history_prob: float = Field(0.15, ge=0, le=1)
    tie_weight: float = Field(0.5, ge=0, description="loss weight of ties (soft 0.5 target)")
    val_fraction: float = Field(0.15, ge=0, lt=1, description="sessions per user for validation")
    eval_every: int = Field(10, ge=1, description="validate every this many steps")
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(
        0.99,
        ge=0,
        lt=1,
        description="cap of the decay of the moving average of the weights that is validated "
        "and returned; the decay ramps up as (1 + n) / (10 + n) (0 = the raw weights)",
    )


@dataclasses.dataclass
class TrainResult:
    """Network and training metrics (``best_step``, ``best_val_auc``, ``train_time_s`` ...)."""

    network: GMTRouterNetwork
    metrics: dict[str, Any]


def _by_user_sessions(prep: PreparedData, idx: IntArray) -> dict[int, dict[int, IntArray]]:
    out: dict[int, dict[int, list[int]]] = {}
    for i in idx:
        out.setdefault(int(prep.user[i]), {}).setdefault(int(prep.session[i]), []).append(int(i))
    return {u: {s: np.array(v, dtype=np.int64) for s, v in d.items()} for u, d in out.items()}


def _ema_with_warmup(decay: float) -> Callable[[Tensor, Tensor, Tensor | int], Tensor]:
    """``AveragedModel`` update with the decay ramped up: ``min(decay, (1 + n) / (10 + n))``
    after ``n`` updates, so a short training run is not averaged with its first steps."""

    def update(averaged: Tensor, current: Tensor, num_averaged: Tensor | int) -> Tensor:
        n = int(num_averaged)
        d = min(decay, (1 + n) / (10 + n))
        return averaged + (current - averaged) * (1.0 - d)

    return update


def cap_history(hist: IntArray, cap: int, rng: np.random.Generator) -> IntArray:
    """A random subset of at most ``cap`` history comparisons (all if fewer), sorted."""
    if len(hist) <= cap:
        return hist
    return np.sort(rng.choice(hist, size=cap, replace=False))


@torch.no_grad()
def score_pairs(
    network: GMTRouterNetwork,
    prep: PreparedData,
    targets: IntArray,
    history: dict[int, IntArray],
    *,
    users_per_batch: int = 32,
) -> np.ndarray:
    """Score comparisons ``targets`` given each user's history (eval mode, no grad).

    Args:
        network: The network (switched to eval mode).
        prep: Prepared data.
        targets: int64 ``[N]`` comparison indices to score.
        history: user index → int64 history comparison indices (missing = no history).
        users_per_batch: users per graph.

    Returns:
        float64 ``[N]``: s(a) − s(b), aligned with ``targets``.
    """
    network.eval()
    out = np.zeros(len(targets), dtype=np.float64)
    users = np.unique(prep.user[targets])
    m = len(prep.models)
    for start in range(0, len(users), users_per_batch):
        chunk = users[start : start + users_per_batch]
        hists = [history.get(int(u), np.zeros(0, dtype=np.int64)) for u in chunk]
        graph = build_batch_graph(prep, hists, reverse_edges=network.config.reverse_edges)
        user_h, llm_h = network.encode(graph)
        pos = {int(u): k for k, u in enumerate(chunk)}
        sel = np.nonzero(np.isin(prep.user[targets], chunk))[0]
        t = targets[sel]
        k = torch.tensor([pos[int(u)] for u in prep.user[t]], dtype=torch.long)
        cand = torch.stack(
            [k * m + torch.from_numpy(prep.a[t]), k * m + torch.from_numpy(prep.b[t])], 1
        )
        s = network.score(user_h[k], torch.from_numpy(prep.query_emb[prep.query[t]]), llm_h[cand])
        out[sel] = (s[:, 0] - s[:, 1]).double().numpy()
    return out


def train_prepared(
    prep: PreparedData,
    train_idx: IntArray,
    config: TrainConfig,
    *,
    seed: int,
    progress: bool = False,
    desc: str = "train gmtrouter",
    init: GMTRouterNetwork | None = None,
    time_budget_s: float | None = None,
    stop: StopFlag | None = None,
) -> TrainResult:
    """Train on comparisons ``train_idx`` of ``prep`` (a validation slice is carved inside).

    Args:
        prep: Prepared data.
        train_idx: int64 comparison indices to train on.
        config: Hyper-parameters (``config.network`` is ignored when ``init`` is given).
        seed: RNG seed (sampling and initialisation).
        progress: Show a progress bar.
        desc: Its label.
        init: Start from a copy of these weights (fine-tuning); ``init`` itself is untouched.
        time_budget_s: Stop after the first step that ends past this many seconds (wall
            clock); ``metrics["stopped_early"]`` tells whether it did.
        stop: Stop before the next step once this event is set (also ``stopped_early``).

    Returns:
        :class:`TrainResult`, the network in eval mode: without ``config.ema_decay``, the raw
        weights of the best validation step (of the last step without validation); with it,
        the weight average as it was at that step (after the last step without validation).

    Raises:
        ValueError: no user has two or more sessions among ``train_idx``.
    """
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    d, dl = prep.query_emb.shape[1], prep.llm_x.shape[1]
    if init is not None:
        net = copy.deepcopy(init)
        cfg = net.config
        if cfg.embedding_dim != d or cfg.llm_feature_dim != dl:
            raise ValueError(
                f"init network expects features [{cfg.embedding_dim}], [{cfg.llm_feature_dim}] "
                f"but the data has [{d}], [{dl}]"
            )
    else:
        cfg = config.network
        if cfg.embedding_dim != d or cfg.llm_feature_dim != dl:
            cfg = cfg.model_copy(update={"embedding_dim": d, "llm_feature_dim": dl})
        net = GMTRouterNetwork(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    ema = (
        torch.optim.swa_utils.AveragedModel(net, avg_fn=_ema_with_warmup(config.ema_decay))
        if config.ema_decay > 0
        else None
    )
    averaged = cast(GMTRouterNetwork, ema.module) if ema is not None else None
    if config.val_fraction > 0:
        fit_idx, val_idx = split_by_session(prep, train_idx, config.val_fraction, rng)
    else:
        fit_idx, val_idx = train_idx, np.zeros(0, dtype=np.int64)
    sessions = _by_user_sessions(prep, fit_idx)
    user_list = np.array([u for u, s in sessions.items() if len(s) >= 2], dtype=np.int64)
    if len(user_list) == 0:
        raise ValueError("training needs at least one user with two or more sessions")
    val_hist_rng = np.random.default_rng(seed + 1)
    val_history = {
        u: cap_history(np.concatenate(list(s.values())), config.max_history, val_hist_rng)
        for u, s in sessions.items()
    }
    m = len(prep.models)
    best_auc, best_step, best_state = -1.0, 0, copy.deepcopy(net.state_dict())
    losses: list[float] = []
    history_log: list[tuple[int, float]] = []
    bar = tqdm(range(1, config.steps + 1), desc=desc, disable=not progress, leave=False)
    steps_run = 0
    stopped_early = False
    for step in bar:
        out_of_time = time_budget_s is not None and time.perf_counter() - t0 > time_budget_s
        if out_of_time or (stop is not None and stop.is_set()):
            stopped_early = True
            break
        steps_run = step
        net.train()
        chosen = rng.choice(
            user_list, size=min(config.users_per_step, len(user_list)), replace=False
        )
        hists: list[IntArray] = []
        t_user: list[np.ndarray] = []
        t_idx: list[np.ndarray] = []
        for k, u in enumerate(chosen):
            sess = list(sessions[int(u)].values())
            order = rng.permutation(len(sess))
            if rng.random() < config.empty_history_prob:
                n_hist = 0
            else:
                n_hist = int(rng.integers(1, len(sess)))
            hist = (
                np.concatenate([sess[j] for j in order[:n_hist]])
                if n_hist
                else np.zeros(0, dtype=np.int64)
            )
            tgt = np.concatenate([sess[j] for j in order[n_hist:]])
            if len(tgt) > config.max_targets:
                tgt = rng.choice(tgt, size=config.max_targets, replace=False)
            hists.append(cap_history(hist, config.max_history, rng))
            t_idx.append(tgt)
            t_user.append(np.full(len(tgt), k, dtype=np.int64))
        tg = np.concatenate(t_idx)
        ku = torch.from_numpy(np.concatenate(t_user))
        graph = build_batch_graph(prep, hists, reverse_edges=cfg.reverse_edges)
        user_h, llm_h = net.encode(graph)
        cand = torch.stack(
            [ku * m + torch.from_numpy(prep.a[tg]), ku * m + torch.from_numpy(prep.b[tg])], 1
        )
        s = net.score(user_h[ku], torch.from_numpy(prep.query_emb[prep.query[tg]]), llm_h[cand])
        diff = s[:, 0] - s[:, 1]
        y = torch.from_numpy(prep.y[tg])
        w = torch.where(y == 0.5, torch.full_like(y, config.tie_weight), torch.ones_like(y))
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(diff, y, reduction="none") * w
        ).sum() / w.sum().clamp_min(1e-6)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call,unused-ignore]
        torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        opt.step()
        if ema is not None:
            ema.update_parameters(net)
        losses.append(float(loss.detach()))
        if len(val_idx) and (step % config.eval_every == 0 or step == config.steps):
            judged = net if averaged is None else averaged
            val = score_pairs(judged, prep, val_idx, val_history)
            auc = roc_auc(val, prep.y[val_idx])
            history_log.append((step, auc))
            if auc > best_auc:
                best_auc, best_step, best_state = auc, step, copy.deepcopy(judged.state_dict())
            bar.set_postfix(
                loss=f"{np.mean(losses[-config.eval_every :]):.3f}", val_auc=f"{auc:.3f}"
            )
    if len(val_idx) and best_auc >= 0:
        net.load_state_dict(best_state)
    else:
        best_step = steps_run
        if averaged is not None:
            net.load_state_dict(averaged.state_dict())
    net.eval()
    return TrainResult(
        network=net,
        metrics={
            "best_step": best_step,
            "best_val_auc": best_auc if len(val_idx) else None,
            "final_loss": float(np.mean(losses[-20:])) if losses else float("nan"),
            "val_curve": history_log,
            "train_time_s": time.perf_counter() - t0,
            "n_train": len(fit_idx),
            "n_val": len(val_idx),
            "steps_run": steps_run,
            "stopped_early": stopped_early,
        },
    )


def train(
    records: Sequence[PreferenceRecord],
    config: TrainConfig,
    *,
    encoder: Encoder,
    seed: int = 136,
    progress: bool = False,
) -> tuple[GMTRouterNetwork, dict[str, Any]]:
    """Train a network on all ``records`` (a validation slice is held out for early stopping).

    Returns:
        ``(network, metrics)``; ``metrics`` also holds ``models`` and ``llm_x`` (the LLM
        features used, float32 ``[M, D_llm]`` tensor) for :func:`model.checkpoint.save_checkpoint`.
    """
    prep = prepare(records, encoder)
    res = train_prepared(
        prep, np.arange(prep.n, dtype=np.int64), config, seed=seed, progress=progress
    )
    metrics = dict(res.metrics)
    metrics["models"] = list(prep.models)
    metrics["llm_x"] = torch.from_numpy(prep.llm_x)
    return res.network, metrics

"""Offline simulation of ``gmtrouter replay`` with frozen weights (a development tool).

It trains the network on the users outside the held-out half (``holdout_users(..., 0.5,
split_seed)``), then walks the held-out users' comparisons in the replay's order
(:func:`server.replay.replay_order`, shuffle seed 0 as the replay's default) and scores
each non-tied one with :func:`model.training.score_pairs`, giving the network the same
user's earlier comparisons of the stream as history (the newest ``history_cap``, like the
sampler's ``fan_out[0]`` = 256 turns = 128 comparisons), and combines it as the service
does (``scoring``: by default the Bradley–Terry prior plus half the network's
personalization residual, ``server/personalization.py``) with the per-query evidence
(``server/query_evidence.py``) from every earlier comparison, the kept users' included (the
replay records those first), and with the per-user evidence (``server/user_evidence.py``)
from the user's earlier comparisons of the stream. No server, no store, no gRPC: a
run takes minutes instead of a full replay, and on LLMFAO and MT-Bench it reproduced the
live replay's ``gmtrouter`` accuracy to four decimals. It does not replace the replay
(README numbers come from the replay); it is how training settings were compared over
several seeds.

Usage::

    .venv/bin/python -m server.replay_simulation --dataset mt_bench \\
        --data-path ../shared/data/mt_bench_human_judgments_full --seed 137 [--ema-decay 0]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from graphstore.interactions import query_key
from model.bradley_terry import per_query_strengths, user_deviation
from model.data import Encoder, prepare
from model.datasets import DATASETS, PreferenceRecord, load_dataset
from model.datasets.splits import holdout_users
from model.text_encoder import TextEncoder
from model.training import TrainConfig, score_pairs, train_prepared
from server.config import QueryEvidenceSettings, ScoringSettings, UserEvidenceSettings
from server.replay import OnlineBradleyTerry, ReplayTally, outcome_wins, replay_order


def simulate_replay(
    records: Sequence[PreferenceRecord],
    encoder: Encoder,
    config: TrainConfig,
    *,
    seed: int = 136,
    split_seed: int = 0,
    holdout_fraction: float = 0.5,
    history_cap: int = 128,
    query_evidence: bool = True,
    scoring: ScoringSettings | None = None,
    user_evidence: UserEvidenceSettings | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Train on the kept users, replay the held-out ones offline.

    Args:
        records: The data set.
        encoder: Query/LLM text encoder.
        config: Training hyper-parameters.
        seed: Training seed.
        split_seed, holdout_fraction: The user split (as ``gmtrouter replay``).
        history_cap: Most recent earlier comparisons of the user given as history.
        query_evidence: Add the service's per-query evidence (``server/query_evidence.py``,
            default settings but without its ``max_comparisons`` cap) to the network's score,
            as the service does; False = none.
        scoring: How the network's output becomes the score, as the service's ``scoring``
            section (None = its defaults: the prior plus 0.5 × the network's personalization
            residual, ``server/personalization.py``).
        user_evidence: The service's ``user_evidence`` section (None = its defaults; with
            ``enabled`` false none is added), applied to the user's earlier comparisons of
            the stream.
        progress: Progress bars for training and for the replayed stream (stderr).

    Returns:
        ``online_accuracy`` (non-tied, a zero score difference counts half), ``n_pairs``,
        ``curve``, ``trend``, ``trend_vs_global_bt`` and ``trend_vs_per_query_bt`` as in the
        replay's JSON (:class:`server.replay.ReplayTally`),
        ``network_only_accuracy`` (the network's logits alone: ``scoring.combine`` network
        and no per-query evidence), ``best_step``,
        ``train_s`` (seconds).

    Raises:
        ValueError: no held-out or no training user (``holdout_fraction`` too small or large),
            or no training user with two sessions (:func:`model.training.train_prepared`).
    """
    held = holdout_users({r.user_id for r in records}, holdout_fraction, split_seed)
    train_recs = [r for r in records if r.user_id not in held]
    if not held or not train_recs:
        raise ValueError(f"holdout_fraction {holdout_fraction} leaves no held-out/training user")
    # Trained on its own preparation of the kept users, as ``gmtrouter train
    # --holdout-fraction`` does (same models, same node counts, same random draws).
    train_prep = prepare(train_recs, encoder)
    t0 = time.perf_counter()
    res = train_prepared(
        train_prep, np.arange(train_prep.n, dtype=np.int64), config, seed=seed, progress=progress
    )
    train_s = time.perf_counter() - t0
    position = {id(r): i for i, r in enumerate(records)}
    prep = prepare(records, encoder)
    stream_records = replay_order([r for r in records if r.user_id in held], 0)
    stream = [position[id(r)] for r in stream_records]
    # The service's per-query evidence (server/query_evidence.py, default settings) on the
    # same stream: warm-started with the kept users' comparisons (the replay records them
    # first), learning after each scored comparison.
    bt = OnlineBradleyTerry()
    for r in train_recs:
        bt.update(
            r.user_id, r.model_a, r.model_b, r.outcome, query=query_key(r.query_text), refit=False
        )
    bt.refit()
    weight = QueryEvidenceSettings().weight
    scoring = scoring or ScoringSettings()
    user_settings = user_evidence or UserEvidenceSettings()
    # the user's earlier comparisons of the stream, newest last: their (winner, loser,
    # weight) triples and query key
    user_wins: dict[str, list[tuple[list[tuple[str, str, float]], str]]] = {}
    seen: dict[int, list[int]] = {}
    tally = ReplayTally()
    network_only = ReplayTally()
    global_bt = ReplayTally()
    per_query_bt = ReplayTally()
    pairs = tqdm(
        zip(stream, stream_records, strict=True),
        total=len(stream),
        desc="simulate replay",
        disable=not progress,
    )
    for i, record in pairs:
        user = int(prep.user[i])
        earlier = seen.setdefault(user, [])
        qkey = query_key(record.query_text)
        if record.outcome != "tie":
            history = np.array(earlier[-history_cap:] if history_cap else [], dtype=np.int64)
            target = np.array([i], dtype=np.int64)
            diff = float(score_pairs(res.network, prep, target, {user: history})[0])
            base = bt.predict(record.user_id, record.model_a, record.model_b, qkey)
            evidence = weight * (base.per_query_bt - base.global_bt) if query_evidence else 0.0
            if scoring.combine == "network":
                score = diff
            elif earlier:  # personalized from the first recorded turn (min_history 1)
                cold = float(score_pairs(res.network, prep, target, {})[0])
                score = base.global_bt + scoring.residual_weight * (diff - cold)
            else:
                score = base.global_bt
            if user_settings.enabled and user_wins.get(record.user_id):
                score += _user_shift(
                    user_wins[record.user_id], qkey, record, bt, user_settings, query_evidence
                )
            n_before = len(earlier)
            tally.add(score + evidence, record.outcome, n_before, record.user_id)
            network_only.add(diff, record.outcome, n_before, record.user_id)
            global_bt.add(base.global_bt, record.outcome, n_before, record.user_id)
            per_query_bt.add(base.per_query_bt, record.outcome, n_before, record.user_id)
        bt.update(record.user_id, record.model_a, record.model_b, record.outcome, query=qkey)
        user_wins.setdefault(record.user_id, []).append(
            (outcome_wins(record.model_a, record.model_b, record.outcome), qkey)
        )
        earlier.append(i)
    summary = tally.summary()
    return {
        "online_accuracy": summary["online_accuracy"],
        "network_only_accuracy": network_only.summary()["online_accuracy"],
        "n_pairs": summary["n_pairs"],
        "curve": summary["curve"],
        "trend": summary["trend"],
        "trend_vs_global_bt": tally.trend(global_bt),
        "trend_vs_per_query_bt": tally.trend(per_query_bt),
        "best_step": res.metrics["best_step"],
        "train_s": train_s,
    }


def _user_shift(
    history: list[tuple[list[tuple[str, str, float]], str]],
    qkey: str,
    record: PreferenceRecord,
    bt: OnlineBradleyTerry,
    settings: UserEvidenceSettings,
    query_evidence: bool,
) -> float:
    """The per-user evidence's shift of ``score(a) − score(b)``, as ``server/user_evidence.py``
    computes it from the user's ``settings.max_comparisons`` most recent comparisons (centred
    on the query's strengths when the per-query evidence is on, else on the global ones; the
    ``sampler.min_history`` gate is not modelled: at its default, 1, it never holds back a
    user with a comparison)."""
    recent = history[-settings.max_comparisons :]
    same = [t for wins, key in recent if qkey and key == qkey for t in wins]
    a, b = record.model_a, record.model_b
    centre = (
        per_query_strengths(
            bt.query_games.get(qkey, []),
            bt.theta,
            (a, b),
            prior_strength=QueryEvidenceSettings().prior_strength,
        )
        if same and query_evidence
        else bt.theta
    )
    dev = user_deviation(
        [t for wins, _ in recent for t in wins],
        same,
        bt.theta,
        centre,
        (a, b),
        user_prior_strength=settings.user_prior_strength,
        user_weight=settings.user_weight,
        query_prior_strength=settings.query_prior_strength,
    )
    return dev[a] - dev[b]


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (see the module docstring); prints one JSON object."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--dataset", choices=DATASETS, required=True)
    ap.add_argument("--data-path", required=True)
    ap.add_argument("--seed", type=int, default=136)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--ema-decay", type=float, default=TrainConfig().ema_decay)
    ap.add_argument("--history-cap", type=int, default=128)
    ap.add_argument("--no-query-evidence", action="store_true", help="no per-query evidence")
    ap.add_argument("--combine", choices=("residual", "network"), default="residual")
    ap.add_argument("--residual-weight", type=float, default=ScoringSettings().residual_weight)
    ap.add_argument("--no-user-evidence", action="store_true", help="no per-user evidence")
    ap.add_argument("--user-weight", type=float, default=UserEvidenceSettings().user_weight)
    ap.add_argument(
        "--user-query-prior-strength",
        type=float,
        default=UserEvidenceSettings().query_prior_strength,
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = simulate_replay(
        load_dataset(args.dataset, args.data_path),
        TextEncoder(),
        TrainConfig(ema_decay=args.ema_decay),
        seed=args.seed,
        split_seed=args.split_seed,
        history_cap=args.history_cap,
        query_evidence=not args.no_query_evidence,
        scoring=ScoringSettings(combine=args.combine, residual_weight=args.residual_weight),
        user_evidence=UserEvidenceSettings(
            enabled=not args.no_user_evidence,
            user_weight=args.user_weight,
            query_prior_strength=args.user_query_prior_strength,
        ),
        progress=True,
    )
    print(json.dumps({"dataset": args.dataset, "seed": args.seed, **out}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

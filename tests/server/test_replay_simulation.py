"""The offline replay simulation scores exactly the held-out users' non-tied comparisons."""

from __future__ import annotations

import torch

from model.datasets.splits import holdout_users
from model.synthetic import HashEncoder, planted_preferences
from model.training import TrainConfig
from server.config import ScoringSettings, UserEvidenceSettings
from server.replay import CURVE_EDGES
from server.replay_simulation import simulate_replay


def test_simulation_scores_the_held_out_non_tied_pairs_with_their_history() -> None:
    torch.set_num_threads(1)
    records = planted_preferences(num_users=40, sessions_per_user=20, seed=2)
    held = holdout_users({r.user_id for r in records}, 0.5, 0)
    expected = sum(1 for r in records if r.user_id in held and r.outcome != "tie")
    cfg = TrainConfig(steps=60, eval_every=20, lr=2e-3)
    with_history = simulate_replay(records, HashEncoder(dim=16), cfg, seed=0)
    without = simulate_replay(records, HashEncoder(dim=16), cfg, seed=0, history_cap=0)
    assert with_history["n_pairs"] == without["n_pairs"] == expected > 0
    assert len(with_history["curve"]) == len(CURVE_EDGES)
    assert with_history["curve"][0]["accuracy"] is not None  # every user's first comparison
    # The planted preferences are per user: history is what makes them predictable.
    assert with_history["online_accuracy"] > without["online_accuracy"] + 0.1
    assert with_history["network_only_accuracy"] > without["network_only_accuracy"] + 0.1
    # The network's logits without the per-query and per-user evidence: the network alone.
    alone = simulate_replay(
        records,
        HashEncoder(dim=16),
        cfg,
        seed=0,
        query_evidence=False,
        scoring=ScoringSettings(combine="network"),
        user_evidence=UserEvidenceSettings(enabled=False),
    )
    assert alone["online_accuracy"] == alone["network_only_accuracy"]
    assert alone["network_only_accuracy"] == with_history["network_only_accuracy"]

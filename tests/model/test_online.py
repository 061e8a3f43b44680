"""One fine-tuning round (model/online.py): accepted when it helps, discarded otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.data import PreparedData, prepare
from model.network import GMTRouterNetwork, NetworkConfig
from model.online import FineTuneConfig, fine_tune, prepare_comparisons, training_sessions
from model.synthetic import HashEncoder, planted_preferences

DIM = 32


@pytest.fixture(scope="module")
def planted() -> PreparedData:
    records = planted_preferences(num_users=24, sessions_per_user=24, seed=3)
    return prepare(records, HashEncoder(dim=DIM), cache=False)


def untrained() -> GMTRouterNetwork:
    torch.manual_seed(0)
    return GMTRouterNetwork(NetworkConfig(embedding_dim=DIM, llm_feature_dim=DIM)).eval()


def weights(net: GMTRouterNetwork) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_a_round_that_helps_is_accepted_and_leaves_the_input_untouched(
    planted: PreparedData,
) -> None:
    torch.set_num_threads(1)
    net = untrained()
    before = weights(net)
    res = fine_tune(net, planted, FineTuneConfig(steps=40, lr=2e-3), seed=0, time_budget_s=120)
    assert res.accepted, res.reason
    m = res.metrics
    assert m["new_loss"] < m["base_loss"], m
    assert m["new_accuracy"] > 0.7 > m["base_accuracy"] - 0.2, m
    assert m["n_holdout"] > 0 and m["n_fit"] + m["n_holdout"] == planted.n
    assert res.network is not net and not res.network.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k  # the served network was never modified


def test_a_round_that_does_not_improve_enough_is_discarded(planted: PreparedData) -> None:
    net = untrained()
    res = fine_tune(
        net, planted, FineTuneConfig(steps=5, min_improvement=10.0), seed=0, time_budget_s=60
    )
    assert not res.accepted and res.network is net
    assert "does not improve" in res.reason


def test_time_budget_stops_training(planted: PreparedData) -> None:
    net = untrained()
    res = fine_tune(net, planted, FineTuneConfig(steps=10_000), seed=0, time_budget_s=0.5)
    assert res.metrics["steps_run"] < 10_000
    assert res.metrics["train_time_s"] < 60


def test_too_little_data_is_a_rejected_round_not_an_error() -> None:
    prep = prepare_comparisons(
        user_ids=["u"],
        session_ids=["s"],
        turn_index=np.zeros(1, dtype=np.int64),
        query_embedding=np.ones((1, DIM), dtype=np.float32),
        model_a=["A"],
        model_b=["B"],
        outcome_a=np.ones(1, dtype=np.float32),
        models=["A", "B"],
        llm_x=np.ones((2, DIM), dtype=np.float32),
    )
    res = fine_tune(untrained(), prep, FineTuneConfig(), seed=0, time_budget_s=10)
    assert not res.accepted


def test_prepare_comparisons_checks_its_inputs() -> None:
    args = dict(
        user_ids=["u", "u"],
        session_ids=["s1", "s2"],
        turn_index=np.zeros(2, dtype=np.int64),
        query_embedding=np.ones((2, DIM), dtype=np.float32),
        model_a=["A", "C"],
        model_b=["B", "A"],
        outcome_a=np.array([1.0, 0.5], dtype=np.float32),
        models=["A", "B"],
        llm_x=np.ones((2, DIM), dtype=np.float32),
    )
    with pytest.raises(ValueError, match=r"without features: \['C'\]"):
        prepare_comparisons(**args)  # type: ignore[arg-type]
    args["models"], args["llm_x"] = ["A", "B", "C"], np.ones((3, DIM), dtype=np.float32)
    prep = prepare_comparisons(**args)  # type: ignore[arg-type]
    assert prep.n == 2 and prep.session.tolist() == [0, 1] and prep.y.tolist() == [1.0, 0.5]
    args["outcome_a"] = np.ones(3, dtype=np.float32)
    with pytest.raises(ValueError, match="length 2"):
        prepare_comparisons(**args)  # type: ignore[arg-type]


def test_feedback_without_a_session_id_still_trains(planted: PreparedData) -> None:
    """RecordResponse accepts an empty ``session_id`` (the Go client sends one when the
    router knows no conversation id). Each such comparison is then a session of its own; as
    one session per user, no round could ever train."""
    ids = [f"i{k}" for k in range(planted.n)]

    def as_recorded(sessions: list[str]) -> PreparedData:
        return prepare_comparisons(
            user_ids=[planted.users[u] for u in planted.user],
            session_ids=sessions,
            turn_index=np.zeros(planted.n, dtype=np.int64),
            query_embedding=planted.query_emb[planted.query],
            model_a=[planted.models[m] for m in planted.a],
            model_b=[planted.models[m] for m in planted.b],
            outcome_a=planted.y,
            models=planted.models,
            llm_x=planted.llm_x,
        )

    sessionless = [""] * planted.n
    cfg = FineTuneConfig(steps=40, lr=2e-3)
    one_session = fine_tune(untrained(), as_recorded(sessionless), cfg, seed=0, time_budget_s=60)
    assert not one_session.accepted and "two sessions" in one_session.reason
    prep = as_recorded(training_sessions(sessionless, ids))
    res = fine_tune(untrained(), prep, cfg, seed=0, time_budget_s=120)
    assert res.accepted, res.reason
    assert 0 < res.metrics["n_holdout"] < planted.n // 2  # single comparisons, not whole users
    assert training_sessions(["s", ""], ["i1", "i2"]) == ["s", "\x00i2"]
    with pytest.raises(ValueError):
        training_sessions([""], [])

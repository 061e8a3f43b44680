"""Training: the weight average (``TrainConfig.ema_decay``) is what training returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.data import PreparedData, prepare
from model.synthetic import HashEncoder, planted_preferences
from model.training import TrainConfig, train_prepared

STEPS = 12
#: Small enough that the cap binds from the 3rd update on ((1 + n) / (10 + n) > 0.3 for n ≥ 3)
#: while the ramp decides the first ones: both parts of the schedule are exercised.
DECAY = 0.3
Trajectory = list[dict[str, torch.Tensor]]


@pytest.fixture(scope="module")
def small() -> PreparedData:
    torch.set_num_threads(1)
    return prepare(
        planted_preferences(num_users=6, sessions_per_user=5, seed=1),
        HashEncoder(dim=16),
        cache=False,
    )


def _raw_trajectory(prep: PreparedData, val_fraction: float) -> Trajectory:
    """Raw weights after 1..STEPS steps. Training is deterministic per seed and the average
    does not feed back into the optimiser, so the raw weights after k steps are those of a
    k-step run; validating only at the end (``eval_every`` > steps) keeps its last step."""
    out = []
    for k in range(1, STEPS + 1):
        cfg = TrainConfig(
            steps=k, val_fraction=val_fraction, eval_every=1000, ema_decay=0.0, users_per_step=4
        )
        net = train_prepared(prep, np.arange(prep.n, dtype=np.int64), cfg, seed=3).network
        out.append({k: v.detach().clone() for k, v in net.state_dict().items()})
    return out


def _average(trajectory: Trajectory) -> dict[str, torch.Tensor]:
    expected = {k: v.clone() for k, v in trajectory[0].items()}  # the first update copies
    for n, weights in enumerate(trajectory[1:], start=1):
        d = min(DECAY, (1 + n) / (10 + n))
        for k in expected:
            expected[k] += (weights[k] - expected[k]) * (1 - d)
    return expected


def _assert_weights(net: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = net.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_without_validation_the_average_after_the_last_step_is_returned(
    small: PreparedData,
) -> None:
    trajectory = _raw_trajectory(small, val_fraction=0.0)
    cfg = TrainConfig(steps=STEPS, val_fraction=0.0, ema_decay=DECAY, users_per_step=4)
    got = train_prepared(small, np.arange(small.n, dtype=np.int64), cfg, seed=3).network
    assert not got.training
    _assert_weights(got, _average(trajectory))
    last = trajectory[-1]
    state = got.state_dict()
    assert any(not torch.allclose(state[k], last[k]) for k in last), "average == last step"


def test_with_validation_the_average_as_of_the_best_step_is_returned(
    small: PreparedData,
) -> None:
    trajectory = _raw_trajectory(small, val_fraction=0.3)
    cfg = TrainConfig(
        steps=STEPS, val_fraction=0.3, eval_every=4, ema_decay=DECAY, users_per_step=4
    )
    res = train_prepared(small, np.arange(small.n, dtype=np.int64), cfg, seed=3)
    best = res.metrics["best_step"]
    assert best in (4, 8, 12)
    _assert_weights(res.network, _average(trajectory[:best]))

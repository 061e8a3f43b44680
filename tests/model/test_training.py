"""Training: the weight average (``TrainConfig.ema_decay``) is what training returns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.data import PreparedData, prepare
from model.synthetic import HashEncoder, planted_preferences
from model.training import TrainConfig, train_prepared

STEPS = 12
DECAY = 0.9


@pytest.fixture(scope="module")
def small() -> PreparedData:
    torch.set_num_threads(1)
    return prepare(
        planted_preferences(num_users=6, sessions_per_user=5, seed=1),
        HashEncoder(dim=16),
        cache=False,
    )


def _raw(prep: PreparedData, steps: int) -> dict[str, torch.Tensor]:
    cfg = TrainConfig(steps=steps, val_fraction=0.0, ema_decay=0.0, users_per_step=4)
    net = train_prepared(prep, np.arange(prep.n, dtype=np.int64), cfg, seed=3).network
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_returned_weights_are_the_warmed_up_moving_average_of_the_raw_steps(
    small: PreparedData,
) -> None:
    # Training is deterministic per seed and the average does not feed back into the
    # optimiser, so the raw weights after k steps are those of a k-step run.
    trajectory = [_raw(small, k) for k in range(1, STEPS + 1)]
    expected = {k: v.clone() for k, v in trajectory[0].items()}  # the first update copies
    for n, weights in enumerate(trajectory[1:], start=1):
        d = min(DECAY, (1 + n) / (10 + n))
        for k in expected:
            expected[k] += (weights[k] - expected[k]) * (1 - d)
    cfg = TrainConfig(steps=STEPS, val_fraction=0.0, ema_decay=DECAY, users_per_step=4)
    got = train_prepared(small, np.arange(small.n, dtype=np.int64), cfg, seed=3).network
    state = got.state_dict()
    assert not got.training
    for k, v in expected.items():
        torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6, msg=k)
    last = trajectory[-1]
    assert any(not torch.allclose(state[k], last[k]) for k in last), "average == last step"

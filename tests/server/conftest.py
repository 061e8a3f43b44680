"""Fixtures shared by the server tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.checkpoint import save_checkpoint
from model.data import prepare
from model.synthetic import planted_preferences
from model.text_encoder import TextEncoder
from model.training import TrainConfig, train_prepared


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A network trained on planted preferences (model/synthetic.py), saved once per session:
    half the users prefer A on math and B on writing, half the reverse."""
    torch.set_num_threads(1)
    encoder = TextEncoder()
    prep = prepare(planted_preferences(num_users=40, sessions_per_user=30, seed=0), encoder)
    res = train_prepared(
        prep,
        np.arange(prep.n, dtype=np.int64),
        TrainConfig(steps=80, eval_every=20, lr=2e-3),  # fast setting for planted data
        seed=0,
    )
    path = tmp_path_factory.mktemp("ckpt") / "planted.pt"
    save_checkpoint(
        path,
        res.network,
        encoder_name=encoder.name,
        encoder_dim=encoder.dim,
        models=prep.models,
        llm_x=torch.from_numpy(prep.llm_x),
    )
    return path

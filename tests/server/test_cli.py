"""The ``gmtrouter`` command line: ``train`` on the bundled LLMFAO sample, ``serve``'s event loop."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from model.checkpoint import load_checkpoint
from model.datasets import load_dataset
from model.datasets.splits import holdout_users
from server.cli import app
from tests.conftest import REPO

LLMFAO = REPO / "examples" / "data" / "llmfao"


def test_train_leaves_the_held_out_users_out(tmp_path: Path) -> None:
    out = tmp_path / "ckpt.pt"
    args = ["train", "--dataset", "llmfao", "--data-path", str(LLMFAO), "--steps", "2"]
    split = ["--holdout-fraction", "0.5", "--split-seed", "3"]
    result = CliRunner().invoke(app, [*args, *split, "--out", str(out)])
    assert result.exit_code == 0, result.output
    users = {r.user_id for r in load_dataset("llmfao", LLMFAO)}
    held = holdout_users(users, 0.5, 3)
    assert 0 < len(held) < len(users)
    extra = load_checkpoint(out).extra
    assert extra["train_users"] == len(users - held)
    assert (extra["holdout_fraction"], extra["split_seed"]) == (0.5, 3)


def test_train_and_evaluate_default_to_the_training_configs_weight_average() -> None:
    import typer.main

    from model.training import TrainConfig

    group = typer.main.get_command(app)
    ctx = typer.Context(group)
    for name in ("train", "evaluate"):
        cmd = group.get_command(ctx, name)  # type: ignore[attr-defined]
        (param,) = [p for p in cmd.params if p.name == "ema_decay"]
        assert param.default == TrainConfig().ema_decay, name


def test_serve_event_loop_is_uvloop_by_default() -> None:
    uvloop = pytest.importorskip("uvloop")
    from server.cli import _loop_factory
    from server.config import ServerSettings

    assert ServerSettings().event_loop == "uvloop"
    assert _loop_factory("uvloop") is uvloop.new_event_loop
    assert _loop_factory("asyncio") is None


def test_serve_event_loop_falls_back_to_asyncio_without_uvloop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from structlog.testing import capture_logs

    from server.cli import _loop_factory

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop raises ImportError
    with capture_logs() as logs:
        assert _loop_factory("uvloop") is None
    assert [(e["log_level"], e["setting"]) for e in logs] == [("warning", "server.event_loop")]

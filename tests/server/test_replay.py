"""``server.replay.replay`` against a real server on a socket (no checkpoint: ``bt_prior``).

Served without a network, the service's score is the Bradley–Terry prior plus the per-query
evidence, which is exactly how the replay's ``per_query_bt`` baseline predicts; switched off,
it is the prior alone, i.e. ``global_bt``. So the replay's tally of the live service must
match those baselines pair for pair: this checks the replay's bookkeeping (order, warm start,
what is scored) and the service's evidence end to end.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from model.datasets.splits import holdout_users
from model.synthetic import planted_preferences
from server.replay import BaselineScores, ReplayTally, format_replay_table, replay
from tests.server.inprocess import DIM, running


def _embeddings(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return np.asarray(v / np.linalg.norm(v, axis=1, keepdims=True), dtype=np.float32)


async def _run(config: dict[str, Any]) -> dict[str, Any]:
    records = planted_preferences(num_users=8, sessions_per_user=12, noise=0.2, seed=3)
    held = holdout_users({r.user_id for r in records}, 0.5, 0)
    stream = [r for r in records if r.user_id in held]
    warm = [r for r in records if r.user_id not in held]
    async with running(config=config) as app:
        result: dict[str, Any] = await replay(
            stream,
            f"127.0.0.1:{app.port}",
            dataset="planted",
            query_embeddings=_embeddings(len(stream)),
            warm=warm,
            warm_embeddings=_embeddings(len(warm)),
            progress=False,
        )
    assert result["n_records"] == len(stream) and result["n_warm_records"] == len(warm)
    assert result["server_methods"] == {"bt_prior": len(stream)}
    assert set(result["methods"]) == {"gmtrouter", *BaselineScores._fields}
    n = {m["n_pairs"] for m in result["methods"].values()}
    assert n == {sum(1 for r in stream if r.outcome != "tie")}
    return result


def _curve(result: dict[str, Any], name: str) -> list[Any]:
    return [(p["n_pairs"], p["accuracy"]) for p in result["methods"][name]["curve"]]


async def test_served_prior_with_query_evidence_scores_as_per_query_bt() -> None:
    # the per-user evidence (server/user_evidence.py) has no baseline: off here
    m = (await _run({"user_evidence": {"enabled": False}}))["methods"]
    assert m["gmtrouter"]["online_accuracy"] == pytest.approx(
        m["per_query_bt"]["online_accuracy"], abs=1e-9
    )
    assert m["gmtrouter"]["curve"] == m["per_query_bt"]["curve"]
    # the evidence changed predictions: the baselines are not all the same
    assert m["per_query_bt"]["online_accuracy"] != m["global_bt"]["online_accuracy"]


async def test_served_prior_without_query_evidence_scores_as_global_bt() -> None:
    result = await _run({"query_evidence": {"enabled": False}, "user_evidence": {"enabled": False}})
    m = result["methods"]
    assert m["gmtrouter"]["online_accuracy"] == pytest.approx(
        m["global_bt"]["online_accuracy"], abs=1e-9
    )
    assert _curve(result, "gmtrouter") == _curve(result, "global_bt")
    # the same hits give the same trend, and no advantage over global_bt at any history
    assert m["gmtrouter"]["trend"] == m["global_bt"]["trend"]
    assert m["gmtrouter"]["trend"]["slope_per_doubling"] is not None
    assert m["gmtrouter"]["trend_vs_global_bt"]["slope_per_doubling"] == pytest.approx(0.0)
    assert "trend_vs_global_bt" not in m["global_bt"]
    assert set(m["per_query_bt"]) >= {"trend_vs_global_bt"} and not any(
        k == "trend_vs_per_query_bt" for k in m["per_query_bt"]
    )
    assert "trend_vs_per_query_bt" in m["gmtrouter"] and "trend_vs_per_query_bt" in m["per_user_bt"]
    assert "trend (accuracy change per doubling" in format_replay_table(result)


def test_trend_against_a_baseline_needs_the_same_comparisons() -> None:
    a, b = ReplayTally(), ReplayTally()
    for i, outcome in enumerate(["a", "b", "a", "a"]):
        a.add(1.0, outcome, i, "u1")
        b.add(-1.0, outcome, i, "u1" if i < 3 else "u2")
    with pytest.raises(ValueError, match="same comparisons"):
        a.trend(b)
    assert a.trend(a)["slope_per_doubling"] == pytest.approx(0.0)

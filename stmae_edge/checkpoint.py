"""One self-describing model file: metadata (config, preprocessing, score statistics, thresholds,
provenance) plus all weights, the frozen backbone's included, so export needs nothing else.

It holds only tensors and plain values, so it loads with torch.load(weights_only=True): opening a
model file someone hands you cannot run code. A sha256 over the weights catches corruption.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path

import torch

from .errors import CheckpointError
from .metadata import ModelMetadata
from .models.stmae import STMAE, STMAEConfig

FORMAT = "stmae-edge/checkpoint"


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: Path | str, model: STMAE, metadata: ModelMetadata) -> ModelMetadata:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    metadata.model_hash = weights_digest(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save({"format": FORMAT, "metadata": metadata.to_dict(), "state_dict": state}, tmp)
    tmp.replace(path)  # never leave a half-written model under the real name
    return metadata


def read_checkpoint(path: Path | str) -> tuple[ModelMetadata, dict[str, torch.Tensor]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such model file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a loadable stmae-edge model file ({first_line[:200]})") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a stmae-edge model file (no '{FORMAT}' marker)")
    metadata = ModelMetadata.from_dict(blob["metadata"])
    state = blob["state_dict"]
    if weights_digest(state) != metadata.model_hash:
        raise CheckpointError(f"{path}: weights do not match their recorded sha256; the file is corrupt "
                              "or was modified, re-train or copy it again")
    return metadata, state


def load_model(path: Path | str) -> tuple[STMAE, ModelMetadata]:
    metadata, state = read_checkpoint(path)
    if metadata.model_family != "stmae":
        raise CheckpointError(f"{path}: model family {metadata.model_family!r} is not supported here")
    model = STMAE(STMAEConfig.from_dict(metadata.config), backbone_weights="none")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the recorded architecture: "
                              f"{str(exc).splitlines()[0]}") from exc
    return model.eval(), metadata

"""One self-describing model file: metadata (config, preprocessing, score statistics, thresholds,
provenance) plus all weights, the frozen backbone's included, so export needs nothing else.

It holds only tensors and plain values, so it loads with torch.load(weights_only=True): opening a
model file someone hands you cannot run code. A sha256 over everything that decides the computation
(weights, architecture, preprocessing) catches corruption and edits; score statistics and thresholds
stay outside it on purpose, as readable settings.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch

from .checks import PLAN_SUFFIXES, check_document, require_model_file
from .errors import CheckpointError, ConfigError, first_line
from .metadata import ModelMetadata
from .models.families import build_model, config_from_dict
from .outputs import check_writable, written_atomically

FORMAT = "stmae-edge/checkpoint"


def model_digest(state_dict: dict, metadata: ModelMetadata) -> str:
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"weight {name!r} is not a tensor; the model file is corrupt")
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(json.dumps({"config": metadata.config, "preprocessing": metadata.preprocessing.to_dict()},
                        sort_keys=True).encode())
    return h.hexdigest()


def save_checkpoint(path: Path | str, model: torch.nn.Module, metadata: ModelMetadata) -> ModelMetadata:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    metadata.model_hash = model_digest(state, metadata)
    with written_atomically(check_writable(path)) as partial:  # never a half-written model under the real name
        torch.save({"format": FORMAT, "metadata": metadata.to_dict(), "state_dict": state}, partial)
    return metadata


def read_checkpoint(path: Path | str) -> tuple[ModelMetadata, dict[str, torch.Tensor]]:
    path = require_model_file(path)
    try:
        with warnings.catch_warnings():  # torch's warnings about a file it refuses would precede our one line
            warnings.simplefilter("ignore")
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad files; all mean the same to a user
        raise CheckpointError(f"{path}: not a loadable stmae-edge checkpoint: {why_unloadable(path)}; give the "
                              ".pt file that `stmae-edge train` wrote") from exc
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a stmae-edge model file (no '{FORMAT}' marker)")
    if not isinstance(blob.get("metadata"), dict) or not isinstance(blob.get("state_dict"), dict):
        raise CheckpointError(f"{path}: model file without metadata or weights; it is corrupt")
    metadata = ModelMetadata.from_dict(check_document(blob["metadata"], f"{path}: the metadata", CheckpointError))
    state = blob["state_dict"]
    check_weights(state, path)
    if model_digest(state, metadata) != metadata.model_hash:
        raise CheckpointError(f"{path}: contents do not match their recorded sha256; the file is corrupt "
                              "or was modified, re-train or copy it again")
    return metadata, state


# The dtypes stmae-edge's models have; anything else (quantized, complex, ...) is not one of its files.
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8,
                 torch.bool)


def check_weights(state: dict, path: Path) -> None:
    """Plain dense tensors under string names, each holding its own bytes, no more in all than the
    file: a 4 KB file can otherwise hold a tensor expanded to 256 GB, which the digest would read.

    Raises:
        CheckpointError: naming the first weight that is not such a tensor.
    """
    total = 0
    for name, tensor in state.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{path}: a weight named {name!r}, not by a string; the file is corrupt")
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: weight {name!r} is not a tensor; the file is corrupt")
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"{path}: weight {name!r} is a {tensor.layout} {tensor.dtype} tensor, which "
                                  "stmae-edge does not write; the file is corrupt or not from stmae-edge")
        size = tensor.numel() * tensor.element_size()
        if size > tensor.untyped_storage().nbytes():
            raise CheckpointError(f"{path}: weight {name!r} claims {size:,} bytes from {tensor.untyped_storage().nbytes():,} "
                                  "of storage (an expanded view); the file is corrupt or crafted")
        total += size
    file_size = path.stat().st_size
    if total > file_size:
        raise CheckpointError(f"{path}: its weights claim {total:,} bytes, more than the {file_size:,}-byte file "
                              "holds (shared storage); the file is corrupt or crafted")


def why_unloadable(path: Path) -> str:
    """What a file that torch.load refused is, in a user's words (torch's own text speaks of its internals)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if path.suffix.lower() in (".onnx", *PLAN_SUFFIXES):
        return f"it is {'an ONNX graph' if path.suffix.lower() == '.onnx' else 'a TensorRT plan'}, not a checkpoint"
    if head != b"PK\x03\x04":  # every checkpoint torch.save writes is a zip archive
        return "it is not a PyTorch file"
    return "it is damaged (truncated?) or holds objects other than weights, which are not loaded for safety"


def rewrite_metadata(path: Path | str, change) -> ModelMetadata:
    """Apply `change` (ModelMetadata -> ModelMetadata) to a checkpoint's metadata and save it, weights
    untouched. A change to what the digest covers (config, preprocessing) is refused.

    Raises:
        CheckpointError: as read_checkpoint, or the change would alter the model's digest.
    """
    metadata, state = read_checkpoint(path)
    changed = change(metadata)
    if model_digest(state, changed) != changed.model_hash:
        raise CheckpointError(f"{path}: that change would alter what the model computes; re-train instead")
    with written_atomically(path) as partial:
        torch.save({"format": FORMAT, "metadata": changed.to_dict(), "state_dict": state}, partial)
    return changed


def load_model(path: Path | str) -> tuple[torch.nn.Module, ModelMetadata]:
    """The network of the checkpoint's model family (models/families.py), in eval mode."""
    metadata, state = read_checkpoint(path)
    try:
        config = config_from_dict(metadata.model_family, metadata.config)
    except (ConfigError, KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise CheckpointError(f"{path}: model config is not usable ({exc}); re-train with this version") from exc
    if metadata.preprocessing.input_size != (config.input_size, config.input_size):
        raise CheckpointError(f"{path}: preprocessing input size {metadata.preprocessing.input_size} does not "
                              f"match the model's {config.input_size}; the file is inconsistent")
    model = build_model(metadata.model_family, config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the recorded architecture: "
                              f"{first_line(exc)}") from exc
    return model.eval(), metadata

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
import zipfile
from pathlib import Path

import torch

from .checks import PLAN_SUFFIXES, check_document, require_model_file
from .errors import CheckpointError, ConfigError, first_line
from .metadata import ModelMetadata
from .models.families import build_model, config_from_dict
from .outputs import check_writable, written_atomically
from .weight_files import check_archive, check_weights

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
    if not zipfile.is_zipfile(path):  # torch.load allocates what a legacy file declares before reading it
        raise CheckpointError(f"{path}: not a loadable stmae-edge checkpoint: {why_unloadable(path)}; give the "
                              ".pt file that `stmae-edge train` wrote")
    check_archive(path, CheckpointError)
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
    check_weights(state, path, CheckpointError)
    if model_digest(state, metadata) != metadata.model_hash:
        raise CheckpointError(f"{path}: contents do not match their recorded sha256; the file is corrupt "
                              "or was modified, re-train or copy it again")
    return metadata, state


def why_unloadable(path: Path) -> str:
    """What a file that torch.load refused is, in a user's words (torch's own text speaks of its internals)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if path.suffix.lower() in (".onnx", *PLAN_SUFFIXES):
        return f"it is {'an ONNX graph' if path.suffix.lower() == '.onnx' else 'a TensorRT plan'}, not a checkpoint"
    if head[:1] == b"\x80":  # a pickle: torch.save's format before PyTorch 1.6, which stmae-edge never wrote
        return "it is a PyTorch file in the format before PyTorch 1.6, not a stmae-edge checkpoint"
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
    check_architecture(metadata.model_family, config, state, path)
    model = build_model(metadata.model_family, config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the recorded architecture: "
                              f"{first_line(exc)}") from exc
    return model.eval(), metadata


# What a config makes on the CPU before any weight is loaded (ST-MAE's token index tables, 8 bytes
# a token, a few of them): a default model's take 16 KB.
MAX_DERIVED_BYTES = 256 * 1024 * 1024


def check_architecture(family: str, config, state: dict[str, torch.Tensor], path: Path) -> None:
    """The weights' names and shapes against the architecture the config describes, built on the meta
    device (no memory): a config that a file's author made huge (a 100,000-wide encoder) is refused
    before anything is allocated, not after the build has run out of memory.

    Raises:
        CheckpointError: the config would build more than MAX_DERIVED_BYTES of tables, or the weights
            do not have its names and shapes.
    """
    tokens = getattr(config, "tokens_per_side", 0) ** 2
    if tokens * 8 * 8 > MAX_DERIVED_BYTES:
        raise CheckpointError(f"{path}: its config asks for {tokens:,} tokens, which no stmae-edge model has; "
                              "the file is corrupt or crafted")
    with torch.device("meta"):
        skeleton = build_model(family, config).state_dict()
    missing = sorted(set(skeleton) - set(state))
    unexpected = sorted(set(state) - set(skeleton))
    wrong = sorted(name for name in skeleton.keys() & state.keys() if skeleton[name].shape != state[name].shape)
    for what, names in (("missing", missing), ("unexpected", unexpected), ("wrongly shaped", wrong)):
        if names:
            listed = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
            raise CheckpointError(f"{path}: weights do not fit the recorded architecture: {what} {listed}; "
                                  "the file is inconsistent, re-train with this version")

"""The metadata of every kind of model file, read and re-thresholded in place:

    .pt    checkpoint (torch, weights_only)   metadata beside the weights
    .onnx  exported graph                     metadata_props["stmae_edge.metadata"]
    .plan  TensorRT engine                    the sidecar <plan>.json

Thresholds sit outside the model digest on purpose (checkpoint.model_digest), so re-thresholding a
deployed file changes neither its hash nor anything it computes, and a plan needs no rebuild. Each
file is rewritten under a temporary name and renamed: an interrupted write leaves the old file whole.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .errors import ConfigError, StmaeError
from .metadata import ONNX_METADATA_KEY, ModelMetadata
from .scoring import Thresholds

log = logging.getLogger(__name__)

# The kinds of model file, one table for every command and for the runtime's backends
# (runtime/backend_table.py): suffixes, what the file is, and how to get from it the file of each other kind.
FILE_KINDS = {
    "plan": ((".plan", ".engine"), "a TensorRT plan", {
        "onnx": "run the .onnx file it was built from",
        "checkpoint": "run the .pt checkpoint that its .onnx was exported from"}),
    "onnx": ((".onnx",), "an ONNX file", {
        "plan": "build a plan with `stmae-edge build`",
        "checkpoint": "run the .pt checkpoint it was exported from"}),
    "checkpoint": ((".pt",), "a PyTorch checkpoint", {
        "onnx": "export it with `stmae-edge export`",
        "plan": "export it with `stmae-edge export`, then build a plan with `stmae-edge build`"}),
}


def file_kind_of(path: Path | str) -> str:
    """The FILE_KINDS key of a model file, from its suffix (in any case).

    Raises:
        ConfigError: a suffix no backend runs.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    for key, (suffixes, _, _) in FILE_KINDS.items():
        if suffix in suffixes:
            return key
    known = ", ".join(f"{description} ({'/'.join(suffixes)})" for suffixes, description, _ in FILE_KINDS.values())
    raise ConfigError(f"{path}: unknown model file type {suffix!r}; give {known}")


def read_metadata(path: Path | str) -> ModelMetadata:
    """The metadata of a .pt, .onnx or .plan file, after the checks its own reader makes.

    Raises:
        CheckpointError, EngineMismatchError: the file is missing, corrupt or not a stmae-edge model.
        ConfigError: an unknown file type.
    """
    path = Path(path)
    kind = file_kind_of(path)
    if kind == "checkpoint":
        from .checkpoint import read_checkpoint

        return read_checkpoint(path)[0]
    if kind == "onnx":
        return ModelMetadata.from_onnx(path)
    from .engine_plan import read_plan

    return read_plan(path)[2]


def write_thresholds(path: Path | str, thresholds: Thresholds) -> ModelMetadata:
    """Store `thresholds` in the model file; nothing else in it changes. Returns the new metadata.

    Raises:
        as read_metadata; OutputError: the file cannot be rewritten.
    """
    path = Path(path)
    kind = file_kind_of(path)
    if kind == "checkpoint":
        from .checkpoint import rewrite_metadata

        return rewrite_metadata(path, lambda m: _with(m, thresholds))
    if kind == "onnx":
        import onnx

        from .onnx_files import load_onnx
        from .outputs import write_bytes_atomically

        proto = load_onnx(path)
        metadata = _with(ModelMetadata.from_onnx(proto), thresholds)
        props = {p.key: p.value for p in proto.metadata_props}
        props[ONNX_METADATA_KEY] = metadata.to_onnx_value()
        del proto.metadata_props[:]
        onnx.helper.set_model_props(proto, props)
        # The bytes themselves, not onnx.save: that writes each external tensor's data to its location,
        # which a crafted file could aim at any file beside it.
        write_bytes_atomically(path, proto.SerializeToString())
        return metadata
    from .engine_plan import read_plan, write_sidecar

    _, sidecar, metadata = read_plan(path)
    metadata = _with(metadata, thresholds)
    sidecar["metadata"] = metadata.to_dict()
    write_sidecar(path, sidecar)
    return metadata


def _with(metadata: ModelMetadata, thresholds: Thresholds) -> ModelMetadata:
    metadata.thresholds = thresholds
    return metadata


def warn_if_thresholds_are_replaced(path: Path | str, metadata: ModelMetadata) -> None:
    """Warn when writing a new file of the same model (the same model hash) to `path` would drop
    thresholds that were set in the file there after it was made (`threshold --write`): a rebuild would
    undo a line's tuning without a word. The new file carries its source's; the warning says how to put
    the earlier ones back. Another model's file, or one that cannot be read, has nothing to keep."""
    path = Path(path)
    if not path.is_file():
        return
    try:
        earlier = read_metadata(path)
    except (StmaeError, OSError):
        return
    if earlier.model_hash != metadata.model_hash or earlier.thresholds == metadata.thresholds:
        return
    was, new = earlier.thresholds, metadata.thresholds
    log.warning("%s had thresholds of its own (image %g, pixel %g: %s); the new file carries its source's (image "
                "%g, pixel %g); to set the earlier ones again: stmae-edge threshold %s --threshold %.9g "
                "--pixel-threshold %.9g --write", path, was.image, was.pixel, was.rule, new.image, new.pixel, path,
                was.image, was.pixel)

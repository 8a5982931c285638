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
import math
from pathlib import Path

from .checks import PLAN_SUFFIXES
from .errors import ConfigError, OutputError, StmaeError
from .metadata import ONNX_METADATA_KEY, ModelMetadata
from .scoring import Thresholds

log = logging.getLogger(__name__)

# The kinds of model file, one table for every command and for the runtime's backends
# (runtime/backend_table.py): suffixes, what the file is, and how to get from it the file of each other kind.
FILE_KINDS = {
    "plan": (PLAN_SUFFIXES, "a TensorRT plan", {
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


def write_thresholds(path: Path | str, thresholds: Thresholds, model_hash: str | None = None) -> ModelMetadata:
    """Store `thresholds` in the model file; nothing else in it changes. Returns the new metadata.

    Args:
        model_hash: the model they were chosen for (its metadata's model_hash), where the file was read
            before they were measured: a file that holds another model by now is refused.

    Raises:
        as read_metadata; OutputError: the file cannot be rewritten, or holds another model than
            `model_hash` (replaced while the thresholds were measured); ConfigError: `thresholds` is not a
            Thresholds.
    """
    if not isinstance(thresholds, Thresholds):  # checked before the file is opened: it stays as it was
        raise ConfigError(f"thresholds must be a stmae_edge.scoring.Thresholds (Thresholds(image=..., pixel=...)), "
                          f"not {type(thresholds).__name__}")
    path = Path(path)
    kind = file_kind_of(path)
    if kind == "checkpoint":
        from .checkpoint import rewrite_metadata

        return rewrite_metadata(path, lambda m: _with(m, thresholds, model_hash, path))
    if kind == "onnx":
        import onnx

        from .onnx_files import load_onnx
        from .outputs import write_bytes_atomically

        proto = load_onnx(path)
        metadata = _with(ModelMetadata.from_onnx(proto), thresholds, model_hash, path)
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
    metadata = _with(metadata, thresholds, model_hash, path)
    sidecar["metadata"] = metadata.to_dict()
    write_sidecar(path, sidecar)
    return metadata


def _with(metadata: ModelMetadata, thresholds: Thresholds, model_hash: str | None, path: Path) -> ModelMetadata:
    if model_hash is not None and metadata.model_hash != model_hash:
        raise OutputError(f"{path} holds another model now (hash {metadata.model_hash[:12]}; the thresholds were "
                          f"measured on {model_hash[:12]}): it was replaced meanwhile, so nothing was written; choose "
                          "the thresholds again on the model it holds")
    metadata.thresholds = thresholds
    return metadata


def thresholds_to_be_replaced(path: Path | str, metadata: ModelMetadata) -> Thresholds | None:
    """The thresholds of the model file at `path`, where a new file of the same model (the same model
    hash) with other values is about to replace it: values set in that file after it was made
    (`threshold --write`), which a rebuild would undo without a word, or its source's earlier ones.
    None where there is nothing to say: no file, the same values (the rule's words aside), or one that
    cannot be read or is another model's (warn_replacing says so here). Read before the new file is
    written; warn_thresholds_replaced after."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        earlier = read_metadata(path)
    except (StmaeError, OSError):
        warn_replacing(path)
        return None
    new = metadata.thresholds
    if earlier.model_hash != metadata.model_hash:
        warn_replacing(path, earlier)
        return None
    if all(math.isclose(a, b, rel_tol=1e-9) for a, b in ((earlier.thresholds.image, new.image),
                                                         (earlier.thresholds.pixel, new.pixel))):
        return None
    return earlier.thresholds


def warn_thresholds_replaced(path: Path | str, earlier: Thresholds | None, new: Thresholds) -> None:
    """Once the new file is written: the values the file at `path` carried before (thresholds_to_be_replaced),
    and how to set them again if they were set for that file."""
    if earlier is not None:
        log.warning("%s carried other thresholds (image %g, pixel %g: %s); the new file carries its source's "
                    "(image %g, pixel %g). If those were set for this file, set them again: stmae-edge threshold %s "
                    "--threshold %r --pixel-threshold %r --write", path, earlier.image, earlier.pixel, earlier.rule,
                    new.image, new.pixel, path, earlier.image, earlier.pixel)


def warn_replacing(path: Path | str, earlier: ModelMetadata | None = None) -> None:
    """A warning that the file at `path`, another model's, is about to be replaced: a validated model
    and the thresholds set for it would otherwise be lost without a word. `earlier`: its metadata,
    where the caller has read it already. Nothing where there is no file."""
    path = Path(path)
    if earlier is None:
        if not path.is_file():
            return
        try:
            earlier = read_metadata(path)
        except (StmaeError, OSError):
            log.warning("%s is replaced; it was not a readable model file", path)
            return
    source = earlier.training.get("data_dir") or "images it does not record"
    log.warning("%s is replaced; it held the model (%s, trained on %s, image threshold %g, model sha256 %s...): "
                "give another --out to keep it", path, earlier.model_family, source, earlier.thresholds.image,
                earlier.model_hash[:12])

"""`stmae-edge triton-repo`: a model repository for the official Triton Inference Server container.

    MODEL.onnx ──> OUT/NAME/config.pbtxt   platform onnxruntime_onnx, KIND_GPU (or KIND_CPU with --cpu)
    MODEL.plan ──> OUT/NAME/config.pbtxt   platform tensorrt_plan, KIND_GPU, the plan's profile 0
                   OUT/NAME/1/model.onnx | model.plan   (a copy of the file; a plan's sidecar beside it)

The network's own input and outputs are served: images (N, 3, H, W) float32, anomaly_map (N, 1, H, W)
and score (N,). Clients preprocess and postprocess with the package (runtime.RemoteDetector), which
reads the model's metadata from the config's `stmae_edge_metadata` parameter. A model folder is
written in a staging folder beside the repository (Triton would take one inside for a model) and
renamed into it when complete. `threshold --write` on
NAME/1/model.* rewrites the thresholds in config.pbtxt too (served_config_update).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from pathlib import Path

from .. import wire_format as wire
from ..engine_plan import read_plan, sidecar_bytes, sidecar_path
from ..errors import ConfigError, OutputError
from ..metadata import INPUT_NAME, MAP_NAME, SCORE_NAME, ModelMetadata
from ..model_files import file_kind_of
from ..onnx_files import has_external_data, load_onnx_bytes
from ..outputs import (
    failure_reason,
    move_into_place,
    remove_stale_staging,
    staging_folder,
    sync_folder,
    write_bytes_atomically,
    write_staged,
)
from ..scoring import Thresholds

logger = logging.getLogger(__name__)

STAGED_INSIDE = ("the model folder is staged in a hidden folder inside it, which a Triton server polling it may "
                 "report as a model that fails to load until it is renamed into place")

PLATFORMS = {"onnx": ("onnxruntime_onnx", "model.onnx"), "plan": ("tensorrt_plan", "model.plan")}  # by file kind


def write_repository(model: Path | str, out: Path | str, name: str | None = None, *, max_batch: int = wire.DEFAULT_MAX_BATCH,
                     max_queue_delay_us: int = 2000, instances: int = 1, cpu: bool = False) -> Path:
    """Write OUT/NAME/{config.pbtxt, 1/model.*}; returns OUT/NAME.

    Args:
        model: an .onnx file, or a .plan built by full TensorRT (with its sidecar).
        out: the model repository's folder.
        name: the model's name in Triton (default: the file's stem).
        max_batch: the largest batch Triton forms (capped by a plan's profile).
        max_queue_delay_us: how long Triton waits for more requests to fill a batch.
        instances: model instances.
        cpu: run an .onnx on Triton's CPU (ONNX Runtime's CPU provider) instead of a GPU.

    Raises:
        ConfigError: an unknown file type, a plan built by TensorRT for RTX, --cpu with a plan, bad numbers.
        OutputError: OUT/NAME exists already. CheckpointError, EngineMismatchError: not a usable model.
    """
    model = Path(model)
    kind = file_kind_of(model)
    if kind not in PLATFORMS:
        raise ConfigError(f"{model}: Triton serves .onnx or .plan files; export or build one first")
    platform, file_name = PLATFORMS[kind]
    name = wire.check_model_name(name) if name is not None else wire.model_name_for(model)
    wire.check_max_batch(max_batch)
    for option, value, low in (("--instances", instances, 1),
                               ("--max-queue-delay-us", max_queue_delay_us, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{option} must be a whole number of at least {low}, got {value!r}")
    profile = None
    if kind == "plan":
        if cpu:
            raise ConfigError("a TensorRT plan runs on a GPU only; give the .onnx file for --cpu")
        served, sidecar, metadata = read_plan(model)
        if sidecar.get("tensorrt", {}).get("flavour") == "tensorrt-rtx":
            raise ConfigError(f"{model} was built by TensorRT for RTX; Triton's TensorRT backend loads plans of full "
                              "TensorRT, of its own version: build the plan with `stmae-edge build` on the serving "
                              "machine (same GPU, same TensorRT as the Triton container), or serve the .onnx")
        if max_batch > sidecar["batch"]["max"]:
            raise ConfigError(f"--max-batch {max_batch} exceeds the plan's batch profile (at most "
                              f"{sidecar['batch']['max']}); rebuild with a larger --batch or lower --max-batch")
        profile = "0"
    else:
        # One read: the file served is the one the config describes, whatever replaces `model` meanwhile
        proto, served = load_onnx_bytes(model)
        if has_external_data(proto):
            raise ConfigError(f"{model} keeps its weights in separate files; triton-repo copies one file: export "
                              "the model as one file (`stmae-edge export` does)")
        metadata = ModelMetadata.from_onnx(proto)
    height, width = metadata.preprocessing.input_size
    document = wire.metadata_document(name, max_batch, metadata, metadata.thresholds)
    config = {
        "name": name, "platform": platform, "max_batch_size": max_batch,
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_FP32", "dims": [3, height, width]}],
        "output": [{"name": MAP_NAME, "data_type": "TYPE_FP32", "dims": [1, height, width]},
                   # (N,) per batch: Triton wants dims per image, so [1] reshaped to a scalar
                   {"name": SCORE_NAME, "data_type": "TYPE_FP32", "dims": [1], "reshape": {"shape": []}}],
        # Version 1 only: a model dropped in as NAME/2 would otherwise be served with version 1's metadata
        # document (preprocessing, score statistics, thresholds), which the clients read from this config
        "version_policy": {"specific": {"versions": [1]}},
        "dynamic_batching": {"max_queue_delay_microseconds": max_queue_delay_us},
        "instance_group": [{"count": instances, "kind": "KIND_CPU" if cpu else "KIND_GPU",
                            **({"profile": [profile]} if profile else {})}],
        "parameters": {wire.METADATA_PARAMETER: {"string_value": json.dumps(document, sort_keys=True)}},
    }
    out = Path(out)
    target = out / name
    if target.exists():
        raise OutputError(f"{target} exists; remove it or give another --out or --name")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {failure_reason(exc, out)}; choose another --out") from None
    files = {"config.pbtxt": to_pbtxt(config).encode(), f"1/{file_name}": served}
    if kind == "plan":  # beside it, as everywhere a plan goes: `threshold` reads and rewrites it there
        files[f"1/{sidecar_path(Path(file_name)).name}"] = sidecar_bytes(sidecar)
    remove_stale_staging(out)  # left inside by a killed run of a version that staged there
    place = staging_place(out)
    try:
        try:
            _write_model_folder(place, target, files)
        except OSError as exc:
            if exc.errno != errno.EXDEV or place == out.resolve():
                raise
            # a bind mount of the same file system: its device is its parent's, a rename into it is refused
            logger.warning("%s cannot take a folder renamed from beside it (a bind mount): %s", out, STAGED_INSIDE)
            _write_model_folder(out.resolve(), target, files)
    except OSError as exc:
        raise OutputError(f"cannot write {target}: {failure_reason(exc, out)}; choose another --out") from None
    return target


def _write_model_folder(place: Path, target: Path, files: dict[str, bytes]) -> None:
    """`files` (relative name -> bytes) written whole in a staging folder in `place`, then renamed to
    `target`: Triton never loads half a model.

    Raises:
        OSError: a write or the rename failed (the staging folder is removed).
    """
    with staging_folder(place) as staging:
        staged = staging / target.name
        (staged / "1").mkdir(parents=True)
        for name, data in files.items():
            write_staged(staged / name, data)
        for folder in (staged / "1", staged):
            folder.chmod(0o755)  # a Triton running as another user reads it
            sync_folder(folder)
        move_into_place(staged, target)
        sync_folder(target.parent)


def staging_place(out: Path) -> Path:
    """Where a model folder is written before it is renamed into the repository `out`: beside `out`, on
    its file system. Triton takes every folder of its repository as a model, hidden ones too: a polling
    server logged an error for the staging folder, and one left by a killed run kept a server started
    with `--exit-on-error` (the default) from starting. Inside `out` only where it is a file system of its
    own (a mount) or its parent cannot be written, with a warning."""
    place = out.resolve()
    parent = place.parent
    try:
        beside = parent != place and parent.stat().st_dev == place.stat().st_dev
    except OSError:
        beside = False
    if beside and os.access(parent, os.W_OK | os.X_OK):
        return parent
    logger.warning("%s is a file system of its own or its parent folder cannot be written: %s", out, STAGED_INSIDE)
    return place


def served_config_update(model: Path | str, thresholds: Thresholds) -> tuple[Path, bytes] | None:
    """When `model` is NAME/VERSION/model.onnx (or model.plan) of a Triton repository whose config.pbtxt
    carries our metadata document (triton-repo's): that config, and its bytes with `thresholds` put
    into the document, where its clients (RemoteDetector) read them; the rest of the file as it is.
    Prepared before anything is written, so that a config that cannot be read or rewritten stops
    `threshold --write` before the model file changes. None for any other file.

    Raises:
        ConfigError: the config names the document, but not as triton-repo writes it (a hand edit in
            another spelling of protobuf's text format).
        OutputError: the config cannot be rewritten (no permission, a read-only mount).
    """
    model = Path(model)
    if model.name not in {file_name for _, file_name in PLATFORMS.values()} or not model.parent.name.isdigit():
        return None
    config = model.parent.parent / "config.pbtxt"
    try:
        text = config.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise OutputError(f"cannot read {config} ({getattr(exc, 'strerror', None) or exc}), whose thresholds its "
                          "clients read; nothing was written") from None
    if wire.METADATA_PARAMETER not in text:
        return None
    # commented-out lines blanked, same length: the positions found are the text's own
    visible = re.sub(r"(?m)^[ \t]*#.*$", lambda line: " " * len(line.group()), text)
    found = _METADATA_LITERAL.search(visible)
    try:
        document = json.loads(_unstring(found.group(1))) if found else None
        document["thresholds"] = document["metadata"]["thresholds"] = thresholds.to_dict()
    except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError):
        raise ConfigError(f"{config}: its {wire.METADATA_PARAMETER} parameter is not written as triton-repo writes "
                          "it; nothing was written: put the thresholds into its document by hand, or write the "
                          "repository again with `stmae-edge triton-repo`") from None
    if not (os.access(config, os.W_OK) and os.access(config.parent, os.W_OK)):
        raise OutputError(f"cannot write {config}, whose thresholds its clients read (no permission); nothing "
                          "was written")
    literal = _string(json.dumps(document, sort_keys=True))
    return config, (text[:found.start(1)] + literal + text[found.end(1):]).encode()


def write_served_config(config: Path, data: bytes) -> None:
    """served_config_update's bytes, written whole.

    Raises:
        OutputError: the file cannot be rewritten.
    """
    try:
        write_bytes_atomically(config, data)
    except OSError as exc:
        raise OutputError(f"cannot write {config}: {failure_reason(exc, config.parent)}") from None


ENUMS = {"data_type", "kind"}
# where to_pbtxt puts the metadata document: the string value of the parameter's map entry
_METADATA_LITERAL = re.compile(r'key:\s*"' + wire.METADATA_PARAMETER
                               + r'"\s*value\s*:?\s*\{\s*string_value:\s*("(?:[^"\\\n]|\\.)*")')


def to_pbtxt(message: dict, indent: int = 0) -> str:
    """A dict as protobuf text format (the ModelConfig message): lists are repeated fields, dicts are
    messages, except `parameters`, which is a map<string, ModelParameter>."""
    pad = "  " * indent
    lines = []
    for key, value in message.items():
        if key == "parameters":
            for map_key, entry in value.items():
                lines.append(f"{pad}{key} {{\n{pad}  key: {_string(map_key)}\n{pad}  value {{\n"
                             f"{to_pbtxt(entry, indent + 2)}{pad}  }}\n{pad}}}")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            lines += [f"{pad}{key} {{\n{to_pbtxt(item, indent + 1)}{pad}}}" for item in value]
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: [{', '.join(_scalar(key, v) for v in value)}]")
        elif isinstance(value, dict):
            lines.append(f"{pad}{key} {{\n{to_pbtxt(value, indent + 1)}{pad}}}")
        else:
            lines.append(f"{pad}{key}: {_scalar(key, value)}")
    return "".join(line + "\n" for line in lines)


def _scalar(key: str, value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return value if key in ENUMS else _string(value)


_ESCAPES = {"n": b"\n", "t": b"\t", "r": b"\r", "a": b"\a", "b": b"\b", "f": b"\f", "v": b"\v"}


def _unstring(literal: str) -> str:
    """The text of a protobuf text-format string literal (_string's, or one edited by hand)."""
    body, decoded, i = literal[1:-1], bytearray(), 0
    while i < len(body):
        if body[i] != "\\":
            decoded += body[i].encode()
            i += 1
        elif body[i + 1] in "xX":  # one byte in hex
            end = i + 2
            while end < min(i + 4, len(body)) and body[end] in "0123456789abcdefABCDEF":
                end += 1
            decoded.append(int(body[i + 2:end], 16))
            i = end
        elif body[i + 1] in "01234567":
            end = i + 2
            while end < min(i + 4, len(body)) and body[end] in "01234567":
                end += 1
            decoded.append(int(body[i + 1:end], 8))
            i = end
        else:
            decoded += _ESCAPES.get(body[i + 1], body[i + 1].encode())
            i += 2
    return decoded.decode()


def _string(text: str) -> str:
    """A protobuf text-format string literal; non-ASCII characters as UTF-8 octal escapes."""
    escaped = []
    for byte in text.encode():
        char = chr(byte)
        if char in '"\\':
            escaped.append("\\" + char)
        elif 32 <= byte < 127:
            escaped.append(char)
        else:
            escaped.append(f"\\{byte:03o}")
    return '"' + "".join(escaped) + '"'

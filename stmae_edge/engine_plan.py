"""Engine plans and their JSON sidecars: the one definition shared by `build` (writes) and the runtime
(reads and checks). No torch and no onnx here: a line PC with only TensorRT and numpy can load plans.

A plan is opaque and specific to a TensorRT version and a GPU, so everything the runtime needs to
trust it sits in the sidecar `<plan>.json`: the model's metadata, the precision, the batch profile,
the TensorRT flavour and version that built it, and the sha256 of the plan itself.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import BackendError, EngineMismatchError, StmaeError
from .metadata import ModelMetadata

SIDECAR_FORMAT = "stmae-edge/engine"
INSTALL_HINT = ("install TensorRT (pip install tensorrt, or JetPack on a Jetson), or TensorRT for RTX: "
                "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings")


class TensorRTMissingError(BackendError):
    """Neither TensorRT nor TensorRT for RTX can be imported."""


def import_tensorrt(flavour: str | None = None):
    """(module, flavour): full TensorRT first, TensorRT for RTX second; or exactly the flavour asked for."""
    candidates = [("tensorrt", "tensorrt"), ("tensorrt_rtx_bindings", "tensorrt-rtx")]
    for module_name, name in candidates:
        if flavour not in (None, name):
            continue
        try:
            return __import__(module_name), name
        except ImportError:
            pass
    wanted = f"{flavour} is" if flavour else "TensorRT is"
    raise TensorRTMissingError(f"{wanted} not installed: {INSTALL_HINT}") from None


def collecting_logger(trt):
    """Keeps TensorRT's errors for our one-line message instead of printing them: TensorRT for RTX
    logs CUDA-driver errors on machines without a GPU even when the ahead-of-time build succeeds."""

    class CollectingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(msg.strip().splitlines()[0][:300])

    return CollectingLogger()


def sha256_file(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sidecar_path(plan: Path | str) -> Path:
    plan = Path(plan)
    return plan.with_name(plan.name + ".json")


def write_sidecar(plan: Path, sidecar: dict) -> Path:
    path = sidecar_path(plan)
    path.write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return path


def read_plan(plan: Path | str) -> tuple[bytes, dict, ModelMetadata]:
    """The plan's bytes, its sidecar and the model metadata, after checking that they belong together.

    Raises EngineMismatchError when the sidecar is missing, malformed or describes another plan."""
    plan = Path(plan)
    if not plan.is_file():
        raise EngineMismatchError(f"{plan}: no such engine plan")
    side = sidecar_path(plan)
    if not side.is_file():
        raise EngineMismatchError(f"{plan}: its sidecar {side.name} is missing; rebuild with "
                                  "`stmae-edge build MODEL.onnx`, which writes both")
    try:
        sidecar = json.loads(side.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineMismatchError(f"{side}: not a readable sidecar ({exc}); rebuild the engine") from exc
    if not isinstance(sidecar, dict) or sidecar.get("format") != SIDECAR_FORMAT:
        raise EngineMismatchError(f"{side}: not a stmae-edge engine sidecar; rebuild the engine")
    data = plan.read_bytes()
    expected = str(sidecar.get("plan", {}).get("sha256", ""))
    if hashlib.sha256(data).hexdigest() != expected:
        raise EngineMismatchError(f"{plan} does not match its sidecar {side.name} (sha256 differs): the plan "
                                  "was rebuilt, replaced or paired with another model's sidecar; rebuild both "
                                  "with `stmae-edge build`")
    try:
        metadata = ModelMetadata.from_dict(sidecar["metadata"])
    except (KeyError, StmaeError) as exc:
        raise EngineMismatchError(f"{side}: the model metadata is missing or unusable ({exc})") from exc
    return data, sidecar, metadata

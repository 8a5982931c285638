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

from .checks import MAX_DOCUMENT_BYTES, is_file, is_whole, parse_document
from .errors import EngineMismatchError, StmaeError, TensorRTMissingError, TensorRTUnloadableError, first_line
from .machine import nvidia_platform
from .metadata import MAX_BATCH, ModelMetadata

SIDECAR_FORMAT = "stmae-edge/engine"
FLAVOURS = ("tensorrt", "tensorrt-rtx")  # import_tensorrt's names
# The batch sizes (min, opt, max) a plan is built for by default; ONNX Runtime's TensorRT provider is
# given the same range.
DEFAULT_BATCH_PROFILE = (1, 8, 32)
DEFAULT_BATCH_TEXT = ":".join(map(str, DEFAULT_BATCH_PROFILE))
PLAN_PRECISIONS = ("fp32", "fp16", "int8")
# TensorRT for RTX builds our graphs for these compute capabilities and no others (its default set):
# data-centre GPUs (H100, H200: 9.0) and Jetson Orin (8.7) need full TensorRT, and so does Turing (7.5:
# T4, RTX 20xx), on which it cannot compile the graphs' float32 matrix products (engines/build.py).
RTX_COMPUTE_CAPABILITIES = ((8, 0), (8, 6), (8, 9), (12, 0), (12, 1))
RTX_COMPUTE_CAPABILITIES_TEXT = ", ".join(f"{major}.{minor}" for major, minor in RTX_COMPUTE_CAPABILITIES)
INSTALL_HINT = ("install TensorRT (pip install tensorrt), or TensorRT for RTX: "
                "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings")
# On a Jetson TensorRT comes with JetPack, for the system Python: a virtual environment sees it only if
# made with the system's packages (pip's tensorrt and TensorRT for RTX are not built for L4T).
JETSON_INSTALL_HINT = ("on a Jetson, JetPack installs TensorRT for the system Python: make the virtual environment "
                       "with `python3 -m venv --system-site-packages` (sudo apt install python3-libnvinfer where "
                       "it is missing)")


# The hint per nvidia_platform(): pip's TensorRT for RTX is built for x86-64 only, and macOS has no CUDA.
INSTALL_HINTS = {
    "x86-64": INSTALL_HINT,
    "jetson": JETSON_INSTALL_HINT,
    "arm": "install TensorRT (pip install tensorrt: NVIDIA's build for ARM servers); TensorRT for RTX has no ARM build",
    "macos": ("TensorRT runs on NVIDIA GPUs, which macOS does not drive: build plans on the Linux or Windows "
              "machine (or the Jetson) that runs them, and run the .onnx here"),
    "other": ("NVIDIA builds no TensorRT wheel for this platform: build plans on the x86-64 or Jetson machine "
              "that runs them, and run the .onnx here"),
}


def install_hint() -> str:
    """How to get TensorRT on this machine."""
    return INSTALL_HINTS[nvidia_platform()]


def import_tensorrt(flavour: str | None = None):
    """(module, flavour): full TensorRT first, TensorRT for RTX second; or exactly the flavour asked for."""
    # TensorRT for RTX is `tensorrt_rtx_bindings` from PyPI, `tensorrt_rtx` from NVIDIA's SDK wheel
    full, rtx = FLAVOURS
    candidates = [("tensorrt", full), ("tensorrt_rtx_bindings", rtx), ("tensorrt_rtx", rtx)]
    unloadable = []
    for module_name, name in candidates:
        if flavour not in (None, name):
            continue
        try:
            return __import__(module_name), name
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # the package is there, one of its own imports is not
                unloadable.append(f"{module_name}: {first_line(exc, 200)}")
        except (ImportError, OSError) as exc:  # installed, but its libraries do not load (a DLL not found)
            unloadable.append(f"{module_name}: {first_line(exc, 200)}")
    wanted = flavour or "TensorRT"
    if unloadable:
        raise TensorRTUnloadableError(f"{wanted} is installed but cannot load here ({'; '.join(unloadable)}): "
                                      "reinstall it, or put its libraries where the system finds them")
    raise TensorRTMissingError(f"{wanted} is not installed: {install_hint()}") from None


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


def telling_error(errors: list[str]) -> str:
    """The error that says what went wrong: TensorRT for RTX adds CUDA-driver errors after the cause
    (a failed deserialisation, say), and on machines without a GPU, errors that change nothing."""
    causes = [e for e in errors if "cudaError" not in e and "CUDA driver" not in e and "CUDA initialization" not in e]
    return (causes or errors or ["no message"])[0]


def sidecar_path(plan: Path | str) -> Path:
    plan = Path(plan)
    return plan.with_name(plan.name + ".json")


def sidecar_bytes(sidecar: dict) -> bytes:
    return (json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode()


def write_sidecar(plan: Path, sidecar: dict) -> Path:
    from .outputs import write_bytes_atomically  # outputs is not needed by the runtime's readers

    path = sidecar_path(plan)
    write_bytes_atomically(path, sidecar_bytes(sidecar))
    return path


def read_plan(plan: Path | str) -> tuple[bytes, dict, ModelMetadata]:
    """The plan's bytes, its sidecar and the model metadata, after checking that they belong together.

    Raises EngineMismatchError when the sidecar is missing, malformed or describes another plan."""
    plan = Path(plan)
    if not is_file(plan, EngineMismatchError):
        raise EngineMismatchError(f"{plan}: no such engine plan")
    side = sidecar_path(plan)
    if not is_file(side, EngineMismatchError):
        raise EngineMismatchError(f"{plan}: its sidecar {side.name} is missing; rebuild with "
                                  "`stmae-edge build MODEL.onnx`, which writes both")
    # `build` replaces the plan and then its sidecar: read between the two renames, they differ, and read
    # again, they are the new pair
    for _ in range(2):
        sidecar = _read_sidecar(side)
        try:
            data = plan.read_bytes()
        except OSError as exc:
            raise EngineMismatchError(f"{plan}: cannot be read ({exc.strerror or exc})") from exc
        if hashlib.sha256(data).hexdigest() == sidecar["plan"]["sha256"]:
            break
    else:
        raise EngineMismatchError(f"{plan} does not match its sidecar {side.name} (sha256 differs): the plan "
                                  "was rebuilt, replaced or paired with another model's sidecar; rebuild both "
                                  "with `stmae-edge build`")
    try:
        metadata = ModelMetadata.from_dict(sidecar["metadata"])
    except (KeyError, StmaeError) as exc:
        raise EngineMismatchError(f"{side}: the model metadata is missing or unusable ({exc})") from exc
    return data, sidecar, metadata


def _read_sidecar(side: Path) -> dict:
    """A plan's sidecar, its fields checked (EngineMismatchError where it is unreadable or not ours)."""
    try:
        if side.stat().st_size > MAX_DOCUMENT_BYTES:
            raise EngineMismatchError(f"{side}: {side.stat().st_size:,} bytes is far more than a sidecar holds; "
                                      "rebuild the engine")
        text = side.read_bytes()
    except OSError as exc:
        raise EngineMismatchError(f"{side}: not a readable sidecar ({exc.strerror or exc}); rebuild the engine") from exc
    sidecar = parse_document(text, f"the sidecar {side}", EngineMismatchError)
    if sidecar.get("format") != SIDECAR_FORMAT:
        raise EngineMismatchError(f"{side}: not a stmae-edge engine sidecar; rebuild the engine")
    check_sidecar_fields(sidecar, side)
    return sidecar


def check_sidecar_fields(sidecar: dict, side: Path) -> None:
    """The fields the runtime reads, of the right types: the sidecar is not covered by the plan's hash."""
    plan_info, trt_info = sidecar.get("plan"), sidecar.get("tensorrt")
    problems = []
    if not isinstance(plan_info, dict) or not isinstance(plan_info.get("sha256"), str):
        problems.append("no plan sha256")
    if not isinstance(trt_info, dict) or trt_info.get("flavour") not in FLAVOURS \
            or not isinstance(trt_info.get("version"), str):
        problems.append(f"no TensorRT flavour ({', '.join(FLAVOURS)}) and version")
    if sidecar.get("precision", "fp32") not in PLAN_PRECISIONS:
        problems.append(f"precision {sidecar.get('precision')!r} is not one of {', '.join(PLAN_PRECISIONS)}")
    batch = sidecar.get("batch")
    sizes = [batch.get(k) for k in ("min", "opt", "max")] if isinstance(batch, dict) else []
    if not (len(sizes) == 3 and all(is_whole(v) for v in sizes) and 1 <= sizes[0] <= sizes[1] <= sizes[2] <= MAX_BATCH):
        problems.append(f"no batch profile (min <= opt <= max, whole numbers from 1 to {MAX_BATCH})")
    if problems:
        raise EngineMismatchError(f"{side}: {'; '.join(problems)}; rebuild the engine with `stmae-edge build`")

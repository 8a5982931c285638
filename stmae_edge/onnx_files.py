"""Opening ONNX files a user hands in (export, verify, calibrate, build, evaluate, the runtime): a
security boundary; and importing ONNX Runtime, whose process-wide log the CLI keeps quiet.

    path -> onnx.load without external data -> every tensor that keeps its data in another file
         must name a file inside the model's own folder -> the ModelProto

A crafted file could otherwise make the ONNX loader or TensorRT's parser read any file on the machine
("../../home/user/.ssh/id_rsa" as a tensor's location). The runtime's ONNX Runtime backend checks a
file here before ONNX Runtime opens it: only onnxruntime 1.24 and later refuse such files themselves.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from .checks import PLAN_SUFFIXES, require_model_file
from .errors import BackendError, CheckpointError, StmaeError, first_line

logger = logging.getLogger(__name__)

# ONNX Runtime's own messages (a GPU provider that could not start, node placement, quantisation's
# advice) go to stderr from its process-wide logger. The CLI turns them off unless asked (-v), as each
# failure it reports becomes one `error:` line; a program embedding the runtime keeps ONNX Runtime's
# settings, its own to choose. Every import of ONNX Runtime in the package goes through
# import_onnxruntime, so that the choice reaches export, verify and calibrate as well as the runtime.
_quiet_onnxruntime = False
_catch_loader_output = False


def quiet_onnxruntime_logs() -> None:
    """Only ONNX Runtime's fatal errors reach stderr from now on, and what its loader of CUDA libraries
    prints is logged instead of reaching stdout (the CLI's choice; see above and preload_cuda_libraries)."""
    global _quiet_onnxruntime
    _quiet_onnxruntime = True
    catch_cuda_loader_output()


def catch_cuda_loader_output() -> None:
    """What ONNX Runtime's loader of CUDA libraries prints to stdout is logged instead (INFO), for a
    program whose stdout is its output: the CLI's, whose --json must stay JSON even with -v."""
    global _catch_loader_output
    _catch_loader_output = True


def import_onnxruntime():
    """The onnxruntime module, its log quieted where the CLI asked.

    Raises:
        BackendError: ONNX Runtime is not installed.
    """
    try:
        import onnxruntime
    except ImportError:
        raise BackendError("ONNX Runtime is not installed: pip install onnxruntime (CPU) or onnxruntime-gpu") from None
    if not hasattr(onnxruntime, "InferenceSession"):
        # onnxruntime and onnxruntime-gpu install the same files: with both installed, removing one takes
        # files the other needs, and what is left imports as an empty package
        raise BackendError(f"ONNX Runtime's installation is broken ({onnxruntime.__name__} has no InferenceSession: "
                           "onnxruntime and onnxruntime-gpu were both installed, and one removed?); "
                           f"{ONNXRUNTIME_REINSTALL}")
    _warn_if_both_onnxruntimes()
    if _quiet_onnxruntime:
        onnxruntime.set_default_logger_severity(4)  # 4: fatal only
    return onnxruntime


ONNXRUNTIME_REINSTALL = ("pip uninstall -y onnxruntime onnxruntime-gpu, then pip install onnxruntime-gpu (Linux and "
                         "Windows x86-64) or onnxruntime (elsewhere), one of the two")
_checked_distributions = False


def _warn_if_both_onnxruntimes() -> None:
    """Once per process: both ONNX Runtime builds installed (pip installs onnxruntime-gpu beside a user's
    onnxruntime without a word), which of their files is used is then a matter of install order."""
    global _checked_distributions
    if _checked_distributions:
        return
    _checked_distributions = True
    from importlib import metadata

    installed = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            installed.append(f"{name} {metadata.version(name)}")
    if len(installed) == 2:
        logger.warning("both ONNX Runtime builds are installed (%s), which share one module: %s",
                       " and ".join(installed), ONNXRUNTIME_REINSTALL)


_preload_lock = threading.Lock()
_preloaded = False


def preload_cuda_libraries(ort) -> None:
    """Load the CUDA and cuDNN libraries of the gpu extra's nvidia-* wheels (onnxruntime 1.21+), once per
    process, before the first GPU session. Their loader prints what it could not load to stdout. Only a
    program that asked (catch_cuda_loader_output, quiet_onnxruntime_logs) has that caught and logged:
    catching it means swapping sys.stdout, the host's, for everyone. Each Detector doing it diverted
    other threads' output, and two opened at once could leave stdout swapped for good."""
    global _preloaded
    preload = getattr(ort, "preload_dlls", None)
    with _preload_lock:
        if _preloaded or preload is None:
            return
        _preloaded = True
        said = io.StringIO()
        try:
            with contextlib.redirect_stdout(said) if _catch_loader_output else contextlib.nullcontext():
                preload(directory="")
        except Exception as exc:  # a folder it expected that is not there, ...
            said.write(first_line(exc))
    if said.getvalue().strip():
        logger.info("onnxruntime.preload_dlls: %s", " | ".join(said.getvalue().split("\n")).strip(" |"))


# What ONNX Runtime's TensorRT provider opens by name when a session starts (TensorRT 10's sonames)
TENSORRT_PROVIDER_LIBRARIES = ("libnvinfer.so.10", "libnvinfer_plugin.so.10", "libnvonnxparser.so.10")
_tensorrt_dll_folders: list = []  # Windows: kept, or the folder leaves the search path again
_tensorrt_preloaded = False


def preload_tensorrt_libraries() -> None:
    """TensorRT's libraries from pip's wheel (the `tensorrt_libs` folder), made findable for ONNX
    Runtime's TensorRT provider, which opens libnvinfer by name and finds nothing in a virtual
    environment (the tensorrt package itself loads them only when imported, which a runtime without
    plans never does). Loaded by path with their symbols global, so that the provider's own dlopen by
    name finds them loaded; on Windows the folder is added to the DLL search path. A library that does
    not load is left to the provider's own error, which names it. Once per process."""
    import ctypes
    import importlib.util
    import os

    global _tensorrt_preloaded
    with _preload_lock:
        if _tensorrt_preloaded:
            return
        _tensorrt_preloaded = True
    try:
        spec = importlib.util.find_spec("tensorrt_libs")
    except (ImportError, ValueError):
        return
    folders = list(spec.submodule_search_locations or []) if spec else []
    if not folders:  # JetPack's or a system TensorRT: on the loader's path already
        return
    folder = Path(folders[0])
    if os.name == "nt":
        if hasattr(os, "add_dll_directory") and folder.is_dir():
            _tensorrt_dll_folders.append(os.add_dll_directory(str(folder)))
            os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
        return
    for name in TENSORRT_PROVIDER_LIBRARIES:
        if (folder / name).exists():
            try:
                ctypes.CDLL(str(folder / name), mode=ctypes.RTLD_GLOBAL)
            except OSError as exc:
                logger.info("%s: not loaded (%s)", folder / name, first_line(exc))


def load_onnx(path: Path | str, error: type[StmaeError] = CheckpointError):
    """The ModelProto of `path`, its external data checked but not loaded.

    Raises:
        ModelFileMissingError: no such file, as for every model file the package opens.
        `error`: the file cannot be read or parsed, or a tensor's external data lies outside its folder.
    """
    return load_onnx_bytes(path, error)[0]


def load_onnx_bytes(path: Path | str, error: type[StmaeError] = CheckpointError):
    """load_onnx's ModelProto and the bytes it was parsed from. Raises as load_onnx."""
    path = require_model_file(path)
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise error(f"{path}: not a readable ONNX file ({first_line(exc, 200)})") from None
    return parse_onnx(blob, path, error), blob


# ONNX Runtime on Windows converted a model's path to the ANSI code page while it started a session and
# failed where the path held a character outside it, a folder named 検査 on a Western system
# (microsoft/onnxruntime#27724 and #28390, fixed in 2026; this package takes onnxruntime 1.18 and later).
PATHS_IN_ANSI = os.name == "nt"


def ort_may_not_open(path: Path | str) -> bool:
    """Whether ONNX Runtime may fail to open the graph at `path` (PATHS_IN_ANSI, a name outside ASCII),
    so that it is given the graph's bytes instead (ort_model_source)."""
    return PATHS_IN_ANSI and not str(path).isascii()


def ort_model_source(path: Path | str) -> str | bytes:
    """What ONNX Runtime's InferenceSession is given for the graph at `path`: its path, or, where ONNX
    Runtime may fail to open that path (PATHS_IN_ANSI, a name outside ASCII), the graph's bytes, unless
    its tensors' data lies in other files, which ONNX Runtime finds from the path.

    Raises:
        ModelFileMissingError, CheckpointError: as load_onnx, where the bytes are read.
    """
    text = str(path)
    if not ort_may_not_open(path):
        return text
    proto, blob = load_onnx_bytes(path)
    if has_external_data(proto):
        logger.info("%s: its tensors' data lies in other files, so ONNX Runtime is given its path", path)
        return text
    return blob


def parse_onnx(blob: bytes, path: Path, error: type[StmaeError] = CheckpointError):
    """The ModelProto in `blob`, the bytes of `path` (load_onnx), checked as load_onnx checks a file: a
    caller that checks a graph and then writes it elsewhere reads it once, so the graph checked is the
    graph written.

    Raises:
        `error`: the bytes are not an ONNX graph, or a tensor's external data lies outside `path`'s folder.
    """
    import onnx

    try:
        proto = onnx.load_model_from_string(blob)
    except Exception as exc:  # protobuf DecodeError, ...
        what = _what_else(path, blob)
        if what:  # the usual swaps: the checkpoint, the plan or its sidecar given where the graph goes
            raise error(f"{path}: {what}, not an ONNX graph; give the .onnx file that `stmae-edge export` wrote") from None
        first = first_line(exc, 200)
        raise error(f"{path}: not a readable ONNX file ({first})") from None
    if not proto.graph.node:  # an empty file parses as an empty model
        raise error(f"{path}: {_what_else(path, blob) or 'an ONNX file without a graph'}, not an ONNX graph; give the "
                    ".onnx file that `stmae-edge export` wrote")
    check_external_data(proto, path, error)
    return proto


# What users give where a graph goes, by the file's first bytes (or name: a plan has no magic of its own)
_MAGIC = ((b"PK\x03\x04", "a zip file (a PyTorch checkpoint?)"), (b"\x89PNG", "a PNG image"),
          (b"\xff\xd8\xff", "a JPEG image"), (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"),
          (b"BM", "a BMP image"), (b"{", "a JSON file (a plan's sidecar?)"))


def _what_else(path: Path, blob: bytes) -> str | None:
    """What the file `path` holding `blob` is, where it is plainly something else than an ONNX graph
    (None: cannot tell)."""
    start = blob[:16]
    if not start:
        return "an empty file"
    found = next((what for magic, what in _MAGIC if start.lstrip().startswith(magic)), None)
    if found is None and path.suffix.lower() in PLAN_SUFFIXES:
        return "a TensorRT plan"
    return found


_INLINE_DATA = ("raw_data", "float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def check_external_data(proto, path: Path, error: type[StmaeError] = CheckpointError) -> None:
    """Every external-data location is a relative path that stays inside the model's folder, and no
    tensor says its data is external while carrying data of its own (what onnx.save would write there)."""
    # The folder the path names, where readers look: a link to a model elsewhere must not move it.
    folder = path.absolute().parent.resolve()
    for tensor in _tensors(proto):
        if tensor.data_location != 1:  # TensorProto.EXTERNAL
            continue
        if any(len(getattr(tensor, field)) for field in _INLINE_DATA):
            raise error(f"{path}: tensor {tensor.name[:80]!r} is marked as external data but carries its own; "
                        "refusing a malformed file (stmae-edge exports are self-contained)")
        location = {entry.key: entry.value for entry in tensor.external_data}.get("location", "")
        try:
            target = (folder / location).resolve()
        except (ValueError, OSError):  # a NUL byte, a name too long, a loop of links
            target = None
        if not location or Path(location).is_absolute() or target is None or folder not in target.parents:
            raise error(f"{path}: tensor {tensor.name[:80]!r} takes its data from {location[:200]!r}, outside the "
                        "model's folder; refusing the file (stmae-edge exports are self-contained)")


def has_external_data(proto) -> bool:
    """Whether any tensor of the model keeps its data in another file."""
    return any(tensor.data_location == 1 for tensor in _tensors(proto))  # TensorProto.EXTERNAL


def _tensors(model) -> Iterator:
    """All tensors of a model: initializers, sparse ones, and those inside node attributes, subgraphs
    and model-local functions."""
    node_lists, graphs = [function.node for function in model.functions], [model.graph]
    while graphs or node_lists:
        if graphs:
            g = graphs.pop()
            yield from g.initializer
            for sparse in g.sparse_initializer:
                yield from (sparse.values, sparse.indices)
            node_lists.append(g.node)
            continue
        for node in node_lists.pop():
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                sparse_tensors = [attribute.sparse_tensor] if attribute.HasField("sparse_tensor") else []
                for sparse in sparse_tensors + list(attribute.sparse_tensors):
                    yield from (sparse.values, sparse.indices)
                if attribute.HasField("g"):
                    graphs.append(attribute.g)
                graphs.extend(attribute.graphs)

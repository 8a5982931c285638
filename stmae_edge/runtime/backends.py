"""Inference backends behind one small interface, and the choice between them.

A backend takes a preprocessed batch (N, 3, H, W) float32 and returns the anomaly maps (N, H, W) and
image scores (N,) as float32 numpy arrays. It also says what actually runs it (`provider`, `device`):
ONNX Runtime silently falls back to the CPU when a GPU provider cannot load, so we compare the
provider we asked for with the one the session reports and refuse a fallback the caller did not ask for.

One table (backend_table.py: BACKEND_KINDS, FILE_KINDS, AUTO) names every backend, the model files it
runs and the device it needs; `auto`'s choice, the errors for a backend that cannot run a file, and
the CLI's --backend help are all read from it:

    model file --(FILE_KINDS: suffix)--> the backends that run it --(auto: the first whose device is
    here)--> open_backend --> OnnxRuntimeBackend | TensorRTBackend (tensorrt_backend.py) | TorchBackend
    (torch_backend.py, needs the train extra)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from glob import escape as glob_escape
from pathlib import Path
from typing import Protocol

import numpy as np

from ..checks import require_model_file
from ..engine_plan import DEFAULT_BATCH_PROFILE
from ..errors import BackendError, CheckpointError, ConfigError, EngineMismatchError, first_line
from ..machine import nvidia_platform
from ..metadata import INPUT_NAME, MAP_NAME, MAX_BATCH, SCORE_NAME, ModelMetadata, onnx_precision
from ..onnx_files import (
    has_external_data,
    import_onnxruntime,
    load_onnx,
    load_onnx_bytes,
    ort_may_not_open,
    preload_cuda_libraries,
    preload_tensorrt_libraries,
)
from ..outputs import folder_waited_for, sha256_file
from .backend_table import AUTO, BACKEND_KINDS, FILE_KINDS, KINDS_BY_NAME, check_backend_name, file_kind_of
from .devices import cpu_description, cuda_device_count, cuda_driver_state, gpu_description

logger = logging.getLogger(__name__)
ORT_PROVIDERS = {kind.name: kind.provider for kind in BACKEND_KINDS if kind.provider}  # backend -> provider
# ONNX Runtime's TensorRT provider builds one engine for this batch range (min, opt, max): the range a
# plan from `build` has by default. Larger batches are split by the Detector.
ORT_TENSORRT_PROFILE = DEFAULT_BATCH_PROFILE
GPU_PROVIDER_HINT = ("check the GPU driver and the CUDA, cuDNN (and TensorRT) versions that this onnxruntime-gpu "
                     "needs (pip install \"stmae-edge[gpu]\" brings CUDA's and cuDNN's), or ask for --backend ort-cpu")


# How to get ONNX Runtime's GPU providers, per machine.nvidia_platform(): PyPI's onnxruntime-gpu is built
# for x86-64 Linux and Windows only
GPU_ONNXRUNTIME_HINTS = {
    "x86-64": "install onnxruntime-gpu in place of onnxruntime",
    "jetson": "install NVIDIA's onnxruntime-gpu build for this JetPack in place of onnxruntime",
    "arm": "PyPI has no onnxruntime-gpu for ARM: build a TensorRT plan with `stmae-edge build` and run that",
    "macos": "ONNX Runtime has no CUDA on macOS",
    "other": "PyPI has no onnxruntime-gpu for this platform",
}


def gpu_onnxruntime_hint() -> str:
    """How to get ONNX Runtime's CUDA and TensorRT providers on this machine."""
    return GPU_ONNXRUNTIME_HINTS[nvidia_platform()]


def choose_backend(path: Path, backend: str) -> str:
    """The backend that runs `path`: `backend` itself, checked against the file, or auto's choice.

    Raises:
        ConfigError: an unknown name, or a backend that does not run this kind of file.
    """
    check_backend_name(backend)
    file_kind = file_kind_of(path)
    if backend == "auto":
        # The last of each list is taken without asking: it runs anywhere, or (a plan) says what is missing.
        *asked, last = AUTO[file_kind]
        chosen = next((name for name in asked if device_present(name)), last)
        skipped = asked[:asked.index(chosen)] if chosen in asked else asked
        if skipped and cuda_device_count() > 0:  # a GPU that ONNX Runtime cannot use: worth a warning
            missing = " or ".join(ORT_PROVIDERS.get(name, name) for name in skipped)
            logger.warning("backend auto: %s for %s: a CUDA GPU is here, but this ONNX Runtime has no %s; %s",
                           chosen, path.name, missing, gpu_onnxruntime_hint() + (
                               ", or build a TensorRT plan with `stmae-edge build` and run that"
                               if nvidia_platform() in ("x86-64", "jetson") else ""))
        elif skipped and (driver := cuda_driver_state()).startswith("error"):
            # a driver that fails (after an upgrade without a reboot, say) looks like no GPU to the count:
            # a line PC that has one would run on its CPU, slower than the line, with nothing said
            logger.warning("backend auto: %s for %s: the CUDA driver fails (cuInit %s; a driver upgraded "
                           "without a reboot, say): %s not tried; `nvidia-smi` says more", chosen, path.name,
                           driver, ", ".join(skipped))
        elif skipped:  # said, not silent: a line PC that should have a GPU runs on its CPU
            logger.info("backend auto: %s for %s (%s: no CUDA GPU here)", chosen, path.name, ", ".join(skipped))
        return chosen
    if KINDS_BY_NAME[backend].file_kind != file_kind:
        _, description, ways = FILE_KINDS[file_kind]
        runs = [kind.name for kind in BACKEND_KINDS if kind.file_kind == file_kind]
        raise ConfigError(f"{path} is {description}; it runs with --backend {' or '.join(runs)} (or auto); for "
                          f"--backend {backend}, {ways[KINDS_BY_NAME[backend].file_kind]}")
    return backend


def device_present(name: str) -> bool:
    """Whether this machine has what backend `name` needs to be auto's choice: a CUDA GPU, and for
    ONNX Runtime its CUDA provider; nothing for a CPU backend."""
    if KINDS_BY_NAME[name].device == "cpu":
        return True
    if cuda_device_count() == 0:
        return False
    return name not in ORT_PROVIDERS or ORT_PROVIDERS[name] in import_onnxruntime().get_available_providers()


class Backend(Protocol):
    name: str  # one of BACKENDS, never "auto"
    provider: str  # what actually executes the graph, as the library reports it
    device: str  # e.g. "CPU: Intel Xeon ... (2 cores)" or "GPU: NVIDIA H100 80GB HBM3"
    precision: str  # fp32, fp16 or int8
    metadata: ModelMetadata
    min_batch: int
    max_batch: int

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def close(self) -> None: ...


def describe(backend: Backend) -> dict:
    return {"backend": backend.name, "provider": backend.provider, "device": backend.device,
            "precision": backend.precision, "batch": [backend.min_batch, backend.max_batch],
            "model_hash": backend.metadata.model_hash}


def open_backend(model_path: Path | str, backend: str = "auto", *, cuda_graph: bool = False,
                 threads: int = 0, spin_threads: bool = False) -> Backend:
    """The backend for a model file: chosen from the file type and the machine, or as named.

    Args:
        model_path: a .plan (with its sidecar), .onnx or .pt file.
        backend: a name of BACKENDS; "auto" chooses from the file's kind and the machine (AUTO).
        cuda_graph: (TensorRT plans only) replay each batch size as a captured CUDA graph.
        threads: ONNX Runtime's intra-op threads (0: its default).
        spin_threads: let ONNX Runtime's threads busy-wait for work (see Detector).

    Raises:
        ConfigError: an unknown backend or file type, or a backend that does not run this file.
        BackendError: no such file, or the backend cannot start here (each says what is missing).
        EngineMismatchError: a plan and its sidecar, or the graph and its metadata, do not agree.
    """
    check_backend_name(backend)
    path = require_model_file(model_path)
    chosen = choose_backend(path, backend)
    if cuda_graph and chosen != "tensorrt":
        raise ConfigError("CUDA graphs are a TensorRT option: give a .plan file, or leave out --cuda-graph")
    if backend == "auto":
        # A GPU that is present but cannot run the file (a CUDA library missing, a provider that fails
        # to start) passes to auto's next choice, said; a backend named by the caller fails instead.
        candidates = (names := AUTO[file_kind_of(path)])[names.index(chosen):]
        # the graph read and checked once for all the providers tried (0.3 s for the default's)
        facts = _graph_facts(path) if len(candidates) > 1 and file_kind_of(path) == "onnx" else None
        for name, following in zip(candidates, candidates[1:], strict=False):
            try:
                return _open_chosen(path, name, cuda_graph, threads, spin_threads, facts)
            except EngineMismatchError:  # the file, not the machine: the next backend would say the same
                raise
            except BackendError as exc:
                logger.warning("backend auto: %s cannot run %s here (%s); trying %s", name, path.name,
                               first_line(exc, 300), following)
        chosen = candidates[-1]
        return _open_chosen(path, chosen, cuda_graph, threads, spin_threads, facts)
    return _open_chosen(path, chosen, cuda_graph, threads, spin_threads)


def _open_chosen(path: Path, chosen: str, cuda_graph: bool, threads: int, spin_threads: bool,
                 facts: tuple[str, tuple[int, ...]] | None = None) -> Backend:
    if chosen == "tensorrt":
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend(path, cuda_graph=cuda_graph)
    if chosen in ORT_PROVIDERS:
        return OnnxRuntimeBackend(path, chosen, threads=threads, spin_threads=spin_threads, facts=facts)
    try:
        from .torch_backend import TorchBackend  # needs the train extra; never imported by the runtime
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        raise BackendError(f"{path} is a PyTorch checkpoint, and PyTorch is not installed here: run the exported "
                           ".onnx file, or pip install \"stmae-edge[train]\"") from None
    return TorchBackend(path, device=chosen.removeprefix("torch-"))


class OnnxRuntimeBackend:
    """An exported ONNX file in ONNX Runtime, on the execution provider named, or an error."""

    name: str
    min_batch = 1

    def __init__(self, path: Path | str, backend: str = "ort-cpu", threads: int = 0, spin_threads: bool = False,
                 facts: tuple[str, tuple[int, ...]] | None = None):
        ort = import_onnxruntime()
        self.name = backend
        wanted = ORT_PROVIDERS[backend]
        if wanted not in ort.get_available_providers():
            raise BackendError(f"this ONNX Runtime build has no {wanted} (it has "
                               f"{', '.join(ort.get_available_providers())}); {gpu_onnxruntime_hint()}; the CPU runs "
                               "it: --backend ort-cpu")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default, one per physical core
        # Spinning threads burn the cores between frames that arrive at intervals, which a line PC's
        # acquisition threads need (docs/BENCHMARKS.md, "ONNX Runtime's threads spinning or waiting").
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_threads else "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "1" if spin_threads else "0")
        # Read by the one loader of users' ONNX files before ONNX Runtime opens it: external data outside
        # the model's folder is refused here, whatever this onnxruntime checks (before 1.24 it read such
        # paths as given). About 0.3 s for the default's 165 MB graph, once per Detector.
        source, digest, facts = _session_source(path, wanted, facts)
        providers = ([wanted] if wanted == "CPUExecutionProvider"
                     else _gpu_providers(ort, wanted, path, facts, digest))
        cache = _engine_cache_of(providers)
        # The TensorRT provider builds its engines as the session starts and writes them without a
        # temporary name: two processes (two cameras' programs) starting at once built them twice, and one
        # could read the other's half-written engine. The second waits, then loads what the first built.
        held = (folder_waited_for(cache, f"waiting for another process to finish building the engines in {cache}")
                if cache is not None else contextlib.nullcontext())
        try:
            with held:
                # No fallback: ONNX Runtime would otherwise print to stdout and move a failing GPU session
                # to the CPU, at creation or in the middle of a run, while `provider` still named the GPU.
                self.session = ort.InferenceSession(source, options, providers=providers, enable_fallback=0)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            _drop_empty_engine_cache(providers)
            if wanted != "CPUExecutionProvider":  # most often a library the provider needs (TensorRT's)
                stale = (f"; if a run was stopped while it built engines, remove {cache} and try again"
                         if cache is not None and cache.exists() else "")
                raise BackendError(f"ONNX Runtime could not start {wanted} for {Path(path).name} "
                                   f"({first_line(exc)}); {GPU_PROVIDER_HINT}{stale}") from exc
            raise BackendError(f"{path}: ONNX Runtime cannot load it ({first_line(exc)})") from exc
        self.session.disable_fallback()  # for versions that do not read enable_fallback
        used = self.session.get_providers()
        if used[0] != wanted:
            _drop_empty_engine_cache(providers)
            raise BackendError(f"ONNX Runtime could not start {wanted} and would run on {used[0]} instead; "
                               f"{GPU_PROVIDER_HINT} (`stmae-edge -v ...` prints ONNX Runtime's reason)")
        self.provider = used[0]
        self.device = cpu_description() if wanted == "CPUExecutionProvider" else gpu_description()
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata = ModelMetadata.from_props(props)
        self.precision = onnx_precision(props)
        self.max_batch = ORT_TENSORRT_PROFILE[2] if wanted == "TensorrtExecutionProvider" else MAX_BATCH
        self.metadata.check_input_size(self.session.get_inputs()[0].shape[2:], path)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.session is None:
            raise BackendError("this ONNX Runtime backend was closed; create a new Detector")
        try:
            maps, scores = self.session.run([MAP_NAME, SCORE_NAME], {INPUT_NAME: batch})
        except Exception as exc:  # onnxruntime's own types: out of memory, a failed GPU kernel, ...
            raise BackendError(f"ONNX Runtime ({self.provider}) failed: {first_line(exc)}") from exc
        return maps[:, 0], scores

    def close(self) -> None:
        self.session = None


# ONNX Runtime's TensorRT provider has no option to keep float32 float32 (its CUDA provider has use_tf32,
# a plan from `build` clears TensorRT's TF32 flag): TensorRT then multiplies in TF32, with fp16's
# mantissa, which the map's Mahalanobis distances amplify. Only the environment turns it off.
TF32_NOTE = ("ONNX Runtime's TensorRT provider computes this float32 graph's matrix products in TF32 (the "
             "precision of fp16) on GPUs from Ampere on; set NVIDIA_TF32_OVERRIDE=0 before the program starts "
             "for float32, or run a plan from `stmae-edge build`, which keeps float32")


def _session_source(path: Path | str, wanted: str, facts: tuple[str, tuple[int, ...]] | None
                    ) -> tuple[str | bytes, str | None, tuple[str, tuple[int, ...]]]:
    """What ONNX Runtime's session is given for the graph at `path`: its path, or the graph itself; for
    the TensorRT provider the sha256 of exactly that graph, which names its engine cache (else None); and
    the graph's facts (_graph_facts), unless given (auto's loop reads them once for several providers).
    The TensorRT provider, and any provider where ONNX Runtime may not open the path
    (onnx_files.ort_may_not_open), is given the graph itself, from the one read that all three come
    from: a model exported to the same name meanwhile (while this process waited for another's engines,
    minutes) cannot be loaded beside the earlier one's engines, nor checked in one read and run from
    another.

    Raises:
        CheckpointError: the file cannot be read or is not an ONNX graph.
    """
    tensorrt = wanted == "TensorrtExecutionProvider"
    if not tensorrt and not ort_may_not_open(path):
        return str(path), None, facts or _graph_facts(path)
    proto, graph = load_onnx_bytes(path, CheckpointError)  # one read for the session and the facts
    # tensors whose data lies beside the graph are found from its path: given the path then
    return ((str(path) if has_external_data(proto) else graph), hashlib.sha256(graph).hexdigest() if tensorrt else None,
            facts or _graph_facts(path, proto))


def _gpu_providers(ort, wanted: str, path: Path | str, facts: tuple[str, tuple[int, ...]],
                   digest: str | None = None) -> list:
    """The provider list for a GPU session: CUDA's libraries found, float32 kept float32 where the
    provider can (TF32 rounds its operands as fp16 does, which the Mahalanobis distances of the map
    amplify: CUDA's provider has an option; TensorRT's only the environment, TF32_NOTE), and for
    TensorRT its libraries found and one engine for the whole batch range, cached beside the model."""
    preload_cuda_libraries(ort)  # 1.21+: CUDA and cuDNN from the nvidia-* wheels of [gpu]
    precision, image_shape = facts
    cuda = ("CUDAExecutionProvider", {"use_tf32": "0"})  # the option exists from onnxruntime 1.18, our floor
    if wanted == "CUDAExecutionProvider":
        return [cuda]
    preload_tensorrt_libraries()  # pip's TensorRT wheel: not on the loader's path in a virtual environment
    if precision == "fp32" and os.environ.get("NVIDIA_TF32_OVERRIDE") != "0":
        logger.warning(TF32_NOTE)
    engine_cache = _engine_cache_folder(Path(path), digest or sha256_file(path))
    try:
        engine_cache.mkdir(exist_ok=True)
    except OSError as exc:
        raise BackendError(f"cannot create the TensorRT engine cache {engine_cache}: "
                           f"{exc.strerror or exc}; copy the model to a writable folder") from exc
    if not any(engine_cache.iterdir()):  # else a first run looks hung, and a folder appears beside the model
        logger.warning("ONNX Runtime's TensorRT provider builds this model's engines into %s before its first "
                       "image: minutes (on a Jetson, many); later runs load them from there", engine_cache)
    shape = "x".join(str(v) for v in image_shape)
    # Without a profile the provider builds for the batch sizes it has seen and rebuilds for each larger one
    profile = {f"trt_profile_{bound}_shapes": f"{INPUT_NAME}:{batch}x{shape}"
               for bound, batch in zip(("min", "opt", "max"), ORT_TENSORRT_PROFILE, strict=True)}
    return [(wanted, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(engine_cache), **profile,
                      # Q/DQ graphs need the provider's INT8 mode; fp16 graphs carry their types
                      "trt_int8_enable": precision == "int8"}), cuda]


def _engine_cache_folder(path: Path, digest: str) -> Path:
    """Where ONNX Runtime's TensorRT provider keeps the engines of the graph at `path`: next to it, not in
    the host program's working directory; a folder per content of the file (`digest`, the sha256 of the
    graph the session is given), because the provider names its engines by the model's path, or for a
    graph given as bytes by its layers' names (onnxruntime's GenerateMetaDefId), never by its weights, and
    would load the engines of the model exported there before; per TensorRT version, as an engine from
    another one is not loadable (the provider rebuilds it, minutes on a Jetson); and apart for engines
    built with TF32 turned off (NVIDIA_TF32_OVERRIDE=0, TF32_NOTE): the variable acts where engines are
    built, so engines built before it was set would keep TF32 without a word."""
    trt_version = _tensorrt_version()
    prefix = f"{path.stem}.ort-tensorrt-cache"
    this_export = f"{prefix}-{digest[:12]}"
    folder = path.with_name(this_export + (f"-{trt_version}" if trt_version else "")
                            + ("-tf32off" if os.environ.get("NVIDIA_TF32_OVERRIDE") == "0" else ""))
    earlier = sorted(p.name for p in path.parent.glob(f"{glob_escape(prefix)}*")
                     if not p.name.startswith(this_export) and p.is_dir())
    if earlier and not folder.exists():
        logger.warning("%s: the engine caches of other exports to this name (%s) are not used; remove them to free "
                       "the disk", path,
                       ", ".join(earlier[:3]) + (" ..." if len(earlier) > 3 else ""))
    return folder


def _engine_cache_of(providers: list) -> Path | None:
    """The TensorRT provider's engine cache folder in a provider list (_gpu_providers), or None."""
    for provider in providers:
        if isinstance(provider, tuple) and "trt_engine_cache_path" in provider[1]:
            return Path(provider[1]["trt_engine_cache_path"])
    return None


def _drop_empty_engine_cache(providers: list) -> None:
    """The TensorRT provider's cache folder, made for a session that did not start, if it holds nothing."""
    for provider in providers:
        if isinstance(provider, tuple) and "trt_engine_cache_path" in provider[1]:
            with contextlib.suppress(OSError):  # not empty: an earlier session's engines, kept
                Path(provider[1]["trt_engine_cache_path"]).rmdir()


def _tensorrt_version() -> str:
    """The version of the TensorRT that pip installed ('' otherwise: JetPack's, or one on the library
    path). Read from the package records: importing TensorRT would load its libraries into the host."""
    from importlib import metadata

    for name in ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu13-libs", "tensorrt-cu12-libs"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return ""


def _graph_facts(path: Path | str, proto=None) -> tuple[str, tuple[int, ...]]:
    """The graph's precision and its input's (channels, height, width), read by the one loader of
    users' ONNX files (onnx_files.load_onnx: external data checked, not loaded), or from its `proto`
    where the caller read it so."""
    # CheckpointError: the file's own fault, which `auto` must not take for the machine's and try the
    # next backend with (its loop passes BackendErrors on)
    proto = proto or load_onnx(path, CheckpointError)
    if not proto.graph.input:
        raise CheckpointError(f"{path}: a graph without inputs, not an stmae-edge model; give the .onnx that "
                              "`stmae-edge export` wrote")
    dims = proto.graph.input[0].type.tensor_type.shape.dim[1:]
    return onnx_precision(proto), tuple(int(d.dim_value) for d in dims)



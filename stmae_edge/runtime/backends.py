"""Inference backends behind one small interface, and the choice between them.

A backend takes a preprocessed batch (N, 3, H, W) float32 and returns the anomaly maps (N, H, W) and
image scores (N,) as float32 numpy arrays. It also says what actually runs it (`provider`, `device`):
ONNX Runtime silently falls back to the CPU when a GPU provider cannot load, so we compare the
provider we asked for with the one the session reports and refuse a fallback the caller did not ask for.

Names (`backend=`):
  auto          .plan -> tensorrt; .onnx -> ort-cuda where a CUDA GPU is present, else ort-cpu; .pt -> torch-cpu
  tensorrt      a TensorRT engine plan with its sidecar (runtime/tensorrt_backend.py)
  ort-tensorrt, ort-cuda, ort-cpu   ONNX Runtime with that execution provider
  torch-cpu, torch-cuda             the PyTorch checkpoint itself, for comparison (needs the train extra)
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import BackendError, ConfigError
from ..metadata import INPUT_NAME, MAP_NAME, MAX_BATCH, SCORE_NAME, ModelMetadata, onnx_precision
from .devices import cpu_description, cuda_device_count, gpu_description

BACKENDS = ("auto", "tensorrt", "ort-tensorrt", "ort-cuda", "ort-cpu", "torch-cpu", "torch-cuda")
ORT_PROVIDERS = {"ort-tensorrt": "TensorrtExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
                 "ort-cpu": "CPUExecutionProvider"}
PLAN_SUFFIXES = (".plan", ".engine")


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
                 threads: int = 0) -> Backend:
    """The backend for a model file: chosen from the file type and the machine, or as named.

    `cuda_graph` (TensorRT plans only) replays each batch size as a captured CUDA graph; `threads` sets
    ONNX Runtime's intra-op threads (0: its default)."""
    path = Path(model_path)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if not path.is_file():
        raise BackendError(f"{path}: no such model file")
    suffix = path.suffix.lower()
    if suffix in PLAN_SUFFIXES:
        if backend not in ("auto", "tensorrt"):
            raise ConfigError(f"{path} is a TensorRT plan; it runs only with --backend tensorrt (or auto)")
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend(path, cuda_graph=cuda_graph)
    if cuda_graph:
        raise ConfigError("CUDA graphs are a TensorRT option: give a .plan file, or leave out --cuda-graph")
    if suffix == ".onnx":
        if backend == "auto":
            has_cuda = cuda_device_count() > 0 and "CUDAExecutionProvider" in _ort().get_available_providers()
            backend = "ort-cuda" if has_cuda else "ort-cpu"
        if backend not in ORT_PROVIDERS:
            raise ConfigError(f"{path} is an ONNX file; use --backend ort-cpu, ort-cuda or ort-tensorrt, or "
                              "build a plan with `stmae-edge build` for --backend tensorrt")
        return OnnxRuntimeBackend(path, backend, threads=threads)
    if suffix == ".pt":
        if backend == "auto":
            backend = "torch-cpu"
        if not backend.startswith("torch-"):
            raise ConfigError(f"{path} is a PyTorch checkpoint; export it (`stmae-edge export`) for {backend}")
        from .torch_backend import TorchBackend  # needs the train extra; never imported by the runtime

        return TorchBackend(path, device=backend.removeprefix("torch-"))
    raise ConfigError(f"{path}: unknown model file type {suffix!r}; use an .onnx file from `stmae-edge export` "
                      "or a .plan from `stmae-edge build`")


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendError("ONNX Runtime is not installed: pip install onnxruntime (CPU) or onnxruntime-gpu") from None
    return onnxruntime


class OnnxRuntimeBackend:
    """An exported ONNX file in ONNX Runtime, on the execution provider named, or an error."""

    name: str
    min_batch = 1

    def __init__(self, path: Path | str, backend: str = "ort-cpu", threads: int = 0):
        ort = _ort()
        self.name = backend
        wanted = ORT_PROVIDERS[backend]
        if wanted not in ort.get_available_providers():
            raise BackendError(f"this ONNX Runtime build has no {wanted} (it has "
                               f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu for "
                               "CUDA and TensorRT, or use --backend ort-cpu")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's default, one per physical core
        providers: list = [wanted]
        if wanted == "TensorrtExecutionProvider":
            # Next to the model, not in the host program's working directory.
            engine_cache = Path(path).with_name(Path(path).stem + ".ort-tensorrt-cache")
            try:
                engine_cache.mkdir(exist_ok=True)
            except OSError as exc:
                raise BackendError(f"cannot create the TensorRT engine cache {engine_cache}: "
                                   f"{exc.strerror or exc}; copy the model to a writable folder") from exc
            providers = [(wanted, {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(engine_cache),
                                   # Q/DQ graphs need the provider's INT8 mode; fp16 graphs carry their types
                                   "trt_int8_enable": _file_precision(path) == "int8"}),
                         "CUDAExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise BackendError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:300]})") from exc
        used = self.session.get_providers()
        if used[0] != wanted:
            raise BackendError(f"ONNX Runtime could not start {wanted} and would run on {used[0]} instead; "
                               "check the GPU driver, CUDA and cuDNN versions that this onnxruntime-gpu needs, "
                               "or ask for --backend ort-cpu")
        self.provider = used[0]
        self.device = cpu_description() if wanted == "CPUExecutionProvider" else gpu_description()
        props = self.session.get_modelmeta().custom_metadata_map
        self.metadata = ModelMetadata.from_props(props)
        self.precision = onnx_precision(props)
        self.max_batch = MAX_BATCH
        self.metadata.check_input_size(self.session.get_inputs()[0].shape[2:], path)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.session is None:
            raise BackendError("this ONNX Runtime backend was closed; create a new Detector")
        try:
            maps, scores = self.session.run([MAP_NAME, SCORE_NAME], {INPUT_NAME: batch})
        except Exception as exc:  # onnxruntime's own types: out of memory, a failed GPU kernel, ...
            raise BackendError(f"ONNX Runtime ({self.provider}) failed: {str(exc).splitlines()[0][:300]}") from exc
        return maps[:, 0], scores

    def close(self) -> None:
        self.session = None


def _file_precision(path: Path | str) -> str:
    import onnx

    try:
        return onnx_precision(onnx.load(str(path), load_external_data=False))
    except Exception as exc:  # protobuf DecodeError, OSError, ...
        raise BackendError(f"{path}: not a readable ONNX file ({exc})") from exc



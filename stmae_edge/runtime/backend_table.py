"""The table of backends: every name --backend takes, the model files it runs and the device it needs.
runtime/backends.py chooses and opens backends from it; the CLI's --backend help is written from it.
Nothing here imports more than the errors and the model files' table (model_files.FILE_KINDS), so
reading the table costs the CLI nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..model_files import FILE_KINDS, file_kind_of  # noqa: F401  (part of the table: backends.py reads them here)


@dataclass(frozen=True)
class BackendKind:
    name: str  # what --backend takes
    file_kind: str  # the model files it runs: a key of FILE_KINDS
    device: str  # "cpu" or "gpu" (a CUDA GPU)
    provider: str | None = None  # ONNX Runtime's execution provider, for the ort-* backends


BACKEND_KINDS = (
    BackendKind("tensorrt", "plan", "gpu"),  # tensorrt_backend.py, through cuda-python
    BackendKind("ort-tensorrt", "onnx", "gpu", "TensorrtExecutionProvider"),  # ONNX Runtime's providers
    BackendKind("ort-cuda", "onnx", "gpu", "CUDAExecutionProvider"),
    BackendKind("ort-cpu", "onnx", "cpu", "CPUExecutionProvider"),
    BackendKind("torch-cpu", "checkpoint", "cpu"),  # torch_backend.py, for comparison; needs the train extra
    BackendKind("torch-cuda", "checkpoint", "gpu"),
)
# What `auto` tries for each kind of file, in order: the first whose device this machine has.
AUTO = {"plan": ("tensorrt",), "onnx": ("ort-cuda", "ort-cpu"), "checkpoint": ("torch-cpu",)}
BACKENDS = ("auto", *(kind.name for kind in BACKEND_KINDS))
KINDS_BY_NAME = {kind.name: kind for kind in BACKEND_KINDS}


def backend_help() -> str:
    """--backend's help, from the table."""
    auto = "; ".join(f"{'/'.join(FILE_KINDS[k][0])}: {', else '.join(names)}" for k, names in AUTO.items())
    by_file = "; ".join(f"{', '.join(kind.name for kind in BACKEND_KINDS if kind.file_kind == k)} ({'/'.join(suffixes)})"
                        for k, (suffixes, _, _) in FILE_KINDS.items())
    return f"{by_file}; or auto: {auto} (the first that this machine can run)"


def check_backend_name(backend: str) -> None:
    """Raises ConfigError unless `backend` is one of BACKENDS."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")

"""The edge runtime: what runs on the line. numpy, OpenCV and the chosen backend; torch only for a
.pt file (its torch backend, for comparison).

The names below load on first use, so that importing one module of the runtime (the CLI reads the
table of backends for its help) does not load them all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# What an integrator needs, from one place: the detector, its results, line-scan, thresholds, and the
# errors to catch (StmaeError is the base of every one of them).
_EXPORTS = {"BACKENDS": "backend_table", "open_backend": "backends", "Detector": "detector", "Detection": "postprocess",
            "Region": "postprocess", "RemoteDetector": "remote", "RemoteError": "remote",
            "StreamingInspector": "linescan", "StripDefect": "linescan", "Thresholds": "..scoring",
            "StmaeError": "..errors", "InvalidImageError": "..errors", "BackendError": "..errors",
            "ConfigError": "..errors", "CheckpointError": "..errors", "EngineMismatchError": "..errors"}

if TYPE_CHECKING:  # the real names for type checkers, which do not run __getattr__
    from ..errors import (
        BackendError,
        CheckpointError,
        ConfigError,
        EngineMismatchError,
        InvalidImageError,
        StmaeError,
    )
    from ..scoring import Thresholds
    from .backend_table import BACKENDS
    from .backends import open_backend
    from .detector import Detector
    from .linescan import StreamingInspector, StripDefect
    from .postprocess import Detection, Region
    from .remote import RemoteDetector, RemoteError

__all__ = ["BACKENDS", "BackendError", "CheckpointError", "ConfigError", "Detection", "Detector", "EngineMismatchError",
           "InvalidImageError", "Region", "RemoteDetector", "RemoteError", "StmaeError", "StreamingInspector",
           "StripDefect", "Thresholds", "open_backend"]  # _EXPORTS' keys (tests/test_imports.py), for linters


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = _EXPORTS[name]
    return getattr(importlib.import_module(module if module.startswith("..") else f".{module}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

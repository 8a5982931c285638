"""The edge runtime: what runs on the line. numpy, OpenCV and the chosen backend; torch only for a
.pt file (its torch backend, for comparison).

The names below load on first use, so that importing one module of the runtime (the CLI reads the
table of backends for its help) does not load them all.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"BACKENDS": "backend_table", "open_backend": "backends", "Detector": "detector", "Detection": "postprocess",
            "Region": "postprocess", "RemoteDetector": "remote", "RemoteError": "remote"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])

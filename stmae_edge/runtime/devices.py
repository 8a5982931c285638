"""What this machine has: its CPU and its CUDA GPUs. Backends name the device they run on from here,
and `auto` asks whether there is a GPU at all."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import subprocess
import sys
from pathlib import Path

from ..machine import available_cores, board_model


def _cuda_driver():
    """The CUDA driver library, initialised, or None: asked directly so that no GPU library has to load
    just to find out there is no GPU."""
    name = "nvcuda.dll" if os.name == "nt" else (ctypes.util.find_library("cuda") or "libcuda.so.1")
    try:
        driver = ctypes.CDLL(name)
        return driver if driver.cuInit(0) == 0 else None
    except (OSError, AttributeError):
        return None


def cuda_device_count() -> int:
    driver, count = _cuda_driver(), ctypes.c_int(0)
    if driver is None or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


CPUINFO = Path("/proc/cpuinfo")


def _macos_cpu_name() -> str | None:
    """The chip's name on macOS ("Apple M2 Pro"), which platform.processor() gives only as "arm"."""
    try:
        found = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                               timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return found.stdout.strip() or None


def cpu_description() -> str:
    """The CPU's model name (x86 Linux, macOS), or the board's (ARM: a Jetson's /proc/cpuinfo names no
    model), and the cores this process may use."""
    model = platform.processor() or platform.machine()
    try:
        with open(CPUINFO) as f:
            named = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        named = _macos_cpu_name() if sys.platform == "darwin" else None
    board = None if named else board_model()
    model = named or (f"{board} ({platform.machine()})" if board else model)
    return f"CPU: {model} ({available_cores()} cores)"


def gpu_description(index: int = 0) -> str:
    driver, device, buffer = _cuda_driver(), ctypes.c_int(0), ctypes.create_string_buffer(256)
    if driver is not None and driver.cuDeviceGet(ctypes.byref(device), index) == 0 \
            and driver.cuDeviceGetName(buffer, 256, device) == 0:
        return f"GPU: {buffer.value.decode(errors='replace')}"
    return "GPU: unknown CUDA device"

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

CUDA_ERROR_NO_DEVICE = 100  # cuInit's answer where a driver is installed and sees no GPU


def _load_cuda_driver():
    """The CUDA driver library, not initialised, or None where it is not installed. libcuda.so.1 first,
    the name the driver installs and cuda-python loads: find_library may name the unversioned
    libcuda.so, which can be the toolkit's stub (in LD_LIBRARY_PATH for building) that finds no GPU."""
    names = ["nvcuda.dll"] if os.name == "nt" else ["libcuda.so.1", ctypes.util.find_library("cuda")]
    for name in filter(None, names):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def cuda_driver_state() -> str:
    """"ok" (the driver starts), "missing" (no driver library), "no GPU" (the driver sees none), or
    "error N" (cuInit's code: a driver that does not match its kernel module, say, after an upgrade
    without a reboot): so that a plan's error says which."""
    driver, code = _started_cuda_driver()
    if code is None:
        return "missing"
    return "ok" if code == 0 else "no GPU" if code == CUDA_ERROR_NO_DEVICE else f"error {code}"


def _started_cuda_driver():
    """(the driver library, cuInit's code), or (None, None) where there is no driver library."""
    driver = _load_cuda_driver()
    try:
        return (driver, driver.cuInit(0)) if driver is not None else (None, None)
    except AttributeError:  # a library of that name that is not the driver
        return None, None


def _cuda_driver():
    """The CUDA driver library, initialised, or None: asked directly so that no GPU library has to load
    just to find out there is no GPU."""
    driver, code = _started_cuda_driver()
    return driver if code == 0 else None


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

"""What this machine gives this process: the CPU cores it may run on, the memory it may still take
(a container's limits included), and whether it is a Jetson. One definition for the CLI's torch
threads, the image survey's threads, the runtime's device description, training's memory estimate,
and the TensorRT build's and install hints' Jetson cases. Standard library only.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

# L4T (JetPack's Linux) writes its release here; its kernels are named "...-tegra" too, which is what
# pyproject.toml's gpu extra tells a Jetson by ('tegra' in platform_release)
TEGRA_RELEASE = Path("/etc/nv_tegra_release")
# The board's name on ARM, where /proc/cpuinfo has no "model name" line
DEVICE_TREE_MODEL = Path("/proc/device-tree/model")


def is_jetson() -> bool:
    """A Jetson (L4T): its GPU shares the system's memory, and JetPack installs TensorRT for the system
    Python rather than through pip."""
    return TEGRA_RELEASE.is_file() or "tegra" in platform.release()


def nvidia_platform() -> str:
    """Which of NVIDIA's Python packages this platform can install, for install hints: "x86-64" (Linux
    or Windows: onnxruntime-gpu, TensorRT, TensorRT for RTX from PyPI), "jetson" (JetPack brings them),
    "arm" (other ARM Linux: TensorRT's server build, no onnxruntime-gpu or TensorRT for RTX on PyPI),
    "macos" (no CUDA at all) or "other" (Windows on ARM, POWER, ...: none of them)."""
    if sys.platform == "darwin":
        return "macos"
    if is_jetson():
        return "jetson"
    machine = platform.machine().lower()
    if sys.platform == "linux" and machine in ("aarch64", "arm64"):
        return "arm"
    if sys.platform in ("linux", "win32") and machine in ("x86_64", "amd64"):
        return "x86-64"
    return "other"  # Windows on ARM, POWER, ...: no NVIDIA wheel


def total_memory_bytes() -> int | None:
    """The machine's physical memory (None where it cannot be read)."""
    if sys.platform == "win32":
        status = windows_memory_status()
        return status.ullTotalPhys if status else None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _memory_status_type():
    """Windows' MEMORYSTATUSEX, the structure GlobalMemoryStatusEx fills (64 bytes)."""
    import ctypes

    class MemoryStatusEx(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_uint32), ("dwMemoryLoad", ctypes.c_uint32),
                    *((name, ctypes.c_uint64) for name in (
                        "ullTotalPhys", "ullAvailPhys", "ullTotalPageFile", "ullAvailPageFile", "ullTotalVirtual",
                        "ullAvailVirtual", "ullAvailExtendedVirtual"))]
    return MemoryStatusEx


def windows_memory_status():
    """GlobalMemoryStatusEx's answer (Windows: no /proc/meminfo there), None where the call fails."""
    import ctypes

    status = _memory_status_type()()
    status.dwLength = ctypes.sizeof(status)
    try:
        ok = ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status))
    except (AttributeError, OSError):
        return None
    return status if ok else None


def board_model() -> str | None:
    """The board's name from the device tree (a Jetson, a Raspberry Pi), None elsewhere."""
    try:
        return DEVICE_TREE_MODEL.read_bytes().rstrip(b"\0").decode("utf-8", "replace").strip() or None
    except OSError:
        return None


def available_cores() -> int:
    """The cores this process may run on: not all the machine has, where containers and affinity limit it."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def available_memory_bytes() -> int | None:
    """Memory this process can still take: the system's MemAvailable, or less where a container's limit
    (cgroup v2 or v1) leaves less; Windows' available physical memory there; None where none of these
    can be read (macOS)."""
    if sys.platform == "win32":
        status = windows_memory_status()
        return status.ullAvailPhys if status else None
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    for folder, limit_name, usage_name, cache_key in (
            ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")):
        try:
            limit, usage = (Path(folder, name).read_text().strip() for name in (limit_name, usage_name))
        except OSError:
            continue
        if limit.isdigit() and usage.isdigit() and int(limit) < 1 << 60:  # "max", or v1's "no limit"
            # usage counts the page cache, which the kernel gives back: reading the images just filled it
            found.append(max(0, int(limit) - int(usage) + _cgroup_stat(Path(folder, "memory.stat"), cache_key)))
    return min(found) if found else None


def _cgroup_stat(stat_file: Path, key: str) -> int:
    """One counter of a cgroup's memory.stat (0 where it cannot be read)."""
    try:
        for line in stat_file.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0

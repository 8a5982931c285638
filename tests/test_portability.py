"""What behaves differently on Windows and other machines than this one, checked here where it can be:
the atomic writer's flushes, the temporary name's length, a TensorRT whose libraries do not load, a
console that cannot print a file name, and one overlay that cannot be written."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import needs_tensorrt

from stmae_edge import outputs
from stmae_edge.errors import OutputError, TensorRTMissingError


def windows_fsync(real_fsync):
    """os.fsync as Windows runs it (FlushFileBuffers): a handle without write access, or a folder, fails."""
    import fcntl

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode) or fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        real_fsync(fd)

    return fsync


@pytest.mark.skipif(sys.platform == "win32", reason="emulates Windows' flush on a POSIX descriptor")
def test_atomic_writes_flush_a_handle_open_for_writing_and_replace_read_only_files(tmp_path, monkeypatch):
    """Every output goes through written_atomically: its flush must work where a read-only handle cannot
    be flushed (Windows), and a folder that cannot be synced is no failure once the file is in place."""
    calls = []
    real_chmod, flush = os.chmod, windows_fsync(os.fsync)
    monkeypatch.setattr(outputs.os, "fsync", lambda fd: (calls.append("fsync"), flush(fd))[1])
    monkeypatch.setattr(outputs.os, "chmod", lambda *a, **k: (calls.append("chmod"), real_chmod(*a, **k))[1])
    target = tmp_path / "model.json"
    outputs.write_bytes_atomically(target, b"first")
    target.chmod(0o444)  # a deployed file made read-only: rewritten in place, its mode kept
    calls.clear()
    outputs.write_bytes_atomically(target, b"second")
    # flushed while still writable (as root, opening a 0o444 file for writing would succeed anyway)
    assert calls[:2] == ["fsync", "chmod"], calls
    assert target.read_bytes() == b"second" and stat.S_IMODE(target.stat().st_mode) == 0o444
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json"]  # no temporary file left


def windows_read_only_rules(monkeypatch):
    """os.replace and os.unlink as Windows runs them: a read-only file can be neither replaced nor
    removed (POSIX asks only the folder)."""
    real_replace, real_unlink = os.replace, os.unlink

    def refuse_read_only(path):
        if os.path.isfile(path) and not os.stat(path).st_mode & stat.S_IWRITE:
            raise PermissionError(errno.EACCES, "Access is denied", str(path))

    monkeypatch.setattr(outputs.os, "replace", lambda src, dst: (refuse_read_only(dst), real_replace(src, dst))[1])
    monkeypatch.setattr(outputs.os, "unlink", lambda path, *a, **k: (refuse_read_only(path), real_unlink(path, *a, **k))[1])
    monkeypatch.setattr(outputs, "READ_ONLY_REFUSES_REPLACE", True)
    monkeypatch.setattr(outputs, "REPLACE_PAUSE_S", 0.0)


def test_a_read_only_file_is_replaced_where_windows_refuses_that_and_stays_read_only(tmp_path, monkeypatch):
    """Windows refused to replace a model file made read-only (threshold --write, export, build over a
    locked-down file failed after 4 s of retries), and the partial file, read-only by then, stayed."""
    windows_read_only_rules(monkeypatch)
    target, plan, sidecar = tmp_path / "model.onnx", tmp_path / "model.plan", tmp_path / "model.plan.json"
    for path in (target, plan, sidecar):
        path.write_bytes(b"old")
        path.chmod(0o444)
    outputs.write_bytes_atomically(target, b"new")
    outputs.write_files_together({plan: b"new plan", sidecar: b"new sidecar"})
    assert [p.read_bytes() for p in (target, plan, sidecar)] == [b"new", b"new plan", b"new sidecar"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o444 for p in (target, plan, sidecar))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.plan", "model.plan.json"]
    # a rename that fails for another reason leaves the old file as it was, read-only, and no partial file
    monkeypatch.setattr(outputs.os, "replace", lambda src, dst: (_ for _ in ()).throw(PermissionError(13, "held open")))
    with pytest.raises(OutputError, match="held open; nothing was replaced"):
        outputs.write_bytes_atomically(target, b"newer")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o444
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.plan", "model.plan.json"]


def test_on_macos_a_file_reaches_the_drive_not_only_its_cache(tmp_path, monkeypatch):
    """macOS's fsync hands the data to the drive, whose cache can still lose it in a power cut; the
    promise "nothing half-written, also after a power cut" needs F_FULLFSYNC there (emulated: Linux's
    fcntl has no such command), and fsync where a file system refuses it."""
    from types import SimpleNamespace

    calls = []

    def full_sync(fd, command, refused=False):
        calls.append("F_FULLFSYNC")
        if refused:
            raise OSError(errno.ENOTSUP, "Operation not supported")

    real_fsync = os.fsync
    monkeypatch.setattr(outputs.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(outputs, "fcntl", SimpleNamespace(F_FULLFSYNC=51, fcntl=full_sync))
    outputs.write_bytes_atomically(tmp_path / "a.json", b"x")
    assert calls[0] == "F_FULLFSYNC" and calls.count("F_FULLFSYNC") == 1  # the file; the folder by fsync
    calls.clear()
    monkeypatch.setattr(outputs, "fcntl", SimpleNamespace(F_FULLFSYNC=51, fcntl=lambda fd, c: full_sync(fd, c, True)))
    outputs.write_bytes_atomically(tmp_path / "b.json", b"y")  # a network share that refuses it
    assert calls[:2] == ["F_FULLFSYNC", "fsync"] and (tmp_path / "b.json").read_bytes() == b"y"


def test_the_up_front_check_tries_the_temporary_name_the_write_will_take(tmp_path):
    """A name that fits with ".partial" but not with the writer's 22 characters would pass the check
    and fail at the end of a long run (255 bytes here; Windows' 260-character paths the same way)."""
    fits = tmp_path / ("a" * 150 + ".pt")
    assert outputs.check_writable(fits) == fits
    too_long = tmp_path / ("a" * 240 + ".pt")
    with pytest.raises(OutputError, match="cannot write"):
        outputs.check_writable(too_long)


def test_a_tensorrt_that_is_installed_but_cannot_load_is_not_called_missing(tmp_path, monkeypatch):
    """TensorRT's package raises FileNotFoundError, or ImportError, where its DLLs are not found: that is
    one line saying it cannot load, not a traceback and not "pip install tensorrt"."""
    from stmae_edge.engine_plan import import_tensorrt

    package = tmp_path / "tensorrt"
    package.mkdir()
    (package / "__init__.py").write_text('raise FileNotFoundError("Could not find: nvinfer_10.dll. Is it on your PATH?")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tensorrt", raising=False)
    with pytest.raises(TensorRTMissingError, match="tensorrt is installed but cannot load here") as caught:
        import_tensorrt("tensorrt")
    assert "nvinfer_10.dll" in str(caught.value) and "pip install tensorrt" not in str(caught.value)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # truly absent: the install hint
    with pytest.raises(TensorRTMissingError, match="tensorrt is not installed: "):
        import_tensorrt("tensorrt")


def test_a_console_that_cannot_encode_a_file_name_gets_it_escaped(tiny_export, synthetic_dataset, tmp_path):
    """Windows writes a pipe in its ANSI code page, strictly: a name outside it must not end the command
    in a traceback after the results were written (here: a Latin-1 stdout, as cp1252 is; an ASCII one
    the command line library replaces with UTF-8 itself)."""
    inputs = tmp_path / "in"
    shutil.copytree(synthetic_dataset / "test" / "good", inputs)
    out = tmp_path / "résultats_検査"
    r = subprocess.run([sys.executable, "-m", "stmae_edge.cli", "predict", str(tiny_export[1]), str(inputs), "--out",
                        str(out), "--no-overlays"], capture_output=True, timeout=300,
                       env={**os.environ, "PYTHONIOENCODING": "latin-1:strict"})
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr.decode(errors="replace")[-2000:]
    assert "résultats_\\u691c\\u67fb".encode("latin-1") in r.stdout and (out / "results.json").is_file()


def test_one_overlay_that_cannot_be_written_costs_only_itself(tiny_export, synthetic_dataset, tmp_path, monkeypatch):
    """A file held open on Windows (a viewer, a virus scanner) refuses its replacement: that overlay is
    reported in its result and the run goes on to write every other one and results.json. (A full disk
    still stops the run: tests/test_faults.py.)"""
    from stmae_edge.runtime import Detector, files

    real_replace = os.replace

    def held_open(src, dst):  # what Windows does past the writer's retries (one attempt here)
        if Path(dst).name == "001.png" and Path(dst).parent.name == "out":  # not in the run's staging folder
            raise PermissionError(13, "Permission denied")
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", held_open)
    inputs = sorted((synthetic_dataset / "test" / "good").iterdir())[:3]
    summary = files.predict_to_folder(Detector(tiny_export[1]), inputs, tmp_path / "out")
    assert summary["overlays_not_written"] == 1 and len(summary["results"]) == 3
    refused = [r for r in summary["results"] if "overlay_error" in r]
    assert len(refused) == 1 and refused[0]["source"].endswith("001.png") and "overlay" not in refused[0]
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    assert written["overlays_not_written"] == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["000.png", "002.png", "results.json"]


@pytest.mark.skipif(sys.platform != "linux", reason="builds a path near Linux's 4096-byte limit")
def test_an_overlay_path_too_long_for_the_system_fails_before_anything_is_scored(tiny_export, synthetic_dataset,
                                                                                  tmp_path):
    """Overlays are written in a staging folder inside --out, about 33 characters deeper: a path past the
    system's limit (Windows' 260 characters; Linux's 4096 bytes here) failed only after every image was
    scored. Now the longest staged name is tried first."""
    from stmae_edge.runtime import Detector, files

    image = tmp_path / "in" / ("a" * 150 + ".png")
    image.parent.mkdir()
    shutil.copy(sorted((synthetic_dataset / "test" / "good").iterdir())[0], image)
    out = tmp_path
    while len(str(out)) < 4096 - 33 - 100:  # results.json's partial name fits; the overlay's does not
        out /= "d" * min(200, 4096 - 33 - 100 - len(str(out)))
    scored = []
    with pytest.raises(OutputError, match=r"cannot write .*aaaa\.png: File name too long; choose a shorter --out .*"
                                          r"nothing was scored"):
        files.predict_to_folder(Detector(tiny_export[1]), [image], out, advance=scored.append)
    assert scored == [] and not out.exists()  # nor the folder made for it
    files.predict_to_folder(Detector(tiny_export[1]), [image], out, overlays=False, advance=scored.append)
    assert scored == [1]


def test_a_replacement_refused_for_a_moment_is_tried_again_where_windows_needs_it(tmp_path, monkeypatch):
    """On Windows a file held open for a moment (a virus scanner reading it) refuses its replacement:
    the rename is tried again there; where it stays refused, the old file is kept and the error says so."""
    target = tmp_path / "results.json"
    target.write_bytes(b"old")
    real_replace, refusals = os.replace, []

    def held_for_a_moment(src, dst):
        if len(refusals) < 2:
            refusals.append(dst)
            raise PermissionError(13, "Permission denied")
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", held_for_a_moment)
    monkeypatch.setattr(outputs, "REPLACE_ATTEMPTS", 3)  # Windows' count (POSIX: 1, an open file is replaced there)
    monkeypatch.setattr(outputs, "REPLACE_PAUSE_S", 0.0)
    outputs.write_bytes_atomically(target, b"new")
    assert target.read_bytes() == b"new" and len(refusals) == 2
    refusals.clear()
    monkeypatch.setattr(outputs, "REPLACE_ATTEMPTS", 2)
    with pytest.raises(OutputError, match="Permission denied; nothing was replaced"):
        outputs.write_bytes_atomically(target, b"newer")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


@needs_tensorrt
def test_a_plan_whose_tensorrt_cannot_load_gives_that_reason_not_install_advice(tiny_export, tmp_path, monkeypatch):
    from stmae_edge.engines.build import build_engine
    from stmae_edge.errors import TensorRTUnloadableError
    from stmae_edge.runtime.tensorrt_backend import TensorRTBackend

    plan, sidecar = build_engine(tiny_export[1], "fp32", "1:1:2", tmp_path / "m.plan")
    module = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx_bindings"}[sidecar["tensorrt"]["flavour"]]
    fake = tmp_path / "fake" / module
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise FileNotFoundError("Could not find: tensorrt_rtx_1_7.dll")\n')
    monkeypatch.syspath_prepend(str(fake.parent))
    monkeypatch.delitem(sys.modules, module, raising=False)
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    with pytest.raises(TensorRTUnloadableError, match="installed but cannot load here") as caught:
        TensorRTBackend(plan)
    assert "tensorrt_rtx_1_7.dll" in str(caught.value) and "was built with" not in str(caught.value)


def test_nvidia_smi_that_finds_no_gpu_is_not_taken_for_one(tmp_path, monkeypatch):
    """nvidia-smi without a driver, or without devices, prints its complaint on stdout and exits
    non-zero: the GPU acceptance script must not expect a GPU from that."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    try:
        import gpu_acceptance
    finally:
        sys.path.pop(0)
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    said = gpu_acceptance.nvidia_smi()
    assert said.startswith(gpu_acceptance.SMI_FAILED) and "exit 6" in said
    fake.write_text("#!/bin/sh\necho 'NVIDIA H200, 9.0, 580.65.06'\n")
    assert gpu_acceptance.nvidia_smi() == "NVIDIA H200, 9.0, 580.65.06"


@pytest.mark.parametrize("system,machine_name,tegra,expected", [
    ("linux", "x86_64", False, "x86-64"), ("win32", "AMD64", False, "x86-64"), ("linux", "aarch64", True, "jetson"),
    ("linux", "aarch64", False, "arm"), ("darwin", "arm64", False, "macos"), ("win32", "ARM64", False, "other")])
def test_install_hints_name_what_this_platform_can_install(monkeypatch, tmp_path, system, machine_name, tegra, expected):
    """pip's onnxruntime-gpu and TensorRT for RTX are built for x86-64 only and macOS has no CUDA: a
    Mac or an ARM server was told to pip install packages that do not exist for it."""
    from stmae_edge import engine_plan, machine
    from stmae_edge.runtime import backends

    release = tmp_path / "nv_tegra_release"
    if tegra:
        release.write_text("# R36 (release), REVISION: 4.0\n")
    monkeypatch.setattr(machine, "TEGRA_RELEASE", release)
    monkeypatch.setattr(machine.sys, "platform", system)
    monkeypatch.setattr(machine.platform, "machine", lambda: machine_name)
    monkeypatch.setattr(machine.platform, "release", lambda: "6.8.0")
    assert machine.nvidia_platform() == expected
    tensorrt, onnxruntime = engine_plan.install_hint(), backends.gpu_onnxruntime_hint()
    assert ("tensorrt-rtx" in tensorrt) == (expected == "x86-64")
    assert onnxruntime.startswith("install onnxruntime-gpu") == (expected == "x86-64")
    assert {"jetson": "--system-site-packages", "macos": "macOS does not drive", "arm": "ARM servers",
            "other": "no TensorRT wheel for this platform"}.get(
        expected, "pip install tensorrt") in tensorrt


def test_windows_memory_status_has_the_layout_global_memory_status_ex_fills():
    """train's memory warning reads Windows' available memory through GlobalMemoryStatusEx (it was
    silent there: no /proc/meminfo). The call refuses a structure whose dwLength is not its own size,
    64 bytes, with the fields at Windows' offsets."""
    import ctypes

    from stmae_edge.machine import _memory_status_type

    status_type = _memory_status_type()
    assert ctypes.sizeof(status_type) == 64
    assert (status_type.ullTotalPhys.offset, status_type.ullAvailPhys.offset,
            status_type.ullAvailExtendedVirtual.offset) == (8, 16, 56)


def test_two_files_on_a_volume_without_file_ids_are_not_taken_for_one(tmp_path, monkeypatch):
    """Some Windows volumes (network shares, virtual drives) give every file the ID 0: samefile then
    called any two files one, and export refused its output as "an input of this command"."""
    a, b = tmp_path / "model.pt", tmp_path / "model.onnx"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    real_stat = os.stat

    def without_ids(path, *args, **kwargs):
        found = real_stat(path, *args, **kwargs)
        if str(tmp_path) not in os.fsdecode(path):
            return found
        return os.stat_result((found.st_mode, 0, 0, *tuple(found)[3:]))  # st_ino and st_dev 0

    monkeypatch.setattr(os, "stat", without_ids)
    assert not outputs.same_file(a, b)
    assert outputs.same_file(a, tmp_path / "." / "model.pt")
    assert outputs.check_writable(b, inputs=[a]) == b

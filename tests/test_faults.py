"""Faults an integrator meets: the model file changes under a running Detector, the disk fills up in
the middle of `predict`, a command is killed halfway. Each ends in a typed error or goes unnoticed by
the running program, and nothing written before is lost or left half-written under its real name."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import needs_tensorrt

from stmae_edge.engine_plan import read_plan
from stmae_edge.errors import EngineMismatchError, StmaeError
from stmae_edge.metadata import ModelMetadata
from stmae_edge.outputs import sha256_file
from stmae_edge.runtime import Detector

CLI = [sys.executable, "-m", "stmae_edge.cli"]


def test_a_detector_keeps_scoring_when_its_model_file_is_replaced_or_deleted(tiny_export, tmp_path):
    model = tmp_path / "line3.onnx"
    shutil.copy(tiny_export[1], model)
    frame = np.random.default_rng(0).integers(0, 256, (80, 90), np.uint8)
    detector = Detector(model, "ort-cpu")
    before = detector.predict(frame)
    model.write_bytes(b"replaced by a half-copied file")
    assert detector.predict(frame).score == before.score
    model.unlink()
    assert detector.predict(frame).score == before.score
    with pytest.raises(StmaeError, match="no such model file"):
        Detector(model, "ort-cpu")
    model.write_bytes(b"replaced by a half-copied file")
    with pytest.raises(StmaeError, match="not a readable ONNX file"):
        Detector(model, "ort-cpu")


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past `limit` bytes fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_in_the_middle_of_predict_loses_nothing_written_before(tiny_export, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):  # small overlays first, then one far larger than the limit
        cv2.imwrite(str(inputs / f"a{i}.png"), rng.integers(0, 256, (40, 40), np.uint8))
    cv2.imwrite(str(inputs / "z_big.png"), rng.integers(0, 256, (900, 900), np.uint8))
    out = tmp_path / "out"
    first = subprocess.run([*CLI, "predict", str(tiny_export[1]), str(inputs), "--out", str(out), "--any-size"],
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}

    r = subprocess.run([*CLI, "predict", str(tiny_export[1]), str(inputs), "--out", str(out), "--any-size"], capture_output=True,
                       text=True, timeout=300, preexec_fn=_file_size_limit(200_000))
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "z_big.png" in lines[0] and "nothing was replaced" in lines[0] and "Traceback" not in r.stderr
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == earlier  # results.json and every overlay whole: the same files, no partial ones beside them


def test_an_interrupted_predict_leaves_the_earlier_run_whole_and_the_next_run_takes_its_names(
        tiny_export, synthetic_dataset, tmp_path, caplog):
    """A second run into the folder, with other thresholds, stopped by Ctrl-C after its first batch: it
    had replaced half the earlier run's overlays under that run's results.json, and the next run took
    those for a user's files and wrote NAME_2.png beside them. Now the earlier run is left as it was,
    and staging folders that killed runs left are removed, but not one that a running command holds."""
    from stmae_edge.outputs import STAGING_PREFIX, staging_folder
    from stmae_edge.runtime import files

    inputs = sorted((synthetic_dataset / "test" / "scratch").glob("*.png")) + sorted(
        (synthetic_dataset / "test" / "good").glob("*.png"))
    out = tmp_path / "out"
    with Detector(tiny_export[1], batch_size=2) as detector:
        files.predict_to_folder(detector, inputs, out)
        earlier = {p.name: p.read_bytes() for p in out.iterdir()}

        def interrupt(done: int) -> None:
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            files.predict_to_folder(detector, inputs, out, pixel_threshold=0.0, advance=interrupt)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier  # and no staging folder left

        killed = out / f"{STAGING_PREFIX}0123456789ab"  # a run killed before it could remove its own
        killed.mkdir()
        (killed / "000.png").write_bytes(b"half a run")
        os.utime(killed, (time.time() - 3600, time.time() - 3600))  # an hour ago
        with caplog.at_level("INFO", logger="stmae_edge.outputs"), staging_folder(out) as running:
            # another command's, still running, for an hour: its lock keeps it
            os.utime(running, (time.time() - 3600, time.time() - 3600))
            summary = files.predict_to_folder(detector, inputs, out, pixel_threshold=0.0)
            assert running.is_dir() and not killed.exists()
            assert f"removed {killed}, left by an earlier run that was stopped" in caplog.text
            assert f"removed {running}" not in caplog.text
    assert summary["replaced_overlays"] == 0
    assert {p.name for p in out.iterdir()} == set(earlier)  # the same names: no NAME_2.png
    assert any((out / name).read_bytes() != earlier[name] for name in earlier if name != "results.json")


def _kill_when(process: subprocess.Popen, ready, limit_s: float = 240) -> bool:
    """SIGKILL `process` as soon as `ready()` holds; False if it finished first."""
    deadline = time.monotonic() + limit_s
    while process.poll() is None and time.monotonic() < deadline:
        if ready():
            process.kill()
            process.wait()
            return True
        time.sleep(0.005)
    process.kill()
    process.wait()
    return False


def _stop_when(process: subprocess.Popen, ready, signum: int, code: int) -> None:
    """Send `signum` (Ctrl-C, SIGTERM) as soon as `ready()` holds; the command must then end with one
    'aborted' line, no traceback, and exit code `code`."""
    deadline = time.monotonic() + 240
    while process.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the command finished before it could be stopped"
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("aborted: outputs are written whole or not at all")


def _partials(folder) -> list:
    return [p for p in folder.iterdir() if p.name.endswith(".partial")]


def _written_partials(folder, name: str) -> list:
    """The temporary files of `name` that hold data: not the empty probe an up-front check makes."""
    found = []
    for p in _partials(folder):
        try:
            if p.name.startswith(f".{name}.") and p.stat().st_size > 0:
                found.append(p)
        except FileNotFoundError:  # renamed or removed between the listing and the look
            pass
    return found


def test_export_killed_while_it_checks_its_graph_leaves_no_onnx_file(tiny_export, tmp_path):
    out = tmp_path / "m.onnx"
    process = subprocess.Popen([*CLI, "export", str(tiny_export[0]), "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _kill_when(process, lambda: bool(_partials(tmp_path))), "export finished before it could be interrupted"
    assert not out.exists()
    with pytest.raises(StmaeError):
        Detector(out, "ort-cpu")


# The command line with every rename held back 1.5 s, the finished temporary file beside its real name:
# a kill is then sure to land between the write and the rename, the moment atomic writes are for.
SLOW_RENAMES = [sys.executable, "-c", """
import os, sys, time
real_replace = os.replace
def held_back(src, dst, **kwargs):
    time.sleep(1.5)
    real_replace(src, dst, **kwargs)
os.replace = held_back
from stmae_edge.cli import main
sys.argv = ["stmae-edge", *sys.argv[1:]]
main()
"""]


def test_calibrate_killed_before_a_rename_leaves_no_graph_or_cache_entry_that_reads_as_complete(
        tiny_export, synthetic_dataset, tmp_path):
    onnx_file = tmp_path / "m.onnx"
    shutil.copy(tiny_export[1], onnx_file)
    cache, out = tmp_path / "cache", tmp_path / "cut.int8.onnx"
    command = ["calibrate", str(onnx_file), "--images", str(synthetic_dataset / "train" / "good"),
               "--cache-dir", str(cache), "--out", str(out), "--min-weights", "1"]
    process = subprocess.Popen([*SLOW_RENAMES, *command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # the graph itself written and waiting for its rename (its cache entry is written before it)
    assert _kill_when(process, lambda: bool(_written_partials(tmp_path, out.name))), \
        "calibrate finished before its graph could be interrupted"
    assert not out.exists()
    for graph in cache.glob("*.int8.onnx") if cache.is_dir() else []:  # a cache entry is whole or absent
        assert ModelMetadata.from_onnx(graph).model_hash == ModelMetadata.from_onnx(onnx_file).model_hash
    r = subprocess.run([*CLI, *command], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert ModelMetadata.from_onnx(out).model_hash == ModelMetadata.from_onnx(onnx_file).model_hash


@needs_tensorrt
def test_build_killed_before_either_rename_leaves_no_plan_that_reads_as_complete(tiny_export, tmp_path):
    """Killed before the plan's rename: no plan. Killed after it, before its sidecar's: a plan without
    a sidecar, which read_plan refuses (an interrupted build is never taken for done)."""
    for stage in ("plan", "sidecar"):
        plan = tmp_path / f"{stage}.plan"
        sidecar = plan.with_name(plan.name + ".json")
        process = subprocess.Popen([*SLOW_RENAMES, "build", str(tiny_export[1]), "--batch", "1:2:4", "--out", str(plan)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ready = ((lambda plan=plan: bool(_written_partials(tmp_path, plan.name))) if stage == "plan" else
                 (lambda plan=plan, sidecar=sidecar: plan.exists() and bool(_written_partials(tmp_path, sidecar.name))))
        assert _kill_when(process, ready), f"build finished before the {stage} could be interrupted"
        assert plan.exists() == (stage == "sidecar") and not sidecar.exists()
        with pytest.raises(EngineMismatchError, match="no such engine plan" if stage == "plan" else "sidecar"):
            read_plan(plan)
        for partial in _partials(tmp_path):  # what a killed process leaves: only temporary names
            partial.unlink()


def test_an_atomic_write_keeps_a_symlink_and_the_permissions_and_types_a_failure(tmp_path):
    from stmae_edge.errors import OutputError
    from stmae_edge.outputs import write_bytes_atomically, written_atomically

    real = tmp_path / "v3.onnx"
    real.write_bytes(b"old")
    os.chmod(real, 0o640)
    link = tmp_path / "current.onnx"
    link.symlink_to(real.name)
    write_bytes_atomically(link, b"new")
    assert link.is_symlink() and real.read_bytes() == b"new" and (real.stat().st_mode & 0o777) == 0o640
    with pytest.raises(OutputError, match="nothing was replaced"):
        with written_atomically(real) as partial:
            partial.write_bytes(b"half")
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")
    assert real.read_bytes() == b"new" and not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_ctrl_c_during_export_says_aborted_in_one_line_and_leaves_no_file(tiny_export, tmp_path):
    out = tmp_path / "m.onnx"
    process = subprocess.Popen([*CLI, "export", str(tiny_export[0]), "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _stop_when(process, lambda: bool(_partials(tmp_path)), signal.SIGINT, 130)
    assert not out.exists() and not _partials(tmp_path)


def test_sigterm_stops_predict_as_ctrl_c_does_and_leaves_the_earlier_run(tiny_export, synthetic_dataset, tmp_path):
    """SIGTERM (a service manager, `kill`) ended a command with no word and left its temporary files; it
    stops the command as Ctrl-C does now: one line, exit 143, its staging folder gone, the earlier run kept."""
    from stmae_edge.outputs import STAGING_PREFIX

    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    good = sorted((synthetic_dataset / "test" / "good").glob("*.png"))
    for i in range(400):  # long enough to be stopped while it scores
        shutil.copy(good[i % len(good)], inputs / f"{i:03d}.png")
    first = subprocess.run([*CLI, "predict", str(tiny_export[1]), *map(str, good), "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    process = subprocess.Popen([*CLI, "predict", str(tiny_export[1]), str(inputs), "--out", str(out), "--batch-size", "1"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _stop_when(process, lambda: any(out.glob(f"{STAGING_PREFIX}*/*.png")), signal.SIGTERM, 143)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier  # no staging folder left either


def test_ctrl_c_while_the_output_is_checked_leaves_no_file(tmp_path, monkeypatch):
    """check_writable makes and removes an empty file under the output's temporary name: Ctrl-C between
    the two left it beside the output (the export test above caught it once, under load)."""
    from stmae_edge.outputs import check_writable

    made = Path.touch

    def touch_then_ctrl_c(self, *args, **kwargs):
        made(self, *args, **kwargs)
        signal.raise_signal(signal.SIGINT)  # Ctrl-C the moment the file exists

    monkeypatch.setattr(Path, "touch", touch_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        check_writable(tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


def test_a_full_disk_is_named_when_a_write_fails(tmp_path):
    from stmae_edge.errors import OutputError
    from stmae_edge.outputs import written_atomically

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match="cannot write .*m.pt: no space left on the disk"):
        with written_atomically(tmp_path / "m.pt") as partial:
            full(partial)
    assert not list(tmp_path.iterdir())


def test_a_nearly_full_disk_takes_the_blame_only_for_what_space_explains(tmp_path, monkeypatch):
    """check_writable, report and predict name a full disk as the writers do; a refusal that says its own
    cause (no permission, a read-only disk) is that cause, whatever space is left."""
    import shutil
    from collections import namedtuple

    from stmae_edge import outputs

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(1 << 30, (1 << 30) - 4096, 4096))
    assert outputs.failure_reason(OSError(errno.EIO, "Input/output error"), tmp_path).startswith("no space left")
    for code, words in ((errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file system")):
        assert outputs.failure_reason(OSError(code, words), tmp_path) == words
    monkeypatch.setattr(outputs.Path, "touch", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "full")))
    with pytest.raises(outputs.OutputError, match="cannot write .*m.onnx: no space left on the disk"):
        outputs.check_writable(tmp_path / "m.onnx")


def test_files_written_together_replace_the_earlier_pair_whole_or_not_at_all(tmp_path, monkeypatch):
    """A plan and its sidecar: the plan was renamed into place before the sidecar was written, so a build
    cut off between them left a new plan beside the old sidecar, refused, and the working engine lost."""
    from stmae_edge import outputs
    from stmae_edge.errors import OutputError

    sigint_before = signal.getsignal(signal.SIGINT)
    plan, side = tmp_path / "m.plan", tmp_path / "m.plan.json"
    plan.write_bytes(b"old plan")
    side.write_bytes(b"old sidecar")
    with pytest.raises(OutputError, match="nothing was replaced"):  # the second file cannot be written
        outputs.write_files_together({plan: b"new plan", tmp_path / "absent" / "m.plan.json": b"new sidecar"})
    assert plan.read_bytes() == b"old plan" and sorted(p.name for p in tmp_path.iterdir()) == ["m.plan", "m.plan.json"]

    real_replace = outputs.move_into_place

    def ctrl_c_between(partial, target):  # Ctrl-C lands between the two renames
        real_replace(partial, target)
        if target == plan:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(outputs, "move_into_place", ctrl_c_between)
    with pytest.raises(KeyboardInterrupt):  # delivered once both are in place
        outputs.write_files_together({plan: b"new plan", side: b"new sidecar"})
    assert plan.read_bytes() == b"new plan" and side.read_bytes() == b"new sidecar"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.plan", "m.plan.json"]
    assert signal.getsignal(signal.SIGINT) is sigint_before


@pytest.mark.skipif(sys.platform == "win32", reason="Windows cannot lock a folder: two builds are not kept apart there")
def test_two_builds_to_one_plan_leave_one_build_s_pair(tmp_path, monkeypatch):
    """Two `build` runs to one --out renamed their plans and sidecars in turn: one's plan could end
    beside the other's sidecar, refused when loaded, and nothing stopped the second build."""
    from stmae_edge import outputs

    plan, side = tmp_path / "m.plan", tmp_path / "m.plan.json"
    real_move = outputs.move_into_place
    second_started, second_done = threading.Event(), threading.Event()

    def the_other_build_between(partial, target):  # the first build's renames, the second's in between
        real_move(partial, target)
        if target == plan and threading.current_thread() is first:
            threading.Thread(target=second_build, daemon=True).start()
            second_started.wait(5)
            second_done.wait(1.5)  # held off by the first's renames: it finishes after them

    def second_build():
        second_started.set()
        outputs.write_files_together({plan: b"plan B", side: b"sidecar B"})
        second_done.set()

    monkeypatch.setattr(outputs, "move_into_place", the_other_build_between)
    first = threading.Thread(target=outputs.write_files_together, args=({plan: b"plan A", side: b"sidecar A"},))
    first.start()
    first.join(10)
    assert second_done.wait(10)
    assert (plan.read_bytes(), side.read_bytes()) == (b"plan B", b"sidecar B")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.plan", "m.plan.json"]


@pytest.mark.skipif(sys.platform == "win32", reason="Windows cannot lock a folder: two builds are not kept apart there")
def test_pairs_written_through_other_spellings_of_their_folders_take_the_locks_in_one_order(tmp_path, monkeypatch):
    """The folders were locked in the order of their names: a plan linked into another folder, written
    by two builds that named its folder differently (a link to it), locked the two folders in opposite
    orders, and each build waited for the other for ever."""
    import contextlib

    from stmae_edge import outputs

    engines, store = tmp_path / "c-engines", tmp_path / "b-store"
    engines.mkdir()
    store.mkdir()
    (tmp_path / "a-link").symlink_to(engines)
    (engines / "m.plan").symlink_to(store / "m.plan")  # the plan itself kept in another folder
    both_hold_one = threading.Barrier(2)
    real_wait = outputs.folder_waited_for
    first_taken = set()

    @contextlib.contextmanager
    def each_takes_its_first_lock_together(folder, waiting):
        with real_wait(folder, waiting):
            if threading.current_thread() not in first_taken:
                first_taken.add(threading.current_thread())
                with contextlib.suppress(threading.BrokenBarrierError):
                    both_hold_one.wait(2)  # the other build takes its first lock meanwhile, if it can
            yield

    monkeypatch.setattr(outputs, "folder_waited_for", each_takes_its_first_lock_together)
    builds = [threading.Thread(target=outputs.write_files_together, daemon=True,
                               args=({folder / "m.plan": b"plan " + name, folder / "m.plan.json": b"sidecar " + name},))
              for folder, name in ((engines, b"A"), (tmp_path / "a-link", b"B"))]
    for build in builds:
        build.start()
    for build in builds:
        build.join(20)
    assert not any(build.is_alive() for build in builds), "the two builds wait for each other"
    plan, sidecar = (store / "m.plan").read_bytes(), (engines / "m.plan.json").read_bytes()
    assert (plan, sidecar) in ((b"plan A", b"sidecar A"), (b"plan B", b"sidecar B"))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts open descriptors in Linux's /proc")
def test_ctrl_c_while_waiting_for_a_folder_keeps_no_descriptor(tmp_path, monkeypatch):
    """A Ctrl-C while a command waited for another's lock on a folder left that folder's descriptor open:
    a host that retries a build for days ran out of descriptors."""
    from stmae_edge import outputs

    def interrupted(fd, operation):
        raise KeyboardInterrupt

    monkeypatch.setattr(outputs.fcntl, "flock", interrupted)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(KeyboardInterrupt), outputs.folder_waited_for(tmp_path, "waiting"):
            pass
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="no SIGHUP on Windows")
def test_signals_held_hold_sighup_leave_ignored_signals_ignored_and_put_each_handler_back():
    """SIGHUP (a closed terminal) stops a command as Ctrl-C does, but was not held during the renames:
    the folder could still mix two runs. A signal the process ignores (a job started with `&`) was
    caught and cancelled a build."""
    from stmae_edge.outputs import signals_held

    hangups: list[int] = []
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, lambda signum, frame: hangups.append(signum))
    try:
        with signals_held() as caught:
            signal.raise_signal(signal.SIGTERM)  # ignored: stays so
            signal.raise_signal(signal.SIGHUP)
            assert caught == [signal.SIGHUP] and hangups == []
        assert hangups == [signal.SIGHUP]  # delivered to the handler that was there, once the block ended
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN and signal.getsignal(signal.SIGINT) is \
            before[signal.SIGINT]
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def test_a_staging_folder_that_cannot_be_removed_is_named(tmp_path, monkeypatch, caplog):
    """On Windows a file held open by another program (a viewer, a virus scanner) stops its removal:
    the hidden folder, which may hold a run's overlays, was left without a word."""
    import shutil

    from stmae_edge.outputs import staging_folder

    monkeypatch.setattr(shutil, "rmtree", lambda path, ignore_errors=False: None)  # the removal fails, as there
    with caplog.at_level("WARNING", logger="stmae_edge.outputs"), staging_folder(tmp_path) as staging:
        (staging / "000.png").write_bytes(b"an overlay")
    assert f"could not remove {staging}, a hidden folder of this run's unused files" in caplog.text


def _tiles(folder, count: int) -> list:
    folder.mkdir()
    rng = np.random.default_rng(3)
    for i in range(count):
        cv2.imwrite(str(folder / f"t{i}.png"), rng.integers(0, 256, (64, 64), np.uint8))
    return sorted(folder.iterdir())


def test_a_backend_that_fails_part_way_through_predict_keeps_what_it_scored(tiny_export, tmp_path):
    """A server gone or a GPU lost after hours of scoring cost the whole run: the staging folder was
    dropped with every result in it. Now what was scored is put in place as the run, and its results.json
    lists the files not scored. The backend here is closed after the first batch, from the progress
    callback, as a lost device closes it: its next call raises BackendError."""
    from stmae_edge.errors import PredictionStoppedError
    from stmae_edge.runtime import files

    paths = _tiles(tmp_path / "in", 5)
    (tmp_path / "in" / "t3.png").write_bytes(b"not a png")  # in the batch that fails: listed as not scored
    out = tmp_path / "out"
    detector = Detector(tiny_export[1], "ort-cpu", batch_size=2)
    files.predict_to_folder(detector, paths, out)  # an earlier, complete run there
    assert len(list(out.glob("*.png"))) == 4

    def advance(done: int) -> None:
        detector.close()  # after the first batch

    with pytest.raises(PredictionStoppedError, match=r"after 2 of 5 images \(this .* was closed.*'stopped' "
                                                     r"lists the 3 images not scored") as failure:
        files.predict_to_folder(detector, paths, out, advance=advance, overlay_threads=2)
    summary = failure.value.summary
    assert [entry["source"] for entry in summary["results"]] == [str(paths[0]), str(paths[1])]
    assert summary["errors"] == [] and summary["stopped"]["not_scored"] == [str(path) for path in paths[2:]]
    written = json.loads((out / "results.json").read_text())
    assert written == {key: value for key, value in summary.items() if key != "replaced_overlays"}
    assert summary["replaced_overlays"] == 2
    # one run in the folder: this one's two overlays; the earlier run's for the files not scored removed
    assert sorted(p.name for p in out.glob("*.png")) == ["t0.png", "t1.png"]
    for entry in summary["results"]:
        assert sha256_file(out / entry["overlay"]) == entry["overlay_sha256"]


@pytest.mark.skipif(sys.platform == "win32", reason="Windows cannot lock a folder: two runs are not kept apart there")
def test_a_second_predict_into_a_folder_that_one_is_writing_is_refused(tiny_export, tmp_path):
    """Two runs into one --out (two cameras' scripts, a --resume beside a new run) mixed their overlays
    and records: the last results.json listed one run's files among the other's overlays."""
    from stmae_edge.errors import OutputError
    from stmae_edge.runtime import files

    paths, others = _tiles(tmp_path / "in", 4), _tiles(tmp_path / "other", 2)
    out = tmp_path / "out"
    refused = []

    def advance(done: int) -> None:  # the first run is writing: another starts into the same folder
        if not refused:
            with Detector(tiny_export[1], "ort-cpu") as second, pytest.raises(OutputError) as error:
                files.predict_to_folder(second, others, out)
            refused.append(str(error.value))

    with Detector(tiny_export[1], "ort-cpu", batch_size=2) as detector:
        summary = files.predict_to_folder(detector, paths, out, advance=advance)
    assert refused == [f"another stmae-edge run (a predict, or a build putting its engine there) is writing into {out}; "
                       "wait for it to end, or choose another --out"]
    assert [entry["source"] for entry in summary["results"]] == [str(path) for path in paths]
    assert sorted(p.name for p in out.glob("*.png")) == [f"t{i}.png" for i in range(4)]
    with Detector(tiny_export[1], "ort-cpu") as detector:  # once it has ended, the folder is free
        assert len(files.predict_to_folder(detector, others, out)["results"]) == 2


@pytest.mark.skipif(sys.platform == "win32", reason="Windows cannot lock a folder: two runs are not kept apart there")
def test_a_predict_refused_while_a_build_puts_its_engine_in_the_folder_does_not_blame_a_predict(tiny_export, tmp_path):
    """The folder's lock does not say who holds it: the refusal named "another stmae-edge predict" where a
    build was renaming its plan and sidecar into the folder."""
    from stmae_edge import outputs
    from stmae_edge.errors import OutputError
    from stmae_edge.runtime import files

    out = tmp_path / "out"
    out.mkdir()
    with outputs.folder_waited_for(out, "a build's renames"), Detector(tiny_export[1], "ort-cpu") as detector:
        with pytest.raises(OutputError, match=r"another stmae-edge run \(a predict, or a build putting its engine "
                           r"there\) is writing into"):
            files.predict_to_folder(detector, _tiles(tmp_path / "in", 1), out)
    assert not any(out.iterdir())  # nothing of the refused run


@pytest.mark.skipif(sys.platform == "win32", reason="Windows cannot lock a folder: two runs are not kept apart there")
def test_a_refused_predict_leaves_the_folder_that_a_run_started_with_it_made(tiny_export, tmp_path, monkeypatch):
    """Two runs started at once into a folder that did not exist: both made it, the second was refused,
    and its clean-up removed the folder while the first was about to write into it."""
    import fcntl

    from stmae_edge import outputs
    from stmae_edge.errors import OutputError
    from stmae_edge.runtime import files

    paths, out = _tiles(tmp_path / "in", 1), tmp_path / "out"
    made = files.check_output_folder
    other_run = []

    def made_by_both(folder, inputs):  # the other run, started at the same moment, takes the folder first
        found = made(folder, inputs)
        other_run.append(os.open(folder, os.O_RDONLY))
        fcntl.flock(other_run[0], fcntl.LOCK_EX)
        return found

    monkeypatch.setattr(files, "check_output_folder", made_by_both)
    outputs.record_folders_made()  # as the CLI does, to remove the folders a failed command made
    try:
        with Detector(tiny_export[1], "ort-cpu") as detector, pytest.raises(OutputError, match="another stmae-edge"):
            files.predict_to_folder(detector, paths, out)
        outputs.remove_folders_left_empty()
        assert out.is_dir()  # still there for the run that holds it
    finally:
        for fd in other_run:
            os.close(fd)
        outputs._FOLDERS_MADE = None


def test_a_backend_that_fails_at_its_first_batch_leaves_the_earlier_run(tiny_export, tmp_path):
    from stmae_edge.errors import BackendError, PredictionStoppedError
    from stmae_edge.runtime import files

    paths = _tiles(tmp_path / "in", 3)
    out = tmp_path / "out"
    detector = Detector(tiny_export[1], "ort-cpu", batch_size=2)
    files.predict_to_folder(detector, paths, out)
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    detector.close()
    with pytest.raises(BackendError, match="closed") as failure:
        files.predict_to_folder(detector, paths, out)
    assert not isinstance(failure.value, PredictionStoppedError)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier


def _stopped_run(tiny_export, paths, out):
    """predict_to_folder into `out`, its backend closed after the first batch of two."""
    from stmae_edge.errors import PredictionStoppedError
    from stmae_edge.runtime import files

    detector = Detector(tiny_export[1], "ort-cpu", batch_size=2)
    with pytest.raises(PredictionStoppedError):
        files.predict_to_folder(detector, paths, out, advance=lambda done: detector.close())


def _alike(a, b) -> bool:
    """Equal but for a float's last bits: ONNX Runtime rounds an image's map a little differently in
    another batch (a batch of one takes other kernels), so scores differ by an ulp, CPU by CPU."""
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-5, abs=1e-6)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_alike(a[k], b[k]) for k in a if k != "overlay_sha256")
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_alike, a, b))
    return a == b


def test_a_stopped_run_resumed_is_the_run_scored_whole(tiny_export, tmp_path):
    """Resumed in the same batches, it is the whole run to the last bit; in other batches (any backend
    and batch may resume), the same but for the rounding of the images scored on resuming."""
    from stmae_edge.runtime import files

    paths = _tiles(tmp_path / "in", 5)
    (tmp_path / "in" / "t3.png").write_bytes(b"not a png")
    with Detector(tiny_export[1], "ort-cpu", batch_size=2) as detector:
        whole = files.predict_to_folder(detector, paths, tmp_path / "whole")
    whole_overlays = {p.name: p.read_bytes() for p in (tmp_path / "whole").glob("*.png")}
    for batch_size, advances in ((2, [2, 2, 1]), (3, [2, 3])):
        out = tmp_path / f"out{batch_size}"
        _stopped_run(tiny_export, paths, out)
        done = []
        with Detector(tiny_export[1], "ort-cpu", batch_size=batch_size) as detector:
            resumed = files.predict_to_folder(detector, paths, out, resume=True, advance=done.append)
        assert done == advances  # the stopped run's two first, then the rest
        assert resumed["stopped"] is None and [entry["images"] for entry in resumed["resumed"]] == [2]
        overlays = {p.name: p.read_bytes() for p in out.glob("*.png")}
        written = json.loads((out / "results.json").read_text())["results"]
        if batch_size == 2:  # t2 alone, then t4 alone, as in the whole run
            for key in ("results", "errors", "failed", "unreadable", "images", "thresholds", "input"):
                assert resumed[key] == whole[key], key
            assert overlays == whole_overlays and written == whole["results"]
        else:  # t2 and t4 together
            for key in ("results", "errors", "failed", "unreadable", "images", "thresholds", "input"):
                assert _alike(resumed[key], whole[key]), key
            assert sorted(overlays) == sorted(whole_overlays) and written == resumed["results"]
            assert all(hashlib.sha256(overlays[entry["overlay"]]).hexdigest() == entry["overlay_sha256"]
                       for entry in written)
            assert [overlays[f"t{i}.png"] for i in (0, 1)] == [whole_overlays[f"t{i}.png"] for i in (0, 1)]


def test_a_resume_that_is_not_of_the_stopped_run_is_refused_and_changes_nothing(tiny_export, tmp_path):
    from stmae_edge.errors import ConfigError
    from stmae_edge.runtime import files

    paths = _tiles(tmp_path / "in", 5)
    detector = Detector(tiny_export[1], "ort-cpu", batch_size=2)
    with pytest.raises(ConfigError, match="holds no results.json"):
        files.predict_to_folder(detector, paths, tmp_path / "empty", resume=True)
    assert not (tmp_path / "empty").exists()  # no folder made for a run refused
    files.predict_to_folder(detector, paths, tmp_path / "complete")
    with pytest.raises(ConfigError, match="scored every image; there is nothing to resume"):
        files.predict_to_folder(detector, paths, tmp_path / "complete", resume=True)

    out = tmp_path / "out"
    _stopped_run(tiny_export, paths, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConfigError, match=r"give the images of the stopped run .* \(5\), no others: 1 of it not given"):
        files.predict_to_folder(detector, paths[:4], out, resume=True)
    with pytest.raises(ConfigError, match=r"1 not in it \(first: .*other.png\)"):
        files.predict_to_folder(detector, [*paths, tmp_path / "other.png"], out, resume=True)
    with pytest.raises(ConfigError, match="scored with another thresholds; resume it as it was started"):
        files.predict_to_folder(detector, paths, out, resume=True, image_threshold=123.0)
    with pytest.raises(ConfigError, match=r"scored with another overlay setting \(--no-overlays\)"):
        files.predict_to_folder(detector, paths, out, resume=True, overlays=False)
    with pytest.raises(ConfigError, match="in the order it was given them"):
        files.predict_to_folder(detector, [*paths[2:], *paths[:2]], out, resume=True)
    record = json.loads(before["results.json"])
    (out / "results.json").write_text(json.dumps({**record, "model_hash": "0" * 64}))
    with pytest.raises(ConfigError, match="scored with another model; resume it as it was started"):
        files.predict_to_folder(detector, paths, out, resume=True)
    # a results.json edited by hand: refused in one line before anything is scored or merged
    entry = record["results"][0]
    for edit, why in (({"results": [{"source": 3}]}, "'results' is not as predict writes it"),
                      ({"errors": ""}, "'errors' is not"), ({"errors": [{"source": "x.png"}]}, "'errors' is not"),
                      ({"runtime": {}}, "'runtime' is not"), ({"images": None}, "'images' is not"),
                      ({"images": 7}, "'images' is 7, where it lists 5"), ({"overlays": None}, "'overlays' is not"),
                      ({"results": [{**entry, "decision": "maybe"}]}, "'results' is not"),
                      ({"stopped": {"error": "x", "not_scored": "t2.png"}}, "'stopped' is not")):
        (out / "results.json").write_text(json.dumps({**record, **edit}))
        with pytest.raises(ConfigError, match=f"is not the results of a stopped run \\(its {why}"):
            files.predict_to_folder(detector, paths, out, resume=True)
    (out / "results.json").write_text(json.dumps({key: value for key, value in record.items() if key != "model"}))
    with pytest.raises(ConfigError, match="its 'model' is missing"):
        files.predict_to_folder(detector, paths, out, resume=True)
    (out / "results.json").write_bytes(before["results.json"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_resumed_run_with_inputs_sharing_a_name_or_given_twice_is_the_run_scored_whole(tiny_export, tmp_path,
                                                                                        caplog):
    """x.png in two folders, and a file given twice: the resume scored the repeated file again when its
    first copy had been scored, and warned that the stopped run's own overlays were a user's files."""
    from stmae_edge.runtime import files

    first, second = _tiles(tmp_path / "a", 2), _tiles(tmp_path / "b", 2)  # a/t0 a/t1, b/t0 b/t1
    paths = [first[0], second[0], first[1], second[1], first[0]]
    with Detector(tiny_export[1], "ort-cpu", batch_size=2) as detector:
        whole = files.predict_to_folder(detector, paths, tmp_path / "whole")
    out = tmp_path / "out"
    _stopped_run(tiny_export, paths, out)
    caplog.clear()
    with caplog.at_level(logging.WARNING), Detector(tiny_export[1], "ort-cpu", batch_size=2) as detector:
        resumed = files.predict_to_folder(detector, paths, out, resume=True)
    assert "took another name" not in caplog.text
    assert resumed["results"] == whole["results"] and resumed["images"] == 5
    assert sorted(p.name for p in out.glob("*.png")) == sorted(p.name for p in (tmp_path / "whole").glob("*.png"))

"""Short versions of the soak and concurrency runs (benchmarks/soak_runtime.py runs the full ones):
repeated calls are bit-identical, resident memory stops growing after warm-up, threads change nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import texture
from soak import concurrent, soak_detector, soak_linescan

from stmae_edge.runtime import Detector

# resident memory now, not its peak, is read from Linux's /proc (macOS has no such file)
needs_proc = pytest.mark.skipif(not Path("/proc/self/statm").is_file(),
                                reason="the soak reads resident memory from Linux's /proc/self/statm")

GROWTH_LIMIT_MB = 5.0


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(3)
    out = [texture(rng, 96).astype(np.uint8) for _ in range(12)]
    out[3][40:50, 20:60] = 250  # a defect-like bar, so regions are part of what must repeat
    out.append(rng.integers(0, 65535, (70, 130), dtype=np.uint16))
    return out


@pytest.fixture(scope="module")
def detector(tiny_export):
    return Detector(tiny_export[1], "ort-cpu")


@needs_proc
def test_repeated_calls_are_bit_identical_and_memory_settles(detector, frames):
    result = soak_detector(detector, frames, total_frames=2_000)
    assert result["mismatches"] == 0
    assert result["rss_leak_mb"] < GROWTH_LIMIT_MB, result


# A host that leaks: it holds every detection (a 96 x 96 float map each, 36 KB). Run in a process of
# its own: in the test run's, memory that earlier tests had freed, kept resident by Python's and the C
# library's allocators, took up part of the leak before the process grew (read once: 6 MB of 36).
LEAKING_HOST = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[3])
from soak import soak_detector
from stmae_edge.runtime import Detector

class KeepsEveryResult:
    def __init__(self, detector):
        self.detector, self.kept = detector, []

    def predict(self, images):
        out = self.detector.predict(images)
        self.kept.append(out)
        return out

with np.load(sys.argv[2]) as saved:
    frames = [saved[f"f{i}"] for i in range(len(saved.files))]
print(json.dumps(soak_detector(KeepsEveryResult(Detector(sys.argv[1], "ort-cpu")), frames, total_frames=1_000)))
"""


@needs_proc
def test_the_soak_reports_a_leak_of_one_map_per_frame(tiny_export, frames, tmp_path):
    """The measure itself can fail: 1,000 frames kept are ~36 MB, seen in both halves."""
    np.savez(tmp_path / "frames.npz", **{f"f{i}": frame for i, frame in enumerate(frames)})
    run = subprocess.run([sys.executable, "-c", LEAKING_HOST, str(tiny_export[1]), str(tmp_path / "frames.npz"),
                          str(Path(__file__).parent)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["mismatches"] == 0
    assert result["rss_leak_mb"] > 20, result


def test_eight_threads_give_the_one_thread_results_bit_for_bit(detector, frames):
    result = concurrent(detector, frames, threads=8, calls=60)
    assert result["calls"] == 480 and result["mismatches"] == 0


@needs_proc
def test_a_strip_pushed_again_gives_the_same_map_and_defects_and_memory_settles(detector):
    rng = np.random.default_rng(5)
    blocks = [texture(rng, 64, 400).astype(np.uint8) for _ in range(3)]
    blocks[1][10:20, 100:180] = 250
    result = soak_linescan(detector, blocks, total_rows=1_500)
    assert result["identical"] and result["rows"] == 1_500
    assert result["rss_leak_mb"] < GROWTH_LIMIT_MB, result


def test_an_inspector_is_freed_with_its_last_reference(detector):
    """No reference cycle: a host that starts a StreamingInspector per strip gets the row buffers back
    at once, not when the cyclic garbage collector next runs (measured: +1.9 MB per 3,000-row strip)."""
    import gc
    import weakref

    from stmae_edge.runtime.linescan import StreamingInspector

    rng = np.random.default_rng(6)
    strip = texture(rng, 200, 300).astype(np.uint8)
    strip[50:60, 100:160] = 250
    gc.disable()
    try:
        inspector = StreamingInspector(detector, overlap=16, pixel_threshold=detector.map_stats.mean)
        defects = inspector.push(strip) + inspector.flush()
        assert defects and all(d.tiles for d in defects)
        alive = weakref.ref(inspector)
        del inspector
        assert alive() is None
    finally:
        gc.enable()

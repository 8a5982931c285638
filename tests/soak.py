"""Load on one Detector and one StreamingInspector, as a line runs them for weeks: the same calls
repeated must give bit-identical results and resident memory must stop growing after warm-up.
tests/test_soak.py runs short versions; benchmarks/soak_runtime.py the full ones.

    soak_detector   a fixed cycle of calls (batches of 1, 8 and 3 frames) repeated: cycle 1 is the
                    reference; it and the next WARMUP_CYCLES are the warm-up; every later cycle must
                    reproduce it exactly
    soak_linescan   the same strip pushed through fresh inspectors on one Detector, pass after pass
    concurrent      T threads x N calls on one Detector against the same calls made from one thread

Memory is read settled (garbage collected, freed heap handed back) and the measured part is split in
two: a leak grows in both halves, while an allocator that extends once after warm-up grows in one
(seen in CI: +5.3 MB in one step in a process that had run 280 tests before; alone it stays flat).
`rss_leak_mb` is twice the smaller half's growth: what a steady leak would add over the whole run.
"""

from __future__ import annotations

import hashlib
import threading
import time

import numpy as np

BATCH_CYCLE = (1, 8, 3)
# ONNX Runtime's and the allocator's pools settle within the first ~250 frames (measured with the tiny
# model on 13 frames: +8.7 MB over cycles 2..20, then flat over 3,000 more); growth is measured after.
WARMUP_CYCLES = 24


def resident_bytes() -> int:
    """This process's resident memory now (Linux /proc), not its peak."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


def settled_resident_bytes() -> int:
    """Resident memory once Python's cycles are collected and, with glibc, freed heap pages are handed
    back (malloc_trim): pages kept after a free depend on what the process ran before; memory still
    referenced stays resident, so a leak still shows."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the plain reading
        pass
    return resident_bytes()


def leak_figures(start: int, middle: int, end: int, highest: int) -> dict:
    """Growth in MB from three settled readings: at the end, per half, and the part both halves show."""
    first, second = (middle - start) / 2**20, (end - middle) / 2**20
    return {"rss_after_warmup_mb": start / 2**20, "rss_growth_mb": (end - start) / 2**20,
            "rss_growth_halves_mb": (first, second), "rss_leak_mb": 2 * min(first, second),
            "rss_peak_growth_mb": (highest - start) / 2**20}


def fingerprint(detections) -> str:
    """Scores, decisions, regions and maps of a call's results, down to the last bit."""
    h = hashlib.sha256()
    for d in detections:
        h.update(np.float64(d.score).tobytes())
        h.update(repr((d.is_anomalous, [r.to_dict() for r in d.regions])).encode())
        h.update(np.ascontiguousarray(d.anomaly_map).tobytes())
    return h.hexdigest()


def call_schedule(frame_count: int) -> list[list[int]]:
    """Frame indices of each call in one cycle: every frame once, in batches of 1, 8 and 3."""
    calls, start, k = [], 0, 0
    while start < frame_count:
        size = BATCH_CYCLE[k % len(BATCH_CYCLE)]
        calls.append(list(range(start, min(start + size, frame_count))))
        start += size
        k += 1
    return calls


def soak_detector(detector, frames: list[np.ndarray], total_frames: int) -> dict:
    schedule = call_schedule(len(frames))
    reference = [fingerprint(detector.predict([frames[i] for i in call])) for call in schedule]

    def cycle() -> int:
        return sum(fingerprint(detector.predict([frames[i] for i in call])) != expected
                   for call, expected in zip(schedule, reference, strict=True))

    mismatches = sum(cycle() for _ in range(WARMUP_CYCLES))
    after_warmup = settled_resident_bytes()
    highest, done, started = after_warmup, len(frames) * (1 + WARMUP_CYCLES), time.perf_counter()
    measured_from, middle = done, None
    while done < total_frames + measured_from:
        mismatches += cycle()
        done += len(frames)
        highest = max(highest, resident_bytes())
        if middle is None and done - measured_from >= total_frames / 2:
            middle = settled_resident_bytes()
    seconds = time.perf_counter() - started
    middle = settled_resident_bytes() if middle is None else middle  # total_frames 0: no halves
    return {"frames": done, "mismatches": mismatches, "seconds": seconds,
            "frames_per_s": (done - measured_from) / seconds,
            **leak_figures(after_warmup, middle, settled_resident_bytes(), highest)}


def soak_linescan(detector, blocks: list[np.ndarray], total_rows: int, overlap: int = 16) -> dict:
    """Pushes `blocks` in turn until `total_rows` rows, through a fresh inspector per pass; pass 1 is
    the reference and the warm-up, passes 2 and 3 the measured halves."""
    from stmae_edge.runtime.linescan import StreamingInspector

    def one_pass() -> tuple[str, int, int]:
        digest = hashlib.sha256()
        inspector = StreamingInspector(detector, overlap=overlap,
                                       on_rows=lambda first, rows: digest.update(np.int64(first).tobytes() + rows.tobytes()))
        rows, k, highest = 0, 0, 0
        defects = []
        while rows < total_rows:
            block = blocks[k % len(blocks)][:total_rows - rows]
            defects += inspector.push(block)
            rows += block.shape[0]
            k += 1
            highest = max(highest, resident_bytes())
        defects += inspector.flush()
        digest.update(repr([d.to_dict() for d in defects]).encode())
        return digest.hexdigest(), rows, highest

    reference, rows, _ = one_pass()
    after_warmup = settled_resident_bytes()
    started = time.perf_counter()
    second, _, highest = one_pass()
    middle = settled_resident_bytes()
    third, _, highest_third = one_pass()
    seconds = (time.perf_counter() - started) / 2
    width = blocks[0].shape[1]
    return {"rows": rows, "width": width, "identical": second == third == reference, "seconds": seconds,
            "rows_per_s": rows / seconds,
            **leak_figures(after_warmup, middle, settled_resident_bytes(), max(highest, highest_third))}


def concurrent(detector, frames: list[np.ndarray], threads: int, calls: int) -> dict:
    """Each thread makes `calls` single-frame calls in its own seeded order; every result must equal
    the one-thread result for that frame, bit for bit."""
    expected = [fingerprint([detector.predict(frame)]) for frame in frames]
    mismatches = [0] * threads
    errors: list[BaseException] = []

    def work(k: int) -> None:
        order = np.random.default_rng(k).integers(0, len(frames), calls)
        try:
            for i in order:
                mismatches[k] += fingerprint([detector.predict(frames[i])]) != expected[i]
        except BaseException as exc:  # reported by the caller, not lost in the thread
            errors.append(exc)

    started = time.perf_counter()
    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    seconds = time.perf_counter() - started
    if errors:
        raise errors[0]
    return {"threads": threads, "calls": threads * calls, "mismatches": sum(mismatches), "seconds": seconds,
            "calls_per_s": threads * calls / seconds}

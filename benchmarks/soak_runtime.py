"""Soak and concurrency of the runtime at full length; writes the soak rows of docs/BENCHMARKS.md.

    python benchmarks/soak_runtime.py [--frames 100000] [--rows 20000] [--width 4096] [--threads 8] [--calls 1000]

One tiny model (ONNX Runtime CPU) so that it runs in minutes on 2 cores; what is measured is the
runtime around it: repeated calls must be bit-identical to the first pass over the same frames, and
resident memory after warm-up must not keep growing: less than 5 MB over the run from growth that both
halves of it show (tests/soak.py has the procedures and why halves).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
BEGIN, END = "<!-- soak-runtime:begin -->", "<!-- soak-runtime:end -->"
GROWTH_LIMIT_MB = 5.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--calls", type=int, default=1_000, help="calls per thread")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    import numpy as np
    from fuzz_inputs import tiny_model
    from quality_magnetic_tile import machine
    from soak import concurrent, soak_detector, soak_linescan
    from synthetic_data import texture

    from stmae_edge.runtime import Detector

    detector = Detector(tiny_model(), "ort-cpu")
    rng = np.random.default_rng(3)
    frames = [texture(rng, 96).astype(np.uint8) for _ in range(40)]
    frames[3][40:50, 20:60] = 250
    frames.append(rng.integers(0, 65535, (70, 130), dtype=np.uint16))
    blocks = [texture(rng, 256, args.width).astype(np.uint8) for _ in range(4)]
    blocks[1][100:120, 1000:1200] = 250

    results = {}
    print(f"soak: {args.frames:,} frames through one Detector ...", flush=True)
    results["detector"] = soak_detector(detector, frames, args.frames)
    print(results["detector"], flush=True)
    print(f"concurrency: {args.threads} threads x {args.calls:,} calls ...", flush=True)
    results["threads"] = concurrent(detector, frames, args.threads, args.calls)
    print(results["threads"], flush=True)
    print(f"line-scan: {args.rows:,} rows x {args.width} px, three times ...", flush=True)
    results["linescan"] = soak_linescan(detector, blocks, args.rows)
    print(results["linescan"], flush=True)
    if not args.no_write:
        write_rows(results, machine(), " ".join(["python benchmarks/soak_runtime.py", *sys.argv[1:]]))
    ok = (results["detector"]["mismatches"] == 0 and results["threads"]["mismatches"] == 0
          and results["linescan"]["identical"] and results["detector"]["rss_leak_mb"] < GROWTH_LIMIT_MB
          and results["linescan"]["rss_leak_mb"] < GROWTH_LIMIT_MB)
    print("targets met" if ok else "TARGETS NOT MET")
    sys.exit(0 if ok else 1)


def halves(result: dict) -> str:
    first, second = result["rss_growth_halves_mb"]
    return f"{first:+.2f} / {second:+.2f} MB"


def write_rows(results: dict, machine: str, command: str) -> None:
    d, t, s = results["detector"], results["threads"], results["linescan"]
    lines = [BEGIN, f"Measured {time.strftime('%Y-%m-%d')} on {machine}, ONNX Runtime CPU, the tiny "
             f"model (64x64 input), by `{command}`. Target: every result bit-identical to the first pass, "
             f"resident memory after warm-up (read settled: collected, freed heap handed back) keeps growing by "
             f"less than {GROWTH_LIMIT_MB:g} MB: twice the smaller half's growth, so that a pool extended "
             "once is not read as a leak.", "",
             "| run | work | results differing from the first pass | resident memory after warm-up | "
             "growth at the end (peak) | growth per half | rate |",
             "|---|---|---|---|---|---|---|",
             f"| one Detector, calls of 1, 8 and 3 frames | {d['frames']:,} frames "
             "(41 distinct, 96x96 8-bit and 130x70 16-bit) | "
             f"{d['mismatches']} | {d['rss_after_warmup_mb']:.1f} MB | "
             f"{d['rss_growth_mb']:+.2f} MB ({d['rss_peak_growth_mb']:+.2f} MB) | {halves(d)} | "
             f"{d['frames_per_s']:,.0f} frames/s |",
             f"| {t['threads']} threads on one Detector | {t['calls']:,} single-frame calls | {t['mismatches']} "
             f"(against one thread) | - | - | - | {t['calls_per_s']:,.0f} calls/s |",
             f"| StreamingInspector, second and third pass of a strip | {s['rows']:,} rows x {s['width']} px each | "
             f"{'0 (map and defects identical)' if s['identical'] else 'DIFFERENT'} | {s['rss_after_warmup_mb']:.1f} MB | "
             f"{s['rss_growth_mb']:+.2f} MB ({s['rss_peak_growth_mb']:+.2f} MB) | {halves(s)} | {s['rows_per_s']:,.0f} rows/s |",
             END]
    path = ROOT / "docs" / "BENCHMARKS.md"
    text, block = path.read_text(), "\n".join(lines)
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Soak and concurrency of the runtime (issue 11)\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()

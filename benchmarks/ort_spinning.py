"""ONNX Runtime's CPU threads spinning (busy-waiting for work, its own default) or waiting (the
Detector's default, `spin_threads=False`), side by side in one run.

    python benchmarks/ort_spinning.py [--model runs/bench_quality/stmae.pt] [--rounds 5]

One exported model behind two Detectors that differ only in `spin_threads`, taking turns within every
round, on decoded magnetic_tile test images:
- batch 8 back to back (throughput: what `bench` measures);
- single frames with a 20 ms pause after each, as a camera hands them to a host program one at a time:
  the latency of each call, and the CPU time the process spends per frame (what the host's own threads
  lose).
Figures are medians over the rounds.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quality_magnetic_tile import model_benchmark_args, write_table  # noqa: E402

from stmae_edge import data  # noqa: E402
from stmae_edge.engines.export import export_onnx  # noqa: E402
from stmae_edge.preprocessing import load_image  # noqa: E402
from stmae_edge.runtime import Detector  # noqa: E402

BEGIN, END = "<!-- ort-spinning:begin -->", "<!-- ort-spinning:end -->"
BATCH, FRAMES, PAUSE_S = 8, 20, 0.020


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one_round(detector: Detector, images: list[np.ndarray]) -> dict:
    detector.predict(images[:BATCH])  # untimed: the other detector's threads may still be winding down
    started = time.perf_counter()
    detector.predict(images[:BATCH])
    batch = time.perf_counter() - started
    latencies, cpu_before = [], cpu_seconds()
    for i in range(FRAMES):
        started = time.perf_counter()
        detector.predict(images[i % len(images)])
        latencies.append(time.perf_counter() - started)
        time.sleep(PAUSE_S)
    return {"batch": batch, "latency": float(np.median(latencies)), "cpu": (cpu_seconds() - cpu_before) / FRAMES}


def main() -> None:
    args = model_benchmark_args(__doc__, lambda p: p.add_argument("--rounds", type=int, default=5))
    onnx_path, _ = export_onnx(args.model, args.model.parent / f"{args.model.stem}.fp32.onnx")
    samples = data.eval_samples(args.data)
    images = [load_image(samples[i].path) for i in range(0, len(samples), max(1, len(samples) // 32))][:32]
    detectors = {"waiting (the default)": Detector(onnx_path, "ort-cpu", batch_size=BATCH),
                 "spinning (`spin_threads=True`)": Detector(onnx_path, "ort-cpu", batch_size=BATCH, spin_threads=True)}
    runs: dict[str, list[dict]] = {name: [] for name in detectors}
    for r in range(args.rounds):
        for name, detector in detectors.items():
            runs[name].append(one_round(detector, images))
            print(f"round {r + 1}/{args.rounds} {name}: {runs[name][-1]}", flush=True)
    medians = {name: {k: float(np.median([x[k] for x in rs])) for k in rs[0]} for name, rs in runs.items()}
    spinning = medians["spinning (`spin_threads=True`)"]
    rows = [f"| {name} | {1e3 * m['batch']:.1f} | {spinning['batch'] / m['batch']:.2f}x | "
            f"{1e3 * m['latency']:.1f} | {1e3 * m['cpu']:.1f} | {m['cpu'] / spinning['cpu']:.2f}x |"
            for name, m in medians.items()]
    print("\n".join(rows))
    write_table(args.md, BEGIN, END, f"python benchmarks/ort_spinning.py --rounds {args.rounds}",
                f"the quality benchmark's model, exported fp32, ONNX Runtime CPU; {len(images)} decoded "
                f"magnetic_tile test images; medians of {args.rounds} interleaved rounds; single frames, "
                f"each followed by a {1e3 * PAUSE_S:.0f} ms pause, {FRAMES} per round",
                ["ONNX Runtime threads", f"ms per batch of {BATCH}", "throughput vs spinning",
                 "ms per single frame (p50)", "process CPU ms per single frame", "CPU vs spinning"], rows)


if __name__ == "__main__":
    main()

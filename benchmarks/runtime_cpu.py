"""The runtime on the CPU, side by side in one run: PyTorch eager, ONNX Runtime FP32 and INT8.

    python benchmarks/runtime_cpu.py [--model runs/bench_quality/stmae.pt] [--rounds 15]

One model (the quality benchmark's checkpoint), its `stmae-edge export` FP32 graph and its
`stmae-edge calibrate` INT8 graph, each behind the same Detector (same preprocessing, same
postprocessing), on the same batches of decoded magnetic_tile test images. The backends take turns
within every round (each turn: one untimed call, then one timed), so drift of this shared machine
hits all of them alike; figures are medians.
Targets (issue 4), at batch 8: ONNX Runtime FP32 >= 2x PyTorch eager; INT8 >= 1.5x FP32 on ONNX
Runtime; preprocessing + postprocessing <= 10% of end-to-end time.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quality_magnetic_tile import model_benchmark_args, write_table  # noqa: E402

from stmae_edge import data  # noqa: E402
from stmae_edge.engines.calibrate import calibrate  # noqa: E402
from stmae_edge.engines.export import export_onnx  # noqa: E402
from stmae_edge.preprocessing import load_image  # noqa: E402
from stmae_edge.runtime import Detector  # noqa: E402
from stmae_edge.runtime.bench import bench_batch  # noqa: E402
from stmae_edge.runtime.detector import STAGES  # noqa: E402

BEGIN, END = "<!-- runtime-cpu:begin -->", "<!-- runtime-cpu:end -->"
BATCH = 8


def side_by_side(detectors: dict[str, Detector], images: list[np.ndarray], rounds: int) -> dict[str, dict]:
    """Per detector: median end-to-end seconds per batch and median seconds per stage."""
    batches = [images[i:i + BATCH] for i in range(0, len(images) - BATCH + 1, BATCH)]
    for detector in detectors.values():
        for batch in batches[:2]:
            detector.predict(batch)  # warm-up: allocations, thread pools, lazy initialisation
    times = {name: {"total": [], **{s: [] for s in STAGES}} for name in detectors}
    for r in range(rounds):
        batch = batches[r % len(batches)]
        for name, detector in detectors.items():
            # One untimed call first: the previous backend's idle threads spin for a while after it
            # returns, and on 2 cores that would be charged to whichever backend runs next.
            detector.predict(batch)
            timings: dict = {}
            started = time.perf_counter()
            detector.predict(batch, timings=timings)
            times[name]["total"].append(time.perf_counter() - started)
            for stage in STAGES:
                times[name][stage].append(timings[stage])
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {1e3 * t['total'][-1]:.0f} ms" for n, t in times.items()),
              flush=True)
    return {name: {key: float(np.median(values)) for key, values in t.items()} for name, t in times.items()}


def main() -> None:
    args = model_benchmark_args(__doc__, lambda p: p.add_argument("--rounds", type=int, default=15,
                                                                  help="timed batches per backend"))
    rounds = args.rounds
    workdir = args.model.parent
    fp32, _ = export_onnx(args.model, workdir / f"{args.model.stem}.fp32.onnx")
    # fp32 around the INT8 layers, as the README advises for the CPU (ONNX Runtime has few fp16 kernels)
    int8, _ = calibrate(fp32, cache_dir=REPO / "calibration", float_precision="fp32")
    samples = data.eval_samples(args.data)
    order = np.random.default_rng(0).permutation(len(samples))[:64]
    images = [load_image(samples[i].path) for i in sorted(order)]
    detectors = {
        "PyTorch eager (torch-cpu)": Detector(args.model, "torch-cpu", batch_size=BATCH),
        "ONNX Runtime CPU, fp32 graph": Detector(fp32, "ort-cpu", batch_size=BATCH),
        "ONNX Runtime CPU, int8 graph": Detector(int8, "ort-cpu", batch_size=BATCH),
    }
    medians = side_by_side(detectors, images, rounds)
    eager = medians["PyTorch eager (torch-cpu)"]["total"]
    ort_fp32 = medians["ONNX Runtime CPU, fp32 graph"]["total"]
    rows = []
    for name, m in medians.items():
        share = (m["preprocess"] + m["postprocess"]) / m["total"]
        rows.append(f"| {name} | {BATCH} | {1e3 * m['total']:.1f} | {BATCH / m['total']:.1f} | "
                    f"{1e3 * m['preprocess']:.1f} | {1e3 * m['infer']:.1f} | {1e3 * m['postprocess']:.1f} | "
                    f"{100 * share:.1f}% | {eager / m['total']:.2f}x | {ort_fp32 / m['total']:.2f}x |")
        print(rows[-1])
    for size in (1, 32):  # the runtime's own latency table at other batch sizes, same images
        r = bench_batch(detectors["ONNX Runtime CPU, fp32 graph"], images, size, max(5, rounds // 2))
        rows.append(f"| ONNX Runtime CPU, fp32 graph | {size} | {r['p50_ms']:.1f} | {r['images_per_s']:.1f} | "
                    f"{r['preprocess_ms']:.1f} | {r['infer_ms']:.1f} | {r['postprocess_ms']:.1f} | "
                    f"{100 * r['pre_post_share']:.1f}% | | |")
        print(rows[-1])
    int8_ratio = ort_fp32 / medians["ONNX Runtime CPU, int8 graph"]["total"]
    fp32_m = medians["ONNX Runtime CPU, fp32 graph"]
    rows += ["", f"At batch {BATCH}: ONNX Runtime fp32 against PyTorch eager **{eager / ort_fp32:.2f}x** "
             f"(target >= 2x); INT8 against FP32 on ONNX Runtime **{int8_ratio:.2f}x** (target >= 1.5x); "
             f"preprocessing + postprocessing **{100 * (fp32_m['preprocess'] + fp32_m['postprocess']) / fp32_m['total']:.1f}%**"
             " of end-to-end time on ONNX Runtime fp32 (target <= 10%)."]
    write_table(args.md, BEGIN, END, f"python benchmarks/runtime_cpu.py --rounds {rounds}",
                f"{len(images)} decoded magnetic_tile test images of their own sizes, medians of {rounds} "
                "interleaved rounds after warm-up; every row is the same Detector code with another backend; "
                f"the batch 1 and 32 rows are `bench_batch` on the first 1 or 32 of those images, "
                f"{max(5, rounds // 2)} timed calls each, not interleaved, as `stmae-edge bench` runs it",
                ["backend", "batch", "ms per batch (p50)", "images/s", "pre ms", "infer ms", "post ms",
                 "pre+post", "vs PyTorch eager", "vs ORT fp32"], rows)


if __name__ == "__main__":
    main()

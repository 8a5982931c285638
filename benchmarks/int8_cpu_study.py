"""Which INT8 graph, if any, makes ONNX Runtime on this CPU faster than FP32? A measured study.

    python benchmarks/int8_cpu_study.py [--model runs/bench_quality/stmae.pt] [--rounds 15]

Quantises the model's FP32 export in several ways with the code of `stmae-edge calibrate` (same 64
training images, MinMax, per-channel weights), then, side by side in one run, times ONNX Runtime's CPU
provider on the same preprocessed batches of 8 test images (inference only; rounds interleaved, each
turn one untimed call and one timed) and
scores each graph as `stmae-edge evaluate GRAPH.onnx DATA` does.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quality_magnetic_tile import model_benchmark_args, pct, write_table  # noqa: E402

from stmae_edge import data  # noqa: E402
from stmae_edge.engines.calibrate import SETTINGS, _quantize  # noqa: E402
from stmae_edge.engines.export import export_onnx  # noqa: E402
from stmae_edge.evaluation.evaluate import evaluate  # noqa: E402
from stmae_edge.metadata import INPUT_NAME, ModelMetadata  # noqa: E402

BEGIN, END = "<!-- int8-cpu-study:begin -->", "<!-- int8-cpu-study:end -->"
CPU_INT8 = {"activation": "uint8", "symmetric": False}  # ORT's recommended U8S8 for x86 CPUs
# The unquantised layers stay fp32 here: ONNX Runtime's CPU provider has few fp16 kernels.
CPU_SETTINGS = SETTINGS | {"float_precision": "fp32"}
VARIANTS = {
    "MatMul only, symmetric int8 Q/DQ (`calibrate --float-precision fp32` before 2026-11-28; TensorRT-compatible)":
        CPU_SETTINGS,
    "Conv and MatMul, symmetric int8 Q/DQ (TensorRT-compatible)": CPU_SETTINGS | {"op_types": ["Conv", "MatMul"]},
    "Conv and MatMul, uint8 activations, QOperator (CPU only)":
        CPU_SETTINGS | CPU_INT8 | {"format": "QOperator", "op_types": ["Conv", "MatMul"]},
    "every supported op, uint8 activations, Q/DQ (CPU only)": CPU_SETTINGS | CPU_INT8 | {"op_types": None},
}


def main() -> None:
    import onnxruntime as ort

    args = model_benchmark_args(__doc__, lambda p: p.add_argument("--rounds", type=int, default=15))
    workdir = args.model.parent / "int8_study"
    workdir.mkdir(parents=True, exist_ok=True)
    fp32, _ = export_onnx(args.model, workdir / "fp32.onnx")
    proto = onnx.load(str(fp32))
    metadata = ModelMetadata.from_onnx(proto)
    calibration = data.recorded_train_images(metadata.training, 64)
    graphs = {"FP32 graph": fp32}
    for i, (name, settings) in enumerate(VARIANTS.items()):
        graphs[name] = workdir / f"int8_{i}.onnx"
        _quantize(fp32, proto, metadata, calibration, graphs[name], 8, settings)

    samples = data.eval_samples(args.data)
    order = np.random.default_rng(0).permutation(len(samples))[:64]
    batches = [metadata.preprocessing([samples[i].path for i in sorted(order)[k:k + 8]]) for k in range(0, 64, 8)]
    sessions = {n: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for n, p in graphs.items()}
    times: dict[str, list[float]] = {n: [] for n in sessions}
    for session in sessions.values():
        session.run(None, {INPUT_NAME: batches[0]})
    for r in range(args.rounds):
        for name, session in sessions.items():
            session.run(None, {INPUT_NAME: batches[r % len(batches)]})  # untimed: lets the last one's threads idle
            started = time.perf_counter()
            session.run(None, {INPUT_NAME: batches[r % len(batches)]})
            times[name].append(time.perf_counter() - started)
    medians = {n: float(np.median(t)) for n, t in times.items()}
    rows = []
    for name, path in graphs.items():
        quality = evaluate(path, args.data)
        rows.append(f"| {name} | {1e3 * medians[name]:.1f} | {medians['FP32 graph'] / medians[name]:.2f}x | "
                    f"{pct(quality['image_auroc'])} | {pct(quality['pixel_auroc'])} |")
        print(rows[-1], flush=True)
    write_table(args.md, BEGIN, END, f"python benchmarks/int8_cpu_study.py --rounds {args.rounds}",
                f"ONNX Runtime CPU provider, inference only, batch 8 of magnetic_tile test images, median of "
                f"{args.rounds} interleaved rounds; quality as `stmae-edge evaluate GRAPH.onnx DATA`",
                ["graph", "ms per batch of 8", "speed against FP32", "image AUROC", "pixel AUROC"], rows)


if __name__ == "__main__":
    main()

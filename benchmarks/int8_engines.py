"""INT8 graphs with the rest in fp16 (the `calibrate` default) against the rest in fp32, and the FP16 graph.

    python benchmarks/int8_engines.py [--model runs/bench_quality/stmae.pt] [--also runs/bench_quality/previous_default.pt]

For each model: exports the fp32 and fp16 graphs as `stmae-edge export` does, calibrates the INT8 graph
both ways (`stmae-edge calibrate`, 64 training images, `--float-precision fp16` and `fp32`) and with every
Linear layer quantised instead of the large ones only (`--min-weights 1`, the graph before), and builds
every graph with TensorRT for RTX at batch 1:8:32 (no GPU needed). Per graph: the plan size; the
convolution and matrix-multiply layers by precision as TensorRT's parser reads the graph (strongly
typed: what the plan runs); image / pixel AUROC and AUPRO as `stmae-edge evaluate GRAPH.onnx DATA`
(ONNX Runtime CPU); and ONNX Runtime CPU milliseconds per batch of 8, the median of interleaved rounds.
Issue 14's targets: the INT8 plan below the FP16 plan; INT8 within 1.0 AUROC point of FP32.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quality_magnetic_tile import model_benchmark_args, pct, write_table  # noqa: E402

from stmae_edge import data  # noqa: E402
from stmae_edge.engine_plan import import_tensorrt  # noqa: E402
from stmae_edge.engines.build import build_engine  # noqa: E402
from stmae_edge.engines.calibrate import calibrate  # noqa: E402
from stmae_edge.engines.export import export_onnx  # noqa: E402
from stmae_edge.evaluation.evaluate import evaluate  # noqa: E402
from stmae_edge.metadata import INPUT_NAME, ModelMetadata  # noqa: E402

BEGIN, END = "<!-- int8-engines:begin -->", "<!-- int8-engines:end -->"


def heavy_layers(trt, path: Path) -> str:
    """Convolutions and matrix products by the precision TensorRT's parser gives them."""
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(0)
    if not trt.OnnxParser(network, logger).parse_from_file(str(path)):
        return "parse failed"
    heavy = {trt.LayerType.CONVOLUTION, trt.LayerType.MATRIX_MULTIPLY}
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    producer = {layer.get_output(k).name: layer.type for layer in layers for k in range(layer.num_outputs)}
    counts: Counter[str] = Counter()
    for layer in layers:
        if layer.type in heavy:
            inputs = [layer.get_input(k) for k in range(layer.num_inputs) if layer.get_input(k) is not None]
            dequantised = any(producer.get(t.name) == trt.LayerType.DEQUANTIZE for t in inputs)
            counts["int8 (Q/DQ)" if dequantised else str(layer.get_output(0).dtype).rpartition(".")[2].lower()] += 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def cpu_milliseconds(graphs: dict[str, Path], batches: list[np.ndarray], rounds: int) -> dict[str, float]:
    import onnxruntime as ort

    sessions = {n: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for n, p in graphs.items()}
    times: dict[str, list[float]] = {n: [] for n in sessions}
    for session in sessions.values():
        session.run(None, {INPUT_NAME: batches[0]})
    for r in range(rounds):
        for name, session in sessions.items():
            started = time.perf_counter()
            session.run(None, {INPUT_NAME: batches[r % len(batches)]})
            times[name].append(time.perf_counter() - started)
    return {n: 1e3 * float(np.median(t)) for n, t in times.items()}


def main() -> None:
    args = model_benchmark_args(__doc__, lambda p: (p.add_argument("--rounds", type=int, default=9),
                                                    p.add_argument("--also", type=Path, action="append", default=[])))
    trt, flavour = import_tensorrt()
    rows = []
    for model in [args.model, *args.also]:
        workdir = model.parent / "int8_engines"
        workdir.mkdir(parents=True, exist_ok=True)
        fp32, _ = export_onnx(model, workdir / f"{model.stem}.fp32.onnx")
        fp16, _ = export_onnx(model, workdir / f"{model.stem}.fp16.onnx", "fp16")
        graphs = {"fp32 graph": fp32, "fp16 graph": fp16}
        for rest in ("fp16", "fp32"):
            graphs[f"int8 graph, rest in {rest}"], _ = calibrate(
                fp32, out=workdir / f"{model.stem}.int8.{rest}.onnx", cache_dir=REPO / "calibration",
                float_precision=rest)
        graphs["int8 graph, rest in fp16, every Linear layer quantised (`--min-weights 1`)"], _ = calibrate(
            fp32, out=workdir / f"{model.stem}.int8.all.onnx", cache_dir=REPO / "calibration", min_weight_elements=1)
        metadata = ModelMetadata.from_onnx(fp32)
        samples = data.eval_samples(args.data)
        order = sorted(np.random.default_rng(0).permutation(len(samples))[:32])
        batches = [metadata.preprocessing([samples[i].path for i in order[k:k + 8]]) for k in range(0, 32, 8)]
        milliseconds = cpu_milliseconds(graphs, batches, args.rounds)
        sizes = {}
        for name, path in graphs.items():
            precision = "int8" if name.startswith("int8") else name[:4]
            _, sidecar = build_engine(path, precision, "1:8:32", workdir / f"{path.stem}.plan")
            sizes[name] = sidecar["plan"]["size_bytes"] / 1e6
        for name, path in graphs.items():
            quality = evaluate(path, args.data) if name != "fp16 graph" else None
            auroc = ("see the precision table" if quality is None else
                     f"{pct(quality['image_auroc'])} / {pct(quality['pixel_auroc'])} / {pct(quality['aupro'])}")
            rows.append(f"| {model.name} | {name} | {sizes[name]:.2f} | {sizes[name] / sizes['fp16 graph']:.3f} | "
                        f"{heavy_layers(trt, path)} | {auroc} | {milliseconds[name]:.0f} | "
                        f"{milliseconds['fp32 graph'] / milliseconds[name]:.2f}x |")
            print(rows[-1], flush=True)
    write_table(args.md, BEGIN, END, "python benchmarks/int8_engines.py --also runs/bench_quality/previous_default.pt",
                f"plans built by {flavour} {trt.__version__} at batch 1:8:32 for its default compute capabilities; "
                f"layers as its ONNX parser reads the strongly typed graph; quality as `stmae-edge evaluate "
                f"GRAPH.onnx DATA`; CPU time: ONNX Runtime CPU provider, batch 8, median of {args.rounds} "
                "interleaved rounds",
                ["model", "graph", "plan MB", "plan / fp16 plan", "conv and matmul layers by precision",
                 "image / pixel AUROC / AUPRO", "ORT CPU ms per batch 8", "CPU speed vs fp32"], rows)


if __name__ == "__main__":
    main()

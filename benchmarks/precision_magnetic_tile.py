"""FP32, FP16 and INT8 ONNX graphs of one model, through ONNX Runtime (CPU), on magnetic_tile.

    python benchmarks/precision_magnetic_tile.py [--model runs/bench_quality/stmae.pt]

Exports the checkpoint as `stmae-edge export MODEL [--precision fp16]` does, scores both graphs with
the code of `stmae-edge evaluate GRAPH.onnx DATA`, and writes the rows next to the PyTorch figures of
the same checkpoint; the INT8 graph comes from `stmae-edge calibrate` on 64 training images.
Targets (issue 3): FP16 within 0.2 points and INT8 within 1.0 point of FP32 on image and pixel AUROC.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quality_magnetic_tile import model_benchmark_args, pct, write_table  # noqa: E402

from stmae_edge.engines.calibrate import calibrate  # noqa: E402
from stmae_edge.engines.export import export_onnx  # noqa: E402
from stmae_edge.evaluation.evaluate import evaluate  # noqa: E402

BEGIN, END = "<!-- precision-magnetic-tile:begin -->", "<!-- precision-magnetic-tile:end -->"


def main() -> None:
    args = model_benchmark_args(__doc__)
    results = {"PyTorch fp32 (checkpoint)": evaluate(args.model, args.data)}
    for precision in ("fp32", "fp16"):
        path, _ = export_onnx(args.model, args.model.with_name(f"{args.model.stem}.{precision}.onnx"), precision)
        results[f"ONNX Runtime CPU, {precision} graph"] = evaluate(path, args.data)
        if precision == "fp32":
            int8, _ = calibrate(path, cache_dir=REPO / "calibration")
    results["ONNX Runtime CPU, int8 graph (the transformer's large layers in INT8, rest in fp16)"] = evaluate(int8, args.data)
    fp32 = results["ONNX Runtime CPU, fp32 graph"]
    rows = []
    for name, r in results.items():
        delta = (f"{100 * (r['image_auroc'] - fp32['image_auroc']):+.2f} / "
                 f"{100 * (r['pixel_auroc'] - fp32['pixel_auroc']):+.2f}")
        rows.append(f"| {name} | {pct(r['image_auroc'])} | {pct(r['pixel_auroc'])} | {pct(r['aupro'])} | "
                    f"{pct(r['f1'])} | {delta} |")
        print(rows[-1], flush=True)
    write_table(args.md, BEGIN, END, "python benchmarks/precision_magnetic_tile.py",
                "the model of the quality benchmark; each graph scored as `stmae-edge evaluate GRAPH.onnx DATA` "
                "does; targets: FP16 within 0.2 points and INT8 within 1.0 point of FP32",
                ["model", "image AUROC", "pixel AUROC", "AUPRO@30%", "F1 at default threshold",
                 "image / pixel AUROC against the fp32 graph, points"], rows)


if __name__ == "__main__":
    main()

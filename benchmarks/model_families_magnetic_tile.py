"""ST-MAE, ST-MAE with self-supervision, and the filtering autoencoder on magnetic_tile, side by side.

    python benchmarks/model_families_magnetic_tile.py [--rounds 15]

Each model is the checkpoint its command in the table writes (trained here, with the same settings,
where the file is missing): quality from `stmae-edge evaluate` on the full test set, throughput of its
`stmae-edge export` graph behind the same Detector on ONNX Runtime CPU, the three taking turns in
every round on the same batches of decoded test images (runtime_cpu.side_by_side), medians.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quality_magnetic_tile import model_benchmark_args, pct, write_table  # noqa: E402
from runtime_cpu import BATCH, side_by_side  # noqa: E402

from stmae_edge import data  # noqa: E402
from stmae_edge.checkpoint import read_checkpoint  # noqa: E402
from stmae_edge.engines.export import export_onnx  # noqa: E402
from stmae_edge.evaluation.evaluate import evaluate, format_report  # noqa: E402
from stmae_edge.models import filtering_ae, stmae  # noqa: E402
from stmae_edge.preprocessing import load_image  # noqa: E402
from stmae_edge.runtime import Detector  # noqa: E402
from stmae_edge.training.train import TrainConfig, train  # noqa: E402

BEGIN, END = "<!-- model-families-magnetic-tile:begin -->", "<!-- model-families-magnetic-tile:end -->"
RUNS = REPO / "runs"

# name: (checkpoint, architecture, training settings, the command that trains it)
MODELS = {
    "ST-MAE": (RUNS / "bench_quality" / "stmae.pt", stmae.preset("small"), TrainConfig(),
               "stmae-edge train DATA --out stmae.pt"),
    "ST-MAE, self-supervised": (RUNS / "families" / "stmae_ss.pt", stmae.preset("small"),
                                TrainConfig(self_supervised=True),
                                "stmae-edge train DATA --self-supervised --out stmae_ss.pt"),
    "Filtering autoencoder": (RUNS / "families" / "filtering_ae.pt", filtering_ae.preset("small"),
                              TrainConfig(epochs=20, lr=1e-3),
                              "stmae-edge train DATA --family filtering-ae --epochs 20 --lr 1e-3 --out filtering_ae.pt"),
}


def main() -> None:
    args = model_benchmark_args(__doc__, lambda p: p.add_argument("--rounds", type=int, default=15,
                                                                  help="timed batches per model"))
    results, detectors, seconds = {}, {}, {}
    for name, (path, config, cfg, _) in MODELS.items():
        if not path.is_file():
            train(args.data, path, config, cfg)
        seconds[name] = read_checkpoint(path)[0].training["seconds"]
        results[name] = evaluate(path, args.data)
        print(name, format_report(results[name]), sep="\n")
        onnx_path, _ = export_onnx(path, path.with_suffix(".fp32.onnx"))
        detectors[name] = Detector(onnx_path, "ort-cpu", batch_size=BATCH)

    samples = data.eval_samples(args.data)
    order = np.random.default_rng(0).permutation(len(samples))[:64]
    images = [load_image(samples[i].path) for i in sorted(order)]
    medians = side_by_side(detectors, images, args.rounds)
    reference = medians["ST-MAE"]["total"]
    rows = []
    for name, (path, _, _, command) in MODELS.items():
        r, total = results[name], medians[name]["total"]
        rows.append(f"| {name} | {pct(r['image_auroc'])} | {pct(r['pixel_auroc'])} | {pct(r['aupro'])} | "
                    f"{pct(r['f1'])} | {BATCH / total:.1f} | {reference / total:.2f}x | {seconds[name]:.0f} s | "
                    f"`{command} && stmae-edge evaluate {path.name} DATA && stmae-edge export {path.name}` |")
        print(rows[-1])

    plain, self_sup = results["ST-MAE"], results["ST-MAE, self-supervised"]
    gains = {k: self_sup[k] - plain[k] for k in ("pixel_auroc", "aupro")}
    verdict = "improves" if max(gains.values()) > 0 else "does not improve"
    rows += ["", f"Self-supervision {verdict} ST-MAE's localisation here: pixel AUROC {pct(plain['pixel_auroc'])} -> "
             f"{pct(self_sup['pixel_auroc'])}, AUPRO {pct(plain['aupro'])} -> {pct(self_sup['aupro'])} "
             f"(image AUROC {pct(plain['image_auroc'])} -> {pct(self_sup['image_auroc'])}).",
             "", "Per defect type, image/pixel AUROC: " + "; ".join(
                 f"{name}: " + ", ".join(f"{k} {pct(v['image_auroc'])}/{pct(v['pixel_auroc'])}"
                                         for k, v in results[name]["per_defect_type"].items())
                 for name in MODELS) + "."]
    write_table(args.md, BEGIN, END, f"python benchmarks/model_families_magnetic_tile.py --rounds {args.rounds}",
                f"one seeded run per model, seed 0; test set: {plain['n_images']} images, {plain['n_anomalous']} "
                f"defective; throughput: ONNX Runtime CPU fp32 graphs at batch {BATCH}, end to end through the "
                f"Detector, medians of {args.rounds} interleaved rounds on {len(images)} decoded test images; "
                "train time is the training's own wall clock, on 2 CPU cores that it may have shared with another "
                "training (those recorded on 2026-11-23 did), so it is an upper bound",
                ["model", "image AUROC", "pixel AUROC", "AUPRO@30%", "F1 at default threshold",
                 "ORT CPU images/s", "vs ST-MAE", "train time", "command (DATA = the dataset)"], rows)


if __name__ == "__main__":
    main()

"""ONNX Runtime CPU throughput of the default model against the previous default, side by side.

    python benchmarks/default_throughput_cpu.py [--model runs/bench_quality/stmae.pt] [--rounds 15]

The default is the quality benchmark's model. The others are trained for one epoch on 32 images here
(speed does not depend on the weights, only on the graph): two defaults before it, preset
"transition-only" (the transition residual alone, token-wise masking, until 2026-11-28; the reference
of the target, its images stretched to the input as they then were) and preset "small-map-score" (the
sharp map alone, the image score as its maximum; the default before the score head, 2026-11-28); two
variants of the sixth session's default (the sharp map, one head smoothing), preset "small-map-scaled"
(its map's residual scaled per image) and preset "small-intensity-norm" (each image brought to one
brightness and contrast first); preset "small-sharp-map" (no wide Gaussian and no lowering by the mean:
the thirteenth session's default), for that Gaussian's cost; preset
"small-wide-map" (the default before the map was lowered by its mean, fifteenth session); and the default with
images stretched to the input (`--aspect stretch`, the default until the sixth session), for the cost of
keeping the aspect (mirror padding, and the map's crop back to the image). All fp32 graphs run behind the same
Detector, taking turns in every round on the same batches of decoded test images
(runtime_cpu.side_by_side); the table gives medians. Target (issue 15): the new default keeps at least
half of the previous default's throughput at batch 8.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quality_magnetic_tile import model_benchmark_args, write_table  # noqa: E402
from runtime_cpu import BATCH, side_by_side  # noqa: E402

from stmae_edge import data  # noqa: E402
from stmae_edge.engines.export import export_onnx  # noqa: E402
from stmae_edge.models.stmae import preset  # noqa: E402
from stmae_edge.preprocessing import load_image  # noqa: E402
from stmae_edge.runtime import Detector  # noqa: E402
from stmae_edge.training.train import TrainConfig, train  # noqa: E402

BEGIN, END = "<!-- default-throughput-cpu:begin -->", "<!-- default-throughput-cpu:end -->"


def main() -> None:
    args = model_benchmark_args(__doc__, lambda p: p.add_argument("--rounds", type=int, default=15))
    previous = args.model.with_name("previous_default.pt")
    # as the default ran: images stretched (it predates --aspect; auto would pad these tiles)
    train(args.data, previous, preset("transition-only"), TrainConfig(epochs=1, max_images=32, aspect="stretch"))
    without_head = args.model.with_name("small_map_score.pt")
    train(args.data, without_head, preset("small-map-score"), TrainConfig(epochs=1, max_images=32))
    scaled = args.model.with_name("small_map_scaled.pt")
    train(args.data, scaled, preset("small-map-scaled"), TrainConfig(epochs=1, max_images=32))
    intensity_norm = args.model.with_name("small_intensity_norm.pt")
    train(args.data, intensity_norm, preset("small-intensity-norm"), TrainConfig(epochs=1, max_images=32))
    sharp = args.model.with_name("small_sharp_map.pt")
    train(args.data, sharp, preset("small-sharp-map"), TrainConfig(epochs=1, max_images=32))
    wide = args.model.with_name("small_wide_map.pt")
    train(args.data, wide, preset("small-wide-map"), TrainConfig(epochs=1, max_images=32))
    stretched = args.model.with_name("small_stretched.pt")
    train(args.data, stretched, preset("small"), TrainConfig(epochs=1, max_images=32, aspect="stretch"))
    detectors, sizes = {}, {}
    for name, path in (("previous default (transition-only)", previous),
                       ("small-map-score: the sharp map alone, no score head (the default before 2026-11-28)", without_head),
                       ("small-map-scaled: the sharp map, its residual scaled per image; one head smoothing", scaled),
                       ("small-intensity-norm: images brought to one brightness and contrast; the sharp map, "
                        "one head smoothing", intensity_norm),
                       ("default with images stretched to the input (--aspect stretch)", stretched),
                       ("small-sharp-map: no wide Gaussian, no lowering by the mean (the thirteenth session's default)", sharp),
                       ("small-wide-map: the map not lowered by its mean (the fourteenth session's default)", wide),
                       ("default", args.model)):
        onnx_path, figures = export_onnx(path, path.with_suffix(".fp32.onnx"))
        detectors[name] = Detector(onnx_path, "ort-cpu", batch_size=BATCH)
        sizes[name] = figures["size_bytes"] / 2 ** 20
    samples = data.eval_samples(args.data)
    order = np.random.default_rng(0).permutation(len(samples))[:64]
    images = [load_image(samples[i].path) for i in sorted(order)]
    medians = side_by_side(detectors, images, args.rounds)
    reference = medians["previous default (transition-only)"]["total"]
    rows = [f"| {name} | {BATCH / m['total']:.1f} | {reference / m['total']:.2f}x | {sizes[name]:.1f} MiB |"
            for name, m in medians.items()]
    print("\n".join(rows))
    write_table(args.md, BEGIN, END, f"python benchmarks/default_throughput_cpu.py --rounds {args.rounds}",
                f"fp32 graphs on ONNX Runtime CPU, batch {BATCH}, end to end through the Detector, medians of "
                f"{args.rounds} interleaved rounds on {len(images)} decoded magnetic_tile test images; target: "
                "the default keeps at least 0.5x", ["model", "images/s", "vs previous default", "ONNX file"], rows)


if __name__ == "__main__":
    main()

"""Line-scan seams on magnetic_tile: how far two neighbouring tiles' maps disagree where they overlap,
and what the line-scan inspector then reports, for the default map and the sharp map alone.

    python benchmarks/linescan_seams.py [--epochs 5] [--retrain]

The default map is partly relative to its tile: lowered by half its own mean, and its wide Gaussian
averages the residual over 21 x 21 cells. On a strip each tile has its own mean and context, so two
tiles can disagree over the rows they share. Two line-scan models are trained as the README says a
line's model is (`stmae-edge train DATA --crop 256`: native-scale crops), the default preset and
`small-sharp-map` (no wide Gaussian, not lowered), in runs/bench_linescan. Each magnetic_tile test image,
at its native scale, mirrored out at its bottom and right where it is smaller (as the crops were) and
cut to the tile width and two tiles' height less the overlap (480 rows for 256-pixel tiles), is pushed
as one strip through `StreamingInspector(overlap=32)`, as `stmae-edge linescan` would push it: two
tiles, rows 0-256 and 224-480, sharing rows 224-256. Each tile's map is kept as the inspector receives
it (the Detector, ONNX Runtime CPU, the model's default thresholds), and compared over the shared rows:
- mean |A - B|, in units of the way from the good strips' median map value to the pixel threshold;
- of the shared pixels over the pixel threshold in either tile, the share over it in one tile only;
- the two tiles' whole-map means apart, in the same units;
and the inspector's defects: good strips with any, defective strips with one whose box holds mask pixels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quality_magnetic_tile import training_benchmark_parser, use_available_cores, write_table  # noqa: E402

from stmae_edge import data  # noqa: E402
from stmae_edge.checkpoint import load_model  # noqa: E402
from stmae_edge.engines.export import export_onnx  # noqa: E402
from stmae_edge.models.stmae import STMAEConfig, preset  # noqa: E402
from stmae_edge.preprocessing import load_image, mirror_pad  # noqa: E402
from stmae_edge.progress import progress_bar  # noqa: E402
from stmae_edge.runtime import Detector  # noqa: E402
from stmae_edge.runtime.linescan import StreamingInspector  # noqa: E402
from stmae_edge.training.loop import TrainConfig  # noqa: E402
from stmae_edge.training.train import train  # noqa: E402

BEGIN, END = "<!-- linescan-seams:begin -->", "<!-- linescan-seams:end -->"
OVERLAP = 32
CROP = 256
PRESETS = ("small", "small-sharp-map")  # the default, and its map without the wide Gaussian or the lowering


class RecordingDetector(Detector):
    """The Detector unchanged, keeping every batch of tile maps it hands the inspector."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tile_maps: list[np.ndarray] = []

    def raw_maps(self, images, timings=None):
        maps, scores = super().raw_maps(images, timings)
        self.tile_maps.append(maps)
        return maps, scores


def describe(model: Path, c: STMAEConfig) -> str:
    wide = f"the wide Gaussian ({c.wide_window}x{c.wide_window} cells)" if c.wide_window else "no wide Gaussian"
    level = f"lowered by {c.level_fraction:g} of its tile's mean" if c.level_fraction else "not lowered"
    return f"`{model.name}`: {wide}, {level}"


def native_strip(image: np.ndarray, rows: int, width: int) -> np.ndarray:
    """The image at its own scale, mirrored out at its bottom and right to rows x width where it is
    smaller (as training's crops are), its middle columns where it is wider, its top rows where taller."""
    image = mirror_pad(image, rows, width)
    left = (image.shape[1] - width) // 2
    return np.ascontiguousarray(image[:rows, left:left + width])


def strips(samples: list, rows: int, width: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    images, masks = [], []
    for s in samples:
        image = load_image(s.path)
        images.append(native_strip(image, rows, width))
        masks.append(native_strip(data.load_mask(s, image.shape[:2]).astype(np.uint8), rows, width) > 0)
    return images, masks


def inspect(model: Path, samples: list) -> dict:
    onnx_path, _ = export_onnx(model, model.with_name(model.stem + ".seams.fp32.onnx"))
    detector = RecordingDetector(onnx_path, "ort-cpu", batch_size=2)
    tile_height, width = detector.preprocessing.input_size
    rows = 2 * tile_height - OVERLAP  # two tiles: the second starts where the first's last OVERLAP rows do
    images, masks = strips(samples, rows, width)
    pairs, defects = [], []
    with progress_bar(model.stem, len(samples)) as advance:
        for image in images:
            detector.tile_maps = []
            inspector = StreamingInspector(detector, overlap=OVERLAP)
            defects.append(inspector.push(image) + inspector.flush())
            tiles = np.concatenate(detector.tile_maps)
            if tiles.shape[0] != 2:
                raise RuntimeError(f"expected 2 tiles per {rows}-row strip, the inspector scored {tiles.shape[0]}")
            pairs.append(tiles)
            advance(1)
    return {"pairs": np.stack(pairs), "defects": defects, "masks": masks, "threshold": detector.thresholds.pixel}


def figures(r: dict, labels: np.ndarray) -> dict:
    pairs, threshold = r["pairs"], r["threshold"]
    level = float(np.median(pairs[labels == 0]))
    span = threshold - level
    a, b = pairs[:, 0, -OVERLAP:], pairs[:, 1, :OVERLAP]  # the shared rows, as each tile saw them
    gap = np.abs(a - b).mean(axis=(1, 2)) / span
    over_a, over_b = a > threshold, b > threshold
    either, one = (over_a | over_b), (over_a != over_b)
    mean_gap = np.abs(pairs[:, 0].mean(axis=(1, 2)) - pairs[:, 1].mean(axis=(1, 2))) / span
    defective = labels == 1

    def on_mask(d, mask):
        return bool(mask[d.row:d.row + d.height, d.col:d.col + d.width].any())

    found = [any(on_mask(d, m) for d in ds) for ds, m, y in zip(r["defects"], r["masks"], labels, strict=True) if y]
    return {
        "gap": [np.median(gap[~defective]), np.median(gap[defective]), np.quantile(gap[defective], 0.9)],
        "one_tile_only": one[defective].sum() / max(int(either[defective].sum()), 1),
        "images_over": int(either[defective].any(axis=(1, 2)).sum()),
        "mean_gap": [np.median(mean_gap[~defective]), np.median(mean_gap[defective])],
        "good_with_defect": np.mean([bool(d) for d, y in zip(r["defects"], labels, strict=True) if y == 0]),
        "found": np.mean(found),
    }


def trained_models(args: argparse.Namespace) -> list[tuple[Path, STMAEConfig]]:
    """Each preset's line-scan model, trained where absent (or with --retrain), and its config."""
    models = []
    for name in PRESETS:
        path = args.workdir / f"{name.replace('-', '_')}.pt"
        if args.retrain or not path.is_file():
            train(args.data, path, preset(name), TrainConfig(epochs=args.epochs, crop=CROP))
        meta = load_model(path)[1]
        if (meta.config != preset(name).to_dict() or meta.training["train_config"]["crop"] != CROP
                or meta.training["train_config"]["epochs"] != args.epochs):
            raise SystemExit(f"{path} is not preset {name} trained on {CROP}-pixel crops for {args.epochs} "
                             "epochs: pass --retrain")
        models.append((path, preset(name)))  # the checkpoint's config, checked equal just above
    return models


def main() -> None:
    parser = training_benchmark_parser(__doc__.splitlines()[0], "bench_linescan")
    parser.set_defaults(epochs=5)
    args = parser.parse_args()
    use_available_cores()
    samples = data.eval_samples(args.data)
    labels = np.array([s.label for s in samples])
    models = trained_models(args)
    rows = []
    for model, config in models:
        f = figures(inspect(model, samples), labels)
        rows.append(f"| {describe(model, config)} | {f['gap'][0]:.3f} / {f['gap'][1]:.3f} / {f['gap'][2]:.3f} | "
                    f"{100 * f['one_tile_only']:.0f}% ({f['images_over']} images) | "
                    f"{f['mean_gap'][0]:.3f} / {f['mean_gap'][1]:.3f} | {100 * f['good_with_defect']:.1f}% | "
                    f"{100 * f['found']:.1f}% |")
        print(rows[-1], flush=True)
    write_table(args.md, BEGIN, END, "python " + " ".join(["benchmarks/linescan_seams.py", *sys.argv[1:]]),
                f"models trained on {CROP}-pixel native crops for {args.epochs} epochs; {len(samples)} test images, "
                f"{int(labels.sum())} defective, each a strip of two "
                f"tiles sharing {OVERLAP} rows; Detector on ONNX Runtime CPU at each model's default thresholds; "
                "units: the way from the good strips' median map value to the pixel threshold",
                ["model, map", "shared rows, mean abs(A - B): good median / defective median / defective 90th pct",
                 "shared pixels over the threshold in one tile only, of those over in either (defective strips)",
                 "the two tiles' means apart: good / defective median", "good strips with a defect",
                 "defective strips with a defect on the mask"], rows)


if __name__ == "__main__":
    main()

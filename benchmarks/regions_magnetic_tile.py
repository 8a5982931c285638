"""Where the regions of a failed image point, on magnetic_tile: the boxes a user is shown, against the masks.

    python benchmarks/regions_magnetic_tile.py [--model runs/bench_quality/stmae.pt]
        [--unseen-model runs/bench_unseen_tiles/stmae.pt --unseen-data runs/bench_unseen_tiles/data]

The quality benchmark's default model, and the unseen-tiles benchmark's where that has been run,
exported and run through the Detector (ONNX Runtime CPU) at their default thresholds, as `predict`
does. For each failed defective image: has it a region at all; does some region's box hold defect
pixels; does the first (highest) one. Two ways: every region the Detector gives, and the regions over
the pixel threshold alone (before the sixteenth session a failed image under that threshold everywhere
got none; now it gets the region around its map's highest point). The given split by the quality
benchmark's halves (the validation half chose the rule, the held-out half did not), the unseen tiles'
test set whole. Also: the share of good images with a region over the pixel threshold (they pass or
fail by the image score alone; the fallback never touches a passed image).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quality_magnetic_tile import model_benchmark_args, test_half, write_table  # noqa: E402

from stmae_edge import data  # noqa: E402
from stmae_edge.engines.export import export_onnx  # noqa: E402
from stmae_edge.progress import progress_bar  # noqa: E402
from stmae_edge.runtime import Detector  # noqa: E402

BEGIN, END = "<!-- regions-magnetic-tile:begin -->", "<!-- regions-magnetic-tile:end -->"


def configure(parser) -> None:
    parser.add_argument("--unseen-model", type=Path, default=REPO / "runs" / "bench_unseen_tiles" / "stmae.pt")
    parser.add_argument("--unseen-data", type=Path, default=REPO / "runs" / "bench_unseen_tiles" / "data")


def detections(model: Path, data_dir: Path) -> tuple[list, list]:
    onnx_path, _ = export_onnx(model, model.with_name(model.stem + ".regions.fp32.onnx"))
    detector = Detector(onnx_path, "ort-cpu", batch_size=8)
    samples = data.eval_samples(data_dir)
    out = []
    with progress_bar(f"{model.parent.name}", len(samples)) as advance:
        for start in range(0, len(samples), 16):
            out += detector.predict([s.path for s in samples[start:start + 16]])
            advance(min(16, len(samples) - start))
    return samples, out


def on_defect(region, mask: np.ndarray) -> bool:
    return bool(mask[region.y:region.y + region.height, region.x:region.x + region.width].any())


def figures(samples: list, found: list, chosen: np.ndarray) -> dict:
    """Shares over the failed defective images in `chosen`, all regions and over-threshold ones only."""
    out = {"failed": 0, "of": 0}
    rows = {"all": [], "over": []}
    good_with_region = []
    for i in chosen:
        s, d = samples[i], found[i]
        if s.label == 0:
            good_with_region.append(any(r.above_pixel_threshold for r in d.regions))
            continue
        out["of"] += 1
        if not d.is_anomalous:
            continue
        out["failed"] += 1
        mask = data.load_mask(s, d.image_size)
        for key, regions in (("all", d.regions), ("over", [r for r in d.regions if r.above_pixel_threshold])):
            rows[key].append((bool(regions), any(on_defect(r, mask) for r in regions),
                              bool(regions) and on_defect(regions[0], mask)))
    for key, r in rows.items():
        out[key] = np.mean(np.array(r, dtype=float), axis=0)
    out["good_with_region"] = float(np.mean(good_with_region))
    return out


def main() -> None:
    args = model_benchmark_args(__doc__.splitlines()[0], configure)
    sets = [("given split, validation half", args.model, args.data, "A"),
            ("given split, held-out half", args.model, args.data, "B")]
    if args.unseen_model.is_file() and args.unseen_data.is_dir():
        sets.append(("unseen tiles, whole test set", args.unseen_model, args.unseen_data, "all"))
    else:
        print(f"no {args.unseen_model} or {args.unseen_data}: run benchmarks/unseen_tiles.py first; given split only")
    scored = {}
    rows = []
    for name, model, data_dir, part in sets:
        if (model, data_dir) not in scored:
            scored[model, data_dir] = detections(model, data_dir)
        samples, found = scored[model, data_dir]
        held_out = test_half(samples)
        chosen = {"A": np.setdiff1d(np.arange(len(samples)), held_out), "B": held_out,
                  "all": np.arange(len(samples))}[part]
        f = figures(samples, found, chosen)
        for key, label in (("over", "over the pixel threshold only (before)"), ("all", "as given now")):
            with_region, located, first = f[key]
            rows.append(f"| {name} | {label} | {f['failed']} of {f['of']} | {100 * with_region:.0f}% | "
                        f"{100 * located:.0f}% | {100 * first:.0f}% | {100 * f['good_with_region']:.0f}% |")
        print("\n".join(rows[-2:]), flush=True)
    write_table(args.md, BEGIN, END, "python " + " ".join(["benchmarks/regions_magnetic_tile.py", *sys.argv[1:]]),
                "Detector on ONNX Runtime CPU at the model's default thresholds; a region is on the defect "
                "when its box holds mask pixels",
                ["test images", "regions", "failed defective images", "with a region", "a region on the defect",
                 "the first region on the defect", "good images with a region over the pixel threshold"], rows)


if __name__ == "__main__":
    main()

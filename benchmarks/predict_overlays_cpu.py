"""`predict` into a folder with overlays: drawn in a pool of threads while the next batch is scored,
against one after another in the scoring thread, and against no overlays; side by side in one run.

    python benchmarks/predict_overlays_cpu.py --model runs/bench_quality/stmae.pt [--rounds 5]

Image files as a camera leaves them (PNG), read, scored and written by `files.predict_to_folder`, the
function behind `stmae-edge predict`: magnetic_tile test images at their own size, and the same images
enlarged to 2048 x 2048 (4 MP), where encoding an overlay as PNG takes longer than scoring the image.
Each round runs every setting once over the same folder, in turn, so drift of this shared machine hits
all of them alike; figures are medians of the rounds.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quality_magnetic_tile import model_benchmark_args, write_table  # noqa: E402

from stmae_edge import data  # noqa: E402
from stmae_edge.engines.export import export_onnx  # noqa: E402
from stmae_edge.machine import available_cores  # noqa: E402
from stmae_edge.runtime import Detector, files  # noqa: E402

BEGIN, END = "<!-- predict-overlays-cpu:begin -->", "<!-- predict-overlays-cpu:end -->"
BATCH, IMAGES = 8, 32
SIZES = {"own size (about 0.1 MP)": None, "2048 x 2048 (4 MP)": 2048}


def image_folders(root: Path, data_dir: Path) -> dict[str, list[Path]]:
    """Per size, IMAGES magnetic_tile test images written as PNG files."""
    samples = data.eval_samples(data_dir)
    chosen = [samples[i].path for i in sorted(np.random.default_rng(0).permutation(len(samples))[:IMAGES])]
    folders = {}
    for label, side in SIZES.items():
        folder = root / (str(side) if side else "own")
        folder.mkdir()
        for i, path in enumerate(chosen):
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if side:
                image = cv2.resize(image, (side, side), interpolation=cv2.INTER_LINEAR)
            cv2.imwrite(str(folder / f"{i:03d}.png"), image)
        folders[label] = sorted(folder.glob("*.png"))
    return folders


def main() -> None:
    args = model_benchmark_args(__doc__, lambda p: p.add_argument("--rounds", type=int, default=5))
    pool = min(files.MAX_OVERLAY_THREADS, available_cores())
    settings = {"none (--no-overlays)": dict(overlays=False),
                "in the scoring thread, one after another": dict(overlay_threads=0),
                f"in a pool of {pool} threads while the next batch is scored (the default)": dict()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        onnx_path, _ = export_onnx(args.model, tmp / "model.onnx")
        folders = image_folders(tmp, args.data)
        times = {(size, name): [] for size in folders for name in settings}
        with Detector(onnx_path, "ort-cpu", batch_size=BATCH, check_size=False) as detector:
            for size, paths in folders.items():
                files.predict_to_folder(detector, paths[:BATCH], tmp / "warm-up")  # sessions, pools, caches
                for r in range(args.rounds):
                    for name, options in settings.items():
                        started = time.perf_counter()
                        files.predict_to_folder(detector, paths, tmp / "out", **options)
                        times[size, name].append(time.perf_counter() - started)
                    print(f"{size}, round {r + 1}/{args.rounds}: "
                          + ", ".join(f"{times[size, n][-1]:.2f} s" for n in settings), flush=True)
    rows = []
    for size in folders:
        serial = float(np.median(times[size, "in the scoring thread, one after another"]))
        for name in settings:
            median = float(np.median(times[size, name]))
            rows.append(f"| {size} | {name} | {median:.2f} | {IMAGES / median:.1f} | {serial / median:.2f}x |")
            print(rows[-1])
    model = args.model.resolve().relative_to(REPO) if args.model.resolve().is_relative_to(REPO) else args.model
    write_table(args.md, BEGIN, END, f"python benchmarks/predict_overlays_cpu.py --model {model} --rounds {args.rounds}",
                f"`files.predict_to_folder`, as `stmae-edge predict` runs it: {IMAGES} magnetic_tile test images "
                f"as PNG files, read, scored at batch {BATCH} on ONNX Runtime's CPU provider (fp32 graph of "
                f"{args.model.name}), overlays written as PNG; medians of {args.rounds} interleaved rounds after "
                "warm-up",
                ["images", "overlays", "s per run", "images/s", "vs one after another"], rows)


if __name__ == "__main__":
    main()

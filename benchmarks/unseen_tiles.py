"""The default and the baselines on magnetic_tile tiles that no training image shows.

    python benchmarks/unseen_tiles.py [--data ../shared/datasets/magnetic_tile] [--epochs 20]

magnetic_tile photographs each physical tile about six times (exposures exp1 to exp6, whose file
numbers follow each other within a few hundred), and its test/good folder is every fifth defect-free
image sorted by name: nearly every good test image is another exposure of a tile in train/good, while
every defective tile is new. The given split therefore measures how well a detector recognises tiles
it has seen against tiles it has not, which flatters every detector that memorises its training tiles.

This script regroups the good images by tile (`tile_groups`): a seeded fifth of the tiles, every
exposure of each, becomes the good test images; the rest are the training images; the defective
folders and masks are the dataset's own. It then trains the default model on that folder exactly as
`stmae-edge train DATA` does, scores it as `stmae-edge evaluate DATA` does, fits the same baselines as
benchmarks/quality_magnetic_tile.py on the same images, and writes docs/BENCHMARKS.md's section.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from quality_magnetic_tile import machine, pct, per_type, run_baselines, summaries, training_benchmark_parser, write_rows  # noqa: E402

from stmae_edge import data  # noqa: E402
from stmae_edge.checkpoint import load_model  # noqa: E402
from stmae_edge.cli import use_available_cores  # noqa: E402
from stmae_edge.evaluation.evaluate import format_report  # noqa: E402
from stmae_edge.models.stmae import preset  # noqa: E402
from stmae_edge.training.train import TrainConfig, score_images, train  # noqa: E402

BEGIN, END = "<!-- unseen-tiles:begin -->", "<!-- unseen-tiles:end -->"
# Exposures of one tile are numbered within ~200 of each other; consecutive tiles are further apart
# (most by thousands). A gap this large starts a new tile; where two tiles' numbers interleave they
# stay one group, which only makes the split more conservative.
TILE_GAP = 250
NAME = re.compile(r"exp(\d+)_num_(\d+)")


def tile_groups(paths: list[Path]) -> np.ndarray:
    """A tile id per image, from magnetic_tile's file names (expE_num_N): sorted by N, a gap of more
    than TILE_GAP starts a new tile."""
    numbers = []
    for path in paths:
        match = NAME.search(path.name)
        if match is None:
            raise SystemExit(f"{path.name}: not a magnetic_tile file name (expE_num_N)")
        numbers.append(int(match.group(2)))
    order = np.argsort(numbers, kind="stable")
    groups = np.empty(len(paths), int)
    tile, last = -1, None
    for i in order:
        if last is None or numbers[i] - last > TILE_GAP:
            tile += 1
        groups[i] = tile
        last = numbers[i]
    return groups


def given_split_overlap(data_dir: Path) -> tuple[int, int]:
    """(good test images whose tile has an image in train/good, good test images)."""
    train_good, test_good = data.images_in(data_dir / "train" / "good"), data.images_in(data_dir / "test" / "good")
    groups = tile_groups(train_good + test_good)
    seen = set(groups[:len(train_good)].tolist())
    return sum(g in seen for g in groups[len(train_good):]), len(test_good)


def held_tiles(groups: np.ndarray, fraction: float, seed: int) -> set[int]:
    """A seeded choice of whole tiles holding at least `fraction` of the images."""
    held, count = set(), 0
    for tile in np.random.default_rng(seed).permutation(groups.max() + 1):
        if count >= fraction * len(groups):
            break
        held.add(int(tile))
        count += int((groups == tile).sum())
    return held


def trained_once(data_dir: Path, model_path: Path, cfg: TrainConfig, retrain: bool) -> None:
    """Train the default on `data_dir` into `model_path` unless it was trained there on this very split
    (its test/good and held-out images), preset and training settings: one trained with other tiles held out has seen the
    good test tiles."""
    split_path = model_path.with_suffix(".split.json")
    held = Path(cfg.holdout_dir) if cfg.holdout_dir else None
    split = json.dumps({"epochs": cfg.epochs, "preset": preset("small").to_dict(), "train_config": asdict(cfg),
                        "test_good": sorted(p.name for p in (data_dir / "test" / "good").iterdir()),
                        "holdout": sorted(p.name for p in held.iterdir()) if held else "random"})
    if retrain or not model_path.is_file() or not split_path.is_file() or split_path.read_text() != split:
        train(data_dir, model_path, preset("small"), cfg)
        split_path.write_text(split)


def regroup(data_dir: Path, out: Path, fraction: float, seed: int) -> dict:
    """A copy of the dataset (symbolic links) whose test/good is a seeded `fraction` of the good tiles,
    every exposure of each, and whose train/good is the other tiles; defect folders as given."""
    good = data.images_in(data_dir / "train" / "good") + data.images_in(data_dir / "test" / "good")
    groups = tile_groups(good)
    held = held_tiles(groups, fraction, seed)
    count = int(np.isin(groups, list(held)).sum())
    if out.exists():
        shutil.rmtree(out)
    for part in ("train/good", "test/good"):
        (out / part).mkdir(parents=True)
    for path, tile in zip(good, groups, strict=True):
        (out / ("test/good" if tile in held else "train/good") / path.name).symlink_to(path.resolve())
    for folder in sorted((data_dir / "test").iterdir()):
        if folder.name != "good":
            (out / "test" / folder.name).symlink_to(folder.resolve())
    (out / "ground_truth").symlink_to((data_dir / "ground_truth").resolve())
    return {"tiles": int(groups.max() + 1), "held_tiles": len(held), "test_good": count,
            "train_good": len(good) - count}


def unseen_tiles_parser(doc: str) -> argparse.ArgumentParser:
    """training_benchmark_parser's options in runs/bench_unseen_tiles, and which tiles are held out."""
    parser = training_benchmark_parser(doc, "bench_unseen_tiles")
    parser.add_argument("--fraction", type=float, default=0.2, help="share of the good images held out, by tile")
    parser.add_argument("--seed", type=int, default=0, help="which tiles are held out")
    return parser


def main() -> None:
    args = unseen_tiles_parser(__doc__).parse_args()
    use_available_cores()

    regrouped = args.workdir / "data"
    counts = regroup(args.data, regrouped, args.fraction, args.seed)
    overlap, given_good = given_split_overlap(args.data)
    print(f"given split: {overlap} of {given_good} test/good images show a tile of train/good; regrouped: {counts}")
    cfg = TrainConfig(epochs=args.epochs)
    model_path = args.workdir / "stmae.pt"
    trained_once(regrouped, model_path, cfg, args.retrain)
    model, meta = load_model(model_path)
    samples = data.eval_samples(regrouped)
    maps, scores = score_images(model, meta.preprocessing, [s.path for s in samples], description="evaluating")
    stmae = summaries(samples, maps, scores, meta.thresholds.image, meta.preprocessing.input_size)
    print(format_report(stmae["full"]))
    baselines = run_baselines(model_path, regrouped, cfg, args.coreset)
    (args.workdir / "results.json").write_text(json.dumps(
        {"counts": counts, "stmae": stmae, "baselines": {k: v[0] for k, v in baselines.items()}}, indent=2))

    def line(name: str, r: dict, fit: str) -> str:
        full = r["full"]
        return (f"| {name} | {pct(full['image_auroc'])} | {pct(full['pixel_auroc'])} | {pct(full['aupro'])} | "
                f"{pct(full['per_defect_type']['crack']['image_auroc'])} | {pct(full['f1'])} | "
                f"{pct(full['pixel_auroc_against_good'])} | {fit} |")

    command = f"python benchmarks/unseen_tiles.py --epochs {args.epochs} --seed {args.seed}"
    n = stmae["full"]
    header = (f"Measured {dt.date.today().isoformat()} on {machine()}, by `{command}` (one seeded run; "
              f"{counts['tiles']} good tiles, {counts['held_tiles']} held out with every exposure: "
              f"{counts['test_good']} good test images, {counts['train_good']} training images; the dataset's "
              f"{n['n_anomalous']} defective images; on the given split {overlap} of its {given_good} test/good "
              "images show a tile that train/good shows too).\n\n"
              "| method, on tiles no training image shows | image AUROC | pixel AUROC | AUPRO@30% | crack image AUROC "
              "| F1 at default threshold | pixel AUROC, defects against good tiles only | fit time |\n"
              "|---|---|---|---|---|---|---|---|")
    rows = [line("ST-MAE default (`stmae-edge train DATA`)", stmae, f"{meta.training['seconds']:.0f} s")]
    names = {"gaussian": "Gaussian per position (the map's features)",
             "patchcore": f"PatchCore-style memory bank (greedy coreset {round(args.coreset * 100, 2):g}%)",
             "gaussian_deep": "Gaussian per position on the score head's layers"}
    rows += [line(names[k], r, f"{fit:.0f} s") for k, (r, fit) in baselines.items()]
    rows += ["", "Per defect type, image / pixel AUROC / AUPRO: "
             + "; ".join([per_type("ST-MAE default", stmae)]
                         + [per_type(names[k].split(" (")[0], r) for k, (r, _) in baselines.items()]) + "."]
    write_rows(args.md, rows, header, BEGIN, END)
    print(f"wrote {args.md}")


if __name__ == "__main__":
    main()

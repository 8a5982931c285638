"""The default threshold on parts that training has not seen: held out by image, or by part.

    python benchmarks/threshold_new_parts.py [--data ../shared/datasets/magnetic_tile] [--epochs 20]

`stmae-edge train DATA` sets its default threshold at mean + 3 std of the scores of good images held
out from training, by default a random tenth of train/good. Where each part is photographed several
times (magnetic_tile: about six exposures of each tile), those images are other photographs of
training parts: they score like training parts, and the threshold is set for parts the model has
seen. On unseen_tiles.py's split (good test tiles that no training image shows) this trains the
default twice and measures its default threshold on the good and defective test tiles:
  held out by image   `stmae-edge train DATA` as it is (unseen_tiles.py's model, reused if there);
  held out by part    `stmae-edge train DATA --holdout-dir H`, H a seeded fifth of the training
                      tiles with every exposure of each, the other tiles training.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from quality_magnetic_tile import machine, pct, summaries, write_rows  # noqa: E402
from unseen_tiles import held_tiles, regroup, tile_groups, trained_once, unseen_tiles_parser  # noqa: E402

from stmae_edge import data  # noqa: E402
from stmae_edge.checkpoint import load_model  # noqa: E402
from stmae_edge.cli import use_available_cores  # noqa: E402
from stmae_edge.scoring import threshold_scoring  # noqa: E402
from stmae_edge.training.train import TrainConfig, score_images  # noqa: E402

BEGIN, END = "<!-- threshold-new-parts:begin -->", "<!-- threshold-new-parts:end -->"


def hold_out_parts(regrouped: Path, out: Path, fraction: float, seed: int) -> Path:
    """A copy of `regrouped` (symbolic links) whose train/good lacks a seeded `fraction` of its tiles;
    those tiles' images go to out/holdout. Returns the holdout folder."""
    good = data.images_in(regrouped / "train" / "good")
    groups = tile_groups(good)
    held = held_tiles(groups, fraction, seed)
    for part in ("data/train/good", "holdout"):
        (out / part).mkdir(parents=True, exist_ok=True)
        for old in (out / part).iterdir():
            old.unlink()
    for path, tile in zip(good, groups, strict=True):
        (out / ("holdout" if tile in held else "data/train/good") / path.name).symlink_to(path.resolve())
    for name in ("test", "ground_truth"):
        link = out / "data" / name
        if not link.is_symlink():
            link.symlink_to((regrouped / name).resolve())
    return out / "holdout"


def operating_point(model_path: Path, samples: list) -> dict:
    model, meta = load_model(model_path)
    maps, scores = score_images(model, meta.preprocessing, [s.path for s in samples], description="evaluating")
    full = summaries(samples, maps, scores, meta.thresholds.image, meta.preprocessing.input_size)["full"]
    return {"threshold": meta.thresholds.image, "false_alarms": full["false_reject_rate"],
            "recall": full["recall"], "f1": full["f1"], "image_auroc": full["image_auroc"],
            "train_images": meta.training["train_images"], "holdout_images": meta.training["holdout_images"],
            "seconds": meta.training["seconds"], "cross_fitted": threshold_scoring(meta.training) == "cross-fitted"}


def main() -> None:
    args = unseen_tiles_parser(__doc__).parse_args()
    use_available_cores()

    regrouped = args.workdir / "data"
    regroup(args.data, regrouped, args.fraction, args.seed)
    samples = data.eval_samples(regrouped)
    by_image = args.workdir / "stmae.pt"
    trained_once(regrouped, by_image, TrainConfig(epochs=args.epochs), args.retrain)
    holdout = hold_out_parts(regrouped, args.workdir / "parts", args.fraction, args.seed)
    by_part = args.workdir / "stmae_holdout_parts.pt"
    trained_once(args.workdir / "parts" / "data", by_part, TrainConfig(epochs=args.epochs, holdout_dir=str(holdout)),
                 args.retrain)
    points = {"by image": operating_point(by_image, samples), "by part": operating_point(by_part, samples)}
    good = sum(s.label == 0 for s in samples)
    command = (f"python benchmarks/threshold_new_parts.py --epochs {args.epochs} --seed {args.seed} "
               f"--fraction {args.fraction:g}")
    header = (f"Measured {dt.date.today().isoformat()} on {machine()}, by `{command}` (one seeded run; unseen_tiles.py's "
              f"split: {good} good test images of tiles no training image shows, {len(samples) - good} defective; "
              "threshold: mean + 3 std of good images' scores, held out or cross-fitted as each row says).\n\n"
              "| held out for the threshold | training images | held-out images | threshold | false alarms on good "
              "test tiles | recall | F1 | image AUROC | training |\n|---|---|---|---|---|---|---|---|---|")
    labels = {"by image": "a random tenth of train/good (`stmae-edge train DATA`)",
              "by part": f"{args.fraction:g} of the training tiles, every exposure (`--holdout-dir`)"}
    for key, point in points.items():
        if point["cross_fitted"]:  # the image threshold then comes from every good image, not the held-out ones
            labels[key] += ("; the score head on all of them, the image threshold on their cross-fitted scores "
                            "(`--score-folds`)")
    rows = [f"| {labels[k]} | {p['train_images']} | {p['holdout_images']} | {p['threshold']:.1f} | "
            f"{pct(p['false_alarms'])}% | {pct(p['recall'])}% | {pct(p['f1'])} | {pct(p['image_auroc'])} | "
            f"{p['seconds']:.0f} s |" for k, p in points.items()]
    write_rows(args.md, rows, header, BEGIN, END)
    print("\n".join(rows))
    print(f"wrote {args.md}")


if __name__ == "__main__":
    main()

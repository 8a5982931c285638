"""The default with a head learnt from labelled defects (`train --defects`) on magnetic_tile, measured
on defective tiles that no labelled image shows.

    python benchmarks/defect_head_magnetic_tile.py [--model runs/bench_quality/stmae.pt] [--counts 10,30,100,all]
    python benchmarks/defect_head_magnetic_tile.py --unseen-good 0.2 --workdir runs/bench_defect_head_unseen

magnetic_tile's defects are all in its test folder, and each tile is photographed up to six times. The
defective tiles (`unseen_tiles.tile_groups`) are split in two, seeded: one half's images are the pool
the labelled sets are drawn from, the other half's, with every test/good image, are the test set. Both
are folders of symbolic links under WORKDIR: data/ (train/good and ground_truth as given, test/ the
test set) and labelled_N/ (test/<type>/ N images drawn from the pool, ground_truth as given), so
`stmae-edge train WORKDIR/data --defects WORKDIR/labelled_N` and `stmae-edge evaluate MODEL WORKDIR/data`
are what a user would run.

Training the default takes minutes, and a model trained with --defects is the default plus the head
(training/defect_head.py; tests/test_defect_head.py checks it). So the default is trained once, or
given (--model: trained by `stmae-edge train` with its defaults on magnetic_tile's train/good), and
each labelled set's head is added to it as `stmae-edge add-defects DEFAULT WORKDIR/labelled_N --data
WORKDIR/data` adds it (training/add_defects.py: the model `train --defects` writes, to the bit; its
"head fit" time counts the backbone passes that command makes). Writes docs/BENCHMARKS.md's section.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from quality_magnetic_tile import machine, pct, write_rows, write_table  # noqa: E402
from runtime_cpu import BATCH, side_by_side  # noqa: E402
from unseen_tiles import regroup, tile_groups  # noqa: E402

from stmae_edge import data  # noqa: E402
from stmae_edge.checkpoint import load_model  # noqa: E402
from stmae_edge.cli import use_available_cores  # noqa: E402
from stmae_edge.engines.export import export_onnx  # noqa: E402
from stmae_edge.evaluation.evaluate import evaluate  # noqa: E402
from stmae_edge.models.stmae import STMAEConfig, preset  # noqa: E402
from stmae_edge.preprocessing import load_image  # noqa: E402
from stmae_edge.runtime import Detector  # noqa: E402
from stmae_edge.training.add_defects import add_defects  # noqa: E402
from stmae_edge.training.train import TrainConfig, train  # noqa: E402

THROUGHPUT = "<!-- defect-head-throughput:begin -->", "<!-- defect-head-throughput:end -->"


def markers(seed: int, unseen: bool) -> tuple[str, str]:
    """Each draw of labelled tiles keeps its own rows, and so does each with unseen good tiles."""
    name = f"defect-head{'-unseen' if unseen else ''}-seed{seed}"
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def split_by_tile(data_dir: Path, seed: int) -> tuple[list[data.EvalSample], list[data.EvalSample]]:
    """(the labelled pool, the test set's defective images): the defective tiles split in two, seeded."""
    defective = [s for s in data.eval_samples(data_dir) if s.label == 1]
    groups = tile_groups([s.path for s in defective])
    tiles = np.random.default_rng(seed).permutation(groups.max() + 1)
    pooled = set(tiles[: len(tiles) // 2].tolist())
    return ([s for s, g in zip(defective, groups, strict=True) if g in pooled],
            [s for s, g in zip(defective, groups, strict=True) if g not in pooled])


def link_samples(samples: list[data.EvalSample], out: Path, data_dir: Path) -> None:
    """out/test/<type>/ holding a link to each image, out/ground_truth linked to the dataset's."""
    for sample in samples:
        folder = out / "test" / sample.defect_type
        folder.mkdir(parents=True, exist_ok=True)
        (folder / sample.path.name).symlink_to(sample.path.resolve())
    (out / "ground_truth").symlink_to((data_dir / "ground_truth").resolve())


def build_folders(data_dir: Path, workdir: Path, counts: list[int | None], seed: int,
                  good_from: Path | None = None) -> tuple[Path, dict]:
    """WORKDIR/data (the test set) and WORKDIR/labelled_N for each count (None: the whole pool). Its
    train/good and test/good are the dataset's, or `good_from`'s (a regrouped copy)."""
    pool, tested = split_by_tile(data_dir, seed)
    good_from = good_from or data_dir
    test_set = workdir / "data"
    if test_set.exists():
        shutil.rmtree(test_set)
    (test_set / "train").mkdir(parents=True)
    (test_set / "train" / "good").symlink_to((good_from / "train" / "good").resolve())
    link_samples(tested, test_set, data_dir)
    (test_set / "test" / "good").symlink_to((good_from / "test" / "good").resolve())
    order = np.random.default_rng(seed + 1).permutation(len(pool))
    labelled = {}
    for count in counts:
        folder = workdir / f"labelled_{count or 'all'}"
        if folder.exists():
            shutil.rmtree(folder)
        link_samples([pool[i] for i in sorted(order[: count or len(pool)])], folder, data_dir)
        labelled[count or len(pool)] = folder
    return test_set, {"pool": len(pool), "tested": len(tested), "labelled": labelled}


def the_default(model_path: Path | None, data_dir: Path, workdir: Path) -> Path:
    """The default model: given (and checked to be `stmae-edge train`'s defaults), or trained here."""
    if model_path is None:
        model_path = workdir / "stmae.pt"
        if not model_path.is_file():
            train(data_dir, model_path, preset("small"), TrainConfig())
    _, meta = load_model(model_path)
    if (STMAEConfig.from_dict(meta.config) != preset("small")
            or TrainConfig(**meta.training["train_config"]) != TrainConfig()):
        raise SystemExit(f"{model_path}: not trained by `stmae-edge train DATA` with its defaults")
    if meta.training["train_images"] + meta.training["holdout_images"] != len(data.train_images(data_dir)):
        raise SystemExit(f"{model_path}: trained on other good images than {data_dir}/train/good's")
    return model_path


def throughput(default_path: Path, head_path: Path, data_dir: Path, rounds: int, md: Path) -> None:
    """ONNX Runtime CPU throughput of the two fp32 graphs, side by side (runtime_cpu.side_by_side)."""
    detectors = {}
    for name, path in (("the default", default_path), ("the default + a labelled-defect head", head_path)):
        onnx_path, _ = export_onnx(path, path.with_suffix(".fp32.onnx"))
        detectors[name] = Detector(onnx_path, "ort-cpu", batch_size=BATCH)
    samples = data.eval_samples(data_dir)
    order = np.random.default_rng(0).permutation(len(samples))[:64]
    medians = side_by_side(detectors, [load_image(samples[i].path) for i in sorted(order)], rounds)
    reference = medians["the default"]["total"]
    rows = [f"| {name} | {BATCH / m['total']:.1f} | {reference / m['total']:.2f}x |" for name, m in medians.items()]
    write_table(md, *THROUGHPUT, f"python benchmarks/defect_head_magnetic_tile.py --model MODEL --rounds {rounds}",
                f"fp32 graphs on ONNX Runtime CPU, batch {BATCH}, end to end through the Detector, medians of {rounds} "
                "interleaved rounds on 64 decoded magnetic_tile test images; the head from every pooled image of "
                "the first draw", ["model", "images/s", "vs the default"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "magnetic_tile")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench_defect_head")
    parser.add_argument("--model", type=Path, help="the default, trained by `stmae-edge train DATA` (default: "
                        "WORKDIR/stmae.pt, trained if missing)")
    parser.add_argument("--counts", default="10,30,100,all", help="labelled images per set, drawn from the pool")
    parser.add_argument("--seed", type=int, default=0, help="which defective tiles are labelled")
    parser.add_argument("--unseen-good", type=float, default=0.0, help="hold out this share of the good tiles, "
                        "every exposure, as the test set's good images (unseen_tiles.regroup); the default is then "
                        "trained on the other tiles here: does the head raise new good parts' maps?")
    parser.add_argument("--rounds", type=int, default=10, help="timed batches per graph for the throughput")
    parser.add_argument("--throughput-only", action="store_true", help="measure the throughput of WORKDIR's "
                        "models from an earlier run only")
    parser.add_argument("--md", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()
    use_available_cores()
    args.workdir.mkdir(parents=True, exist_ok=True)
    counts = [None if c == "all" else int(c) for c in args.counts.split(",")]
    if args.throughput_only:
        heads = sorted(args.workdir.glob("stmae_defects_*.pt"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
        throughput(the_default(args.model, args.data, args.workdir), heads[-1], args.data, args.rounds, args.md)
        return
    regrouped = None
    if args.unseen_good:
        regrouped = args.workdir / "regrouped"
        print("regrouped good tiles:", regroup(args.data, regrouped, args.unseen_good, args.seed))
    test_set, split = build_folders(args.data, args.workdir, counts, args.seed, regrouped)
    print(f"labelled pool {split['pool']} images, test set {split['tested']} defective images")

    default_path = the_default(args.model, test_set, args.workdir)
    results = {"default": evaluate(default_path, test_set)}
    seconds = {}
    for count, folder in split["labelled"].items():
        started = time.perf_counter()
        path = args.workdir / f"stmae_defects_{count}.pt"
        add_defects(default_path, folder, path, data_dir=test_set)
        seconds[count] = time.perf_counter() - started
        results[count] = evaluate(path, test_set)
    (args.workdir / "results.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=2))

    types = [t for t in results["default"]["per_defect_type"]]

    def line(name: str, r: dict, fit: str) -> str:
        by_type = " / ".join(f"{pct(r['per_defect_type'][t]['pixel_auroc'])}" for t in types)
        # a head that took "unseen" for "defect" would raise the good tiles' maps: these would fall
        against_good = " / ".join(f"{pct(r['per_defect_type'][t]['pixel_auroc_against']['good'])}" for t in types)
        return (f"| {name} | {pct(r['image_auroc'])} | {pct(r['pixel_auroc'])} | {pct(r['aupro'])} | "
                f"{pct(r['per_defect_type']['crack']['image_auroc'])} | {by_type} | {against_good} | {fit} |")

    rows = [line("the default (good images only)", results["default"], "")]
    rows += [line(f"the default + a head from {count} labelled images", results[count], f"{seconds[count]:.0f} s")
             for count in split["labelled"]]
    unseen = f" --unseen-good {args.unseen_good:g}" if args.unseen_good else ""
    given = " --model MODEL" if args.model else ""
    command = f"python benchmarks/defect_head_magnetic_tile.py{given} --counts {args.counts} --seed {args.seed}{unseen}"
    goods_are = (f"{args.unseen_good:.0%} of the good tiles, every exposure, held out: good tiles that no training "
                 "image shows" if args.unseen_good else "other exposures of training tiles")
    header = (f"Measured {dt.date.today().isoformat()} on {machine()}, by `{command}` (one seeded run; the default "
              f"trained by `stmae-edge train` on train/good; labelled images drawn from {split['pool']} defective "
              f"images of half the defective tiles; test set: the other tiles' {split['tested']} defective images "
              f"and {results['default']['n_images'] - split['tested']} good images, {goods_are}).\n\n"
              "| model | image AUROC | pixel AUROC | AUPRO@30% | crack image AUROC | pixel AUROC by type ("
              + ", ".join(types) + ") | each type's defects against the good images' pixels | head fit |\n"
              "|---|---|---|---|---|---|---|---|")
    write_rows(args.md, rows, header, *markers(args.seed, bool(args.unseen_good)))
    print("\n".join([header, *rows]))
    if args.rounds:
        throughput(default_path, args.workdir / f"stmae_defects_{max(split['labelled'])}.pt", args.data,
                   args.rounds, args.md)


if __name__ == "__main__":
    main()

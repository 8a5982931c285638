"""The default ST-MAE against the detectors a user could pick instead, on the same features.

    python benchmarks/quality_magnetic_tile.py [--data ../shared/datasets/magnetic_tile] [--epochs 40]

Trains the default model exactly as `stmae-edge train DATA --out W/stmae.pt` does and scores it as
`stmae-edge evaluate` does. On the same training images and the same frozen backbone features it fits
two baselines: a Gaussian per grid position (PaDiM-style) and a PatchCore-style nearest-neighbour
memory bank with greedy coreset subsampling. All are thresholded on the same held-out good images and
scored with the same metrics. When the default fuses the transition residual with per-position
statistics, the ablation scores each part of the same model on its own. The default scores images
with a head on deeper layers (blocks 4, 10, 14): a third baseline is the Gaussian on those layers,
and the ablation gives the model's own map maximum as the score.

Model choices were made on a validation half of the test set (VALIDATION_SEED below); the other
half, never looked at while choosing, is reported beside the full test set.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stmae_edge import data  # noqa: E402
from stmae_edge.checkpoint import load_model  # noqa: E402
from stmae_edge.cli import use_available_cores  # noqa: E402
from stmae_edge.evaluation.evaluate import evaluate, format_report  # noqa: E402
from stmae_edge.evaluation.metrics import pixel_auroc_against, summarize  # noqa: E402
from stmae_edge.models.backbones import FeatureExtractor  # noqa: E402
from stmae_edge.models.maps import maps_and_scores, smooth  # noqa: E402
from stmae_edge.models.stmae import preset  # noqa: E402
from stmae_edge.scoring import (  # noqa: E402
    ScoreStats,
    Thresholds,
    map_maxima,
    threshold_scoring,  # noqa: E402
)
from stmae_edge.training.baseline import GaussianBaseline, PatchCoreBaseline  # noqa: E402
from stmae_edge.training.image_set import choose_keep_aspect, image_sizes, split_holdout  # noqa: E402
from stmae_edge.training.train import (  # noqa: E402
    TrainConfig,
    batches,
    extract_features,
    score_images,
    train,
)

BEGIN, END = "<!-- quality-magnetic-tile:begin -->", "<!-- quality-magnetic-tile:end -->"


def machine() -> str:
    """The CPU by name and by the vector instructions that change ONNX Runtime's INT8 results."""
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            if cpu and flags:
                break
    except OSError:
        pass
    if flags:
        vector = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2")
        vnni = "VNNI" if {"avx512_vnni", "avx_vnni"} & flags else "no VNNI"
        cpu = f"{cpu} ({vector}, {vnni})"
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, no GPU"


VALIDATION_SEED = 123


def test_half(samples: list) -> np.ndarray:
    """Indices of the half of each test folder that model choices never saw (the other half was the
    validation split): a seeded half of every defect type and of the good images."""
    rng = np.random.default_rng(VALIDATION_SEED)
    kept = []
    for kind in sorted({s.defect_type for s in samples}):
        members = [i for i, s in enumerate(samples) if s.defect_type == kind]
        order = rng.permutation(len(members))
        kept += [members[i] for i in order[len(members) // 2:]]
    return np.array(sorted(kept))


def summaries(samples: list, maps: np.ndarray, scores: np.ndarray, threshold: float, size) -> dict:
    """The evaluate command's metrics on the full test set and on its held-out half."""
    masks = np.stack([data.load_mask(s, size) for s in samples])
    labels = np.array([s.label for s in samples])
    types = [s.defect_type for s in samples]
    half = test_half(samples)
    # every defect against the good parts alone: all defect types taken as one
    grouped = pixel_auroc_against(masks, maps, ["good" if t == "good" else "defective" for t in types])
    return {"full": {**summarize(labels, scores, masks, maps, types, threshold),
                     "pixel_auroc_against_good": grouped["defective"]["good"]},
            "test_half": summarize(labels[half], scores[half], masks[half], maps[half],
                                   [types[i] for i in half], threshold)}


@torch.no_grad()
def run_baselines(model_path: Path, data_dir: Path, cfg: TrainConfig, coreset_ratio: float) -> dict:
    """Both baselines, fitted on the same training images and backbone features as the model,
    thresholded on the same held-out images: {name: (summaries, fit seconds)}."""
    model, meta = load_model(model_path)
    pre = meta.preprocessing
    train_paths, holdout_paths = split_holdout(data.train_images(data_dir), cfg.holdout_fraction, cfg.seed)
    samples = data.eval_samples(data_dir)
    c = model.config
    sizes = image_sizes([s.path for s in samples])  # maps outside score_images: framed before the masks
    shallow = model.features
    deep = FeatureExtractor(c.backbone, c.score_layers, c.grid) if c.score_layers else None
    results = {}
    for name, baseline in (
            ("gaussian", GaussianBaseline(smoothing_sigma=c.smoothing_sigma)),
            ("patchcore", PatchCoreBaseline(coreset_ratio, smoothing_sigma=c.smoothing_sigma)),
            ("gaussian_deep", GaussianBaseline(smoothing_sigma=c.smoothing_sigma))):
        if name == "gaussian_deep":
            if deep is None:
                continue
            model.features = deep  # the score head's layers, on the map's grid, all channels
        if name != "patchcore":
            features = {"train": extract_features(model, pre, train_paths, description=f"{name} features")}
            for part, paths in (("holdout", holdout_paths), ("test", [s.path for s in samples])):
                features[part] = extract_features(model, pre, paths, description=f"{part} features")
        started = time.perf_counter()
        baseline.fit(features["train"])
        fit_seconds = time.perf_counter() - started

        def score(raw, baseline=baseline):
            parts = [baseline.score(chunk.float(), pre.input_size) for chunk in raw.split(16)]
            return (np.concatenate([m[:, 0].numpy() for m, _ in parts]),
                    np.concatenate([s.numpy() for _, s in parts]))

        threshold = Thresholds.from_stats(ScoreStats.from_scores(score(features["holdout"])[1]), cfg.sigma).image
        maps, scores = score(features["test"])
        maps = pre.to_image_frame(maps, sizes)
        results[name] = (summaries(samples, maps, scores, threshold, pre.input_size), fit_seconds)
    model.features = shallow
    return results


@torch.no_grad()
def run_ablation(model_path: Path, data_dir: Path, maps: np.ndarray) -> dict:
    """Each part of a fused model on its own, same weights: {part: summaries}; {} for an unfused model.
    With a score head, also the model's map with its maximum as the score (`maps`: the model's test maps).
    Thresholds are not comparable across parts, so F1 is left out (threshold None)."""
    model, meta = load_model(model_path)
    results = {}
    samples = data.eval_samples(data_dir)
    if model.config.score_layers:
        results["the image score as the map's maximum, without the score head"] = summaries(
            samples, maps, map_maxima(maps), None, meta.preprocessing.input_size)
    if model.config.gaussian_weight <= 0:
        return results
    pre = meta.preprocessing
    c = model.config
    sizes = image_sizes([s.path for s in samples])  # maps outside score_images: framed before the masks
    parts = {"transition residual alone (the map of `--preset transition-only`)": model.transition_map,
             f"per-position Gaussian of the {c.gaussian_input} alone{' (the sharp one)' if c.wide_window else ''}":
                 lambda f, recon: model.gaussian_map(model.gaussian_input(f, recon))}
    if c.wide_window:
        parts[f"the wide Gaussian alone ({c.wide_window}x{c.wide_window} cells)"] = (
            lambda f, recon: model.wide_map(model.gaussian_input(f, recon)))
    if c.level_fraction:
        parts["the map not lowered by its mean (`--preset small-wide-map`'s map)"] = (
            lambda f, recon: model.gaussian_z(model.gaussian_input(f, recon)))
    for name, part in parts.items():
        maps, scores = [], []
        for chunk in batches([s.path for s in samples], 16):
            features = model.standardize(model.extract(torch.from_numpy(pre(chunk))))
            grid_map = smooth(part(features, model.reconstruct(features)), model.smoothing_kernel)
            m, sc = maps_and_scores(grid_map, pre.input_size)
            maps.append(m[:, 0].numpy())
            scores.append(sc.numpy())
        maps = pre.to_image_frame(np.concatenate(maps), sizes)
        results[name] = summaries(samples, maps, np.concatenate(scores), None, pre.input_size)
    return results


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}"


def write_rows(md_path: Path, rows: list[str], header: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace this benchmark's section (between its markers) in the Markdown file, or append it."""
    md_path.parent.mkdir(parents=True, exist_ok=True)
    text = md_path.read_text() if md_path.exists() else "# Benchmarks\n"
    block = f"{begin}\n{header}\n" + "\n".join(rows) + f"\n{end}"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    md_path.write_text(text)


def model_benchmark_args(doc: str, configure=None) -> argparse.Namespace:
    """--model (default: this script's trained model), --data and --md, for the scripts that reuse it;
    `configure(parser)` adds a script's own options."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if configure:
        configure(parser)
    parser.add_argument("--model", type=Path, default=REPO / "runs" / "bench_quality" / "stmae.pt")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "magnetic_tile")
    parser.add_argument("--md", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()
    use_available_cores()
    return args


def write_table(md_path: Path, begin: str, end: str, command: str, note: str, columns: list[str],
                rows: list[str]) -> None:
    """A benchmark's table with its provenance line, written into its own section of the file."""
    header = (f"Measured on {machine()}, by `{command}` ({note}).\n\n| " + " | ".join(columns) + " |\n|"
              + "---|" * len(columns))
    write_rows(md_path, rows, header, begin, end)
    print(f"wrote {md_path}")


def row(name: str, r: dict, extra: str) -> str:
    full, half = r["full"], r["test_half"]
    return (f"| {name} | {pct(full['image_auroc'])} | {pct(full['pixel_auroc'])} | {pct(full['aupro'])} | "
            f"{pct(full['per_defect_type']['crack']['image_auroc'])} | {pct(full['f1'])} | "
            f"{pct(half['image_auroc'])} / {pct(half['pixel_auroc'])} / {pct(half['aupro'])} | {extra} |")


def per_type(name: str, r: dict) -> str:
    return f"{name}: " + ", ".join(f"{k} {pct(v['image_auroc'])}/{pct(v['pixel_auroc'])}/{pct(v['aupro'])}"
                                   for k, v in r["full"]["per_defect_type"].items())


def training_benchmark_parser(doc: str, workdir: str) -> argparse.ArgumentParser:
    """The options of the benchmarks that train the default and fit the baselines: --data, --workdir
    (runs/<workdir>), --epochs, --coreset, --retrain, --md."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "magnetic_tile")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / workdir)
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--coreset", type=float, default=0.01, help="PatchCore's coreset ratio")
    parser.add_argument("--retrain", action="store_true", help="train again even where WORKDIR/stmae.pt is "
                        "the default model trained for --epochs")
    parser.add_argument("--md", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    return parser


def main() -> None:
    args = training_benchmark_parser(__doc__, "bench_quality").parse_args()
    use_available_cores()

    cfg = TrainConfig(epochs=args.epochs)
    model_path = args.workdir / "stmae.pt"
    if not model_path.is_file() or args.retrain:
        train(args.data, model_path, preset("small"), cfg)
    model, meta = load_model(model_path)
    if (meta.config != preset("small").to_dict() or meta.training["train_config"]["epochs"] != args.epochs
            or meta.preprocessing.keep_aspect != choose_keep_aspect(cfg, data.train_images(args.data))[0]):
        raise SystemExit(f"{model_path} is not the default model trained for {args.epochs} epochs: pass --retrain")
    samples = data.eval_samples(args.data)
    maps, scores = score_images(model, meta.preprocessing, [s.path for s in samples], description="evaluating")
    stmae = summaries(samples, maps, scores, meta.thresholds.image, meta.preprocessing.input_size)
    assert abs(stmae["full"]["image_auroc"] - evaluate(model_path, args.data)["image_auroc"]) < 1e-9
    print(format_report(stmae["full"]))
    baselines = run_baselines(model_path, args.data, cfg, args.coreset)
    ablation = run_ablation(model_path, args.data, maps)
    for name, (r, _) in baselines.items():
        print(name, format_report(r["full"]), sep="\n")
    (args.workdir / "results.json").write_text(json.dumps(
        {"stmae": stmae, "baselines": {k: v[0] for k, v in baselines.items()}, "ablation": ablation}, indent=2))

    command = f"python benchmarks/quality_magnetic_tile.py --epochs {args.epochs}"
    date = dt.date.today().isoformat()
    n = stmae["full"]
    header = (f"Measured {date} on {machine()}, by `{command}` (one seeded run, seed {cfg.seed}; "
              f"test set: {n['n_images']} images, {n['n_anomalous']} defective; maps and masks at "
              f"{meta.preprocessing.input_size[0]}x{meta.preprocessing.input_size[1]}; the held-out half: "
              f"{stmae['test_half']['n_images']} images on which no model choice was made, but for the twentieth "
              "session's cross-fitted score head, chosen on full-test-set figures).\n\n"
              "| method | image AUROC | pixel AUROC | AUPRO@30% | crack image AUROC | F1 at default threshold | "
              "held-out half: image / pixel / AUPRO | fit time, command |\n|---|---|---|---|---|---|---|---|")
    config = model.config
    if config.gaussian_weight <= 0:
        scored = "the transition residual"
    elif config.transition_weight <= 0:
        scaled = ", each channel scaled by its spread over the image," if config.gaussian_scale else ""
        scored = f"the {config.gaussian_input}{scaled} scored by a per-position Gaussian"
        if config.wide_window:
            scored += (f", and by a second one of it averaged over {config.wide_window}x{config.wide_window} "
                       f"cells ({config.wide_dim} principal components), the larger of the two as z-scores "
                       "on held-out good images")
        if config.level_fraction:
            scored += f", the map lowered by {config.level_fraction:g} of its mean over the image"
    else:
        scored = (f"the transition residual + {config.gaussian_weight:g} x a per-position Gaussian of the "
                  f"{config.gaussian_input}")
    described = (f"efficientnet-lite0, {args.epochs} epochs, {config.mask_unit}x{config.mask_unit}-token masked "
                 f"blocks; map: {scored}")
    if config.intensity_norm:
        described = "each image brought to the training images' mean and std; " + described
    if meta.preprocessing.keep_aspect:
        described = "each image fitted into the input with its aspect ratio kept, mirror-padded; " + described
    if config.score_layers:
        described += (f"; score: a Gaussian per position of {', '.join(config.score_layers)} on a "
                      f"{config.score_grid}x{config.score_grid} grid"
                      f"{', each channel standardised over the image' if config.score_standardize else ''}, "
                      f"{config.score_dim} principal components")
        if config.score_wide_sigma:
            on = (f"cross-fitted good images (the head {meta.training['score_head']})"
                  if threshold_scoring(meta.training) == "cross-fitted" else "held-out good images")
            described += (f", the larger of its maxima after {config.score_smoothing_sigma:g} and "
                          f"{config.score_wide_sigma:g} cells of smoothing, each as a z-score on {on}")
    gaussian, patchcore = baselines["gaussian"], baselines["patchcore"]
    bank = round(args.coreset * 100, 2)
    rows = [
        row(f"ST-MAE default ({described})", stmae,
            f"{meta.training['seconds']:.0f} s, `stmae-edge train DATA --out stmae.pt && stmae-edge evaluate stmae.pt DATA`"),
        row("Gaussian per position (PaDiM-style, the map's features)", gaussian[0], f"{gaussian[1]:.0f} s, (this script)"),
        row(f"PatchCore-style memory bank (3x3 neighbourhood, greedy coreset {bank:g}%, the map's features)",
            patchcore[0], f"{patchcore[1]:.0f} s, (this script)"),
    ]
    if "gaussian_deep" in baselines:
        deep = baselines["gaussian_deep"]
        rows.append(row(f"Gaussian per position on the score head's layers ({', '.join(config.score_layers)}, "
                        f"{config.grid}x{config.grid} grid, all channels)", deep[0], f"{deep[1]:.0f} s, (this script)"))
    rows += [row(f"ablation: {name} (same weights)", r, "") for name, r in ablation.items()]
    rows += ["", "Per defect type, image / pixel AUROC / AUPRO, full test set: "
             + "; ".join([per_type("ST-MAE default", stmae), per_type("Gaussian", gaussian[0]),
                          per_type("PatchCore", patchcore[0])]) + "."]
    rows += ["", *where_pixel_auroc_is_lost({"ST-MAE default": stmae, "Gaussian": gaussian[0]})]
    write_rows(args.md, rows, header)
    print(f"wrote {args.md}")


def where_pixel_auroc_is_lost(results: dict) -> list[str]:
    """The pooled pixel AUROC taken apart (metrics.pixel_auroc_against): each defect type's pixels
    against the normal pixels of each group of test images, one cell per method."""
    names = list(results)
    first = results[names[0]]["full"]
    groups = list(next(iter(first["per_defect_type"].values()))["pixel_auroc_against"])
    lines = [f"Where the pooled pixel AUROC is lost (`metrics.pixel_auroc_against`, also printed by `stmae-edge "
             f"evaluate`): the pixel AUROC of each type's defects against the normal pixels of each group of "
             f"test images, {' / '.join(names)}. All defects against the good images' pixels alone: "
             + ", ".join(f"{n} {pct(results[n]['full']['pixel_auroc_against_good'])}" for n in names)
             + " (pooled: " + ", ".join(f"{pct(results[n]['full']['pixel_auroc'])}" for n in names) + ").", "",
             "| defects of, against the normal pixels of | " + " | ".join(groups) + " |", "|---|" + "---|" * len(groups)]
    for kind in first["per_defect_type"]:
        cells = [" / ".join(pct(results[n]["full"]["per_defect_type"][kind]["pixel_auroc_against"][g]) for n in names)
                 for g in groups]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()

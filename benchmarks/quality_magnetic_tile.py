"""ST-MAE against a per-position Gaussian baseline (PaDiM-style) on the same backbone features.

    python benchmarks/quality_magnetic_tile.py [--data ../shared/datasets/magnetic_tile] [--epochs 40]

Trains the default ST-MAE exactly as `stmae-edge train DATA --out W/stmae.pt` does, evaluates it as
`stmae-edge evaluate` does, fits the baseline on the same training images and features, scores both
on the same test set with the same metrics, and writes both rows into docs/BENCHMARKS.md.
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
from stmae_edge.cli import use_available_cores  # noqa: E402
from stmae_edge.baseline import GaussianBaseline  # noqa: E402
from stmae_edge.checkpoint import load_model  # noqa: E402
from stmae_edge.evaluate import evaluate, format_report  # noqa: E402
from stmae_edge.metrics import summarize  # noqa: E402
from stmae_edge.models.stmae import preset  # noqa: E402
from stmae_edge.scoring import ScoreStats, Thresholds  # noqa: E402
from stmae_edge.train import TrainConfig, batches, extract_features, split_holdout, train  # noqa: E402

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


@torch.no_grad()
def run_baseline(model_path: Path, data_dir: Path, cfg: TrainConfig) -> tuple[dict, float]:
    """Fit on the same training images ST-MAE used, threshold from the same held-out images."""
    model, meta = load_model(model_path)
    pre = meta.preprocessing
    train_paths, holdout_paths = split_holdout(data.train_images(data_dir), cfg.holdout_fraction, cfg.seed)
    started = time.perf_counter()
    baseline = GaussianBaseline(smoothing_sigma=model.config.smoothing_sigma)
    baseline.fit(extract_features(model, pre, train_paths, description="baseline features"))
    fit_seconds = time.perf_counter() - started

    def score(paths):
        maps, scores = [], []
        for chunk in batches(paths, 16):
            m, s = baseline.score(model.extract(torch.from_numpy(pre(chunk))), pre.input_size)
            maps.append(m[:, 0].numpy())
            scores.append(s.numpy())
        return np.concatenate(maps), np.concatenate(scores)

    _, holdout_scores = score(holdout_paths)
    threshold = Thresholds.from_stats(ScoreStats.from_scores(holdout_scores), cfg.sigma).image
    samples = data.eval_samples(data_dir)
    maps, scores = score([s.path for s in samples])
    masks = np.stack([data.load_mask(s, pre.input_size) for s in samples])
    result = summarize(np.array([s.label for s in samples]), scores, masks, maps,
                       [s.defect_type for s in samples], threshold)
    return result, fit_seconds


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "magnetic_tile")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench_quality")
    parser.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    parser.add_argument("--md", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()
    use_available_cores()

    cfg = TrainConfig(epochs=args.epochs)
    model_path = args.workdir / "stmae.pt"
    meta = train(args.data, model_path, preset("small"), cfg)
    stmae = evaluate(model_path, args.data)
    print(format_report(stmae))
    baseline, baseline_seconds = run_baseline(model_path, args.data, cfg)
    print(format_report(baseline))
    (args.workdir / "results.json").write_text(json.dumps({"stmae": stmae, "baseline": baseline}, indent=2))

    command = f"python benchmarks/quality_magnetic_tile.py --epochs {args.epochs}"
    date = dt.date.today().isoformat()
    header = (f"Measured {date} on {machine()}, by `{command}` (one seeded run, seed {cfg.seed}; "
              f"test set: {stmae['n_images']} images, {stmae['n_anomalous']} defective; maps and masks at "
              f"{meta.preprocessing.input_size[0]}x{meta.preprocessing.input_size[1]}).\n\n"
              "| method | image AUROC | pixel AUROC | AUPRO@30% | F1 at default threshold | fit time | "
              "equivalent command |\n|---|---|---|---|---|---|---|")
    per_type = lambda r: ", ".join(f"{k} {pct(v['image_auroc'])}/{pct(v['pixel_auroc'])}"  # noqa: E731
                                   for k, v in r["per_defect_type"].items())
    rows = [
        f"| ST-MAE small (efficientnet-lite0, {args.epochs} epochs) | {pct(stmae['image_auroc'])} | "
        f"{pct(stmae['pixel_auroc'])} | {pct(stmae['aupro'])} | {pct(stmae['f1'])} | "
        f"{meta.training['seconds']:.0f} s | `stmae-edge train DATA --epochs {args.epochs} --out stmae.pt && "
        "stmae-edge evaluate stmae.pt DATA` |",
        f"| Gaussian per position (PaDiM-style, same features) | {pct(baseline['image_auroc'])} | "
        f"{pct(baseline['pixel_auroc'])} | {pct(baseline['aupro'])} | {pct(baseline['f1'])} | "
        f"{baseline_seconds:.0f} s | (this script) |",
        "",
        f"Per defect type, image/pixel AUROC: ST-MAE: {per_type(stmae)}. Baseline: {per_type(baseline)}.",
    ]
    write_rows(args.md, rows, header)
    print(f"wrote {args.md}")


if __name__ == "__main__":
    main()

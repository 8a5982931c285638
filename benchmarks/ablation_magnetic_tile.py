"""Which anomaly map? Ablation of ST-MAE's map on one trained model, on magnetic_tile.

    python benchmarks/ablation_magnetic_tile.py [--model runs/bench_quality/stmae.pt]

The model from benchmarks/quality_magnetic_tile.py is scored with each variant of the map: the
residual (MSE, or MSE * (1 - cosine)), per-position normalisation off or on (statistics from the
training images), and the eval split (checkerboard of single tokens, or of 2x2 token blocks). The
weights are the same in every row; only how the residual becomes a map changes. Rows go to
docs/BENCHMARKS.md.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quality_magnetic_tile import model_benchmark_args, pct, write_table  # noqa: E402

from stmae_edge import data  # noqa: E402
from stmae_edge.checkpoint import load_model  # noqa: E402
from stmae_edge.evaluation.metrics import summarize  # noqa: E402
from stmae_edge.models.maps import maps_and_scores, smooth  # noqa: E402
from stmae_edge.training.image_set import split_holdout  # noqa: E402
from stmae_edge.training.train import batches  # noqa: E402

BEGIN, END = "<!-- ablation-magnetic-tile:begin -->", "<!-- ablation-magnetic-tile:end -->"


def block_split(side: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    white = (((rows // block) + (cols // block)) % 2 == 0).flatten()
    positions = torch.arange(side * side)
    return positions[white], positions[~white]


@torch.no_grad()
def main() -> None:
    args = model_benchmark_args(__doc__)
    model, meta = load_model(args.model)
    pre, cfg = meta.preprocessing, model.config
    training = meta.training["train_config"]
    train_paths = data.train_images(args.data)
    if not training.get("holdout_dir"):  # else every image of train/good trained
        train_paths, _ = split_holdout(train_paths, training["holdout_fraction"], training["seed"])
    samples = data.eval_samples(args.data)
    masks = np.stack([data.load_mask(s, pre.input_size) for s in samples])
    labels = np.array([s.label for s in samples])
    types = [s.defect_type for s in samples]

    def features(paths):
        return torch.cat([model.standardize(model.extract(torch.from_numpy(pre(c)))) for c in batches(paths, 32)])

    train_feats, test_feats = features(train_paths), features([s.path for s in samples])
    rows = []
    for block in (1, 2):
        a, b = block_split(cfg.tokens_per_side, block)
        recon = lambda f, a=a, b=b: torch.cat([model.reconstruct(x, a.expand(len(x), -1), b.expand(len(x), -1))  # noqa: E731
                                               for x in f.split(32)])
        train_recon, test_recon = recon(train_feats), recon(test_feats)
        for kind in ("mse", "mse_cos"):
            model.config = replace(cfg, residual=kind)  # the model's own residual, each kind in turn
            residual = model.residual(test_feats, test_recon)
            reference = model.residual(train_feats, train_recon)
            for norm in (False, True):
                grid = (residual - reference.mean(0)) / reference.std(0).clamp_min(1e-6) if norm else residual
                maps, scores = maps_and_scores(smooth(grid, model.smoothing_kernel), pre.input_size)
                r = summarize(labels, scores.numpy(), masks, maps[:, 0].numpy(), types, 0.0)
                default = block == 1 and kind == cfg.residual and norm == cfg.position_norm
                rows.append(f"| {'1x1' if block == 1 else '2x2'} checkerboard | {kind} | {'on' if norm else 'off'} | "
                            f"{pct(r['image_auroc'])} | {pct(r['pixel_auroc'])} | {pct(r['aupro'])} | "
                            f"{pct(r['per_defect_type']['uneven']['pixel_auroc'])} | {'default' if default else ''} |")
                print(rows[-1], flush=True)
    write_table(args.md, BEGIN, END, "python benchmarks/ablation_magnetic_tile.py",
                "the model of the quality benchmark above, same weights in every row",
                ["eval split", "residual", "per-position norm", "image AUROC", "pixel AUROC", "AUPRO@30%",
                 "uneven pixel AUROC", ""], rows)


if __name__ == "__main__":
    main()

"""Evaluation on an MVTec AD-layout test set: image/pixel AUROC, AUPRO, per defect type, F1 at the
default threshold. Maps and masks are compared at the model's input resolution."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import data
from .checkpoint import check_writable, load_model
from .errors import OutputError
from .metrics import summarize
from .train import score_images


def evaluate(model_path: Path | str, data_dir: Path | str, batch_size: int = 16) -> dict:
    model, metadata = load_model(model_path)
    samples = data.eval_samples(data_dir)
    size = metadata.preprocessing.input_size
    maps, scores = score_images(model, metadata.preprocessing, [s.path for s in samples], batch_size,
                                description="evaluating")
    masks = np.stack([data.load_mask(s, size) for s in samples]) if data.has_masks(samples) else None
    result = summarize(
        labels=np.array([s.label for s in samples]),
        scores=scores,
        masks=masks,
        maps=maps,
        defect_types=[s.defect_type for s in samples],
        threshold=metadata.thresholds.image,
    )
    result["model"] = str(model_path)
    result["data_dir"] = str(data_dir)
    result["model_hash"] = metadata.model_hash
    return result


def format_report(result: dict) -> str:
    def pct(v):
        return "  n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:5.1f}"

    lines = [
        f"{'':14s} {'image AUROC':>11s} {'pixel AUROC':>11s} {'AUPRO@30%':>9s} {'images':>6s}",
        f"{'all':14s} {pct(result['image_auroc']):>11s} {pct(result['pixel_auroc']):>11s} "
        f"{pct(result['aupro']):>9s} {result['n_images']:6d}",
    ]
    for name, m in result["per_defect_type"].items():
        lines.append(f"{name:14s} {pct(m['image_auroc']):>11s} {pct(m['pixel_auroc']):>11s} "
                     f"{pct(m['aupro']):>9s} {m['n_images']:6d}")
    lines.append(f"default threshold {result['threshold']:.4g}: F1 {pct(result['f1'])}, "
                 f"precision {pct(result['precision'])}, recall {pct(result['recall'])}")
    return "\n".join(lines)


def write_json(result: dict, path: Path | str) -> None:
    path = check_writable(path)
    try:
        path.write_text(json.dumps(result, indent=2) + "\n")
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc}") from exc

"""Evaluation on an MVTec AD-layout test set: image/pixel AUROC, AUPRO, per defect type, F1 at the
model's threshold. Maps and masks are compared at the model's input resolution."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .. import data
from ..model_files import read_metadata
from ..outputs import check_writable, write_bytes_atomically
from .metrics import interval_text, percent_text, summarize
from .validation import score_dataset


def evaluate(model_path: Path | str, data_dir: Path | str, batch_size: int = 16, backend: str | None = None,
             bit_depth: int | None = None) -> dict:
    """A checkpoint (.pt, PyTorch), an exported graph (.onnx, ONNX Runtime CPU) or a TensorRT plan (.plan,
    on its GPU) on a test set.

    Args:
        model_path: a .pt, .onnx or .plan file.
        data_dir: a labelled set in the MVTec AD layout (DATA_DIR/test/<type>, masks in ground_truth/).
        batch_size: images scored at once.
        backend: a runtime backend (runtime.BACKEND_KINDS) or "auto"; None: the file kind's CPU backend
            (validation.EVALUATION_BACKENDS; a plan on its GPU), for the same figures on any machine.
        bit_depth: significant bits of 16-bit pixels in place of the model's (as `predict --bit-depth`).

    Returns:
        metrics.summarize's dictionary: image / pixel AUROC, AUPRO, F1 at the model's threshold, and the
        same per defect type.

    Raises:
        DatasetError: no test images, only one class, or test images or masks that cannot be read
            (named before any image is scored).
        CheckpointError, EngineMismatchError: an unreadable or modified model file.
        ConfigError: not a model file type. BackendError: a plan where TensorRT or its GPU is missing.
    """
    # Every kind of file through the runtime, as `threshold` and `report` score a set (by default on the
    # CPU: validation.EVALUATION_BACKENDS). A checkpoint needs torch, the rest do not.
    metadata = read_metadata(model_path)  # the model file is checked before any data is read
    samples = data.eval_samples(data_dir)
    scored = score_dataset(model_path, data_dir, backend, batch_size, description="evaluating", samples=samples,
                           bit_depth=bit_depth)
    maps, scores = scored.maps, scored.scores
    size = metadata.preprocessing.input_size
    masks = data.load_masks(samples, size) if data.has_masks(samples) else None
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
    result["threshold_rule"] = metadata.thresholds.rule  # the default rule's, or the one `threshold --write` stored
    result["backend"] = scored.detector.info["backend"]
    result["bit_depth"] = scored.detector.preprocessing.bit_depth
    return result


def format_report(result: dict) -> str:
    def pct(v):
        return percent_text(v, 5)

    lines = [  # an interval is None where it cannot be estimated (metrics.image_auroc_interval)
        f"{'':14s} {'image AUROC':>11s} {'95% interval':>14s} {'pixel AUROC':>11s} {'AUPRO@30%':>9s} {'images':>6s}",
        *(f"{name:14s} {pct(m['image_auroc']):>11s} {interval_text(m.get('image_auroc_interval')):>14s} "
          f"{pct(m['pixel_auroc']):>11s} "
          f"{pct(m['aupro']):>9s} {m['n_images']:6d}"
          for name, m in (("all", result), *result["per_defect_type"].items())),
    ]
    if result["threshold"] is not None:
        n_good = result["n_images"] - result["n_anomalous"]
        failed = round((result.get("false_reject_rate") or 0.0) * n_good)
        rule = f" ({result['threshold_rule']})" if result.get("threshold_rule") else ""
        lines.append(f"the model's threshold {result['threshold']:.6g}{rule}: F1 {pct(result['f1']).strip()}, "
                     f"precision {pct(result['precision']).strip()}, recall {pct(result['recall']).strip()}, "
                     f"good images failed {failed} of {n_good} ({pct(result.get('false_reject_rate')).strip()}%)")
    against = {name: m["pixel_auroc_against"] for name, m in result["per_defect_type"].items()
               if m.get("pixel_auroc_against")}
    if against:
        groups = list(next(iter(against.values())))
        lines += ["pixel AUROC of each type's defects against the normal pixels of each group of images:",
                  f"{'':14s} " + " ".join(f"{g[:9]:>9s}" for g in groups)]
        lines += [f"{name:14s} " + " ".join(f"{pct(row[g]):>9s}" for g in groups) for name, row in against.items()]
    return "\n".join(lines)


def write_json(result: dict, path: Path | str) -> None:
    write_bytes_atomically(check_writable(path), (json.dumps(result, indent=2) + "\n").encode())

"""Parity of an exported ONNX file with its PyTorch checkpoint, on real images, through ONNX Runtime (CPU).

Images are preprocessed by the one preprocessing definition, read from the ONNX file's own metadata,
so the check also proves that the metadata describes the input the graph expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .. import data
from ..checkpoint import load_model
from ..checks import is_finite_number, is_whole
from ..errors import ConfigError, DatasetError, VerificationError, first_line
from ..metadata import INPUT_NAME, MAX_BATCH, ModelMetadata, onnx_precision
from ..onnx_files import import_onnxruntime, load_onnx, ort_model_source
from ..progress import progress_bar
from .parity import PARITY_RTOL, relative_difference


def verify(onnx_path: Path | str, checkpoint: Path | str, images: Sequence[Path] | None = None,
           batch_sizes: Sequence[int] = (1, 8), rtol: float | None = None) -> dict:
    """Max relative difference of maps and scores per batch size, ONNX Runtime (CPU) against PyTorch.

    Args:
        onnx_path: the exported graph.
        checkpoint: the .pt file it was exported from.
        images: images to run (default: the model's recorded training images, repeated to fill a batch).
        batch_sizes: each is run through both.
        rtol: the largest relative difference allowed (default: parity.PARITY_RTOL for the graph's
            precision, 1e-4 for fp32 and 2e-2 for fp16).

    Raises:
        VerificationError: the graph comes from another model, ONNX Runtime cannot run it, or it differs
            by more than `rtol`.
        ConfigError: batch sizes that are not whole numbers from 1 to MAX_BATCH, or an rtol not above 0.
        DatasetError: no images to verify with. InvalidImageError: an image cannot be read.
        CheckpointError: an unreadable or modified checkpoint or graph metadata.
    """
    sizes = list(batch_sizes) if isinstance(batch_sizes, (list, tuple)) else []
    if not sizes or not all(is_whole(b) and 1 <= b <= MAX_BATCH for b in sizes):
        raise ConfigError(f"batch sizes {batch_sizes!r} must be a list of whole numbers from 1 to {MAX_BATCH}")
    if rtol is not None and (not is_finite_number(rtol) or rtol <= 0):
        raise ConfigError(f"rtol {rtol!r} must be a number above 0 (the largest relative difference allowed)")
    proto = load_onnx(onnx_path)
    exported, precision = ModelMetadata.from_onnx(proto), onnx_precision(proto)
    rtol_given = rtol is not None
    if rtol is None:
        if precision not in PARITY_RTOL:  # an INT8 graph ranks like FP32 but its numbers differ: not a parity check
            raise VerificationError(f"{onnx_path} is an {precision} graph; verify checks fp32 and fp16 exports "
                                    "(`stmae-edge evaluate` measures an INT8 graph), or give --rtol")
        rtol = PARITY_RTOL[precision]
    with progress_bar(f"verifying {Path(onnx_path).name}", 1 + len(batch_sizes)) as step:
        step(0, status="loading the model")
        return _compare(onnx_path, checkpoint, exported, images, batch_sizes, rtol, step,
                        _advice(precision, rtol_given, checkpoint))


def _advice(precision: str, rtol_given: bool, checkpoint) -> str:
    """What to do when the graph differs: fp32 should match to rounding, so something broke (unless the
    limit given is tighter than rounding); fp16 rounds every layer and INT8 quantises the larger ones,
    more on some models than others, so what matters is whether it still ranks the images alike."""
    if precision == "fp32":
        return f"export {checkpoint} again" if not rtol_given else "an fp32 graph matches to about 1e-4 relative"
    rounding = "fp16 rounds every layer" if precision == "fp16" else f"{precision} quantises the larger layers"
    return (f"{rounding}: compare the two with `stmae-edge evaluate` (AUROC)"
            + ("" if rtol_given else ", or allow more with --rtol"))


def _compare(onnx_path, checkpoint, exported: ModelMetadata, images, batch_sizes, rtol: float, step,
             advice: str) -> dict:
    """verify's work, `step` moving its progress bar: PyTorch and ONNX Runtime on each batch size."""
    ort = import_onnxruntime()
    model, metadata = load_model(checkpoint)
    step(1, status="preprocessing images")
    if exported.model_hash != metadata.model_hash:
        raise VerificationError(f"{onnx_path} was exported from another model (hash {exported.model_hash[:12]}, "
                                f"checkpoint {metadata.model_hash[:12]}); export {checkpoint} again")
    # an empty --images folder is refused, not taken for "no folder given" (the training images instead)
    paths = list(images) if images is not None else data.recorded_train_images(metadata.training, max(batch_sizes))
    if not paths:
        raise DatasetError("no images to verify with: the --images folder holds no image files")
    needed = max(batch_sizes)
    paths = [paths[i % len(paths)] for i in range(needed)]  # repeat a short list up to the largest batch
    batch = exported.preprocessing(paths)

    try:
        session = ort.InferenceSession(ort_model_source(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ONNX Runtime's own exception types
        raise VerificationError(f"{onnx_path}: ONNX Runtime cannot load this graph ({first_line(exc, 200)}); export "
                                f"{checkpoint} again") from exc
    figures = {"provider": session.get_providers()[0], "rtol": rtol, "images": len(set(paths)),
               "folder": data.folder_of(paths), "batches": {}}
    failures = []
    for size in batch_sizes:
        step(0, status=f"batch of {size}")
        x = batch[:size]
        try:
            onnx_maps, onnx_scores = session.run(None, {INPUT_NAME: x})
        except Exception as exc:
            raise VerificationError(f"{onnx_path}: ONNX Runtime failed on a batch of {size} ({first_line(exc, 200)}); "
                                    f"export {checkpoint} again") from exc
        with torch.no_grad():
            maps, scores = (t.numpy() for t in model(torch.from_numpy(x)))
        rel_map, rel_score = relative_difference(onnx_maps, maps), relative_difference(onnx_scores, scores)
        figures["batches"][size] = {"map_max_rel_diff": rel_map, "score_max_rel_diff": rel_score}
        if not (rel_map <= rtol and rel_score <= rtol):
            failures.append(f"batch {size}: map {rel_map:.2e}, score {rel_score:.2e}")
        step(1, status=f"batch of {size} compared")
    if failures:
        raise VerificationError(f"{onnx_path} differs from {checkpoint} beyond {rtol:g} relative: "
                                + "; ".join(failures) + f"; {advice}")
    return figures

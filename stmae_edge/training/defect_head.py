"""A head learnt from labelled defects (`train --defects DIR`): what a model of good parts alone cannot
learn is what a defect looks like beside the rest of an unusual part (docs/BENCHMARKS.md, issue 15).

    DIR/test/<type>/*  defective images (test/good, where there, adds good ones), masks in
                       DIR/ground_truth/<type>/ (the MVTec AD layout), every file read once
      -> labelled_defects: refused where they are DATA_DIR/test's images, which `evaluate` measures on
    each mask -> Preprocessing.mask_tensor (laid out as the image is) -> its share of defect per grid
                 cell: the cell's label
    the labelled images' and up to DEFECT_GOOD_IMAGES training images' cells -> STMAE.defect_inputs
      -> a per-cell classifier, DEFECT_HIDDEN hidden units, binary cross-entropy on the shares,
         seeded AdamW (fit_defect_head)
      -> its inputs' standardisation folded into the first layer; its output's (mean, std) over the
         held-out good images' cells: the z-score the map adds where positive (STMAE.defect_z,
         STMAEConfig.defect_rectified: a kind of defect the labelled images lack is not lowered)

The rest of the model is fitted before the head and does not depend on it: a model trained with
--defects is the model trained without, plus the head.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .. import data
from ..errors import DatasetError
from ..models.stmae import STMAE
from ..preprocessing import Preprocessing
from ..progress import progress_bar
from .loop import batches, z_score_table

logger = logging.getLogger(__name__)

# Fewer labelled defective images than this are warned about: on magnetic_tile a head from 10 images
# moved the test tiles' pixel AUROC by -1.2 or +3.6 points (two draws), from 30 by +4.9 to +5.6
# (docs/BENCHMARKS.md, "A head learnt from labelled defects").
DEFECT_IMAGES_ADVISED = 30
DEFECT_HIDDEN = 128  # the head's hidden units (STMAEConfig.defect_hidden) where train --defects sets it
DEFECT_GOOD_IMAGES = 150  # training good images whose cells the head sees as normal, at most
DEFECT_EPOCHS = 30
DEFECT_BATCH = 4096  # cells per step
DEFECT_LR = 1e-3
DEFECT_WEIGHT_DECAY = 1e-2
REMEDY = "Replace or remove them"
LAYOUT = ("put the labelled defective images in DEFECTS/test/<type>/ and their masks in "
          "DEFECTS/ground_truth/<type>/<name>_mask.png (the MVTec AD layout)")


@dataclass(frozen=True)
class LabelledDefects:
    """The images a head learns from, each read once: defective ones with their masks, good ones (label 0)."""
    folder: Path
    samples: list[data.EvalSample]
    sizes: dict[Path, tuple[int, int]]  # each image's (height, width) as shown (data.survey)
    colour: tuple[Path, ...] = ()  # those whose pixels are not gray (preprocessing.looks_gray)

    @property
    def defective(self) -> list[data.EvalSample]:
        return [s for s in self.samples if s.label == 1]

    def describe(self) -> dict:
        """What the metadata records: the folder, its defective images by type and its good ones."""
        types: dict[str, int] = {}
        for sample in self.defective:
            types[sample.defect_type] = types.get(sample.defect_type, 0) + 1
        return {"folder": str(self.folder.resolve()), "defective_images": len(self.defective), "types": types,
                "good_images": len(self.samples) - len(self.defective)}


def labelled_defects(folder: Path | str, data_dir: Path | str) -> LabelledDefects:
    """The labelled images in `folder` (the MVTec AD layout's test/ and ground_truth/), read before training.

    Raises:
        DatasetError: no such folder, or no test/ in it; no defective image; a defective image without a
            mask, or whose mask is of another size or marks nearly all of it (inverted); no mask marking
            anything (images whose masks mark nothing are left out, with a warning);
            an unreadable image or mask; images that are also in DATA_DIR/test (the same pixels):
            `evaluate` would then measure the model on what it learnt from.
    """
    folder = Path(folder)
    where = f"--defects {folder}"
    if not folder.is_dir():
        raise DatasetError(f"{where}: {'not a folder' if folder.exists() else 'no such folder'}; {LAYOUT}")
    if folder.resolve() == Path(data_dir).resolve():
        raise DatasetError(f"{where}: the training set's own test images, which evaluate measures the model on; give "
                           "labelled defects kept apart from DATA_DIR/test")
    if not data.child_folder(folder, "test").is_dir():
        raise DatasetError(f"{where}: no test folder; {LAYOUT}")
    try:
        samples = data.eval_samples(folder, both_classes=False, warn_unmasked=False)
    except DatasetError:  # the only refusal left: no image at all
        raise DatasetError(f"{where}: no images in test/<type>/; {LAYOUT}") from None
    defective = [s for s in samples if s.label == 1]
    if not defective:
        raise DatasetError(f"{where}: no defective images in test/<type>/; the head learns from defective images "
                           "and their masks")
    unmasked = [s for s in defective if s.mask_path is None]
    if unmasked:
        raise DatasetError(f"{where}: {len(unmasked)} of {len(defective)} defective images have no mask (first: "
                           f"{unmasked[0].path}); put each one's mask in ground_truth/<type>/ as "
                           f"{unmasked[0].path.stem}_mask.png")
    read = data.survey([s.path for s in samples], f"labelled images in {folder}", remedy=REMEDY)
    masks = data.survey([s.mask_path for s in defective], f"masks in {folder}", remedy=REMEDY, digests=False,
                        progress=False)
    empty = unmarked(where, defective, read.sizes, masks.sizes)
    if empty:
        logger.warning("%s: %d masks mark no defect pixel (first: %s); their images are left out of the head's "
                       "training: mark their defects (white on black), or move the images to test/good", where,
                       len(empty), empty[0].mask_path)
        samples = [s for s in samples if s not in empty]
        defective = [s for s in defective if s not in empty]
        if not defective:
            raise DatasetError(f"{where}: no mask marks a defect pixel; the head learns from defective images "
                               "and their masks")
    test_folder = data.child_folder(Path(data_dir), "test")
    if test_folder.is_dir():
        tested = data.survey([p for sub in sorted(test_folder.iterdir()) if sub.is_dir() for p in data.images_in(sub)],
                             "test images of the training set", skip_unreadable=True, progress=False)
        shared = set(read.digests.values()) & set(tested.digests.values())
        if shared:
            first = next(path for path, digest in read.digests.items() if digest in shared)
            raise DatasetError(f"{where}: {len(shared)} of its images are also in {test_folder} (first: "
                               f"{first.name}); evaluate would measure the model on what it learnt from: keep the "
                               "labelled defects apart from the test images")
    if len(defective) < DEFECT_IMAGES_ADVISED:
        logger.warning("%s: %d labelled defective images; a head from so few can as well lower the map's figures "
                       "as raise them (on magnetic_tile, 10 images: pixel AUROC -1.2 or +3.6 points, by draw); "
                       "label at least %d, and compare the two models with `stmae-edge evaluate` on parts the "
                       "labelled ones do not show", where, len(defective), DEFECT_IMAGES_ADVISED)
    kept = {s.path for s in samples}
    return LabelledDefects(folder, samples, {s.path: read.sizes[s.path] for s in samples},
                           tuple(p for p in read.colour if p in kept))


def unmarked(where: str, defective: list[data.EvalSample], image_sizes: dict[Path, tuple[int, int]],
             mask_sizes: dict[Path, tuple[int, int]]) -> list[data.EvalSample]:
    """The defective images whose masks mark no pixel: the head would learn their defects as normal, so
    they are left out (magnetic_tile has four such masks).

    Raises:
        DatasetError: the first mask of another size than its image (likely another image's), or that
            marks nearly all of it (likely inverted).
    """
    empty = []
    for sample in defective:
        mask, image = sample.mask_path, image_sizes[sample.path]
        covered = data.fit_mask(sample, image)[2]
        faults = data.mask_faults(mask_sizes[mask], image, covered)
        if "size" in faults:
            raise DatasetError(f"{where}: the mask {mask} is {mask_sizes[mask][1]}x{mask_sizes[mask][0]}, its image "
                               f"{sample.path.name} {image[1]}x{image[0]}; each mask must be its own image's")
        if "inverted" in faults:
            raise DatasetError(f"{where}: the mask {mask} marks {100 * covered:.0f}% of its image; defects must be "
                               "the white pixels on black: check that it is not inverted")
        if "empty" in faults:
            empty.append(sample)
    return empty


def kept_feature_sets(defects: LabelledDefects, good_images: int) -> int:
    """How many images' worth of backbone features the head keeps in memory, for training's estimate:
    the labelled images' features, and the head's inputs (five times the features' channels) of them
    and of up to DEFECT_GOOD_IMAGES good images."""
    return len(defects.samples) + 5 * (len(defects.samples) + min(good_images, DEFECT_GOOD_IMAGES))


def grid_labels(preprocessing: Preprocessing, sample: data.EvalSample, size: tuple[int, int], grid: int) -> np.ndarray:
    """The share of defect in each cell of the grid (grid, grid), float32, as the network lays out the
    image, whose (height, width) as shown is `size`."""
    mask, _, _ = data.fit_mask(sample, size)  # at the image's own size
    return cv2.resize(preprocessing.mask_tensor(mask), (grid, grid), interpolation=cv2.INTER_AREA)


@torch.no_grad()
def head_inputs(model: STMAE, raw_features: torch.Tensor, batch_size: int = 32, dtype=torch.float16) -> torch.Tensor:
    """STMAE.defect_inputs of cached raw backbone features, (N, K, G, G); in fp16 by default, to hold them."""
    out = []
    for chunk in raw_features.split(batch_size):
        feats = model.standardize(chunk.float())
        recon = model.reconstruct(feats)
        sharp, wide = model.gaussian_zs(model.gaussian_input(feats, recon))
        out.append(model.defect_inputs(feats, recon, sharp, wide).to(dtype))
    return torch.cat(out)


def cells(x: torch.Tensor) -> torch.Tensor:
    """(N, K, G, G) -> (N * G * G, K)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def normal_images(count: int, seed: int) -> np.ndarray:
    """Which of `count` training images (their indices, sorted) the head sees as normal: up to
    DEFECT_GOOD_IMAGES, drawn by the training's seed."""
    return np.sort(np.random.default_rng(seed).permutation(count)[:DEFECT_GOOD_IMAGES])


def fit_defect_head(model: STMAE, preprocessing: Preprocessing, defects: LabelledDefects,
                    labelled_features: torch.Tensor, normal_features: torch.Tensor, holdout_features: torch.Tensor,
                    seed: int) -> dict:
    """Fit the model's labelled-defect head; everything else in the model must be fitted already.

    Args:
        labelled_features, normal_features, holdout_features: raw backbone features (N, C, G, G) of
            defects.samples, of the training images that normal_images chooses and of the held-out good
            images, as training caches them.

    Returns:
        What the metadata records of it: the labelled images, the cells it learnt from, its last loss.

    The cells are held in memory in fp16: 1.8 MB per image with the default preset's 882 inputs.
    """
    grid = model.config.grid
    labelled = head_inputs(model, labelled_features)
    labels = torch.from_numpy(np.stack([grid_labels(preprocessing, s, defects.sizes[s.path], grid)
                                       for s in defects.samples]))
    normal = head_inputs(model, normal_features)
    x = torch.cat([cells(labelled), cells(normal)])
    y = torch.cat([labels.reshape(-1), torch.zeros(len(normal) * grid * grid)])
    del labelled, normal
    mean, std = standardisation(x)
    generator = torch.Generator().manual_seed(seed)
    hidden = model.config.defect_hidden
    with torch.random.fork_rng(devices=[]):  # their default initialisation leaves the global generator as it was
        first = torch.nn.Linear(x.shape[1], hidden)
        second = torch.nn.Linear(hidden, 1)
    for layer in (first, second):  # seeded here, from `generator`
        bound = layer.in_features ** -0.5
        with torch.no_grad():
            layer.weight.uniform_(-bound, bound, generator=generator)
            layer.bias.uniform_(-bound, bound, generator=generator)
    parameters = [*first.parameters(), *second.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=DEFECT_LR, weight_decay=DEFECT_WEIGHT_DECAY)
    last = float("nan")
    with progress_bar("defect head", DEFECT_EPOCHS) as advance:
        for _ in range(DEFECT_EPOCHS):
            total = 0.0
            for batch in batches(torch.randperm(len(x), generator=generator), DEFECT_BATCH):
                inputs = (x[batch].float() - mean) / std
                loss = F.binary_cross_entropy_with_logits(second(torch.relu(first(inputs)))[:, 0], y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
            last = total / len(x)
            advance()
    with torch.no_grad():  # (x - mean) / std through W, b is x through W / std, b - W (mean / std)
        weight = first.weight / std
        model.defect_hidden_weight.copy_(weight[:, :, None, None])
        model.defect_hidden_bias.copy_(first.bias - weight @ mean)
        model.defect_output_weight.copy_(second.weight[:, :, None, None])
        model.defect_output_bias.copy_(second.bias)
        # the z-score's scale from the inputs as the graph computes them, in fp32
        logits = [model.defect_logits(head_inputs(model, chunk, dtype=torch.float32)) for chunk in holdout_features.split(32)]
    model.defect_stats.copy_(z_score_table([logits]))
    share = float(y.mean())
    logger.info("defect head: %d labelled images, %d cells, %.1f%% of them defect, loss %.4f",
                len(defects.samples), len(x), 100 * share, last)
    return {**defects.describe(), "cells": int(len(x)), "defect_share": round(share, 4),
            "training_good_images": int(len(normal_features)), "loss": round(last, 5)}


def standardisation(x: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input, mean and std over the cells (float64 sums, chunk by chunk), the std floored."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for part in x.split(chunk):
        part = part.double()
        total += part.sum(dim=0)
        squares += part.pow(2).sum(dim=0)
    mean = total / len(x)
    std = (squares / len(x) - mean.pow(2)).clamp_min(0).sqrt()
    return mean.float(), std.float() + 1e-3

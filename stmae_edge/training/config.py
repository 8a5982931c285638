"""Training's settings (TrainConfig), without torch: the CLI reads their defaults for its options and
its --help, which must not wait for torch to import (training/loop.py and train.py use them)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..checks import is_finite_number, is_whole
from ..errors import ConfigError
from ..scoring import DEFAULT_SIGMA

ASPECT_CHOICES = ("auto", "keep", "stretch")
COLOR_CHOICES = ("auto", "gray", "rgb")
MIN_CROP, MAX_CROP = 16, 4096  # --crop's sides in pixels: a crop must span some cells and fit in memory


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 20  # the default model trains in under 20 minutes on 2 CPU cores (docs/BENCHMARKS.md)
    # At most this many optimiser steps, in whole epochs where one fits: what keeps `train DATA` within
    # its time on a larger training set than magnetic_tile's, whose 20 epochs of 686 images are these
    # 840 steps (698 s on 2 cores; 5 epochs, 210 steps, already come within 0.3 points). 0 = no cap.
    max_steps: int = 840
    batch_size: int = 16
    lr: float = 4e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    holdout_fraction: float = 0.1
    # A folder of good images of parts that train/good does not show, held out in place of
    # holdout_fraction of train/good: where each part is photographed several times, images drawn from
    # train/good are other photographs of training parts and set the threshold too low for new parts
    # (magnetic_tile: 13% of new good tiles flagged, 23% before score_folds; docs/BENCHMARKS.md).
    # "" = draw from train/good.
    holdout_dir: str = ""
    # The score head (a Gaussian of frozen features, no training) is fitted on every good image and
    # calibrated by cross-fitting: each image scored by a head fitted on the other folds. Its scales and
    # the image threshold then rest on every good image instead of one draw of held-out ones, which
    # moved magnetic_tile's image AUROC between 97.1 and 98.0 (docs/BENCHMARKS.md). 0 = the held-out
    # images, as with holdout_dir or crop, where cross-fitting is not used.
    score_folds: int = 5
    seed: int = 0
    max_images: int = 0  # 0 = all; a cap for quick runs
    sigma: float = DEFAULT_SIGMA  # default threshold = mean + sigma * std of good scores (held-out or cross-fitted)
    crop: int = 0  # > 0: train on random crops of this side at native resolution (line-scan tiles)
    crops_per_image: int = 4  # crops drawn, once and seeded, from each image when crop > 0
    self_supervised: bool = False  # learn to restore good features from corrupted images (corruption.py)
    corruptions_per_image: int = 2  # ST-MAE --self-supervised: corrupted versions of each image, drawn once
    defect_weight: float = 20.0  # filtering AE: extra loss weight on corrupted pixels (FilteringAutoencoder.loss)
    bit_depth: int = 16  # significant bits of uint16 training images (Preprocessing.bit_depth), kept in the model
    aspect: str = "auto"  # "keep" (Preprocessing.keep_aspect), "stretch", or "auto": keep where shapes vary
    color: str = "auto"  # "gray", "rgb" (Preprocessing.color), or "auto": gray where every good image is gray
    # Every good image is decoded before training starts; one that cannot be stops the run there, unless
    # this leaves such files out (with a warning; their count kept in the checkpoint).
    skip_unreadable: bool = False
    # A folder of labelled defects in the MVTec AD layout (test/<type>/, ground_truth/<type>/), kept
    # apart from the training set's test images: ST-MAE then learns a head from them that the map adds
    # (training/defect_head.py). "" = good images alone.
    defects_dir: str = ""

    def __post_init__(self) -> None:
        for name in ("holdout_dir", "defects_dir"):  # a Path would go into the checkpoint, which then would not load
            if not isinstance(getattr(self, name), str | os.PathLike):
                raise ConfigError(f"{name} {getattr(self, name)!r} must be a folder's path")
            object.__setattr__(self, name, os.fspath(getattr(self, name)))
        # types first: a float count (epochs=1.5) passed every check below and failed after the backbone pass
        for name in ("epochs", "batch_size", "max_steps", "max_images", "crop", "crops_per_image",
                     "corruptions_per_image", "score_folds", "bit_depth", "seed"):
            if not is_whole(getattr(self, name)):
                raise ConfigError(f"{name} {getattr(self, name)!r} must be a whole number")
        for name in ("lr", "weight_decay", "warmup_fraction", "sigma", "defect_weight", "holdout_fraction"):
            if not is_finite_number(getattr(self, name)):
                raise ConfigError(f"{name} {getattr(self, name)!r} must be a finite number")
        if self.epochs < 1 or self.batch_size < 1 or not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError("epochs, batch size and learning rate must be positive")
        if self.max_steps < 0:
            raise ConfigError(f"max steps {self.max_steps} must be 0 (no cap) or positive")
        if self.max_images < 0 or not math.isfinite(self.sigma) or self.sigma < 0 or not 0 <= self.defect_weight < math.inf:
            raise ConfigError("max images, sigma and defect weight must not be negative")
        if self.corruptions_per_image < 1:
            raise ConfigError("corruptions per image must be at least 1")
        if self.crop and not MIN_CROP <= self.crop <= MAX_CROP or self.crops_per_image < 1:
            raise ConfigError(f"crop {self.crop} must be 0 (whole images) or {MIN_CROP}..{MAX_CROP} pixels, with at "
                              "least one crop per image")
        if self.score_folds == 1 or self.score_folds < 0:
            raise ConfigError(f"score folds {self.score_folds} must be 0 (the held-out images) or at least 2")
        if not 0 < self.holdout_fraction < 1:
            raise ConfigError(f"holdout fraction {self.holdout_fraction} must be between 0 and 1")
        if self.aspect not in ASPECT_CHOICES:
            raise ConfigError(f"aspect {self.aspect!r}: use one of {', '.join(ASPECT_CHOICES)}")
        if self.defects_dir and self.crop:
            raise ConfigError("--defects and --crop: a head learnt from labelled whole images cannot score crops; "
                              "train on whole images to use labelled defects")
        if self.color not in COLOR_CHOICES:
            raise ConfigError(f"color {self.color!r}: use one of {', '.join(COLOR_CHOICES)}")


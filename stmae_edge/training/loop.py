"""What both model families' training shares: its settings (TrainConfig) and the optimisation loop.

    TrainConfig --> optimize(model, count, cfg, loss_of): AdamW, warm-up then cosine decay, seeded
    batch order --> the mean loss of each epoch. train.py (ST-MAE) and filtering.py (the filtering
    autoencoder) each give it their loss; batches() and mean_and_std() serve both.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, TrainingError
from ..progress import progress_bar
from ..scoring import DEFAULT_SIGMA

logger = logging.getLogger(__name__)


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
    # Every good image is decoded before training starts; one that cannot be stops the run there, unless
    # this leaves such files out (with a warning; their count kept in the checkpoint).
    skip_unreadable: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError("epochs, batch size and learning rate must be positive")
        if self.max_steps < 0:
            raise ConfigError(f"max steps {self.max_steps} must be 0 (no cap) or positive")
        if self.max_images < 0 or not math.isfinite(self.sigma) or self.sigma < 0 or not 0 <= self.defect_weight < math.inf:
            raise ConfigError("max images, sigma and defect weight must not be negative")
        if self.corruptions_per_image < 1:
            raise ConfigError("corruptions per image must be at least 1")
        if self.crop and not 16 <= self.crop <= 4096 or self.crops_per_image < 1:
            raise ConfigError(f"crop {self.crop} must be 0 (whole images) or 16..4096 pixels, with at least "
                              "one crop per image")
        if self.score_folds == 1 or self.score_folds < 0:
            raise ConfigError(f"score folds {self.score_folds} must be 0 (the held-out images) or at least 2")
        if not 0 < self.holdout_fraction < 1:
            raise ConfigError(f"holdout fraction {self.holdout_fraction} must be between 0 and 1")
        if self.aspect not in ASPECT_CHOICES:
            raise ConfigError(f"aspect {self.aspect!r}: use one of {', '.join(ASPECT_CHOICES)}")


ASPECT_CHOICES = ("auto", "keep", "stretch")


def batches(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


# The smallest std a normalisation divides by: a statistic that does not vary (a constant map, a
# feature that is always zero) must not divide by zero. Far below the stds seen (0.06..0.09 per position
# on magnetic_tile's residuals).
FITTED_STD_FLOOR = 1e-6


def mean_and_std(chunks: Iterable[torch.Tensor], dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Population mean and std over `dims` (kept, as size 1) of tensors seen chunk by chunk, in float64."""
    total = total_sq = 0.0
    count = 0
    for chunk in chunks:
        c = chunk.double()
        part = c.sum(dim=dims, keepdim=True)
        total, total_sq = total + part, total_sq + c.pow(2).sum(dim=dims, keepdim=True)
        count += c.numel() // part.numel()
    mean = total / count
    return mean.float(), (total_sq / count - mean.pow(2)).clamp_min(0).sqrt().float()


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    warmup = max(1, int(total * cfg.warmup_fraction))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))


def epochs_within_budget(cfg: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(epochs, steps in each): cfg.epochs, or fewer whole epochs where cfg.max_steps would be passed;
    where one epoch alone is more than the budget (a training set of thousands), its first max_steps
    steps, so that the budget bounds training time on any set."""
    if not cfg.max_steps or cfg.epochs * steps_per_epoch <= cfg.max_steps:
        return cfg.epochs, steps_per_epoch
    if cfg.max_steps < steps_per_epoch:
        logger.warning("training %d steps of one epoch's %d (%d of the images, drawn at random): the step budget "
                       "(--max-steps %d) bounds training time; --max-steps 0 trains every epoch", cfg.max_steps,
                       steps_per_epoch, cfg.max_steps * cfg.batch_size, cfg.max_steps)
        return 1, cfg.max_steps
    epochs = cfg.max_steps // steps_per_epoch
    logger.warning("training %d of %d epochs (%d steps of %d): the step budget (--max-steps %d) bounds training "
                   "time; --max-steps 0 trains every epoch", epochs, cfg.epochs,
                   epochs * steps_per_epoch, cfg.epochs * steps_per_epoch, cfg.max_steps)
    return epochs, steps_per_epoch


def optimize(model: torch.nn.Module, count: int, cfg: TrainConfig, loss_of, description: str = "training",
             precision: int = 4) -> list[float]:
    """The training loop both families share: AdamW with warm-up and cosine decay over `cfg.epochs`
    passes (fewer where `cfg.max_steps` would be passed: epochs_within_budget) of `count` samples in
    seeded order, dropping the ragged last batch (equal-sized steps). `loss_of(indices, epoch,
    generator)` gives a batch's loss. Returns the mean loss of each epoch trained."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)
    batch_size = min(cfg.batch_size, count)
    epochs, steps_per_epoch = epochs_within_budget(cfg, count // batch_size)
    total = epochs * steps_per_epoch
    history = []
    model.train()
    step = 0
    with progress_bar(description, total) as advance:
        for epoch in range(epochs):
            order = torch.randperm(count, generator=generator)
            losses = []
            for i in range(steps_per_epoch):
                loss = loss_of(order[i * batch_size:(i + 1) * batch_size], epoch, generator)
                value = loss.item()
                if not math.isfinite(value):  # every step after it would be wasted, and the statistics fail
                    raise TrainingError(f"training diverged at epoch {epoch + 1}, step {step + 1}: the loss is "
                                        f"{value}; train again with a lower --lr (this run: {cfg.lr:g})")
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total, cfg)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(value)
                step += 1
                advance(1, status=f"epoch {epoch + 1}/{epochs} loss {np.mean(losses):.{precision}f}")
            history.append(float(np.mean(losses)))
    model.eval()
    return history

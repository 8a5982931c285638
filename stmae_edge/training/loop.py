"""What both model families' training shares: its settings (TrainConfig) and the optimisation loop.

    TrainConfig --> optimize(model, count, cfg, loss_of): AdamW, warm-up then cosine decay, seeded
    batch order --> the mean loss of each epoch. train.py (ST-MAE) and filtering.py (the filtering
    autoencoder) each give it their loss; batches() and mean_and_std() serve both.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from ..errors import TrainingError
from ..progress import progress_bar
from .config import ASPECT_CHOICES, TrainConfig  # noqa: F401 - where the training modules take them

logger = logging.getLogger(__name__)




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


def z_score_table(groups: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """(mean, std) per group of held-out values, one row each, as the graph's z-scores read them
    (mean_and_std: population std, float64), the std floored at FITTED_STD_FLOOR."""
    rows = []
    for group in groups:
        mean, std = mean_and_std((v.flatten() for v in group), dims=(0,))
        rows.append([float(mean), max(float(std), FITTED_STD_FLOOR)])
    return torch.tensor(rows)

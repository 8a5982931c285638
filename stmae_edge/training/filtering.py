"""Training the filtering autoencoder: good images get fresh synthetic defects every epoch
(corruption.py), and the network learns to give back the good image.

Each step takes one corrupted/good pair per image, preprocessed by the one preprocessing definition
at the model's input size. Whole inputs, not patches: the network's receptive field spans most of a
256-pixel input, and trained on 64- or 128-pixel patches it saw mostly padding at its coarsest level
and failed on whole images (measured on magnetic_tile: the error on good pixels grew from about 1e-4
to 0.5 within 200 steps).
Images are decoded per step, so memory does not grow with the dataset. Everything is seeded: sample i
of epoch e is corrupted with rng (seed, e, i).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..models.filtering_ae import FilteringAEConfig, FilteringAutoencoder
from ..preprocessing import ImageInput, Preprocessing, load_image
from ..progress import progress_bar
from .corruption import corrupt
from .loop import FITTED_STD_FLOOR, TrainConfig, batches, mean_and_std, optimize

DONORS = 16  # training images that lend their texture to "other image" defects


def train_filtering(config: FilteringAEConfig, preprocessing: Preprocessing, items: Sequence[ImageInput],
                    cfg: TrainConfig) -> tuple[FilteringAutoencoder, list[float]]:
    model = FilteringAutoencoder(config)
    history = fit_filtering(model, preprocessing, items, cfg)
    if config.position_norm:
        mean, std = residual_statistics(model, preprocessing, items)
        model.residual_mean.copy_(mean)
        model.residual_std.copy_(std)
    return model, history


def training_pairs(items: Sequence[ImageInput], indices: Sequence[int], donors: Sequence[np.ndarray],
                   preprocessing: Preprocessing, epoch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(corrupted, good) model inputs, (B, 3, H, W) each, for the items at `indices` in this epoch."""
    corrupted, good = [], []
    for i in indices:
        sample = corrupt(load_image(items[i]), donors, np.random.default_rng((seed, epoch, int(i))),
                         bit_depth=preprocessing.bit_depth)
        corrupted.append(sample.corrupted)
        good.append(sample.target)
    return preprocessing(corrupted), preprocessing(good)


def fit_filtering(model: FilteringAutoencoder, preprocessing: Preprocessing, items: Sequence[ImageInput],
                  cfg: TrainConfig) -> list[float]:
    """The shared training loop (loop.optimize) on fresh corrupted/good pairs; mean loss per epoch."""
    rng = np.random.default_rng(cfg.seed)
    donors = [load_image(items[int(i)]) for i in rng.permutation(len(items))[:DONORS]]

    def loss_of(idx: torch.Tensor, epoch: int, generator: torch.Generator) -> torch.Tensor:
        corrupted, good = training_pairs(items, idx.tolist(), donors, preprocessing, epoch, cfg.seed)
        x, y = torch.from_numpy(corrupted), torch.from_numpy(good)
        return model.loss(x, model.restore(x), y, cfg.defect_weight)

    return optimize(model, len(items), cfg, loss_of, "training (filtering autoencoder)", precision=5)


@torch.no_grad()
def residual_statistics(model: FilteringAutoencoder, preprocessing: Preprocessing, items: Sequence[ImageInput],
                        batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the eval-mode residual at each pixel over the good training images, (1, 1, H, W)."""
    model.eval()
    with progress_bar("residual statistics", len(items)) as advance:
        def residuals():
            for chunk in batches(items, batch_size):
                yield model.residual(model.correction(torch.from_numpy(preprocessing(chunk))))
                advance(len(chunk))

        mean, std = mean_and_std(residuals(), dims=(0,))
    return mean, std.clamp_min(FITTED_STD_FLOOR)

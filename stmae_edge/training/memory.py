"""How much memory ST-MAE training will need at its peak, said before the backbone pass starts.

    the features kept for every good image (backbone and score-head features, fp16; a probe of one image)
      x PEAK_PER_KEPT + PEAK_BASE_BYTES                      (measured, docs/BENCHMARKS.md)
    against what this machine, or the container it runs in, has available

Running out of memory ends training in one line (cli.py), but only after the backbone pass and the
transformer's minutes; a folder too large for the machine is better said before either.
"""

from __future__ import annotations

import logging

import torch

from ..data import MIN_GOOD_IMAGES
from ..machine import available_memory_bytes

logger = logging.getLogger(__name__)

# Peak resident memory of the default preset grew by 1.64 MB per good image for 0.54 MB of features
# kept, from 2.6 GB (640 and 1,280 images: 3.61 and 4.66 GB; BENCHMARKS "Training memory on large folders")
PEAK_PER_KEPT = 3.05
PEAK_BASE_BYTES = 2.6e9
GB = 1e9


@torch.no_grad()
def kept_bytes_per_image(model, input_size: tuple[int, int]) -> int:
    """The bytes of features training keeps for each image: one image's through the frozen backbone."""
    features, score_features = model.extract_with_score(torch.zeros(1, 3, *input_size))
    return 2 * (features.numel() + (score_features.numel() if score_features is not None else 0))  # fp16


def peak_bytes(images: int, kept_per_image: int) -> float:
    """Estimated peak resident memory of training on `images` feature sets of `kept_per_image` bytes."""
    return PEAK_BASE_BYTES + PEAK_PER_KEPT * kept_per_image * images


def warn_if_short(images: int, feature_sets: int, kept_per_set: int) -> None:
    """A warning where the estimated peak exceeds the memory available, with the --max-images that fits.
    `feature_sets`: what is kept for the `images` good images (more than one each with crops or
    corrupted copies)."""
    have = available_memory_bytes()
    need = peak_bytes(feature_sets, kept_per_set)
    if have is None or need <= have:
        return
    sets_per_image = feature_sets / max(images, 1)
    fits = int((have - PEAK_BASE_BYTES) / (PEAK_PER_KEPT * kept_per_set * sets_per_image))
    fewer = f"train on fewer (--max-images {fits}) or" if fits >= MIN_GOOD_IMAGES else "train"
    what = f"{images} images" + (f" ({feature_sets} feature sets: crops or corrupted copies)" if feature_sets != images
                                 else "")
    logger.warning("training on %s needs about %.1f GB of memory at its peak and %.1f GB is available: it is "
                   "likely to run out after the backbone pass; %s on a machine with more memory", what, need / GB,
                   have / GB, fewer)

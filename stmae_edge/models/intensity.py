"""Per-image intensity normalisation, the first step inside the graph (presets with intensity_norm).

    preprocessed image (B, 3, H, W) ──> minus its own mean, divided by its own std (all channels
    together) ──> times target std, plus target mean ──> backbone

The target is the good training images' average mean and std (train.fit_intensity_target), so a
typical part is left almost as it was, while a brighter lamp, a longer exposure or a darker batch of
parts changes no feature. It is off in the default and on in `--preset small-intensity-norm`: on
ELPV it raised image AUROC, on magnetic_tile it cost localisation, since a large defect moves its
own image's mean and std and so shifts the rest of the tile (docs/BENCHMARKS.md, issue 15). A defect
that only makes a whole part brighter or darker is not seen with it.

The module is called under the attribute name `intensity` (INTENSITY_SCOPE): the exporter records
that name on its nodes, and the INT8 graph's fp16 conversion keeps just these nodes in fp32, since a
mean over 3 x H x W values overflows half precision's sums.
"""

from __future__ import annotations

import torch
from torch import nn

from .maps import mean_and_spread

# Below this std (in preprocessed units; one grey level of 255 is about 0.008) an image is flat: it is
# scaled as if its std were this floor, so a blank frame stays blank instead of dividing by zero.
INTENSITY_MIN_STD = 1e-3


def image_statistics(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's mean and (population) std over channels and pixels, (B, 1, 1, 1) each, in the
    images' dtype: what the module normalises by, and what training averages into its target."""
    return mean_and_spread(images, (1, 2, 3))


class IntensityNormalization(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # (mean, std) every image is brought to, in the preprocessed input's units; fitted at training
        self.register_buffer("target", torch.tensor([0.0, 1.0]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()  # fp32 inside an fp16 export too
        mean, std = image_statistics(x)
        target = self.target.float()
        return ((x - mean) / std.clamp(min=INTENSITY_MIN_STD) * target[1] + target[0]).to(images.dtype)

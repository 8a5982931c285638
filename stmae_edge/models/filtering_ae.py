"""The filtering autoencoder (Bauer, Nakajima, Mueller 2022): a fully convolutional image-space network
trained to turn images with synthetic defects back into the good image, so that at inference it
filters out whatever is not normal and leaves the rest as it was.

Data flow for one image (the names below are the methods):
  restore   image (3, H, W) -> U-Net: `levels` stages, each halving the resolution, dilated
            convolutions at the coarsest for context wider than a defect, skip connections back up;
            the network predicts a correction added to its input, so keeping good pixels is easy
            and removing defects is what training teaches
  anomaly   per-pixel squared residual over the channels, as a z-score against the good training
            images at that pixel, Gaussian-smoothed; image score = max of the map

One forward pass, no backbone, nothing random.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..metadata import FILTERING_AE_FAMILY
from .maps import ScoringScope, gaussian_kernel, maps_and_scores, smooth

FAMILY = FILTERING_AE_FAMILY


@dataclass(frozen=True)
class FilteringAEConfig:
    input_size: int = 256
    channels: tuple[int, ...] = (8, 16, 32, 64, 128)  # per level, full resolution first
    dilations: tuple[int, ...] = (1, 2, 4)  # residual 3x3 convolutions at the coarsest level
    smoothing_sigma: float = 4.0  # pixels
    position_norm: bool = True  # residual as a z-score against good images at the same pixel

    def __post_init__(self) -> None:
        if not self.channels or min(self.channels) < 1 or min(self.dilations, default=1) < 1 or self.input_size < 16:
            raise ConfigError(f"filtering-ae channels {self.channels} and dilations {self.dilations} must be "
                              f"positive and the input size {self.input_size} at least 16")
        if self.input_size % self.stride:
            raise ConfigError(f"input size {self.input_size} (the --crop side, when given) is not a multiple of "
                              f"{self.stride}, the downsampling of {len(self.channels)} levels")
        if not (math.isfinite(self.smoothing_sigma) and 0 < self.smoothing_sigma <= 64):
            raise ConfigError(f"smoothing sigma {self.smoothing_sigma} must be within (0, 64] pixels")

    @property
    def stride(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"], d["dilations"] = list(self.channels), list(self.dilations)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FilteringAEConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown model config keys {sorted(unknown)}: made by a newer stmae-edge?")
        d = dict(d)
        d["channels"], d["dilations"] = tuple(d["channels"]), tuple(d["dilations"])
        return cls(**d)


# "small": 0.85 M weights and about 0.75 GMAC per 256 x 256 image; on ONNX Runtime CPU it runs at 0.81x
# the ST-MAE small preset's throughput (docs/BENCHMARKS.md). "tiny" is for tests.
PRESETS: dict[str, FilteringAEConfig] = {
    "tiny": FilteringAEConfig(input_size=64, channels=(8, 16), dilations=(1, 2), smoothing_sigma=2.0),
    "small": FilteringAEConfig(),
}


def preset(name: str, **overrides) -> FilteringAEConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown {FAMILY} preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def conv(cin: int, cout: int, stride: int = 1, dilation: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=dilation * (kernel // 2),
                                   dilation=dilation), nn.SiLU())


class Context(nn.Module):
    """A residual dilated convolution: widens the receptive field without losing resolution."""

    def __init__(self, channels: int, dilation: int):
        super().__init__()
        self.conv = conv(channels, channels, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class Up(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.reduce = conv(cin, cout, kernel=1)  # 1x1: the 3x3 merge below does the spatial work
        self.merge = conv(2 * cout, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        # Nearest upsampling then a convolution: no checkerboard artefacts, and a plain ONNX Resize.
        x = self.reduce(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.merge(torch.cat([x, skip], dim=1))


class FilteringAutoencoder(nn.Module):
    def __init__(self, config: FilteringAEConfig):
        super().__init__()
        self.config = c = config
        ch = c.channels
        self.stem = nn.Sequential(conv(3, ch[0]), conv(ch[0], ch[0]))
        self.down = nn.ModuleList(nn.Sequential(conv(ch[i - 1], ch[i], stride=2), conv(ch[i], ch[i]))
                                  for i in range(1, len(ch)))
        self.context = nn.Sequential(*(Context(ch[-1], d) for d in c.dilations))
        self.up = nn.ModuleList(Up(ch[i], ch[i - 1]) for i in range(len(ch) - 1, 0, -1))
        self.head = nn.Conv2d(ch[0], 3, 1)
        nn.init.zeros_(self.head.weight)  # start as the identity: the correction is learnt from zero
        nn.init.zeros_(self.head.bias)
        self.register_buffer("smoothing_kernel", gaussian_kernel(c.smoothing_sigma))
        self.scoring = ScoringScope()
        # Image borders leave larger residuals on every good part; measuring each pixel against its
        # own good-image statistics keeps them from setting the image score.
        self.register_buffer("residual_mean", torch.zeros(1, 1, c.input_size, c.input_size))
        self.register_buffer("residual_std", torch.ones(1, 1, c.input_size, c.input_size))

    def correction(self, images: torch.Tensor) -> torch.Tensor:
        """Preprocessed images (B, 3, H, W), H and W multiples of config.stride -> what the filter changes."""
        skips = [self.stem(images)]
        for stage in self.down:
            skips.append(stage(skips[-1]))
        x = self.context(skips.pop())
        for stage in self.up:
            x = stage(x, skips.pop())
        return self.head(x)

    def restore(self, images: torch.Tensor) -> torch.Tensor:
        """The filtered images: the input with defects replaced by what good parts look like there."""
        return images + self.correction(images)

    @staticmethod
    def residual(correction: torch.Tensor) -> torch.Tensor:
        """Per-pixel squared residual (input - restored = -correction) over the channels: (B, 1, H, W).
        Taken from the correction itself, not from a difference of two near-equal images, so fp16 and
        INT8 graphs lose nothing to cancellation."""
        return correction.float().pow(2).mean(dim=1, keepdim=True)

    def anomaly_map(self, correction: torch.Tensor) -> torch.Tensor:
        """Residual, normalised per pixel if configured, then smoothed: (B, 1, H, W), in float32 (as in
        ST-MAE, the reductions are where half precision would lose what the score depends on)."""
        residual = self.residual(correction)
        if self.config.position_norm:
            residual = (residual - self.residual_mean.float()) / self.residual_std.float()
        return smooth(residual, self.smoothing_kernel.float())

    @staticmethod
    def loss(corrupted: torch.Tensor, restored: torch.Tensor, target: torch.Tensor,
             defect_weight: float = 0.0) -> torch.Tensor:
        """Squared error to the good image, each pixel where the input was corrupted weighted
        1 + defect_weight: defects cover a few percent of an image, and without the weight the
        identity is nearly optimal and learning to remove them takes many times the steps."""
        error = (restored - target).pow(2).mean(dim=1, keepdim=True)
        weight = 1.0 + defect_weight * ((corrupted - target).abs().amax(dim=1, keepdim=True) > 0).float()
        return (weight * error).sum() / weight.sum()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, H, W), preprocessed -> anomaly maps (B, 1, H, W) and image scores (B,)."""
        return maps_and_scores(self.scoring(self.anomaly_map, self.correction(images)), images.shape[-2:])

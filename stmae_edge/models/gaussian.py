"""A Gaussian per feature-grid position (PaDiM, Defard et al. 2021), the one definition shared by the
Gaussian baseline and ST-MAE's fused map.

    features (N, C, G, G) of good images -> per position p: mean (C,), covariance + eps * I -> precision
    score: Mahalanobis distance sqrt((x - mean)^T precision (x - mean)) per position
"""

from __future__ import annotations

import torch

from ..errors import DatasetError

GAUSSIAN_CHUNK = 64  # images added to the sums at a time: the grouping fixes the float64 rounding


@torch.no_grad()
def fit_position_gaussian(features: torch.Tensor, eps: float, chunk: int = GAUSSIAN_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (P, C) and precision (P, C, C), P = G * G, of good images' features, in float64 chunk by
    chunk (memory stays at one chunk), returned as float32."""
    sums = PositionGaussianSums()
    for part in features.split(chunk):
        sums.add(part)
    return sums.fit(eps)


class PositionGaussianSums:
    """A per-position Gaussian's sums, added GAUSSIAN_CHUNK images at a time, for features that are
    never all in memory at once (training on thousands of images); fit_position_gaussian in one piece."""

    def __init__(self):
        self.count = 0
        self.total: torch.Tensor | None = None
        self.products: torch.Tensor | None = None

    def add(self, part: torch.Tensor) -> None:
        b, c, g, w = part.shape
        x = part.double().reshape(b, c, g * w).permute(2, 0, 1)  # (P, b, C)
        if self.total is None:
            self.total = torch.zeros(g * w, c, dtype=torch.float64)
            self.products = torch.zeros(g * w, c, c, dtype=torch.float64)
        self.total += x.sum(dim=1)
        self.products += x.transpose(1, 2) @ x
        self.count += b

    def fit(self, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean (P, C), precision (P, C, C)) as float32.

        Raises:
            DatasetError: fewer than two images were added.
        """
        n = self.count
        if n < 2:
            raise DatasetError("a per-position Gaussian needs at least two images")
        c = self.total.shape[1]
        mean = self.total / n
        cov = (self.products - n * mean.unsqueeze(2) * mean.unsqueeze(1)) / (n - 1)
        cov += eps * torch.eye(c, dtype=torch.float64)
        # Symmetric positive definite by construction: a float64 Cholesky inverse is exact and stable
        # where a batched LU inverse (torch.linalg.inv) failed inside MKL on 1024 matrices of 176x176.
        return mean.float(), torch.cholesky_inverse(torch.linalg.cholesky(cov)).float()


def mahalanobis(features: torch.Tensor, mean: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """features (B, C, G, G) -> distance per position (B, 1, G, G), as batched MatMuls over positions
    (what ONNX exporters and TensorRT take)."""
    b, c, g, w = features.shape
    centred = features.float().reshape(b, c, g * w).permute(2, 0, 1) - mean.float().unsqueeze(1)  # (P, B, C)
    squared = ((centred @ precision.float()) * centred).sum(dim=-1)  # (P, B)
    return squared.clamp_min(0).sqrt().permute(1, 0).reshape(b, 1, g, w)


def projected_mahalanobis(features: torch.Tensor, projection: torch.Tensor, mean: torch.Tensor,
                          precision: torch.Tensor) -> torch.Tensor:
    """features (B, C, G, G) -> projected on `projection` (C, K) -> distance per position (B, 1, G, G)."""
    b, c, g, w = features.shape
    projected = features.float().reshape(b, c, g * w).transpose(1, 2) @ projection.float()
    return mahalanobis(projected.transpose(1, 2).reshape(b, -1, g, w), mean, precision)

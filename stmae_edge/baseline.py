"""A simple baseline on the same frozen features: a Gaussian per feature-grid position (PaDiM-style).

Fit: mean and covariance of the C-dimensional feature vector at each of the G x G positions over the
good images (+ eps * I so the inverse exists). Score: Mahalanobis distance per position, smoothed
and upsampled exactly like ST-MAE's map, image score = max. It answers "does the transformer earn
its keep over plain statistics of the same features?".
"""

from __future__ import annotations

import torch

from .models.maps import gaussian_kernel, maps_and_scores, smooth


class GaussianBaseline:
    def __init__(self, eps: float = 0.01, smoothing_sigma: float = 0.5):
        self.eps = eps
        self.kernel = gaussian_kernel(smoothing_sigma)
        self.mean: torch.Tensor | None = None  # (P, C), P = G * G positions
        self.precision: torch.Tensor | None = None  # (P, C, C)
        self.grid = 0

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> "GaussianBaseline":
        """features: raw backbone features of good images (N, C, G, G), any float dtype."""
        n, c, g, _ = features.shape
        self.grid = g
        x = features.float().flatten(2).permute(2, 0, 1)  # (P, N, C)
        self.mean = x.mean(dim=1)
        centred = x - self.mean[:, None]
        cov = (centred.transpose(1, 2) @ centred / max(1, n - 1)).double() + self.eps * torch.eye(c, dtype=torch.float64)
        # Symmetric positive definite by construction: a float64 Cholesky inverse is exact and stable
        # where a batched LU inverse (torch.linalg.inv) failed inside MKL on 1024 matrices of 176x176.
        self.precision = torch.cholesky_inverse(torch.linalg.cholesky(cov)).float()
        return self

    @torch.no_grad()
    def score(self, features: torch.Tensor, output_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, C, G, G) -> maps (B, 1, H, W) and image scores (B,), as STMAE.forward returns."""
        if self.mean is None:
            raise RuntimeError("fit the baseline before scoring")
        b = features.shape[0]
        d = features.float().flatten(2).permute(2, 0, 1) - self.mean[:, None]  # (P, B, C)
        distance = torch.einsum("pbc,pcd,pbd->bp", d, self.precision, d).clamp_min(0).sqrt()
        grid_map = smooth(distance.view(b, 1, self.grid, self.grid), self.kernel)
        return maps_and_scores(grid_map, output_size)

"""Baselines on the same frozen features, the detectors a user could pick instead of ST-MAE.

GaussianBaseline, a Gaussian per feature-grid position (PaDiM-style; models/gaussian.py). Fit: mean
and covariance of the C-dimensional feature vector at each of the G x G positions over the good images
(+ eps * I so the inverse exists). Score: Mahalanobis distance per position, smoothed and upsampled
exactly like ST-MAE's map, image score = max. It answers "does the transformer earn its keep over
plain statistics of the same features?".

PatchCoreBaseline, a nearest-neighbour memory bank with greedy coreset subsampling (PatchCore-style),
as a user of anomalib would run it.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..models.gaussian import fit_position_gaussian, mahalanobis
from ..models.maps import gaussian_kernel, maps_and_scores, neighbourhood_mean, smooth


class GaussianBaseline:
    def __init__(self, eps: float = 0.01, smoothing_sigma: float = 0.5):
        self.eps = eps
        self.kernel = gaussian_kernel(smoothing_sigma)
        self.mean: torch.Tensor | None = None  # (P, C), P = G * G positions
        self.precision: torch.Tensor | None = None  # (P, C, C)

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> GaussianBaseline:
        """features: raw backbone features of good images (N, C, G, G), any float dtype."""
        self.mean, self.precision = fit_position_gaussian(features, self.eps)
        return self

    @torch.no_grad()
    def score(self, features: torch.Tensor, output_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """features (B, C, G, G) -> maps (B, 1, H, W) and image scores (B,), as STMAE.forward returns."""
        if self.mean is None:
            raise RuntimeError("fit the baseline before scoring")
        grid_map = smooth(mahalanobis(features, self.mean, self.precision), self.kernel)
        return maps_and_scores(grid_map, output_size)


def greedy_coreset(vectors: torch.Tensor, count: int, projection_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Indices of `count` rows chosen by greedy k-center selection (PatchCore, Roth et al. 2022): each
    pick is the row farthest from all picked so far. Distances are taken in a seeded random projection
    to `projection_dim` dimensions, as PatchCore and anomalib do, to make the selection affordable."""
    n = vectors.shape[0]
    if not 1 <= count <= n:
        raise ConfigError(f"coreset size {count} must be within 1..{n}")
    generator = torch.Generator().manual_seed(seed)
    x = vectors.float()
    if x.shape[1] > projection_dim:
        x = x @ (torch.randn(x.shape[1], projection_dim, generator=generator) / projection_dim ** 0.5)
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2: one matrix-vector product a pick, no (n, dim) temporaries.
    norms = x.pow(2).sum(dim=1)
    picked = torch.empty(count, dtype=torch.long)
    picked[0] = int(torch.randint(n, (1,), generator=generator))
    nearest = torch.full((n,), float("inf"))
    for k in range(count):
        if k:
            picked[k] = int(nearest.argmax())
        centre = x[picked[k]]
        torch.minimum(nearest, norms - 2 * (x @ centre) + norms[picked[k]], out=nearest)
    return picked


class PatchCoreBaseline:
    """PatchCore-style nearest-neighbour baseline on the same frozen features (Roth et al. 2022).

    Fit: every grid position of every good image, after 3x3 neighbourhood averaging, goes into a memory
    bank, which greedy coreset selection cuts to `coreset_ratio` of its size. Score: distance of each
    position's averaged feature to its nearest bank entry, smoothed and upsampled like the other maps,
    image score = max. Position is not part of the feature: PatchCore does not know where a patch was.
    """

    def __init__(self, coreset_ratio: float = 0.01, neighbourhood: int = 3, smoothing_sigma: float = 0.5,
                 seed: int = 0):
        if not 0 < coreset_ratio <= 1:
            raise ConfigError(f"coreset ratio {coreset_ratio} must be within (0, 1]")
        self.coreset_ratio = coreset_ratio
        self.neighbourhood = neighbourhood
        self.kernel = gaussian_kernel(smoothing_sigma)
        self.seed = seed
        self.bank: torch.Tensor | None = None

    def _aggregate(self, features: torch.Tensor) -> torch.Tensor:
        return neighbourhood_mean(features.float(), self.neighbourhood)

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> PatchCoreBaseline:
        """features: raw backbone features of good images (N, C, G, G)."""
        patches = self._aggregate(features).permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        count = max(1, int(round(patches.shape[0] * self.coreset_ratio)))
        self.bank = patches[greedy_coreset(patches, count, seed=self.seed)].contiguous()
        return self

    @torch.no_grad()
    def score(self, features: torch.Tensor, output_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.bank is None:
            raise RuntimeError("fit the baseline before scoring")
        b, c, g, _ = features.shape
        queries = self._aggregate(features).permute(0, 2, 3, 1).reshape(-1, c)
        distance = torch.cdist(queries, self.bank).amin(dim=1)
        grid_map = smooth(distance.view(b, 1, g, g), self.kernel)
        return maps_and_scores(grid_map, output_size)

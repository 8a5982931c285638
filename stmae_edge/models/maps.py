"""From a residual to what the user sees, shared by every model family: Gaussian smoothing, the map
at input size, and the image score as the map's maximum (which an ST-MAE score head replaces with
the maximum of its own map, models/stmae.py). Also the one per-image mean and spread that the
graph's normalisations divide by (intensity, score head, scaled Gaussian input), and the neighbourhood
mean that PatchCore and ST-MAE's wide Gaussian average cells with."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def mean_and_spread(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (not Bessel-corrected) over `dims`, kept as size-1 axes, in x's dtype."""
    mean = x.mean(dim=dims, keepdim=True)
    return mean, (x - mean).pow(2).mean(dim=dims, keepdim=True).sqrt()


class ScoringScope(torch.nn.Module):
    """Runs a model's anomaly map (and ST-MAE's score head) under the name `scoring` (the model's
    attribute holding it).

    It holds no weights and computes nothing of its own. It is there for the exporter, which records
    the module path of every node: calibrate reads it to find the part of the graph that scores, and
    keeps that part in fp32 when the rest of the INT8 graph goes to fp16 (half_precision.SCORING_SCOPE).
    """

    def forward(self, anomaly_map, *inputs: torch.Tensor) -> torch.Tensor:
        return anomaly_map(*inputs)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k1 = torch.exp(-0.5 * (t / sigma) ** 2)
    k1 = k1 / k1.sum()
    return (k1[:, None] * k1[None, :])[None, None]


def smooth(grid_map: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    pad = kernel.shape[-1] // 2
    return F.conv2d(F.pad(grid_map, (pad, pad, pad, pad), mode="replicate"), kernel)


def neighbourhood_mean(grid: torch.Tensor, size: int) -> torch.Tensor:
    """Each cell replaced by the mean of the size x size cells around it (size odd; at the edges, of the
    cells there). PatchCore's local aggregation, and the input of ST-MAE's wide Gaussian
    (models/stmae.py).

    As two AveragePools in an exported graph, down the columns and then along the rows: the window is
    a product of two intervals, also where the edges cut it, so the mean over it is the mean of the
    column means, exactly, and ONNX Runtime CPU runs the two about five times faster than one 21 x 21
    pool on the default's residual (docs/BENCHMARKS.md)."""
    half = size // 2
    down = F.avg_pool2d(grid, (size, 1), stride=1, padding=(half, 0), count_include_pad=False)
    return F.avg_pool2d(down, (1, size), stride=1, padding=(0, half), count_include_pad=False)


def maps_and_scores(grid_map: torch.Tensor, size) -> tuple[torch.Tensor, torch.Tensor]:
    """Map -> map at input size and image score. The score is the max of the map the user sees, so an
    image over the threshold always has pixels over the same threshold (unless a score head replaces
    the score, models/stmae.py)."""
    if tuple(grid_map.shape[-2:]) != tuple(size):
        grid_map = F.interpolate(grid_map, size=size, mode="bilinear", align_corners=False)
    return grid_map, grid_map.flatten(1).amax(dim=1)

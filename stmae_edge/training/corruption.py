"""Synthetic defects for self-supervised training (Bauer, Nakajima, Mueller 2022): good images get
spatially coherent corruptions, and a model learns to restore the good image.

Each defect is a shape (ellipse, polygon, blob or scratch) of random size and position, filled with a
texture from another training image, a shifted or rotated copy of the same image, or noise, at a
random opacity. Optional i.i.d. Gaussian noise goes on the whole image first and stays in the target
(the 2025 follow-up), so the model learns to remove defects, not noise.

Everything is seeded per sample: `corrupt(image, donors, rng)` with `np.random.default_rng((seed, i))`
gives the same defects for sample i on every run. numpy and OpenCV only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from ..preprocessing import cv2, to_float

SHAPES = ("ellipse", "polygon", "blob", "scratch")
SOURCES = ("other", "shifted", "rotated", "noise")


@dataclass(frozen=True)
class CorruptionConfig:
    probability: float = 0.9  # chance that an image gets defects at all (some stay clean: learn identity)
    max_defects: int = 3
    min_size: float = 0.04  # defect extent, as a fraction of the shorter image side
    max_size: float = 0.3
    min_opacity: float = 0.4
    max_opacity: float = 1.0
    shapes: tuple[str, ...] = SHAPES
    sources: tuple[str, ...] = SOURCES
    noise_std: float = 0.0  # Gaussian noise on the whole image, intensities in [0, 1]; kept in the target

    def __post_init__(self) -> None:
        if not (0 <= self.probability <= 1 and self.max_defects >= 1 and 0 < self.min_size <= self.max_size <= 1
                and 0 < self.min_opacity <= self.max_opacity <= 1 and self.noise_std >= 0):
            raise ConfigError(f"corruption settings out of range: {self}")
        unknown = (set(self.shapes) - set(SHAPES)) | (set(self.sources) - set(SOURCES))
        if unknown or not self.shapes or not self.sources:
            raise ConfigError(f"unknown or empty corruption shapes/sources {sorted(unknown)}; "
                              f"use {SHAPES} and {SOURCES}")


@dataclass(frozen=True)
class Corruption:
    corrupted: np.ndarray  # float32 in [0, 1], the image's shape: the model's input
    target: np.ndarray  # float32 in [0, 1]: the good image (with the same noise, if any): what to restore
    mask: np.ndarray  # bool (H, W): exactly the pixels where corrupted differs from target
    defects: tuple[tuple[str, str], ...]  # (shape, source) of each defect, for inspection and tests


def corrupt(image: np.ndarray, donors: Sequence[np.ndarray], rng: np.random.Generator,
            config: CorruptionConfig = CorruptionConfig(), bit_depth: int = 16) -> Corruption:
    """One corrupted sample of a decoded image (gray or BGR, 8/16-bit or float in [0, 1]); uint16
    images and donors hold `bit_depth` significant bits (Preprocessing.bit_depth)."""
    target = to_float(image, bit_depth)
    if config.noise_std > 0:
        target = np.clip(target + rng.normal(0, config.noise_std, target.shape).astype(np.float32), 0, 1)
    corrupted = target.copy()
    defects = []
    if rng.random() < config.probability:
        for _ in range(int(rng.integers(1, config.max_defects + 1))):
            shape = config.shapes[int(rng.integers(len(config.shapes)))]
            source = config.sources[int(rng.integers(len(config.sources)))]
            footprint = _shape_mask(shape, target.shape[:2], rng, config)
            texture = _texture(source, target, donors, rng, bit_depth)
            alpha = np.float32(rng.uniform(config.min_opacity, config.max_opacity))
            weight = footprint.astype(np.float32) * alpha
            if corrupted.ndim == 3:
                weight = weight[:, :, None]
            corrupted = corrupted * (1 - weight) + texture * weight
            defects.append((shape, source))
    corrupted = np.clip(corrupted, 0, 1).astype(np.float32)
    changed = corrupted != target
    mask = changed.any(axis=2) if changed.ndim == 3 else changed
    return Corruption(corrupted, target, mask, tuple(defects))


def _shape_mask(shape: str, size: tuple[int, int], rng: np.random.Generator, config: CorruptionConfig) -> np.ndarray:
    height, width = size
    side = min(height, width)
    extent = max(2, int(side * rng.uniform(config.min_size, config.max_size)))
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    canvas = np.zeros((height, width), np.uint8)
    if shape == "ellipse":
        axes = (max(1, extent // 2), max(1, int(extent * rng.uniform(0.2, 1.0)) // 2))
        cv2.ellipse(canvas, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    elif shape == "polygon":
        count = int(rng.integers(3, 9))
        angles = np.sort(rng.uniform(0, 2 * np.pi, count))
        radii = rng.uniform(0.3, 1.0, count) * extent / 2
        points = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
        cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 1)
    elif shape == "blob":  # thresholded smooth noise: irregular, stain-like outlines
        box = max(4, extent)
        noise = cv2.GaussianBlur(rng.random((box, box)).astype(np.float32), (0, 0), box / 8)
        ys, xs = np.mgrid[:box, :box]
        falloff = 1 - np.hypot(ys - box / 2, xs - box / 2) / (box / 2)
        blob = ((noise - noise.mean()) / (noise.std() + 1e-6) * 0.3 + falloff > 0.5).astype(np.uint8)
        top, left = cy - box // 2, cx - box // 2
        y0, x0 = max(0, top), max(0, left)
        y1, x1 = min(height, top + box), min(width, left + box)
        if y1 > y0 and x1 > x0:
            canvas[y0:y1, x0:x1] = blob[y0 - top:y1 - top, x0 - left:x1 - left]
    else:  # scratch: a thin polyline
        points = [(cx, cy)]
        direction = rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(2, 5))):
            direction += rng.normal(0, 0.4)
            step = extent / 2
            points.append((int(points[-1][0] + step * np.cos(direction)), int(points[-1][1] + step * np.sin(direction))))
        cv2.polylines(canvas, [np.array(points, np.int32)], False, 1, max(1, int(side * rng.uniform(0.005, 0.02))))
    return canvas.astype(bool)


def _texture(source: str, image: np.ndarray, donors: Sequence[np.ndarray], rng: np.random.Generator,
             bit_depth: int = 16) -> np.ndarray:
    """A full-size float texture in the image's channel layout, to be shown through a defect's shape."""
    height, width = image.shape[:2]
    if source == "other" and donors:
        donor = to_float(donors[int(rng.integers(len(donors)))], bit_depth)
        if donor.ndim != image.ndim:
            donor = cv2.cvtColor(donor, cv2.COLOR_GRAY2BGR if image.ndim == 3 else cv2.COLOR_BGR2GRAY)
        if donor.shape[0] < height or donor.shape[1] < width:
            donor = cv2.resize(donor, (max(width, donor.shape[1]), max(height, donor.shape[0])))
        y = int(rng.integers(0, donor.shape[0] - height + 1))
        x = int(rng.integers(0, donor.shape[1] - width + 1))
        return np.ascontiguousarray(donor[y:y + height, x:x + width])
    if source in ("shifted", "other"):  # "other" without donors falls back to the image itself
        dy = int(rng.integers(height // 4, max(height // 4 + 1, 3 * height // 4)))
        dx = int(rng.integers(width // 4, max(width // 4 + 1, 3 * width // 4)))
        return np.roll(image, (dy, dx), axis=(0, 1))
    if source == "rotated":
        matrix = cv2.getRotationMatrix2D((width / 2, height / 2), float(rng.uniform(30, 330)), 1.0)
        return cv2.warpAffine(image, matrix, (width, height), borderMode=cv2.BORDER_REFLECT_101)
    scale = float(rng.uniform(1, 8))  # noise: smooth random texture of random grain and contrast
    noise = cv2.GaussianBlur(rng.random(image.shape).astype(np.float32), (0, 0), scale)
    noise = (noise - noise.min()) / (np.ptp(noise) + 1e-6)
    low = rng.uniform(0, 0.7)
    return (low + noise * rng.uniform(0.1, 1 - low)).astype(np.float32)

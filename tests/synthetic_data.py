"""Synthetic good parts and a small MVTec-layout dataset, for the tests and for the scripts that need
data without ../shared (scripts/gpu_acceptance.py, benchmarks/): numpy and OpenCV only, no pytest."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def texture(rng: np.random.Generator, height: int, width: int | None = None) -> np.ndarray:
    """A smooth random texture with fine grain, float in 0..255: 'good parts' (or a good line-scan web)
    that still vary from image to image. Shared by every test that needs good material."""
    width = height if width is None else width
    coarse = cv2.resize(rng.normal(128, 20, (height // 8, width // 8)), (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(coarse + rng.normal(0, 4, (height, width)), 0, 255)


def make_synthetic_dataset(root: Path, n_train: int = 24, n_good: int = 6, n_bad: int = 6, size: int = 96,
                           seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for folder in ("train/good", "test/good", "test/scratch", "ground_truth/scratch"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        cv2.imwrite(str(root / "train/good" / f"{i:03d}.png"), texture(rng, size).astype(np.uint8))
    for i in range(n_good):
        cv2.imwrite(str(root / "test/good" / f"{i:03d}.png"), texture(rng, size).astype(np.uint8))
    for i in range(n_bad):
        image = texture(rng, size)
        mask = np.zeros((size, size), np.uint8)
        x, y = rng.integers(size // 6, size - size // 3, 2)
        cv2.rectangle(mask, (int(x), int(y)), (int(x) + size // 5, int(y) + size // 12), 255, -1)
        image[mask > 0] = 250
        cv2.imwrite(str(root / "test/scratch" / f"{i:03d}.png"), image.astype(np.uint8))
        cv2.imwrite(str(root / "ground_truth/scratch" / f"{i:03d}_mask.png"), mask)
    return root

"""Shared fixtures: a small synthetic MVTec-layout dataset and the path to ../shared datasets."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


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


def rank_correlation(a, b) -> float:
    """Spearman's rank correlation of two score lists: how alike two models (fp32 and INT8, say) rank
    the same images. INT8 is promised to rank like FP32, not to match its numbers: ONNX Runtime's INT8
    kernels give different numbers on CPUs with and without AVX-512/VNNI."""
    ranks = [np.argsort(np.argsort(np.asarray(v))) for v in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="session")
def magnetic_tile() -> Path:
    path = SHARED_DATASETS / "magnetic_tile"
    if not ((path / "train" / "good").is_dir() and (path / "test").is_dir()):
        pytest.skip(f"needs the magnetic_tile dataset at {path} (CI has ../shared; users do not)")
    return path


@pytest.fixture(scope="session")
def tiny_export(synthetic_dataset, tmp_path_factory):
    """A tiny model trained on the synthetic set and its fp32 ONNX export: (checkpoint, onnx, export figures).

    Shared by the export, engine and calibration tests; they add files beside it but change none."""
    from stmae_edge.engines.export import export_onnx
    from stmae_edge.models.stmae import preset
    from stmae_edge.training.train import TrainConfig, train

    folder = tmp_path_factory.mktemp("tiny_export")
    train(synthetic_dataset, folder / "m.pt", preset("tiny"), TrainConfig(epochs=2, batch_size=8),
          backbone_weights="random")
    path, figures = export_onnx(folder / "m.pt", folder / "m.onnx")
    return folder / "m.pt", path, figures

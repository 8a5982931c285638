"""Shared fixtures: a small synthetic MVTec-layout dataset and the path to ../shared datasets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from synthetic_data import make_synthetic_dataset, texture  # noqa: F401  (without pytest: scripts use them too)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = REPO.parent / "shared" / "datasets"


# Full TensorRT (a Jetson, pip's tensorrt) or TensorRT for RTX (what CI installs): either builds plans.
TENSORRT_PRESENT = any(__import__("importlib").util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx_bindings"))
NO_TENSORRT = "needs TensorRT or TensorRT for RTX: pip install '.[rtx]' (scripts/test.sh does)"
needs_tensorrt = pytest.mark.skipif(not TENSORRT_PRESENT, reason=NO_TENSORRT)


def require_tensorrt() -> None:
    """Skip the rest of a test where neither TensorRT is installed (its checks before this have run)."""
    if not TENSORRT_PRESENT:
        pytest.skip(NO_TENSORRT)


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


@pytest.fixture(scope="session")
def other_tiny_export(synthetic_dataset, tmp_path_factory):
    """Another tiny model (another seed: other weights, another model hash) and its fp32 export, for what
    happens when a file is replaced by another model's: (checkpoint, onnx)."""
    from stmae_edge.engines.export import export_onnx
    from stmae_edge.models.stmae import preset
    from stmae_edge.training.train import TrainConfig, train

    folder = tmp_path_factory.mktemp("other_tiny_export")
    train(synthetic_dataset, folder / "m.pt", preset("tiny"), TrainConfig(epochs=1, batch_size=8, seed=1),
          backbone_weights="random")
    path, _ = export_onnx(folder / "m.pt", folder / "m.onnx")
    return folder / "m.pt", path


@pytest.fixture(scope="session")
def tiny_fp16_export(tiny_export):
    """tiny_export's model exported as fp16, beside it: (checkpoint, onnx, export figures). An export
    takes 15 to 25 s here; the tests that only read this graph share it (copy it to change it)."""
    from stmae_edge.engines.export import export_onnx

    checkpoint, path, _ = tiny_export
    fp16_path, figures = export_onnx(checkpoint, path.with_name("m.fp16.onnx"), "fp16")
    return checkpoint, fp16_path, figures


def pytest_configure(config):
    """Under pytest-xdist, each worker on cores of its own (its subprocesses inherit them): workers that
    share every core oversubscribe them, PyTorch's and ONNX Runtime's threads waiting on each other."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= count:
        os.sched_setaffinity(0, cores[int(worker[2:]) % count::count])

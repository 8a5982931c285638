"""The filtering autoencoder, the second model family: trained on self-made defects, carried through the
same checkpoint, export, verification, calibration, engine build and runtime as ST-MAE."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch
from conftest import needs_tensorrt, rank_correlation

from stmae_edge import data
from stmae_edge.checkpoint import load_model
from stmae_edge.engines.calibrate import FAMILY_SETTINGS, calibrate, output_convs
from stmae_edge.engines.export import TENSORRT_OPS, export_onnx
from stmae_edge.engines.verify import verify
from stmae_edge.errors import ConfigError
from stmae_edge.evaluation.evaluate import evaluate
from stmae_edge.metadata import ModelMetadata
from stmae_edge.models.families import FAMILIES
from stmae_edge.models.filtering_ae import FilteringAEConfig, FilteringAutoencoder, preset
from stmae_edge.preprocessing import load_image
from stmae_edge.runtime import Detector
from stmae_edge.training.filtering import training_pairs
from stmae_edge.training.train import TrainConfig, preprocessing_for, train

CFG = TrainConfig(epochs=100, batch_size=4, lr=3e-3, seed=0)


@pytest.fixture(scope="module")
def trained(synthetic_dataset, tmp_path_factory):
    folder = tmp_path_factory.mktemp("filtering_ae")
    meta = train(synthetic_dataset, folder / "ae.pt", preset("tiny"), CFG)
    return folder / "ae.pt", meta


@pytest.fixture(scope="module")
def exported(trained):
    path, _ = trained
    onnx_path, figures = export_onnx(path, path.with_suffix(".onnx"))
    return onnx_path, figures


def test_filter_runs_at_any_size_and_the_residual_is_what_it_changed():
    torch.manual_seed(0)
    model = FilteringAutoencoder(preset("tiny")).eval()
    torch.nn.init.normal_(model.head.weight, std=0.1)  # a non-identity filter
    for shape in ((2, 3, 64, 64), (1, 3, 96, 128)):
        x = torch.randn(shape)
        with torch.no_grad():
            restored = model.restore(x)
            residual = model.residual(model.correction(x))
        assert restored.shape == x.shape
        torch.testing.assert_close(residual, (x - restored).pow(2).mean(dim=1, keepdim=True), rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="multiple of 16"):
        FilteringAEConfig(input_size=200)
    assert FilteringAEConfig.from_dict(preset("small").to_dict()) == preset("small")
    with pytest.raises(ConfigError, match="unknown model config keys"):
        FilteringAEConfig.from_dict({**preset("small").to_dict(), "heads": 4})


def test_training_pairs_are_seeded_fresh_every_epoch_with_the_good_image_as_target(synthetic_dataset):
    items = data.train_images(synthetic_dataset)[:6]
    donors = [load_image(p) for p in items[:3]]
    preprocessing = preprocessing_for(preset("tiny"))
    a = training_pairs(items, range(6), donors, preprocessing, epoch=1, seed=0)
    b = training_pairs(items, range(6), donors, preprocessing, epoch=1, seed=0)
    c = training_pairs(items, range(6), donors, preprocessing, epoch=2, seed=0)
    assert all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])  # fresh defects every epoch
    assert np.array_equal(a[1], preprocessing(items))  # the target is the good image itself


def test_checkpoint_names_its_family_and_training_is_seeded(trained, synthetic_dataset, tmp_path):
    path, meta = trained
    model, loaded = load_model(path)
    assert isinstance(model, FilteringAutoencoder) and loaded.model_family == "filtering-ae"
    assert loaded.config == preset("tiny").to_dict()
    assert loaded.training["self_supervised"] is True
    assert meta.thresholds.image > meta.score_stats.mean
    short = replace(CFG, epochs=2)
    first, second = (train(synthetic_dataset, tmp_path / f"{k}.pt", preset("tiny"), short) for k in "ab")
    assert first.model_hash == second.model_hash
    assert train(synthetic_dataset, tmp_path / "c.pt", preset("tiny"), replace(short, seed=1)).model_hash != first.model_hash


def test_training_teaches_the_filter_to_remove_defects(trained, synthetic_dataset):
    """Good test images it never trained on, with fresh synthetic defects: inside the defects, the
    restored image is much closer to the good image than the corrupted input was; elsewhere it stays
    close to the input."""
    path, meta = trained
    model, _ = load_model(path)
    items = [s.path for s in data.eval_samples(synthetic_dataset) if s.label == 0]
    donors = [load_image(p) for p in data.train_images(synthetic_dataset)[:4]]
    corrupted, good = training_pairs(items, range(len(items)), donors, meta.preprocessing, epoch=999, seed=1)
    with torch.no_grad():
        restored = model.restore(torch.from_numpy(corrupted)).numpy()
    defect = np.abs(corrupted - good).sum(axis=1) > 1e-3
    before = ((corrupted - good) ** 2).mean(axis=1)[defect].mean()
    after = ((restored - good) ** 2).mean(axis=1)[defect].mean()
    assert after < 0.8 * before, (after, before)  # the identity gives 1.0; measured 0.56
    assert ((restored - corrupted) ** 2).mean(axis=1)[~defect].mean() < 0.1 * before


def test_export_verifies_and_uses_only_tensorrt_ops(trained, exported):
    path, _ = trained
    onnx_path, figures = exported
    assert set(figures["ops"]) <= TENSORRT_OPS and "Conv" in figures["ops"] and "MatMul" not in figures["ops"]
    assert figures["shapes"]["anomaly_map"] == ["batch", 1, 64, 64] and figures["shapes"]["score"] == ["batch"]
    assert ModelMetadata.from_onnx(onnx_path).model_family == "filtering-ae"
    result = verify(onnx_path, path)
    assert max(b["map_max_rel_diff"] for b in result["batches"].values()) < 1e-4


def test_int8_calibration_quantises_the_convolutions_but_not_the_anomaly_signal(exported, synthetic_dataset,
                                                                                 tmp_path):
    assert set(FAMILY_SETTINGS) == set(FAMILIES)
    onnx_path, _ = exported
    out, report = calibrate(onnx_path, out=tmp_path / "ae.int8.onnx", cache_dir=tmp_path / "cache")
    assert report["settings"]["op_types"] == ["Conv"] and report["quantized_nodes"] > 0
    proto = onnx.load(str(out))
    dequantised = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    produced_by = {o: n for n in proto.graph.node for o in n.output}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    head_and_smoothing = set(output_convs(onnx.load(str(onnx_path))))
    assert len(head_and_smoothing) == 2  # the correction head (3 channels) and the smoothing (1)
    for conv in convs:
        quantised = conv.input[0] in dequantised
        assert quantised == (conv.name not in head_and_smoothing), conv.name
        # nothing downstream of an output conv is clipped to the calibration range either
        if conv.name in head_and_smoothing:
            assert not any(n.op_type == "QuantizeLinear" and conv.output[0] in n.input for n in proto.graph.node)
    assert all(produced_by.get(c.input[0]) is None or produced_by[c.input[0]].op_type != "DequantizeLinear"
               for c in convs if c.name in head_and_smoothing)
    # INT8 ranks the test images as fp32 does: its scores are not flattened at the good images' range
    paths = [s.path for s in data.eval_samples(synthetic_dataset)]
    with Detector(onnx_path) as fp32, Detector(out) as int8:
        full = np.array([r.score for r in fp32.predict(paths)])
        quantised_scores = np.array([r.score for r in int8.predict(paths)])
    assert rank_correlation(full, quantised_scores) > 0.8


@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_engines_build_from_every_graph_the_family_emits(trained, exported, precision, tmp_path):
    from stmae_edge.engines.build import build_engine

    onnx_path, _ = exported
    if precision == "fp16":
        onnx_path, _ = export_onnx(trained[0], tmp_path / "ae.fp16.onnx", "fp16")
    elif precision == "int8":
        onnx_path, _ = calibrate(onnx_path, out=tmp_path / "ae.int8.onnx", cache_dir=tmp_path / "cache")
    plan, sidecar = build_engine(onnx_path, precision, "1:4:8", tmp_path / f"ae.{precision}.plan")
    assert plan.stat().st_size > 10_000 and sidecar["metadata"]["model_family"] == "filtering-ae"


def test_runtime_runs_it_like_any_other_model(trained, exported, synthetic_dataset):
    path, meta = trained
    onnx_path, _ = exported
    model, _ = load_model(path)
    paths = sorted((synthetic_dataset / "test").rglob("*.png"))[:6]
    with Detector(onnx_path) as detector:
        results = detector.predict(paths)
    with torch.no_grad():
        maps, scores = model(torch.from_numpy(meta.preprocessing(paths)))
    np.testing.assert_allclose([r.score for r in results], scores.numpy(), rtol=1e-4, atol=1e-5)
    assert [r.is_anomalous for r in results] == list(scores.numpy() > meta.thresholds.image)
    fp16_path, _ = export_onnx(path, path.with_name("ae.fp16.onnx"), "fp16")
    with Detector(fp16_path) as half:
        half_scores = np.array([r.score for r in half.predict(paths)])
    assert np.abs(half_scores - scores.numpy()).max() <= 0.02 * np.abs(scores.numpy()).max()


def test_evaluate_gives_the_same_figures_from_the_checkpoint_and_the_onnx_file(trained, exported, synthetic_dataset):
    from_pt = evaluate(trained[0], synthetic_dataset)
    from_onnx = evaluate(exported[0], synthetic_dataset)
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert from_onnx[key] == pytest.approx(from_pt[key], abs=1e-6)


def test_train_command_takes_the_family(synthetic_dataset, tmp_path):
    model = tmp_path / "ae.pt"
    r = subprocess.run([sys.executable, "-m", "stmae_edge.cli", "train", str(synthetic_dataset), "--family",
                        "filtering-ae", "--preset", "tiny", "--epochs", "1", "--out", str(model)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "stmae_edge.cli", "info", str(model)], capture_output=True, text=True,
                       timeout=300)
    info = json.loads(r.stdout)
    assert info["model_family"] == "filtering-ae" and info["config"]["channels"] == [8, 16]

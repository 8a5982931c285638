"""INT8 calibration: symmetric Q/DQ on the transformer only, cached by model and images, TensorRT builds it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from stmae_edge import data
from stmae_edge.calibrate import calibrate, statistics_nodes
from stmae_edge.errors import ConfigError
from stmae_edge.export import export_onnx
from stmae_edge.metadata import onnx_precision
from stmae_edge.metadata import ModelMetadata
from stmae_edge.metrics import image_auroc
from stmae_edge.runtime import Detector

from conftest import rank_correlation


@pytest.fixture(scope="module")
def fp32_graph(tiny_export):
    checkpoint, path, _ = tiny_export
    return checkpoint.parent, path


def test_int8_graph_is_symmetric_qdq_on_the_transformer_only(fp32_graph):
    folder, path = fp32_graph
    out, report = calibrate(path, cache_dir=folder / "cache")
    proto = onnx.load(str(out))
    assert onnx_precision(proto) == "int8" and report["cache"] == "miss" and report["quantized_nodes"] > 0
    assert ModelMetadata.from_onnx(proto).to_dict() == ModelMetadata.from_onnx(path).to_dict()
    initializers = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    zero_points = [initializers[n.input[2]] for n in proto.graph.node
                   if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2]
    assert zero_points and all(not np.any(z) for z in zero_points)  # symmetric: TensorRT needs zero points 0
    consumers = {}
    for n in proto.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n.op_type)
    dequantized_into = {op for n in proto.graph.node if n.op_type == "DequantizeLinear"
                        for op in consumers.get(n.output[0], [])}
    # The transformer's MatMuls run on quantised tensors; the backbone's convolutions stay in float
    # (measured: quantising them loses 3 points of image AUROC).
    assert "MatMul" in dequantized_into and "Conv" not in dequantized_into
    # The per-position Gaussian of the fused map is the anomaly signal itself: it stays in float.
    produced_by = {o: n.op_type for n in proto.graph.node for o in n.output}
    statistics = [n for n in proto.graph.node if any(i.rpartition(".")[2].startswith("gaussian_") for i in n.input)]
    assert len(statistics) == 2 and set(statistics_nodes(onnx.load(str(path)))) == {n.name for n in statistics}
    assert all(produced_by.get(i) != "DequantizeLinear" for n in statistics for i in n.input)


def test_cache_is_reused_only_when_model_and_images_match(fp32_graph, synthetic_dataset, tmp_path):
    folder, path = fp32_graph
    images = data.train_images(synthetic_dataset)[:16]
    _, first = calibrate(path, images, tmp_path / "a.onnx", cache_dir=tmp_path / "cache")
    _, again = calibrate(path, images, tmp_path / "b.onnx", cache_dir=tmp_path / "cache")
    assert (first["cache"], again["cache"]) == ("miss", "hit") and first["key"] == again["key"]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    _, other = calibrate(path, images[1:], tmp_path / "c.onnx", cache_dir=tmp_path / "cache")
    assert other["cache"] == "miss" and other["key"] != first["key"]


def test_int8_graph_ranks_images_like_fp32_and_builds(fp32_graph, synthetic_dataset, tmp_path):
    # What INT8 promises is FP32's ranking, not its numbers: ONNX Runtime's INT8 kernels differ between
    # CPUs (AVX2 against AVX-512/VNNI), and a tolerance on maps held on one and failed on the other.
    folder, path = fp32_graph
    out, _ = calibrate(path, cache_dir=folder / "cache")
    samples = data.eval_samples(synthetic_dataset)
    labels = [s.label for s in samples]
    with Detector(path) as fp32, Detector(out) as int8:
        full = [r.score for r in fp32.predict([s.path for s in samples])]
        quantised = [r.score for r in int8.predict([s.path for s in samples])]
    assert image_auroc(labels, full) == 1.0  # the tiny model separates the synthetic defects ...
    assert image_auroc(labels, quantised) == 1.0  # ... and so does its INT8 graph
    assert rank_correlation(full, quantised) > 0.8
    pytest.importorskip("tensorrt_rtx_bindings", reason="needs TensorRT for RTX: pip install '.[rtx]'")
    from stmae_edge.engine_build import build_engine

    plan, sidecar = build_engine(out, "int8", "1:2:4", tmp_path / "m.int8.plan")
    assert sidecar["precision"] == "int8" and plan.stat().st_size > 50_000


def test_only_fp32_graphs_are_calibrated(fp32_graph, tmp_path):
    folder, path = fp32_graph
    fp16, _ = export_onnx(folder / "m.pt", tmp_path / "m.fp16.onnx", "fp16")
    with pytest.raises(ConfigError, match="calibrate the fp32 export"):
        calibrate(fp16, cache_dir=tmp_path / "cache")

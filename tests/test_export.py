"""ONNX export: a fixed graph (constant-index Gathers, no scatter, nothing random), metadata inside,
ops TensorRT supports, and parity with PyTorch through ONNX Runtime at batch 1 and 8."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from stmae_edge import data
from stmae_edge.checkpoint import load_model
from stmae_edge.engines.export import PARITY_RTOL, TENSORRT_OPS, export_onnx
from stmae_edge.engines.verify import verify
from stmae_edge.errors import CheckpointError, ExportError, VerificationError
from stmae_edge.metadata import ModelMetadata
from stmae_edge.models.stmae import Attention, preset
from stmae_edge.training.train import TrainConfig, train


@pytest.fixture(scope="module")
def exported(tiny_export):
    return tiny_export


def _constants(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def test_graph_is_fixed_and_uses_only_allowed_ops(exported):
    checkpoint, path, figures = exported
    proto = onnx.load(str(path))
    ops = {n.op_type for n in proto.graph.node}
    assert ops <= TENSORRT_OPS, ops - TENSORRT_OPS
    assert not ops & {"ScatterND", "ScatterElements", "RandomUniform", "RandomNormal", "RandomUniformLike",
                      "RandomNormalLike", "Loop", "If", "NonZero"}
    assert figures["shapes"]["images"] == ["batch", 3, 64, 64]
    assert figures["shapes"]["anomaly_map"] == ["batch", 1, 64, 64] and figures["shapes"]["score"] == ["batch"]
    assert figures["smoke_max_rel_diff"] < 1e-4


def test_split_and_restore_are_gathers_with_constant_indices(exported):
    checkpoint, path, _ = exported
    model, _ = load_model(checkpoint)
    proto = onnx.load(str(path))
    constants = _constants(proto)
    gather_indices = [constants[n.input[1]] for n in proto.graph.node
                      if n.op_type == "Gather" and n.input[1] in constants]
    for buffer in (model.eval_split_a, model.eval_split_b, model.eval_restore):
        assert any(idx.shape == tuple(buffer.shape) and np.array_equal(idx, buffer.numpy())
                   for idx in gather_indices), "a split or restore index set is not a constant Gather"


def test_attention_is_exported_written_out(exported):
    # Training runs the fused kernel; the graph must keep softmax(q k^T * scale) v as MatMul, Mul and
    # Softmax, which TensorRT fuses itself (the exporter's decomposition of the kernel scales q and k).
    checkpoint, path, _ = exported
    model, _ = load_model(checkpoint)
    proto = onnx.load(str(path))
    producer = {out: node for node in proto.graph.node for out in node.output}
    softmaxes = [node for node in proto.graph.node if node.op_type == "Softmax"]
    assert len(softmaxes) == sum(isinstance(m, Attention) for m in model.modules())
    for node in softmaxes:
        scaled = producer[node.input[0]]
        assert scaled.op_type == "Mul"
        assert any(name in producer and producer[name].op_type == "MatMul" for name in scaled.input)


def test_metadata_travels_in_the_onnx_file(exported):
    checkpoint, path, _ = exported
    _, metadata = load_model(checkpoint)
    assert ModelMetadata.from_onnx(path).to_dict() == metadata.to_dict()
    foreign = path.with_name("foreign.onnx")
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.save(proto, str(foreign))
    with pytest.raises(CheckpointError, match="not exported by stmae-edge"):
        ModelMetadata.from_onnx(foreign)


def test_parity_with_pytorch_at_batch_1_and_8(exported, synthetic_dataset):
    checkpoint, path, _ = exported
    images = [s.path for s in data.eval_samples(synthetic_dataset)]
    figures = verify(path, checkpoint, images, batch_sizes=(1, 8))
    for size in (1, 8):
        assert figures["batches"][size]["map_max_rel_diff"] <= 1e-4
    assert figures["provider"] == "CPUExecutionProvider"


def test_parity_on_real_images(magnetic_tile, exported):
    checkpoint, path, _ = exported
    figures = verify(path, checkpoint, data.train_images(magnetic_tile)[:8], batch_sizes=(1, 8))
    assert max(f["map_max_rel_diff"] for f in figures["batches"].values()) <= 1e-4


def test_verify_catches_a_changed_graph_and_a_foreign_model(exported, tiny_fp16_export, synthetic_dataset,
                                                              tmp_path):
    checkpoint, path, _ = exported
    proto = onnx.load(str(path))
    bias = next(t for t in proto.graph.initializer if t.name == "head.bias")  # feeds every prediction
    changed = numpy_helper.to_array(bias) + 0.05
    bias.CopyFrom(numpy_helper.from_array(changed.astype(np.float32), bias.name))
    altered = tmp_path / "altered.onnx"
    onnx.save(proto, str(altered))
    images = [s.path for s in data.eval_samples(synthetic_dataset)]
    with pytest.raises(VerificationError, match="differs.*; export .* again$"):  # fp32: something broke
        verify(altered, checkpoint, images)
    # an fp16 graph's failure says what to look at next
    fp16_path = tmp_path / "m.fp16.onnx"
    proto = onnx.load(str(tiny_fp16_export[1]))
    bias = next(t for t in proto.graph.initializer if t.name.endswith("head.bias"))  # under its fp16 wrapper
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.asarray(0.5, numpy_helper.to_array(bias).dtype),
                                          bias.name))
    onnx.save(proto, str(fp16_path))
    with pytest.raises(VerificationError, match="differs.*fp16 rounds every layer: compare the two with "
                                                "`stmae-edge evaluate` \\(AUROC\\), or allow more with --rtol$"):
        verify(fp16_path, checkpoint, images)
    with pytest.raises(VerificationError, match="AUROC\\)$"):  # a limit given already: not told to give one
        verify(fp16_path, checkpoint, images, rtol=1e-3)
    other = tmp_path / "other.pt"
    train(synthetic_dataset, other, preset("tiny"), TrainConfig(epochs=1, batch_size=8, seed=1),
          backbone_weights="random")
    with pytest.raises(VerificationError, match="another model"):
        verify(path, other, images)


@pytest.fixture(scope="module")
def exported_fp16(tiny_fp16_export):
    return tiny_fp16_export


def test_fp16_graph_has_fp32_edges_and_fp16_weights(exported_fp16):
    _, path, figures = exported_fp16
    proto = onnx.load(str(path))
    assert figures["precision"] == "fp16"
    edges = list(proto.graph.input) + list(proto.graph.output)
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for v in edges)
    weight_types = {t.data_type for t in proto.graph.initializer if numpy_helper.to_array(t).size > 64}
    assert onnx.TensorProto.FLOAT16 in weight_types
    assert {n.op_type for n in proto.graph.node} <= TENSORRT_OPS
    # The per-position Gaussian that scores the map keeps fp32: a Mahalanobis distance amplifies rounding.
    statistics = {t.name: t.data_type for t in proto.graph.initializer
                  if t.name.rpartition(".")[2].startswith("gaussian_")}  # "model." inside the fp16 wrapper
    assert statistics and set(statistics.values()) == {onnx.TensorProto.FLOAT}


def test_fp16_parity_within_half_precision_tolerance(exported_fp16, synthetic_dataset):
    checkpoint, path, figures = exported_fp16
    assert figures["smoke_max_rel_diff"] < 2e-2
    images = [s.path for s in data.eval_samples(synthetic_dataset)]
    result = verify(path, checkpoint, images, batch_sizes=(1, 8))  # the fp16 graph's own tolerance by default
    assert result["rtol"] == PARITY_RTOL["fp16"] == 2e-2
    assert max(f["map_max_rel_diff"] for f in result["batches"].values()) > 1e-6  # really fp16, not fp32
    with pytest.raises(VerificationError):
        verify(path, checkpoint, images, batch_sizes=(8,), rtol=1e-7)


def test_an_export_that_does_not_reproduce_its_model_is_not_written(tiny_export, tmp_path, monkeypatch):
    """The smoke parity at export is a check, not a figure: above its precision's tolerance (here made
    stricter than any graph meets) the export stops and leaves no file."""
    import stmae_edge.engines.export as export_module

    monkeypatch.setitem(export_module.PARITY_RTOL, "fp32", 0.0)
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match=r"fp32 graph exported from .* does not reproduce the model: its outputs "
                                          r"differ by .* relative on random inputs, more than 0; nothing was written"):
        export_onnx(tiny_export[0], out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_evaluate_runs_onnx_files_like_checkpoints(exported, synthetic_dataset):
    from stmae_edge.evaluation.evaluate import evaluate

    checkpoint, path, _ = exported
    torch_result, onnx_result = evaluate(checkpoint, synthetic_dataset), evaluate(path, synthetic_dataset)
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1"):
        assert onnx_result[key] == pytest.approx(torch_result[key], abs=1e-4)

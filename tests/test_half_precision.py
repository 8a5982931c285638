"""half_precision.to_half on small hand-made graphs, run through ONNX Runtime: what stays fp32 keeps
its exact values, what cannot be fp16 is refused."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from stmae_edge.engines.half_precision import float_region, to_half
from stmae_edge.errors import ConfigError


def model(nodes, inputs, outputs, initializers=(), opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def run(proto: onnx.ModelProto, **feeds) -> list[np.ndarray]:
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def test_constants_keep_what_their_consumers_need():
    # A Resize's scales from a Constant node (fp32 by definition) and an epsilon read only by fp32 nodes.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 10, 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [helper.make_node("Constant", [], ["scales"], name="scales",
                              value=numpy_helper.from_array(np.array([1, 1, 1.1, 1.1], np.float32))),
             helper.make_node("Constant", [], ["eps"], name="eps", value_float=1e-8),
             helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Resize", ["r", "", "scales"], ["big"], name="resize", mode="nearest"),
             helper.make_node("ReduceMax", ["big"], ["m"], name="gaussian_max", keepdims=0),
             helper.make_node("Add", ["m", "eps"], ["y"], name="gaussian_add")]
    proto = model(nodes, [x], [y])
    half = to_half(proto, {"gaussian_max", "gaussian_add"})
    types = {t.name: t.data_type for t in half.graph.initializer}
    assert types == {"scales": TensorProto.FLOAT, "eps": TensorProto.FLOAT}
    data = np.zeros((1, 1, 10, 10), np.float32)
    assert run(half, x=data)[0] == np.float32(1e-8)  # not rounded to 0 through fp16
    resized = to_half(model(nodes[:4], [x], [helper.make_tensor_value_info("big", TensorProto.FLOAT, None)]), set())
    assert run(resized, x=data)[0].shape == (1, 1, 11, 11)


def test_what_fp16_cannot_hold_is_refused():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    big = numpy_helper.from_array(np.array([1e6, 1.0], np.float32), "big")
    with pytest.raises(ConfigError, match="beyond fp16"):
        to_half(model([helper.make_node("Mul", ["x", "big"], ["y"], name="mul")], [x], [y], [big]), set())
    # ... unless only fp32 nodes read it
    kept = to_half(model([helper.make_node("Mul", ["x", "big"], ["y"], name="mul")], [x], [y], [big]), {"mul"})
    np.testing.assert_array_equal(run(kept, x=np.ones(2, np.float32))[0], [1e6, 1.0])
    scale = numpy_helper.from_array(np.array(1e-6, np.float32), "scale")
    zero = numpy_helper.from_array(np.array(0, np.int8), "zero")
    qdq = [helper.make_node("QuantizeLinear", ["x", "scale", "zero"], ["q"], name="q"),
           helper.make_node("DequantizeLinear", ["q", "scale", "zero"], ["y"], name="dq")]
    with pytest.raises(ConfigError, match="smallest normal"):
        to_half(model(qdq, [x], [y], [scale, zero]), set())
    with pytest.raises(ConfigError, match="opset 17"):
        to_half(model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [x], [y], opset=17), set())


def test_the_region_is_the_scoring_nodes_and_everything_after_them():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="feature"),
             helper.make_node("Neg", ["a"], ["b"], name="score_start"),
             helper.make_node("Abs", ["b"], ["y"], name="after")]
    proto = model(nodes, [x], [y])
    assert float_region(proto, {"score_start"}) == {"score_start", "after"}
    half = to_half(proto, float_region(proto, {"score_start"}))
    np.testing.assert_array_equal(run(half, x=np.array([1.5, -2.0], np.float32))[0], [1.5, 0.0])

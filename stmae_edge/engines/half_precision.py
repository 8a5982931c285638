"""An fp32 ONNX graph -> the same graph in fp16, with the scoring statistics and what follows them in fp32.

    fp32 export ──> scoring_nodes(): the nodes the exporter recorded under the models' `scoring`
                    module (models.maps.ScoringScope: the anomaly map, from features to map,
                    and the score head)
    fp32 graph, Q/DQ or not ──> float_region(): those nodes, the nodes that read a scoring statistic
                    (STATISTICS_PREFIXES), and every node after them, up to the outputs; and,
                    without what follows them, the per-image intensity normalisation's nodes
                    (INTENSITY_SCOPE: whole-image means, which overflow fp16 sums)
                 ──> to_half(): every other float tensor and initializer in fp16, Casts where the
                    two regions meet, fp32 graph inputs and outputs kept

Why: TensorRT compiles a strongly typed network in the graph's own types, so an INT8 graph whose
non-quantised layers are fp32 runs them in fp32, slower and larger than the FP16 plan. The INT8 graph
of `calibrate` goes through `to_half` so that it is the FP16 graph with Q/DQ on the quantised layers.
Its Q/DQ scales become fp16 too, which ONNX allows from opset 19 (the graph's opset is raised to it).

The scoring stays fp32, as in the FP16 export (HalfPrecision in export.py and the models'
anomaly_map): a Mahalanobis distance amplifies what an fp16 copy of a precision matrix loses, and the
residual's channel reductions and the cosine's epsilon are where half precision loses what the score
depends on. The scope comes from the fp32 export's node metadata, which ONNX Runtime's quantiser drops,
so calibrate reads it before quantising and finds the nodes again by name. This module needs no torch.
"""

from __future__ import annotations

import collections
import re

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import ConfigError, ExportError, first_line

# Model buffers (by the last part of their name) that score the map: ST-MAE's per-position Gaussians
# (sharp and wide) and residual statistics, the fusion's scale, and the image score head's projection
# and Gaussian. Export keeps them fp32 in the FP16 graph, calibrate leaves them unquantised in the INT8
# graph, and `to_half` keeps them and everything after them in fp32.
STATISTICS_PREFIXES = ("gaussian_", "wide_", "fusion_stats", "residual_mean", "residual_std", "score_", "defect_")
# The attribute name of models.maps.ScoringScope in every model; the exporter records it per node.
SCORING_SCOPE = "scoring"
# The attribute name of models.intensity.IntensityNormalization: its nodes alone stay fp32 (a mean over
# a whole image overflows fp16 sums), and what reads them goes back to fp16.
INTENSITY_SCOPE = "intensity"
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
QDQ_FLOAT_SCALE_OPSET = 19
MIN_OPSET = 18  # Reduce ops take axes as an input from 18 on: raising an older graph's opset would break them
FP16_MAX = 65504.0
FP16_SMALLEST_NORMAL = 6.104e-05  # a Q/DQ scale below it loses precision in fp16, or becomes 0
# Inputs that ONNX fixes to tensor(float) whatever the node's data type (Resize's scales).
FLOAT_ONLY_INPUTS = {"Resize": {2}}


def is_statistic(name: str) -> bool:
    """Whether an initializer or buffer name (dotted path) is one of the scoring statistics."""
    return name.rpartition(".")[2].startswith(STATISTICS_PREFIXES)


def statistics_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of the nodes that read a scoring statistic (initializers named by STATISTICS_PREFIXES)."""
    names = {init.name for init in proto.graph.initializer if is_statistic(init.name)}
    return [node.name for node in proto.graph.node if names.intersection(node.input)]


# The exporter writes a node's module path as a Python list of quoted attribute names, e.g.
# "['', 'scoring', 'scoring.gaussian']"; read it as text, never evaluated (the graph is a user's file).
_SCOPE_NAME = re.compile(r"'([^'\\]*)'")
_SCOPE_LIST = re.compile(r"\[(?:'[^'\\]*'(?:, '[^'\\]*')*)?\]")


def scoring_nodes(proto: onnx.ModelProto, scope: str = SCORING_SCOPE) -> set[str]:
    """Names of the nodes that the exporter recorded under the models' scoring scope (or another module
    attribute's, INTENSITY_SCOPE); empty for a graph exported before the scope existed, or one that lost
    its node metadata."""
    names = set()
    for node in proto.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == NAME_SCOPES_KEY), None)
        if scopes and len(scopes) < 10_000 and _SCOPE_LIST.fullmatch(scopes) \
                and scope in _SCOPE_NAME.findall(scopes):
            names.add(node.name)
    return names


def float_region(proto: onnx.ModelProto, scoring: set[str] = frozenset()) -> set[str]:
    """Nodes to keep in fp32: the nodes named in `scoring` (scoring_nodes of the fp32 export), the
    nodes that read a scoring statistic, and every node after them."""
    graph = proto.graph
    consumers = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    region = set(statistics_nodes(proto)) | {node.name for node in graph.node if node.name in scoring}
    stack = [node for node in graph.node if node.name in region]
    while stack:
        for out in stack.pop().output:
            for consumer in consumers[out]:
                if consumer.name not in region:
                    region.add(consumer.name)
                    stack.append(consumer)
    return region


def to_half(proto: onnx.ModelProto, keep_float: set[str]) -> onnx.ModelProto:
    """A copy of `proto` in fp16 but for the nodes named in `keep_float`; graph inputs and outputs stay
    fp32. Every node must have a unique name (the exporter and the quantiser give them).

    Raises:
        ConfigError: the graph's opset is below MIN_OPSET, a constant does not fit fp16, a Q/DQ scale is
            below fp16's smallest normal number, or the result does not pass ONNX's type check.
    """
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise ConfigError(f"the graph has opset {opset}; export it again with this version (opset {MIN_OPSET}+)")
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    _constants_to_initializers(graph)
    _check_fp16_range(graph, keep_float)
    inferred = onnx.shape_inference.infer_shapes(proto)
    elem_type = {v.name: v.type.tensor_type.elem_type
                  for v in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]}
    initializers = {init.name: init for init in graph.initializer}
    current = {name: t for name, t in elem_type.items()}  # the type each tensor has in the new graph
    for init in graph.initializer:
        current[init.name] = init.data_type
    half_initializers: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}

    def as_type(name: str, wanted: int) -> str:
        if current.get(name) == wanted:
            return name
        if name in initializers and current[name] == TensorProto.FLOAT and wanted == TensorProto.FLOAT16:
            if name not in half_initializers:  # a constant is converted once, not cast at run time
                half = numpy_helper.from_array(numpy_helper.to_array(initializers[name]).astype(np.float16),
                                               f"{name}.fp16")
                graph.initializer.append(half)
                half_initializers[name] = half.name
                current[half.name] = TensorProto.FLOAT16
            return half_initializers[name]
        if (name, wanted) not in casts:
            cast = onnx.helper.make_node("Cast", [name], [f"{name}.to{wanted}"], name=f"{name}.cast_to{wanted}",
                                         to=wanted)
            nodes.append(cast)
            casts[name, wanted] = cast.output[0]
            current[cast.output[0]] = wanted
        return casts[name, wanted]

    for node in _topological(graph):
        half = node.name not in keep_float
        for i, name in enumerate(node.input):
            if name and current.get(name) in (TensorProto.FLOAT, TensorProto.FLOAT16):
                fixed_float = i in FLOAT_ONLY_INPUTS.get(node.op_type, ())
                node.input[i] = as_type(name, TensorProto.FLOAT16 if half and not fixed_float else TensorProto.FLOAT)
        if half:
            for attribute in node.attribute:
                if node.op_type == "Cast" and attribute.name == "to" and attribute.i == TensorProto.FLOAT:
                    attribute.i = TensorProto.FLOAT16
                if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == TensorProto.FLOAT:
                    attribute.t.CopyFrom(numpy_helper.from_array(
                        numpy_helper.to_array(attribute.t).astype(np.float16), attribute.t.name))
        for out in node.output:
            if elem_type.get(out) == TensorProto.FLOAT:
                current[out] = TensorProto.FLOAT16 if half else TensorProto.FLOAT
        nodes.append(node)
    for output in graph.output:
        if current.get(output.name) == TensorProto.FLOAT16:
            internal = f"{output.name}.fp16"
            for node in nodes:
                node.output[:] = [internal if o == output.name else o for o in node.output]
                node.input[:] = [internal if i == output.name else i for i in node.input]
            nodes.append(onnx.helper.make_node("Cast", [internal], [output.name], name=f"{output.name}.cast_to_fp32",
                                               to=TensorProto.FLOAT))
    used = {name for node in nodes for name in node.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]  # stale types; shape inference gives the new ones
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = max(entry.version, QDQ_FLOAT_SCALE_OPSET)
    try:  # a node whose output type comes from an attribute, not its inputs, would show here
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as exc:
        raise ConfigError(f"the fp16 graph does not type-check ({first_line(exc, 200)}); "
                          "calibrate with --float-precision fp32") from None
    return model


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Constant nodes become initializers, so that each consumer gets the precision it needs (a Resize's
    scales stay fp32, a constant read only by the fp32 scoring is not rounded through fp16)."""
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1:
            attribute = node.attribute[0]
            value = onnx.helper.get_attribute_value(attribute)
            if attribute.name == "value":
                array = numpy_helper.to_array(value)
            elif attribute.name in ("value_float", "value_floats"):
                array = np.asarray(value, dtype=np.float32)
            elif attribute.name in ("value_int", "value_ints"):
                array = np.asarray(value, dtype=np.int64)
            else:
                kept.append(node)
                continue
            graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _check_fp16_range(graph: onnx.GraphProto, keep_float: set[str]) -> None:
    """Refuse constants that fp16 cannot hold, and Q/DQ scales it would hold only as subnormals."""
    initializers = {init.name: init for init in graph.initializer if init.data_type == TensorProto.FLOAT}
    half_inputs = {name for node in graph.node if node.name not in keep_float for name in node.input}
    for name in half_inputs & initializers.keys():
        values = np.abs(numpy_helper.to_array(initializers[name]))
        if values.size and values[np.isfinite(values)].max(initial=0.0) > FP16_MAX:
            raise ConfigError(f"constant {name} holds {values.max():.3g}, beyond fp16 (65504); "
                              "calibrate with --float-precision fp32")
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.name not in keep_float:
            scale = initializers.get(node.input[1])
            if scale is not None and np.abs(numpy_helper.to_array(scale)).min() < FP16_SMALLEST_NORMAL:
                raise ConfigError(f"a quantisation scale of {node.name} is below fp16's smallest normal number; "
                                  "calibrate with --float-precision fp32")


def _topological(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes in an order where each comes after the producers of its inputs."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError("the ONNX graph has a cycle or an input that nothing produces: not a graph that "
                              "`stmae-edge export` wrote; export the model again")
        for node in ready:
            available.update(node.output)
        ordered += ready
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    return ordered

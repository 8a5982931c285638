"""INT8 calibration: symmetric Q/DQ on the transformer only, the rest in fp16 but the scoring, cached by
model and images, TensorRT builds it."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import rank_correlation, require_tensorrt
from onnx import TensorProto, numpy_helper

from stmae_edge import data
from stmae_edge.engines import calibrate as calibrate_module
from stmae_edge.engines.calibrate import FAMILY_SETTINGS, calibrate, weight_elements
from stmae_edge.engines.export import export_onnx
from stmae_edge.engines.half_precision import (
    INTENSITY_SCOPE,
    SCORING_SCOPE,
    float_region,
    scoring_nodes,
    statistics_nodes,
)
from stmae_edge.errors import ConfigError
from stmae_edge.evaluation.metrics import image_auroc
from stmae_edge.metadata import ModelMetadata, onnx_precision
from stmae_edge.models.maps import ScoringScope
from stmae_edge.outputs import sha256_file
from stmae_edge.runtime import Detector


@pytest.fixture(scope="module")
def fp32_graph(tiny_export):
    checkpoint, path, _ = tiny_export
    return checkpoint.parent, path


def test_int8_graph_is_symmetric_qdq_on_the_transformer_only(fp32_graph, tmp_path):
    folder, path = fp32_graph
    # a cache of its own: the module's shared one may hold this entry already, whatever order tests run in
    out, report = calibrate(path, cache_dir=tmp_path / "cache", min_weight_elements=1)
    proto = onnx.load(str(out))
    from stmae_edge.engines.verify import verify
    from stmae_edge.errors import VerificationError

    with pytest.raises(VerificationError, match="is an int8 graph; verify checks fp32 and fp16 exports"):
        verify(out, folder / "m.pt")  # no parity tolerance means anything for INT8 numbers
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
    # The per-position Gaussians, the map's sharp and wide ones and the score head's, are the anomaly
    # signal itself: they stay in float (projection and precision MatMul each), and so does the score
    # head's wide smoothing (its narrow one shares the map's kernel, which the exporter stores once as
    # smoothing_kernel).
    produced_by = {o: n.op_type for n in proto.graph.node for o in n.output}
    statistics = [n for n in proto.graph.node
                  if any(i.rpartition(".")[2].startswith(("gaussian_", "wide_", "score_")) for i in n.input)]
    assert len(statistics) == 7 and set(statistics_nodes(onnx.load(str(path)))) == {n.name for n in statistics}
    assert all(produced_by.get(i) != "DequantizeLinear" for n in statistics for i in n.input)


def test_only_layers_with_enough_weights_are_quantised(fp32_graph, synthetic_dataset, tmp_path):
    # A quantised Linear layer pays only where its INT8 weights save more plan than its Q/DQ layers
    # cost: measured with TensorRT for RTX, small ones make the plan larger (docs/BENCHMARKS.md).
    folder, path = fp32_graph
    exported = onnx.load(str(path))
    sizes = weight_elements(exported, ["MatMul"])
    statistics = set(statistics_nodes(exported))
    transformer = {name: k for name, k in sizes.items() if k and name not in statistics}
    cut = sorted(set(transformer.values()))[len(set(transformer.values())) // 2]  # some layers above, some below
    out, report = calibrate(path, out=tmp_path / "cut.onnx", cache_dir=folder / "cache", min_weight_elements=cut)
    proto = onnx.load(str(out))
    produced_by = {o: n.op_type for n in proto.graph.node for o in n.output}
    quantised = {n.name for n in proto.graph.node
                 if n.op_type == "MatMul" and any(produced_by.get(i) == "DequantizeLinear" for i in n.input)}
    assert quantised == {name for name, k in transformer.items() if k >= cut} and 0 < len(quantised) < len(transformer)
    assert report["settings"]["min_weight_elements"] == cut
    assert report["int8_layers"] == len(quantised) and report["weighted_layers"] == len(transformer)
    # The tiny model has no layer as large as the default asks for: refused in one line, nothing written.
    assert max(transformer.values()) < FAMILY_SETTINGS["stmae"]["min_weight_elements"]
    largest = f"its largest MatMul has {max(transformer.values())} weights, INT8 starts at 65536"
    with pytest.raises(ConfigError, match=f"no layer of this model is large enough.*{largest}.*--min-weights 1"):
        calibrate(path, out=tmp_path / "new" / "none.onnx", cache_dir=tmp_path / "new-cache")
    assert not (tmp_path / "new").exists() and not (tmp_path / "new-cache").exists()  # no empty folders left
    with pytest.raises(ConfigError, match="at least 1"):
        calibrate(path, out=tmp_path / "none.onnx", cache_dir=folder / "cache", min_weight_elements=0)
    assert not (tmp_path / "none.onnx").exists()
    result = subprocess.run([sys.executable, "-m", "stmae_edge.cli", "calibrate", str(path), "--out",
                             str(tmp_path / "none.onnx"), "--cache-dir", str(folder / "cache")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "--min-weights 1" in result.stderr
    result = subprocess.run([sys.executable, "-m", "stmae_edge.cli", "calibrate", str(path), "--out",
                             str(tmp_path / "cli.onnx"), "--cache-dir", str(folder / "cache"), "--min-weights", str(cut)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "cache hit" in result.stdout, result.stderr
    # no --images: a sample of the training images, from the folder the model recorded, named
    assert f"images of {(synthetic_dataset / 'train' / 'good').resolve()} (cache" in result.stdout
    assert f"{len(quantised)} of {len(transformer)} layers in INT8; those under {cut} weights stay in fp16" in result.stdout
    # the thresholds it carries are the fp32 model's: said, with how to check and set its own
    assert f"next: its thresholds are the fp32 model's; on a labelled set, `stmae-edge evaluate {tmp_path / 'cli.onnx'}" \
        in result.stdout
    # and the command it gives to set them runs as printed (it lacked the target `threshold` needs)
    hint = re.search(r"`stmae-edge (threshold [^`]*)`", result.stdout).group(1).replace("DATA", str(synthetic_dataset))
    result = subprocess.run([sys.executable, "-m", "stmae_edge.cli", *hint.split()], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "wrote" in result.stdout, result.stderr
    # --images with --count: that many of the folder's images (all 24 without it)
    good = synthetic_dataset / "train" / "good"
    for extra, used in (([], 24), (["--count", "8"], 8)):
        result = subprocess.run([sys.executable, "-m", "stmae_edge.cli", "calibrate", str(path), "--out",
                                 str(tmp_path / "count.onnx"), "--cache-dir", str(folder / "cache"), "--min-weights",
                                 str(cut), "--images", str(good), *extra], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and f"calibrated on {used} images of {good}" in result.stdout, result.stderr


def float_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of every float tensor of the graph (inputs, outputs, intermediates, initializers)."""
    inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type
             for v in [*inferred.graph.input, *inferred.graph.output, *inferred.graph.value_info]}
    types |= {t.name: t.data_type for t in proto.graph.initializer}
    return {name: t for name, t in types.items() if t in (TensorProto.FLOAT, TensorProto.FLOAT16)}


def test_int8_graph_is_the_fp16_graph_with_qdq_and_fp32_scoring(fp32_graph):
    folder, path = fp32_graph
    exported = onnx.load(str(path))
    scoring = scoring_nodes(exported)
    assert scoring and statistics_nodes(exported)
    out, report = calibrate(path, cache_dir=folder / "cache", min_weight_elements=1)
    proto = onnx.load(str(out))
    assert report["settings"]["float_precision"] == "fp16"
    onnx.checker.check_model(proto, full_check=True)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 19  # fp16 Q/DQ scales
    types = float_types(proto)
    region = float_region(proto, scoring)
    # The scoring part: every node the exporter put under the scope, the statistics and all after them.
    kept = scoring & {n.name for n in proto.graph.node}  # the quantiser folds a few away
    assert len(kept) > 0.8 * len(scoring) and kept <= region and set(statistics_nodes(proto)) <= region
    for node in proto.graph.node:
        outputs = [types[o] for o in node.output if o in types]
        if node.name in region:
            assert set(outputs) <= {TensorProto.FLOAT}, (node.op_type, node.name)
        elif node.op_type != "Cast":
            assert set(outputs) <= {TensorProto.FLOAT16}, (node.op_type, node.name)
    # Every Q/DQ scale is fp16, so no Cast sits between a DequantizeLinear and its MatMul.
    qdq = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq and all(types[n.input[1]] == TensorProto.FLOAT16 for n in qdq)
    casts = [n for n in proto.graph.node if n.op_type == "Cast"]
    produced_by = {o: n.op_type for n in proto.graph.node for o in n.output}
    assert not any(produced_by.get(c.input[0]) == "DequantizeLinear" for c in casts)
    # The statistics stay fp32, the graph's inputs and outputs too.
    statistic_inits = [t.name for t in proto.graph.initializer if t.name.startswith("gaussian_")]
    assert statistic_inits and all(types[name] == TensorProto.FLOAT for name in statistic_inits)
    assert {types[v.name] for v in [*proto.graph.input, *proto.graph.output]} == {TensorProto.FLOAT}
    assert ModelMetadata.from_onnx(proto).to_dict() == ModelMetadata.from_onnx(path).to_dict()


def test_fp32_unquantised_layers_on_request_and_old_exports_are_refused(fp32_graph, tmp_path):
    folder, path = fp32_graph
    out, report = calibrate(path, out=tmp_path / "m.int8.onnx", cache_dir=folder / "cache", float_precision="fp32",
                            min_weight_elements=1)
    assert set(float_types(onnx.load(str(out))).values()) == {TensorProto.FLOAT}
    _, fp16 = calibrate(path, out=tmp_path / "h.int8.onnx", cache_dir=folder / "cache", min_weight_elements=1)
    assert report["key"] != fp16["key"]  # the precision is part of the cache key
    with pytest.raises(ConfigError, match="unknown precision 'bf16'"):
        calibrate(path, out=tmp_path / "x.onnx", cache_dir=folder / "cache", float_precision="bf16")
    old = onnx.load(str(path))  # an export from before the scoring scope: no node metadata
    for node in old.graph.node:
        del node.metadata_props[:]
    onnx.save(old, str(tmp_path / "old.onnx"))
    with pytest.raises(ConfigError, match="export it again.*--float-precision fp32"):
        calibrate(tmp_path / "old.onnx", out=tmp_path / "y.onnx", cache_dir=folder / "cache")
    assert not (tmp_path / "y.onnx").exists()


def test_every_model_family_scores_under_the_scope_calibrate_looks_for():
    from stmae_edge.models.filtering_ae import FilteringAutoencoder
    from stmae_edge.models.filtering_ae import preset as ae_preset
    from stmae_edge.models.stmae import STMAE, preset

    for model in (STMAE(preset("tiny"), backbone_weights="random"), FilteringAutoencoder(ae_preset("tiny"))):
        assert isinstance(getattr(model, SCORING_SCOPE), ScoringScope)
        assert not list(getattr(model, SCORING_SCOPE).state_dict())  # checkpoints are unchanged by it


def test_cache_is_reused_only_when_model_and_images_match(fp32_graph, synthetic_dataset, tmp_path, caplog,
                                                          monkeypatch):
    folder, path = fp32_graph
    images = data.train_images(synthetic_dataset)[:16]
    _, first = calibrate(path, images, tmp_path / "a.onnx", cache_dir=tmp_path / "cache", min_weight_elements=1)
    _, again = calibrate(path, images, tmp_path / "b.onnx", cache_dir=tmp_path / "cache", min_weight_elements=1)
    assert (first["cache"], again["cache"]) == ("miss", "hit") and first["key"] == again["key"]
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    _, other = calibrate(path, images[1:], tmp_path / "c.onnx", cache_dir=tmp_path / "cache", min_weight_elements=1)
    assert other["cache"] == "miss" and other["key"] != first["key"]
    import onnxruntime  # another quantiser may choose other scales from the same images: calibrated again

    monkeypatch.setattr(onnxruntime, "__version__", onnxruntime.__version__ + ".post1")
    _, upgraded = calibrate(path, images, tmp_path / "u.onnx", cache_dir=tmp_path / "cache", min_weight_elements=1)
    assert upgraded["cache"] == "miss" and upgraded["key"] != first["key"]
    monkeypatch.undo()
    # nor by another version of this package's decoding or quantisation code, which no setting records
    decoding, code = Path(calibrate_module.preprocessing.__file__), tmp_path / "preprocessing.py"
    code.write_bytes(decoding.read_bytes())
    monkeypatch.setattr(calibrate_module, "CODE_DECIDING_CALIBRATION", tuple(
        code if source == decoding else source for source in calibrate_module.CODE_DECIDING_CALIBRATION))
    _, same = calibrate(path, images, tmp_path / "g.onnx", cache_dir=tmp_path / "cache", min_weight_elements=1)
    assert same["key"] == first["key"]
    code.write_bytes(code.read_bytes() + b"\n# a decoding fix\n")
    _, fixed = calibrate(path, images, tmp_path / "h.onnx", cache_dir=tmp_path / "cache", min_weight_elements=1)
    assert fixed["cache"] == "miss" and fixed["key"] != first["key"]
    monkeypatch.undo()
    # a cached graph that no longer matches its record (edited, damaged) is calibrated again, not shipped
    cached = Path(first["cache_file"])
    cached.write_bytes(cached.read_bytes()[:-64])
    _, redone = calibrate(path, images, tmp_path / "d.onnx", cache_dir=tmp_path / "cache", min_weight_elements=1)
    assert redone["cache"] == "miss" and (tmp_path / "d.onnx").read_bytes() == (tmp_path / "a.onnx").read_bytes()
    # nor is a graph written there with a record to match: the cache is trusted no further than a user's file
    record = cached.with_name(cached.name.replace(".int8.onnx", ".json"))
    shutil.copyfile(path, cached)
    record.write_text(json.dumps(dict(json.loads(record.read_text()), int8_sha256=sha256_file(cached))))
    with caplog.at_level(logging.WARNING):
        _, swapped = calibrate(path, images, tmp_path / "e.onnx", cache_dir=tmp_path / "cache", min_weight_elements=1)
    assert swapped["cache"] == "miss" and (tmp_path / "e.onnx").read_bytes() == (tmp_path / "a.onnx").read_bytes()
    assert "is not this model's INT8 graph (it is not an INT8 graph)" in caplog.text
    # nor is a graph put there while the cached one is being checked: the graph checked is the graph copied
    from_onnx = calibrate_module.ModelMetadata.from_onnx
    calls = []

    def swap_while_checking(proto):
        calls.append(1)
        if len(calls) == 2:  # the first reads the fp32 graph given; the second checks the cached one
            shutil.copyfile(path, cached)
        return from_onnx(proto)

    monkeypatch.setattr(calibrate_module.ModelMetadata, "from_onnx", staticmethod(swap_while_checking))
    _, checked = calibrate(path, images, tmp_path / "f.onnx", cache_dir=tmp_path / "cache", min_weight_elements=1)
    assert len(calls) >= 2 and checked["cache"] == "hit"
    assert (tmp_path / "f.onnx").read_bytes() == (tmp_path / "a.onnx").read_bytes()
    # and a file far larger than the fp32 graph it would come from is not read at all
    monkeypatch.undo()
    with open(cached, "r+b") as f:
        f.truncate(2 * path.stat().st_size + calibrate_module.CACHE_SLACK_BYTES + 1)
    _, too_large = calibrate(path, images, tmp_path / "g.onnx", cache_dir=tmp_path / "cache", min_weight_elements=1)
    assert too_large["cache"] == "miss" and (tmp_path / "g.onnx").read_bytes() == (tmp_path / "a.onnx").read_bytes()


def test_a_graph_replaced_while_the_images_are_read_is_not_mixed_into_the_int8_graph(fp32_graph, other_tiny_export,
                                                                                      synthetic_dataset, tmp_path,
                                                                                      monkeypatch):
    """calibrate read the fp32 file three times (metadata, the cache key, the weights quantised): an export
    to the same name while the images were read gave an INT8 graph of the other model's weights under
    this model's metadata, cached, and served again on later hits."""
    _, path = fp32_graph
    images = data.train_images(synthetic_dataset)[:16]
    model = tmp_path / "m.onnx"
    shutil.copyfile(path, model)
    expected, _ = calibrate(model, images, tmp_path / "expected.onnx", cache_dir=tmp_path / "cache-a",
                            min_weight_elements=1)
    survey = data.survey

    def surveyed_while_replaced(*args, **kwargs):
        found = survey(*args, **kwargs)
        shutil.copyfile(other_tiny_export[1], model)  # an export to the same name finished meanwhile
        return found

    monkeypatch.setattr(data, "survey", surveyed_while_replaced)
    out, report = calibrate(model, images, tmp_path / "out.onnx", cache_dir=tmp_path / "cache-b", min_weight_elements=1)
    assert report["cache"] == "miss" and out.read_bytes() == expected.read_bytes()
    record = json.loads(Path(report["cache_file"].replace(".int8.onnx", ".json")).read_text())
    assert record["onnx_sha256"] == sha256_file(path)  # the graph quantised, not the one there now


def test_a_graph_with_its_weights_beside_it_is_calibrated_once(fp32_graph, synthetic_dataset, tmp_path):
    """The cached INT8 graph holds its weights inside it, so it is larger than such an fp32 graph's own
    file: the size bound on cached graphs refused it, and every run calibrated again."""
    _, path = fp32_graph
    folder = tmp_path / "external"
    folder.mkdir()
    onnx.save(onnx.load(str(path)), str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    images = data.train_images(synthetic_dataset)[:16]
    runs = [calibrate(folder / "m.onnx", images, tmp_path / f"{n}.onnx", cache_dir=tmp_path / "cache",
                      min_weight_elements=1)[1]["cache"] for n in range(2)]
    assert runs == ["miss", "hit"]


def test_int8_graph_ranks_images_like_fp32_and_builds(fp32_graph, synthetic_dataset, tmp_path):
    # What INT8 promises is FP32's ranking, not its numbers: ONNX Runtime's INT8 kernels differ between
    # CPUs (AVX2 against AVX-512/VNNI), and a tolerance on maps held on one and failed on the other.
    folder, path = fp32_graph
    out, _ = calibrate(path, cache_dir=folder / "cache", min_weight_elements=1)
    samples = data.eval_samples(synthetic_dataset)
    labels = [s.label for s in samples]
    with Detector(path) as fp32, Detector(out) as int8:
        full = [r.score for r in fp32.predict([s.path for s in samples])]
        quantised = [r.score for r in int8.predict([s.path for s in samples])]
    assert image_auroc(labels, full) == 1.0  # the tiny model separates the synthetic defects ...
    assert image_auroc(labels, quantised) == 1.0  # ... and so does its INT8 graph
    assert rank_correlation(full, quantised) > 0.8
    require_tensorrt()
    from stmae_edge.engines.build import build_engine

    plan, sidecar = build_engine(out, "int8", "1:2:4", tmp_path / "m.int8.plan")
    assert sidecar["precision"] == "int8" and plan.stat().st_size > 50_000
    # As TensorRT reads the graph: every convolution and matrix product runs in fp16 or INT8, but for
    # the scoring's (the map's sharp Gaussian and the score head's: two MatMuls and a smoothing Conv
    # each; the map's wide Gaussian: two MatMuls; the score head's second, wider smoothing), which run
    # in fp32.
    from stmae_edge.engine_plan import import_tensorrt

    trt, _ = import_tensorrt()
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(0)
    assert trt.OnnxParser(network, logger).parse_from_file(str(out))
    heavy = {trt.LayerType.CONVOLUTION, trt.LayerType.MATRIX_MULTIPLY}
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    fp32_heavy = [layer.name for layer in layers if layer.type in heavy
                  and layer.get_output(0).dtype == trt.DataType.FLOAT]
    proto = onnx.load(str(out))
    region = float_region(proto, scoring_nodes(onnx.load(str(path))))
    in_region = [n.name for n in proto.graph.node if n.name in region and n.op_type in ("Conv", "MatMul")]
    assert len(fp32_heavy) == len(in_region) == 9, (fp32_heavy, in_region)
    assert sum(layer.type in heavy and layer.get_output(0).dtype == trt.DataType.HALF for layer in layers) > 10


def test_intensity_normalisation_stays_fp32_in_every_graph_and_builds(synthetic_dataset, tmp_path):
    # `--preset small-intensity-norm`: whole-image means, which overflow fp16 sums, before the backbone.
    from stmae_edge.models.stmae import preset
    from stmae_edge.training.train import TrainConfig, train

    train(synthetic_dataset, tmp_path / "m.pt", preset("tiny", intensity_norm=True),
          TrainConfig(epochs=1, batch_size=8), backbone_weights="random")
    path, _ = export_onnx(tmp_path / "m.pt", tmp_path / "m.onnx")
    intensity = scoring_nodes(onnx.load(str(path)), INTENSITY_SCOPE)
    fp16, _ = export_onnx(tmp_path / "m.pt", tmp_path / "m.fp16.onnx", "fp16")
    int8, _ = calibrate(path, cache_dir=tmp_path / "cache", min_weight_elements=1)
    for graph in (fp16, int8):
        proto = onnx.load(str(graph))
        types = float_types(proto)
        mine = [n for n in proto.graph.node if n.name in intensity]
        assert {"ReduceMean", "Sqrt", "Div"} <= {n.op_type for n in mine}, graph
        assert all(types[o] == TensorProto.FLOAT for n in mine for o in n.output if o in types), graph
        region = float_region(proto, scoring_nodes(proto))
        convs = [n for n in proto.graph.node if n.op_type == "Conv" and n.name not in region]
        assert convs and all(types[n.output[0]] == TensorProto.FLOAT16 for n in convs), graph  # the backbone
    samples = [s.path for s in data.eval_samples(synthetic_dataset)]
    with Detector(path) as fp32, Detector(int8) as quantised:
        assert rank_correlation([r.score for r in fp32.predict(samples)],
                                [r.score for r in quantised.predict(samples)]) > 0.8
    require_tensorrt()
    from stmae_edge.engines.build import build_engine

    plan, sidecar = build_engine(int8, "int8", "1:2:4", tmp_path / "m.int8.plan")
    assert sidecar["precision"] == "int8" and plan.stat().st_size > 50_000


def test_only_fp32_graphs_are_calibrated(tiny_fp16_export, tmp_path):
    fp16 = tiny_fp16_export[1]
    with pytest.raises(ConfigError, match="calibrate the fp32 export"):
        calibrate(fp16, cache_dir=tmp_path / "cache")


def test_unreadable_images_and_a_graph_the_quantiser_rejects_are_one_error_each(fp32_graph, synthetic_dataset,
                                                                                tmp_path):
    """A calibration image that cannot be read stopped calibration midway; ONNX Runtime's quantiser
    raised its own exception type (InvalidArgument), which reached the user as a traceback."""
    from stmae_edge.errors import DatasetError, ExportError

    _, path = fp32_graph
    images = data.images_in(synthetic_dataset / "test" / "good")
    broken = tmp_path / "broken.png"
    broken.write_bytes(images[0].read_bytes()[:80])
    with pytest.raises(DatasetError, match=r"1 of 7 calibration images cannot be read: .*broken.png"):
        calibrate(path, [*images, broken], tmp_path / "q.onnx", cache_dir=tmp_path / "cache", batch_size=2,
                  min_weight_elements=1)
    graph = onnx.load(str(path))
    del graph.graph.node[0]  # a node's input now comes from nowhere: our metadata, an invalid graph
    invalid = tmp_path / "invalid.onnx"
    onnx.save(graph, str(invalid))
    with pytest.raises(ExportError, match=r"invalid.onnx: ONNX Runtime's quantisation failed \(.*Invalid model"):
        calibrate(invalid, images, tmp_path / "q.onnx", cache_dir=tmp_path / "cache", batch_size=2,
                  min_weight_elements=1)
    assert not (tmp_path / "q.onnx").exists() and not list((tmp_path / "cache").glob("*.onnx"))

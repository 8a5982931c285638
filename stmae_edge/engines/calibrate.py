"""INT8 calibration: an fp32 ONNX export -> a symmetric Q/DQ INT8 graph that TensorRT accepts.

Tool: onnxruntime.quantization, which the runtime already depends on, so calibration adds no package.
Settings, each from measurement on magnetic_tile:
- Q/DQ format, symmetric (every zero point 0): TensorRT rejects non-zero zero points.
- Biases stay float (QuantizeBias off): TensorRT's parser rejects the int32 bias DequantizeLinear.
- Which ops are quantised depends on the model family (FAMILY_SETTINGS). ST-MAE: only MatMul, that is
  the transformer, and only its large MatMuls with weights (layers_left_in_float: not attention's
  products of two activations, and not Linear layers under 65536 weights, which make a TensorRT plan
  larger, not smaller; in the default model its input and output projections and its encoder's
  query-key-value products are quantised); the backbone convolutions stay in float. Measured (image / pixel AUROC): fp32
  88.3 / 69.0; MatMul only 88.4 / 68.8; Conv only 86.5 / 65.6; Conv and MatMul 85.0 / 65.4. The
  per-position Gaussian of the fused map (its MatMuls read initializers named gaussian_*) stays in
  float too: like the autoencoder's output convolutions below, it is the anomaly signal itself. The
  filtering autoencoder is all convolutions, so its Conv layers are quantised, except its output
  convolutions (at most 3 output channels: the correction head and the map smoothing). Their outputs
  are the anomaly signal itself; quantised, they would be clipped at the range good calibration
  images reach, exactly where defects go beyond it.
- The layers left unquantised run in fp16 (FLOAT_PRECISIONS, default fp16): the INT8 graph is the FP16
  graph with Q/DQ on the quantised layers, so a TensorRT INT8 plan is never an FP32 network with a few
  INT8 layers, larger and slower than the FP16 plan. The scoring (the model's anomaly map, found by the
  exporter's `scoring` scope) stays fp32, as in the FP16 export: half_precision.py. `fp32` keeps today's
  fp32 graph for ONNX Runtime on a CPU, which has few fp16 kernels and runs that graph 1.3x to 1.4x faster.

The result is cached under calibration/, keyed by a hash of the model file, the images and the
settings, and reused when all three match.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import onnx

from .. import __version__, data, image_header, preprocessing
from ..checks import is_whole, parse_document
from ..errors import ConfigError, DatasetError, ExportError, StmaeError, first_line
from ..metadata import FILTERING_AE_FAMILY, INPUT_NAME, PRECISION_KEY, STMAE_FAMILY, ModelMetadata, onnx_precision
from ..model_files import thresholds_to_be_replaced, warn_thresholds_replaced
from ..onnx_files import has_external_data, import_onnxruntime, load_onnx_bytes, parse_onnx
from ..outputs import check_not_an_input, check_writable, sha256_file, write_bytes_atomically, written_atomically
from ..progress import progress_bar
from . import half_precision
from .half_precision import INTENSITY_SCOPE, float_region, scoring_nodes, statistics_nodes, to_half

log = logging.getLogger(__name__)

# min_weight_elements: the smallest layer quantised
# (0: no rule, products of two activations too; the model families set their own).
SETTINGS = {"format": "QDQ", "symmetric": True, "per_channel": True, "quantize_bias": False,
            "op_types": ["MatMul"], "method": "MinMax", "activation": "int8", "weight": "int8",
            "float_precision": "fp16", "min_weight_elements": 0}
FLOAT_PRECISIONS = ("fp16", "fp32")
FAMILY_SETTINGS = {STMAE_FAMILY: {"op_types": ["MatMul"], "float_statistics": True, "min_weight_elements": 65536},
                   FILTERING_AE_FAMILY: {"op_types": ["Conv"], "float_output_convs": True}}
OUTPUT_CONV_CHANNELS = 3  # a Conv with at most this many output channels produces or smooths the map
DEFAULT_COUNT = 64


def settings_for(metadata: ModelMetadata, float_precision: str = SETTINGS["float_precision"],
                 min_weight_elements: int | None = None) -> dict:
    """SETTINGS with what the model's family quantises, the precision of the rest, and (when given)
    the smallest layer worth quantising instead of the family's."""
    if metadata.model_family not in FAMILY_SETTINGS:
        raise ConfigError(f"no INT8 settings for model family {metadata.model_family!r}")
    if float_precision not in FLOAT_PRECISIONS:
        raise ConfigError(f"unknown precision {float_precision!r} for the unquantised layers; choose "
                          f"{' or '.join(FLOAT_PRECISIONS)}")
    if min_weight_elements is not None and min_weight_elements < 1:
        raise ConfigError(f"--min-weights must be at least 1 (got {min_weight_elements}): 1 quantises every layer "
                          "with weights")
    settings = SETTINGS | FAMILY_SETTINGS[metadata.model_family] | {"float_precision": float_precision}
    return settings | ({"min_weight_elements": min_weight_elements} if min_weight_elements is not None else {})


def output_convs(proto: onnx.ModelProto) -> list[str]:
    """Names of the Conv nodes whose weights have at most OUTPUT_CONV_CHANNELS output channels."""
    weights = {init.name: init for init in proto.graph.initializer}
    return [node.name for node in proto.graph.node if node.op_type == "Conv" and node.input[1] in weights
            and weights[node.input[1]].dims[0] <= OUTPUT_CONV_CHANNELS]


def signal_layers(proto: onnx.ModelProto, settings: dict) -> list[str]:
    """Names of the layers that make the anomaly signal itself, never quantised: the family's output
    convolutions or per-position statistics, as `settings` says."""
    signal = output_convs(proto) if settings.get("float_output_convs") else []
    return signal + (statistics_nodes(proto) if settings.get("float_statistics") else [])


def weight_elements(proto: onnx.ModelProto, op_types: Sequence[str]) -> dict[str, int]:
    """Each node of `op_types` and its number of weight elements: the size of its constant operand (an
    initializer, or one seen through Transpose or Reshape), 0 where it multiplies two activations
    (attention's scores and its weighted sum)."""
    sizes = {init.name: int(np.prod(init.dims)) for init in proto.graph.initializer}
    producer = {out: node for node in proto.graph.node for out in node.output}

    def constant_size(name: str) -> int:
        node = producer.get(name)
        if name in sizes:
            return sizes[name]
        if node is not None and node.op_type in ("Transpose", "Reshape"):
            return constant_size(node.input[0])
        return 0

    return {node.name: max(constant_size(name) for name in node.input)
            for node in proto.graph.node if node.op_type in op_types}


def layers_left_in_float(sizes: dict[str, int], min_weight_elements: int) -> list[str]:
    """Names of the layers INT8 does not pay for, so they run in the precision of the rest, from their
    weight_elements: those with no weight to shrink (a product of two activations) and those with fewer
    than `min_weight_elements` weights. Measured with TensorRT for RTX on ST-MAE's transformer, each
    MatMul quantised alone: the 704x160 and 128x704 projections make the plan smaller (0.19 and 0.07 MB),
    each product inside the transformer blocks larger (0.1 to 0.4 MB); the six from 65536 weights
    together, the projections and the encoder's 160x480 query-key-value products, make it smaller than
    FP16 (docs/BENCHMARKS.md, "INT8 engines with the rest in fp16")."""
    return [name for name, size in sizes.items() if size < min_weight_elements]


def layers_kept_in_float(proto: onnx.ModelProto, settings: dict, onnx_path: Path) -> list[str]:
    """Names of the layers calibration leaves unquantised: those that make the anomaly signal and those
    too small to pay (layers_left_in_float).

    Raises:
        ConfigError: no layer is left to quantise; the INT8 graph would be the FP16 graph.
    """
    signal = signal_layers(proto, settings)
    if not (settings["op_types"] and settings["min_weight_elements"]):  # op_types None: every op (the CPU study)
        return signal
    sizes = weight_elements(proto, settings["op_types"])
    small = layers_left_in_float(sizes, settings["min_weight_elements"])
    check_something_quantised(sizes, signal, small, settings, onnx_path)
    return signal + small


def check_something_quantised(sizes: dict[str, int], signal: Sequence[str], small: Sequence[str], settings: dict,
                              onnx_path: Path) -> None:
    """Raises ConfigError when no layer is left to quantise, once the layers that make the anomaly
    signal (`signal`) and those too small to pay (`small`) are left out: the INT8 graph would be the
    FP16 graph. `sizes`: weight_elements of the graph."""
    candidates = {name: size for name, size in sizes.items() if name not in signal}
    if not set(candidates) - set(small):
        largest = max(candidates.values(), default=0)
        raise ConfigError(f"{onnx_path}: no layer of this model is large enough for INT8 to pay (its largest "
                          f"{'/'.join(settings['op_types'])} has {largest} weights, INT8 starts at "
                          f"{settings['min_weight_elements']}); build the FP16 graph instead, or quantise the "
                          "small layers anyway with --min-weights 1")


def scoring_region(quantized: onnx.ModelProto, scoring: set[str], onnx_path: Path) -> set[str]:
    """float_region of the quantised graph, after checking that the scoring survived quantisation:
    some of its nodes are still there by name, and every graph output comes from it.

    Raises:
        ConfigError: it did not; the fp16 graph would score in fp16.
    """
    region = float_region(quantized, scoring)
    producers = {out: node.name for node in quantized.graph.node for out in node.output}
    outputs_scored = all(producers.get(o.name) in region for o in quantized.graph.output)
    if not scoring & {node.name for node in quantized.graph.node} or not outputs_scored:
        raise ConfigError(f"{onnx_path}: the scoring part of the graph was not found after quantisation; calibrate "
                          "with --float-precision fp32")
    return region


# This package's code that turns a graph and images into an INT8 graph: a change to any of it (a decoding
# fix, another quantisation rule, another graph written) calibrates again, with no version to raise by hand
CODE_DECIDING_CALIBRATION = (Path(__file__), Path(half_precision.__file__), Path(preprocessing.__file__),
                             Path(image_header.__file__))


def code_digest() -> str:
    """sha256 of the source files that decide a calibration, and of the versions of the libraries they
    decode and rewrite with; the package's version in place of the files where they cannot be read."""
    try:
        sources = [sha256_file(source) for source in CODE_DECIDING_CALIBRATION]
    except OSError:
        sources = [__version__]
    return hashlib.sha256(" ".join([*sources, onnx.__version__, cv2.__version__, np.__version__]).encode()).hexdigest()


def cache_key(graph_sha256: str, images: Sequence[Path], settings: dict) -> str:
    """The graph's (its bytes' sha256), the images', the settings', onnxruntime's version's and this
    package's calibration code's digest, naming a cached calibration.

    Raises:
        DatasetError: images that cannot be read (all counted, the first five named), before anything is
            calibrated.
    """
    h = hashlib.sha256()
    h.update(graph_sha256.encode())
    unreadable = []
    for path in images:
        try:
            h.update(sha256_file(path).encode())
        except OSError as exc:
            unreadable.append(f"{path} ({exc.strerror or first_line(exc)})")
    if unreadable:
        raise DatasetError(f"{len(unreadable)} of {len(images)} calibration images cannot be read: "
                           f"{data.first_named(unreadable)}. Calibrate from image files that can be read")
    h.update(json.dumps(settings, sort_keys=True).encode())
    # the quantiser's own version: another onnxruntime may choose other scales from the same images
    h.update(import_onnxruntime().__version__.encode())
    h.update(code_digest().encode())
    return h.hexdigest()[:16]


# Room above twice the fp32 graph's size for a cached INT8 graph: Q/DQ nodes and scales of a tiny model
CACHE_SLACK_BYTES = 1 << 20


def intact_cached_graph(cached: Path, record: Path, metadata: ModelMetadata, largest: int | None) -> bytes | None:
    """The bytes of a cached INT8 graph that is the one its record describes (its sha256) and an INT8 graph
    of this model that passes the checks any graph a user hands in does; None where it must be calibrated
    again. A cache folder is a user's folder: a graph edited, damaged or put there by anything else (with
    a record to match) is not shipped. Read once, so the graph checked is the graph copied, and only up to
    `largest` bytes (an INT8 graph is smaller than the fp32 graph it was made from; None: any size)."""
    try:
        if not cached.is_file() or (largest is not None and cached.stat().st_size > largest):
            return None
        graph = cached.read_bytes()
    except OSError:
        return None
    try:
        recorded = parse_document(record.read_bytes(), str(record), ConfigError).get("int8_sha256")
    except (OSError, ConfigError):
        recorded = None
    if recorded != hashlib.sha256(graph).hexdigest():
        log.warning("calibration cache %s does not match its record %s; calibrating again", cached, record.name)
        return None
    try:
        proto = parse_onnx(graph, cached)
        why = ("it is not an INT8 graph" if onnx_precision(proto) != "int8" else
               "it is another model's" if ModelMetadata.from_onnx(proto).model_hash != metadata.model_hash else "")
    except StmaeError as exc:
        why = str(exc)
    if why:
        log.warning("calibration cache %s is not this model's INT8 graph (%s); calibrating again", cached, why)
        return None
    return graph


def calibrate(onnx_path: Path | str, images: Sequence[Path] | None = None, out: Path | str | None = None,
              count: int = DEFAULT_COUNT, cache_dir: Path | str = "calibration",
              batch_size: int = 8, float_precision: str = SETTINGS["float_precision"],
              min_weight_elements: int | None = None) -> tuple[Path, dict]:
    """Calibrate an fp32 export on good images and write its INT8 graph.

    Args:
        onnx_path: fp32 graph written by `stmae-edge export`.
        images: good images (default: `count` of the model's recorded training images).
        out: the INT8 graph (default: NAME.int8.onnx beside the input).
        float_precision: fp16 (for TensorRT) or fp32 (for ONNX Runtime on a CPU) for the layers left
            unquantised; the scoring stays fp32 either way.
        min_weight_elements: quantise only layers with at least this many weights (default: the
            family's, FAMILY_SETTINGS; 1 quantises every layer with weights).

    Returns:
        The INT8 graph's path and a report {cache: hit|miss, key, images, quantized_nodes, settings,
        int8_layers, weighted_layers (the layers that could be: all with weights but the anomaly signal's)}.

    Raises:
        ConfigError: not an fp32 graph, an unknown family or precision, (fp16) a graph exported
            without the scoring scope, no layer as large as `min_weight_elements`, or a batch size or
            count that is not a whole number >= 1.
        DatasetError: fewer images than one batch, `images` not a list of paths, or images that cannot
            be read (all counted, the first five named, before calibration starts).
        ExportError: ONNX Runtime's quantisation failed on the graph.
        CheckpointError: not a readable ONNX file of ours. OutputError: `out` cannot be written.
    """
    for name, value in (("batch_size", batch_size), ("count", count)):
        if not is_whole(value) or value < 1:
            raise ConfigError(f"{name} {value!r} must be a whole number, at least 1")
    if images is not None and (isinstance(images, (str, os.PathLike))
                               or not all(isinstance(p, (str, os.PathLike)) for p in images)):
        raise DatasetError("images must be a list of image file paths (data.images_in(FOLDER) lists a folder's), "
                           f"not {images!r:.120}")
    onnx_path = Path(onnx_path)
    # Read once: its digest names the cache, and its bytes are what is quantised, so that an export to
    # this name while the images are read cannot put one model's weights under another's metadata
    proto, fp32_graph = load_onnx_bytes(onnx_path)
    fp32_sha256 = hashlib.sha256(fp32_graph).hexdigest()
    metadata = ModelMetadata.from_onnx(proto)
    if onnx_precision(proto) != "fp32":
        raise ConfigError(f"{onnx_path} is an {onnx_precision(proto)} graph; calibrate the fp32 export "
                          "(`stmae-edge export MODEL`)")
    # an empty --images folder is refused below, not taken for "no folder given" (the training images instead)
    images = sorted(map(Path, images)) if images is not None else data.recorded_train_images(metadata.training, count)
    if len(images) < batch_size:
        raise DatasetError(f"{len(images)} calibration images; give at least {batch_size} good images")
    settings = settings_for(metadata, float_precision, min_weight_elements)
    if settings["float_precision"] == "fp16" and not scoring_nodes(proto):
        raise ConfigError(f"{onnx_path} was exported by an older version, without the marks that tell its "
                          "scoring part (kept in fp32) from the rest; export it again with `stmae-edge "
                          "export MODEL`, or calibrate with --float-precision fp32")
    out = check_not_an_input(out or onnx_path.with_name(f"{onnx_path.stem}.int8.onnx"), [onnx_path, *images])
    layers_kept_in_float(proto, settings, onnx_path)  # refused before any folder is made for its outputs
    out = check_writable(out)  # its inputs checked above
    earlier_thresholds = thresholds_to_be_replaced(out, metadata)
    key = cache_key(fp32_sha256, images, settings)
    cache_dir = Path(cache_dir)
    cached = cache_dir / f"{onnx_path.stem}.{key}.int8.onnx"
    record = cache_dir / f"{onnx_path.stem}.{key}.json"
    # A graph whose weights lie beside it has an INT8 graph larger than its own file: no bound then
    largest = None if has_external_data(proto) else 2 * len(fp32_graph) + CACHE_SLACK_BYTES
    graph = intact_cached_graph(cached, record, metadata, largest)
    report = {"key": key, "images": len(images), "folder": data.folder_of(images),
              "cache": "miss" if graph is None else "hit", "cache_file": str(cached), "settings": settings}
    if graph is None:
        data.survey(images, "calibration images", digests=False)  # every one decoded before calibration starts
        check_writable(cached, option="--cache-dir")
        with written_atomically(cached) as partial:  # a cache hit must never find half a graph
            _quantize(onnx_path, proto, metadata, images, partial, batch_size, settings, fp32_graph)
            graph = partial.read_bytes()
        write_bytes_atomically(record, (json.dumps(
            {"onnx": str(onnx_path), "onnx_sha256": fp32_sha256,
             "int8_sha256": hashlib.sha256(graph).hexdigest(), "images": [str(p) for p in images],
             "settings": settings}, indent=2) + "\n").encode())
    write_bytes_atomically(out, graph)
    warn_thresholds_replaced(out, earlier_thresholds, metadata.thresholds)
    quantized = parse_onnx(graph, out, ExportError)
    report["quantized_nodes"] = sum(n.op_type == "QuantizeLinear" for n in quantized.graph.node)
    produced_by = {o: n.op_type for n in quantized.graph.node for o in n.output}
    report["int8_layers"] = sum(n.op_type in settings["op_types"] and
                                any(produced_by.get(i) == "DequantizeLinear" for i in n.input)
                                for n in quantized.graph.node)
    signal = set(signal_layers(proto, settings))
    report["weighted_layers"] = sum(size > 0 and name not in signal
                                    for name, size in weight_elements(proto, settings["op_types"]).items())
    return out, report


@contextlib.contextmanager
def quantisation_errors(onnx_path: Path) -> Iterator[None]:
    """ONNX Runtime's quantisation raises its own exception types (InvalidArgument, Fail) and ValueError:
    one ExportError saying so, instead of a traceback (our own typed errors pass through)."""
    try:
        yield
    except (StmaeError, OSError):  # an OSError is the disk's (full, say): the writer names it, not the graph
        raise
    except Exception as exc:  # noqa: BLE001 - whatever the quantiser raises, the user needs its first line
        raise ExportError(f"{onnx_path}: ONNX Runtime's quantisation failed ({first_line(exc, 300)}); check the "
                          "graph with `stmae-edge verify`, or export the model again") from exc


def _quantize(onnx_path: Path, proto: onnx.ModelProto, metadata: ModelMetadata, images: Sequence[Path],
              target: Path, batch_size: int, settings: dict = SETTINGS, fp32_graph: bytes | None = None) -> None:
    """Static quantisation with `settings` (SETTINGS: the TensorRT-compatible default; the CPU study in
    benchmarks/ tries others), calibrated on `images`, metadata carried over with precision int8.
    `fp32_graph`: the bytes `proto` was read from, quantised from a copy (None: onnx_path's bytes now)."""
    import_onnxruntime()  # its log quieted as the CLI asked, before quantisation's sessions start
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self, advance):
            self.chunks = iter(range(0, len(images), batch_size))
            self.advance = advance

        def get_next(self):
            start = next(self.chunks, None)
            if start is None:
                return None
            chunk = images[start:start + batch_size]
            self.advance(len(chunk))
            return {INPUT_NAME: metadata.preprocessing(chunk)}

    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    with tempfile.TemporaryDirectory() as tmp, quantisation_errors(onnx_path):
        prepared, source = Path(tmp) / "prepared.onnx", onnx_path
        if fp32_graph is not None and not has_external_data(proto):  # external data is found beside onnx_path
            source = Path(tmp) / "fp32.onnx"
            source.write_bytes(fp32_graph)
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        prepared_proto = onnx.load(str(prepared))
        excluded = layers_kept_in_float(prepared_proto, settings, onnx_path)
        with progress_bar("calibrating", len(images)) as advance:
            quantize_static(str(prepared), str(target), Batches(advance), nodes_to_exclude=excluded,
                            quant_format=getattr(QuantFormat, settings["format"]),
                            per_channel=settings["per_channel"], op_types_to_quantize=settings["op_types"],
                            activation_type=types[settings["activation"]], weight_type=types[settings["weight"]],
                            calibrate_method=getattr(CalibrationMethod, settings["method"]),
                            extra_options={"ActivationSymmetric": settings["symmetric"], "WeightSymmetric": True,
                                           "QuantizeBias": settings["quantize_bias"]})
    quantized = onnx.load(str(target))
    if settings["float_precision"] == "fp16":
        keep_float = scoring_region(quantized, scoring_nodes(proto), onnx_path) | scoring_nodes(proto, INTENSITY_SCOPE)
        quantized = to_half(quantized, keep_float)
    del quantized.metadata_props[:]
    props = {p.key: p.value for p in proto.metadata_props}
    props[PRECISION_KEY] = "int8"
    onnx.helper.set_model_props(quantized, props)
    onnx.save(quantized, str(target))

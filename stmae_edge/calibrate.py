"""INT8 calibration: an fp32 ONNX export -> a symmetric Q/DQ INT8 graph that TensorRT accepts.

Tool: onnxruntime.quantization, which the runtime already depends on, so calibration adds no package.
Settings, each from measurement on magnetic_tile:
- Q/DQ format, symmetric (every zero point 0): TensorRT rejects non-zero zero points.
- Biases stay float (QuantizeBias off): TensorRT's parser rejects the int32 bias DequantizeLinear.
- Which ops are quantised depends on the model family (FAMILY_SETTINGS). ST-MAE: only MatMul, that is
  the transformer; the backbone convolutions stay in float. Measured (image / pixel AUROC): fp32
  88.3 / 69.0; MatMul only 88.4 / 68.8; Conv only 86.5 / 65.6; Conv and MatMul 85.0 / 65.4. The
  per-position Gaussian of the fused map (its MatMuls read initializers named gaussian_*) stays in
  float too: like the autoencoder's output convolutions below, it is the anomaly signal itself. The
  filtering autoencoder is all convolutions, so its Conv layers are quantised, except its output
  convolutions (at most 3 output channels: the correction head and the map smoothing). Their outputs
  are the anomaly signal itself; quantised, they would be clipped at the range good calibration
  images reach, exactly where defects go beyond it.

The result is cached under calibration/, keyed by a hash of the model file, the images and the
settings, and reused when all three match.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import onnx

from . import data
from .onnx_files import load_onnx
from .outputs import check_writable, write_bytes_atomically, written_atomically
from .engine_plan import sha256_file
from .errors import ConfigError, DatasetError
from .metadata import INPUT_NAME, PRECISION_KEY, onnx_precision
from .metadata import ModelMetadata
from .progress import progress_bar

SETTINGS = {"format": "QDQ", "symmetric": True, "per_channel": True, "quantize_bias": False,
            "op_types": ["MatMul"], "method": "MinMax", "activation": "int8", "weight": "int8"}
FAMILY_SETTINGS = {"stmae": {"op_types": ["MatMul"], "float_statistics": True},
                   "filtering-ae": {"op_types": ["Conv"], "float_output_convs": True}}
OUTPUT_CONV_CHANNELS = 3  # a Conv with at most this many output channels produces or smooths the map
DEFAULT_COUNT = 64


def settings_for(metadata: ModelMetadata) -> dict:
    """SETTINGS with what the model's family quantises."""
    if metadata.model_family not in FAMILY_SETTINGS:
        raise ConfigError(f"no INT8 settings for model family {metadata.model_family!r}")
    return SETTINGS | FAMILY_SETTINGS[metadata.model_family]


def output_convs(proto: onnx.ModelProto) -> list[str]:
    """Names of the Conv nodes whose weights have at most OUTPUT_CONV_CHANNELS output channels."""
    weights = {init.name: init for init in proto.graph.initializer}
    return [node.name for node in proto.graph.node if node.op_type == "Conv" and node.input[1] in weights
            and weights[node.input[1]].dims[0] <= OUTPUT_CONV_CHANNELS]


def statistics_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of the nodes that read ST-MAE's per-position Gaussian (initializers named gaussian_*).
    The Mahalanobis distance they compute is the anomaly signal itself: quantised at the range that
    good calibration images reach, it would be clipped exactly where defects go beyond it."""
    names = {init.name for init in proto.graph.initializer if init.name.rpartition(".")[2].startswith("gaussian_")}
    return [node.name for node in proto.graph.node if names.intersection(node.input)]


def cache_key(onnx_path: Path, images: Sequence[Path], settings: dict) -> str:
    h = hashlib.sha256()
    h.update(sha256_file(onnx_path).encode())
    for path in images:
        h.update(sha256_file(path).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:16]


def calibrate(onnx_path: Path | str, images: Sequence[Path] | None = None, out: Path | str | None = None,
              count: int = DEFAULT_COUNT, cache_dir: Path | str = "calibration",
              batch_size: int = 8) -> tuple[Path, dict]:
    """Returns the INT8 graph's path and a report {cache: hit|miss, key, images, quantized_nodes}."""
    onnx_path = Path(onnx_path)
    proto = load_onnx(onnx_path)
    metadata = ModelMetadata.from_onnx(proto)
    if onnx_precision(proto) != "fp32":
        raise ConfigError(f"{onnx_path} is an {onnx_precision(proto)} graph; calibrate the fp32 export "
                          "(`stmae-edge export MODEL`)")
    images = sorted(images) if images else data.recorded_train_images(metadata.training, count)
    if len(images) < batch_size:
        raise DatasetError(f"{len(images)} calibration images; give at least {batch_size} good images")
    out = check_writable(out or onnx_path.with_name(f"{onnx_path.stem}.int8.onnx"), [onnx_path, *images])
    settings = settings_for(metadata)
    key = cache_key(onnx_path, images, settings)
    cache_dir = Path(cache_dir)
    cached = cache_dir / f"{onnx_path.stem}.{key}.int8.onnx"
    report = {"key": key, "images": len(images), "cache": "hit" if cached.is_file() else "miss",
              "cache_file": str(cached), "settings": settings}
    if not cached.is_file():
        check_writable(cached)
        with written_atomically(cached) as partial:  # a cache hit must never find half a graph
            _quantize(onnx_path, proto, metadata, images, partial, batch_size, settings)
        write_bytes_atomically(cache_dir / f"{onnx_path.stem}.{key}.json", (json.dumps(
            {"onnx": str(onnx_path), "onnx_sha256": sha256_file(onnx_path),
             "images": [str(p) for p in images], "settings": settings}, indent=2) + "\n").encode())
    with written_atomically(out) as partial:
        shutil.copyfile(cached, partial)
    quantized = onnx.load(str(out))
    report["quantized_nodes"] = sum(n.op_type == "QuantizeLinear" for n in quantized.graph.node)
    return out, report


def _quantize(onnx_path: Path, proto: onnx.ModelProto, metadata: ModelMetadata, images: Sequence[Path],
              target: Path, batch_size: int, settings: dict = SETTINGS) -> None:
    """Static quantisation with `settings` (SETTINGS: the TensorRT-compatible default; the CPU study in
    benchmarks/ tries others), calibrated on `images`, metadata carried over with precision int8."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
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
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        prepared_proto = onnx.load(str(prepared))
        excluded = output_convs(prepared_proto) if settings.get("float_output_convs") else []
        excluded += statistics_nodes(prepared_proto) if settings.get("float_statistics") else []
        with progress_bar("calibrating", len(images)) as advance:
            quantize_static(str(prepared), str(target), Batches(advance), nodes_to_exclude=excluded,
                            quant_format=getattr(QuantFormat, settings["format"]),
                            per_channel=settings["per_channel"], op_types_to_quantize=settings["op_types"],
                            activation_type=types[settings["activation"]], weight_type=types[settings["weight"]],
                            calibrate_method=getattr(CalibrationMethod, settings["method"]),
                            extra_options={"ActivationSymmetric": settings["symmetric"], "WeightSymmetric": True,
                                           "QuantizeBias": settings["quantize_bias"]})
    quantized = onnx.load(str(target))
    del quantized.metadata_props[:]
    props = {p.key: p.value for p in proto.metadata_props}
    props[PRECISION_KEY] = "int8"
    onnx.helper.set_model_props(quantized, props)
    onnx.save(quantized, str(target))

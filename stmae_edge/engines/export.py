"""Export a checkpoint to one self-contained ONNX file, and check what was written.

The graph takes preprocessed images (N, 3, H, W) float32 with a dynamic batch and returns the anomaly
maps (N, 1, H, W) and image scores (N,). The eval split is the model's constant index buffers, so it
exports as Gather nodes with constant indices, and the return to raster order as a Gather with the
inverse permutation: no ScatterND, nothing random. The model's metadata (one schema: metadata.py)
goes into metadata_props, where the runtime reads it.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from ..checkpoint import load_model
from ..checks import require_model_file
from ..errors import ConfigError, ExportError, StmaeError, first_line
from ..metadata import (
    INPUT_NAME,
    MAP_NAME,
    MAX_BATCH,
    ONNX_METADATA_KEY,
    PRECISION_KEY,
    SCORE_NAME,
    ModelMetadata,
    onnx_precision,
)
from ..model_files import thresholds_to_be_replaced, warn_thresholds_replaced
from ..onnx_files import import_onnxruntime, ort_model_source
from ..outputs import check_writable, written_atomically
from ..progress import progress_bar
from .half_precision import is_statistic
from .parity import PARITY_RTOL, relative_difference

OPSET = 18
EXPORT_PRECISIONS = ("fp32", "fp16")



class HalfPrecision(torch.nn.Module):
    """fp16 inside, fp32 at the edges: callers keep feeding float32 images and reading float32 maps.
    The scoring statistics (half_precision.is_statistic) stay fp32: the map is computed in fp32 from
    them, and an fp16 copy of a precision matrix would lose what a Mahalanobis distance amplifies."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        statistics = {name: buffer.clone() for name, buffer in model.named_buffers()
                      if is_statistic(name) and buffer.is_floating_point()}
        self.model = model.half()
        for name, buffer in statistics.items():
            owner, _, attribute = name.rpartition(".")
            setattr(self.model.get_submodule(owner) if owner else self.model, attribute, buffer)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps, scores = self.model(images.half())
        return maps.float(), scores.float()

# Ops that TensorRT's ONNX parser supports and that this model needs (TensorRT 10 operator list).
# Anything else fails the export check: a new op must be looked up before it is allowed in.
TENSORRT_OPS = frozenset({
    "Abs", "Add", "AveragePool", "Cast", "Clip", "Concat", "Constant", "ConstantOfShape", "Conv",
    "DepthToSpace", "Div", "Equal", "Erf", "Expand", "Flatten", "Gather", "Gemm", "Identity",
    "LayerNormalization", "MatMul", "Max", "MaxPool", "Min", "Mul", "Neg", "Pad", "Pow", "Range", "ReduceL2",
    "ReduceMax", "ReduceMean", "ReduceSum", "Relu", "Reshape", "Resize", "Shape", "Sigmoid", "Slice",
    "Softmax", "Sqrt", "Squeeze", "Sub", "Tanh", "Transpose", "Unsqueeze", "Where",
})


def default_onnx_path(checkpoint: Path | str, precision: str = "fp32") -> Path:
    suffix = "" if precision == "fp32" else f".{precision}"
    return Path("export") / f"{Path(checkpoint).stem}{suffix}.onnx"


def export_onnx(checkpoint: Path | str, out: Path | str | None = None,
                precision: str = "fp32") -> tuple[Path, dict]:
    """Checkpoint -> ONNX file with metadata; returns the path and the checks' figures.

    Args:
        checkpoint: a .pt file written by `train`.
        out: the ONNX file (default: export/NAME.onnx, or NAME.fp16.onnx).
        precision: fp32 or fp16 (INT8 comes from engines/calibrate.py).

    Returns:
        The ONNX file's path and the checks' figures (op counts, parity with PyTorch).

    Raises:
        ConfigError: an unknown precision.
        CheckpointError: an unreadable or modified checkpoint.
        ExportError: the exporter failed, or the graph fails the checks after export (TensorRT's op
            allow-list, no ScatterND, outputs that agree with PyTorch).
        OutputError: `out` cannot be written, or names the checkpoint.
    """
    if precision not in EXPORT_PRECISIONS:
        raise ConfigError(f"unknown export precision {precision!r}; choose {', '.join(EXPORT_PRECISIONS)} "
                          "(int8 comes from `stmae-edge calibrate`)")
    require_model_file(checkpoint)  # before --out's folder is made: a mistyped name leaves nothing behind
    out = check_writable(out or default_onnx_path(checkpoint, precision), [checkpoint])
    with progress_bar(f"exporting {Path(checkpoint).name}", 3) as step:
        step(0, status="loading the model")
        figures = _export_and_check(checkpoint, out, precision, step)
    return out, figures


def _export_and_check(checkpoint: Path | str, out: Path, precision: str, step) -> dict:
    """export_onnx's work, `step` moving its progress bar: the export, then the checks on the file."""
    model, metadata = load_model(checkpoint)
    earlier_thresholds = thresholds_to_be_replaced(out, metadata)
    reference = model
    if precision == "fp16":
        reference = copy.deepcopy(model)  # .half() converts in place; the fp32 twin checks parity
        model = HalfPrecision(model).eval()
    size = metadata.preprocessing.input_size
    # A batch of 2 as the example: with 1, exporters can bake batch 1 into the graph.
    example = torch.zeros(2, 3, *size)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    step(1, status="exporting the graph (the longest step)")
    try:
        # verbose=False: the exporter's status lines went to stdout, which was swapped for the whole export
        # to keep them off (a host program's other threads lost their output meanwhile)
        with quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(model, (example,), input_names=[INPUT_NAME],
                                        output_names=[MAP_NAME, SCORE_NAME],
                                        dynamic_shapes={"images": {0: batch}}, dynamo=True,
                                        opset_version=OPSET, optimize=True, verbose=False)
    except Exception as exc:  # the exporter raises many types; the user needs the first line
        missing = missing_package(exc)
        if missing is not None and missing.name.partition(".")[0] == "onnxscript":  # the CLI says which extra
            raise missing from None
        raise ExportError(f"ONNX export of {checkpoint} failed: {first_line(exc)}") from exc
    proto = program.model_proto
    proto.producer_name = "stmae-edge"
    onnx.helper.set_model_props(proto, {ONNX_METADATA_KEY: metadata.to_onnx_value(),
                                        PRECISION_KEY: precision})
    step(1, status="checking it against PyTorch")
    with written_atomically(out) as partial:  # checked before it takes the real name
        onnx.save(proto, str(partial))
        try:
            figures = check_onnx(partial, reference)
        except StmaeError:
            raise
        except Exception as exc:  # ONNX Runtime's own types; not a write failure, which the block would say
            raise ExportError(f"the graph exported from {checkpoint} fails its checks: "
                              f"{first_line(exc)}") from exc
        difference, limit = figures["smoke_max_rel_diff"], PARITY_RTOL[precision] if precision == "fp32" else np.inf
        if not difference <= limit:  # NaN too
            raise ExportError(f"the {precision} graph exported from {checkpoint} does not reproduce the model: its "
                              f"outputs differ by {difference:.1e} relative on random inputs, more than {limit:g}; "
                              "nothing was written")
    warn_thresholds_replaced(out, earlier_thresholds, metadata.thresholds)
    step(1, status="done")
    return figures


def missing_package(exc: BaseException) -> ModuleNotFoundError | None:
    """The ModuleNotFoundError behind `exc`, itself or among its causes, if there is one."""
    seen: BaseException | None = exc
    for _ in range(16):  # a chain of causes, bounded
        if seen is None:
            return None
        if isinstance(seen, ModuleNotFoundError) and seen.name:
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


@contextlib.contextmanager
def quiet_exporter():
    """The exporter's notes that are not about this model (torchvision's detection ops it cannot register
    where torchvision is absent, a deprecation inside torch's own pytree) kept off the user's terminal."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        registration.setLevel(level)


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    return dict(collections.Counter(node.op_type for node in proto.graph.node))


def check_onnx(path: Path | str, model=None) -> dict:
    """onnx.checker, shape inference, the op allow-list and, given the torch model, a smoke parity run."""
    proto = onnx.load(str(path))
    try:
        onnx.checker.check_model(proto, full_check=True)
        inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{path}: the ONNX checker rejects the graph: {first_line(exc)}") from exc
    ops = op_counts(proto)
    unsupported = sorted(set(ops) - TENSORRT_OPS)
    if unsupported:
        raise ExportError(f"{path}: ops outside the TensorRT allow-list: {unsupported}")
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.input) + list(inferred.graph.output)}
    ModelMetadata.from_onnx(proto)  # the metadata must read back under the schema
    figures = {"ops": ops, "shapes": shapes, "size_bytes": Path(path).stat().st_size,
               "precision": onnx_precision(proto)}
    if model is not None:
        figures["smoke_max_rel_diff"] = _smoke_parity(path, model)
    return figures


def _smoke_parity(path: Path | str, model) -> float:
    """Random inputs through ONNX Runtime (CPU) and torch, maps and scores (which a score head computes
    apart from the map); the larger relative difference. A quick guard, not the real-image check."""
    ort = import_onnxruntime()
    size = model.config.input_size
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        maps, scores = model(x)
    session = ort.InferenceSession(ort_model_source(path), providers=["CPUExecutionProvider"])
    onnx_maps, onnx_scores = session.run([MAP_NAME, SCORE_NAME], {INPUT_NAME: x.numpy()})
    return max(relative_difference(got, want.numpy()) for got, want in ((onnx_maps, maps), (onnx_scores, scores)))

"""Build TensorRT engine plans from exported ONNX files with the TensorRT Python API.

`tensorrt` (10.x/11.x, users' GPU machines and Jetsons) when installed, else TensorRT for RTX
(`tensorrt_rtx_bindings`), which builds ahead of time without a GPU, so CI proves every graph we emit
compiles. One code path serves both: a strongly typed network (the precision lives in the ONNX graph),
an optimisation profile from the batch range, a timing cache (full TensorRT only: TensorRT for RTX
made its timing-cache calls no-ops in 1.2), a workspace limit on Jetsons (or where asked), and a JSON
sidecar next to the plan.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..checks import is_whole
from ..engine_plan import (
    DEFAULT_BATCH_TEXT,
    PLAN_PRECISIONS,
    RTX_COMPUTE_CAPABILITIES_TEXT,
    SIDECAR_FORMAT,
    collecting_logger,
    import_tensorrt,
    sidecar_bytes,
    sidecar_path,
    telling_error,
)
from ..errors import ConfigError, ExportError, OutputError, first_line
from ..machine import is_jetson, total_memory_bytes
from ..metadata import INPUT_NAME, MAX_BATCH, ModelMetadata, onnx_precision
from ..model_files import thresholds_to_be_replaced, warn_thresholds_replaced
from ..onnx_files import has_external_data, load_onnx_bytes
from ..outputs import check_writable, signals_held, write_bytes_atomically, write_files_together
from ..progress import progress_bar

PRECISIONS = PLAN_PRECISIONS  # int8 graphs come from `stmae-edge calibrate`
# TensorRT for RTX >= 1.2 (the rtx extra needs 1.7) keeps the timing-cache API as deprecated no-ops
TIMING_CACHE_FLAVOURS = ("tensorrt",)

log = logging.getLogger(__name__)
# TensorRT's default workspace is all of the GPU's memory, which on a Jetson is the system's own, shared
# with the CPU: tactics timed at batch 32 can take enough of it for the kernel to kill the build. There
# the default is a quarter of the memory, at most 2 GiB (the default model's plans need far less).
JETSON_WORKSPACE_CAP = 2 << 30


def default_workspace_bytes() -> int | None:
    """The build's workspace limit where none is asked for: TensorRT's own (None), but on a Jetson."""
    if not is_jetson():
        return None
    total = total_memory_bytes()
    return min(JETSON_WORKSPACE_CAP, total // 4) if total else JETSON_WORKSPACE_CAP


@dataclass(frozen=True)
class BatchRange:
    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str) -> BatchRange:
        try:
            low, opt, high = (int(v) for v in text.split(":"))
        except ValueError:
            raise ConfigError(f"batch range {text!r} must be MIN:OPT:MAX, e.g. {DEFAULT_BATCH_TEXT}") from None
        if not 1 <= low <= opt <= high <= MAX_BATCH:
            raise ConfigError(f"batch range {text!r} needs 1 <= MIN <= OPT <= MAX <= {MAX_BATCH}")
        return cls(low, opt, high)

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


def default_plan_path(onnx_path: Path | str, precision: str) -> Path:
    stem = Path(onnx_path).stem
    stem = stem if stem.endswith(f".{precision}") else f"{stem}.{precision}"
    return Path("engines") / f"{stem}.plan"


def phase_monitor(trt, advance, stop_requested: Sequence = ()):
    """A TensorRT IProgressMonitor (TensorRT 10+ and RTX) that moves a progress bar: its total is the
    top phase's step count, its status the innermost phase under way. It cancels the build once
    `stop_requested` holds anything (Ctrl-C, held by outputs.signals_held: raised inside TensorRT's
    callback it would have to cross C++), and a failure of its own (a closed terminal) never stops one."""

    class PhaseMonitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.top: str | None = None  # the first top phase: the bar's steps; later ones only name it
            self.under_way: list[str] = []
            self.total = self.done = 0
            self.lock = threading.Lock()  # TensorRT may call from several of its threads

        def phase_start(self, phase_name, parent_phase, num_steps) -> None:
            try:
                with self.lock:
                    self.under_way.append(phase_name)
                    if parent_phase is None and self.top is None:
                        self.top, self.total = phase_name, max(int(num_steps), 1)
                        advance(0, status=phase_name, total=self.total)
                    else:
                        advance(0, status=phase_name)
            except Exception:  # noqa: BLE001  (a display problem must not end a build)
                pass

        def step_complete(self, phase_name, step) -> bool:
            try:
                with self.lock:
                    if phase_name == self.top and self.done < self.total:
                        self.done += 1
                        advance(1, status=self.under_way[-1] if self.under_way else phase_name)
            except Exception:  # noqa: BLE001
                pass
            return not stop_requested  # False cancels the build

        def phase_finish(self, phase_name) -> None:
            with self.lock:
                if phase_name in self.under_way:
                    self.under_way.remove(phase_name)

    return PhaseMonitor()


def build_engine(onnx_path: Path | str, precision: str | None = None, batch: str | tuple | BatchRange = DEFAULT_BATCH_TEXT,
                 out: Path | str | None = None, timing_cache: Path | str | None = None,
                 compute_capabilities: Sequence[str] = (), workspace_mb: int | None = None) -> tuple[Path, dict]:
    """ONNX -> engine plan and its sidecar (plan path + '.json'). Returns the plan path and the sidecar.

    The network is strongly typed, so the precision is the ONNX graph's own; `precision` only checks it.

    Args:
        onnx_path: a graph written by `export` or `calibrate`.
        precision: fp32, fp16 or int8, checked against the graph's own (None: take the graph's).
        batch: the optimisation profile, "MIN:OPT:MAX" (or a (MIN, OPT, MAX) tuple, or a BatchRange).
        out: the plan (default: engines/NAME.PRECISION.plan); its sidecar is OUT.json.
        timing_cache: TensorRT's timing cache file (default: timing.cache beside the plan); not used
            with TensorRT for RTX, which has none.
        compute_capabilities: TensorRT for RTX only: the GPUs' compute capabilities ("8.6", "12.0", ...)
            the plan is built for, instead of its default set (RTX_COMPUTE_CAPABILITIES); "current"
            for the GPU of this machine. Not Turing (7.5): see target_compute_capabilities.
        workspace_mb: the most memory TensorRT may use for its tactics while building, in MiB (None:
            TensorRT's default, all of the GPU's memory, but on a Jetson: default_workspace_bytes).

    Raises:
        ConfigError: an unknown precision, one the graph does not have, a bad batch range, or compute
            capabilities that TensorRT for RTX does not build for (or given to full TensorRT, whose plans
            are for the GPU they are built on).
        ExportError: not one of our graphs, TensorRT's parser or builder failed (the first error).
        TensorRTMissingError: neither TensorRT nor TensorRT for RTX is installed.
        OutputError: `out` cannot be written.
    """
    if precision is not None and precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; this version builds {', '.join(PRECISIONS)}")
    if workspace_mb is not None and (not is_whole(workspace_mb) or workspace_mb < 1):
        raise ConfigError(f"--workspace-mb {workspace_mb}: give at least 1 MiB (or leave it out for TensorRT's default)")
    if isinstance(batch, tuple) and len(batch) == 3 and all(is_whole(b) for b in batch):
        batch = ":".join(map(str, batch))  # (MIN, OPT, MAX), checked as the text is
    if not isinstance(batch, (BatchRange, str)):
        raise ConfigError(f"batch {batch!r} must be MIN:OPT:MAX (e.g. {DEFAULT_BATCH_TEXT}), a (MIN, OPT, MAX) tuple "
                          "or a BatchRange")
    batch = batch if isinstance(batch, BatchRange) else BatchRange.parse(batch)
    onnx_path = Path(onnx_path)
    proto, graph = load_onnx_bytes(onnx_path, ExportError)  # its digest goes in the sidecar: the graph built
    metadata = ModelMetadata.from_onnx(proto)  # also refuses files that are not ours
    graph_precision = onnx_precision(proto)
    if precision is not None and precision != graph_precision:
        how = ("stmae-edge calibrate EXPORTED.onnx" if precision == "int8"
               else f"stmae-edge export MODEL --precision {precision}")
        raise ConfigError(f"{onnx_path} is an {graph_precision} graph; for {precision} run `{how}` "
                          "and build that file")
    precision = graph_precision
    trt, flavour = import_tensorrt()  # before --out's folder is made: a machine without TensorRT keeps none
    out = check_writable(out or default_plan_path(onnx_path, precision), [onnx_path])
    earlier_thresholds = thresholds_to_be_replaced(out, metadata)
    cache_path = Path(timing_cache) if timing_cache else out.parent / "timing.cache"

    logger = collecting_logger(trt)
    builder = trt.Builder(logger)
    # Strongly typed: TensorRT 11 and RTX always are; TensorRT 10 needs the flag. Precision comes
    # from the graph's own types, so the same call builds fp32, fp16 and Q/DQ int8 graphs.
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # The graph load_onnx read and checked, as bytes: parse_from_file would read the file again (another
    # file, if it was swapped meanwhile) and opens its path as a narrow string, which Windows reads in its
    # code page (a folder named with an umlaut "failed to parse"). The path is handed over only where
    # tensors keep their data beside the graph (never in our exports).
    if not parser.parse(graph, str(onnx_path) if has_external_data(proto) else None):
        errors = [parser.get_error(i) for i in range(parser.num_errors)]
        first = errors[0] if errors else None
        where = f" at node {first.node_name()!r} ({first.node_operator()})" if first and first.node_name() else ""
        desc = first.desc().strip().splitlines()[0] if first else "unknown error"
        raise ExportError(f"{onnx_path}: TensorRT's ONNX parser failed{where}: {desc}")

    config = builder.create_builder_config()
    workspace = workspace_mb << 20 if workspace_mb is not None else default_workspace_bytes()
    if workspace is not None:
        if workspace_mb is None:
            log.info("building on a Jetson: TensorRT's workspace is capped at %d MiB (--workspace-mb sets another)",
                     workspace >> 20)
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    keep_float32(trt, config)
    target_compute_capabilities(trt, config, flavour, compute_capabilities)
    profile = builder.create_optimization_profile()
    shape = tuple(network.get_input(0).shape)[1:]
    profile.set_shape(INPUT_NAME, (batch.min, *shape), (batch.opt, *shape), (batch.max, *shape))
    config.add_optimization_profile(profile)
    uses_timing_cache = flavour in TIMING_CACHE_FLAVOURS
    if uses_timing_cache:
        _attach_timing_cache(config, cache_path)
    elif timing_cache:
        log.warning("%s: not used; %s has no timing cache", timing_cache, flavour)

    started = time.perf_counter()
    # A build takes minutes on a Jetson: the bar follows TensorRT's top phase, naming the one under way
    with progress_bar(f"building ({flavour})", 1) as advance, signals_held() as stop_requested:
        monitor = phase_monitor(trt, advance, stop_requested)
        config.progress_monitor = monitor
        plan = builder.build_serialized_network(network, config)  # None once cancelled: Ctrl-C comes after
        if plan is not None:  # TensorRT reports one step fewer than it announced for its top phase
            advance(max(monitor.total - monitor.done, 0), status="done")
    if plan is None:
        raise ExportError(f"{onnx_path}: TensorRT could not build an engine ({flavour}: {telling_error(logger.errors)}); "
                          "try a smaller --batch range or check the graph with `stmae-edge verify`")
    seconds = time.perf_counter() - started
    if uses_timing_cache:  # a speed-up for the next build: one that cannot be written costs this one nothing
        try:
            write_bytes_atomically(cache_path, bytes(config.get_timing_cache().serialize()))
        except OutputError as exc:
            log.warning("%s; the next build starts without a timing cache", exc)
    plan = bytes(plan)
    sidecar = {
        "format": SIDECAR_FORMAT,
        "metadata": metadata.to_dict(),
        "precision": precision,
        "batch": {"min": batch.min, "opt": batch.opt, "max": batch.max},
        "tensorrt": {"flavour": flavour, "version": trt.__version__},
        "target": _target(config, flavour),
        "workspace_bytes": int(config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE)),
        "onnx": {"path": str(onnx_path), "sha256": hashlib.sha256(graph).hexdigest()},
        "plan": {"path": out.name, "sha256": hashlib.sha256(plan).hexdigest(), "size_bytes": len(plan)},
        "build_seconds": round(seconds, 2),
        "package_version": __version__,
    }
    # The plan and its sidecar replace the earlier pair together, or not at all: a plan beside an older
    # sidecar is refused by read_plan, so a build cut off between the two lost a working engine.
    write_files_together({out: plan, sidecar_path(out): sidecar_bytes(sidecar)})
    warn_thresholds_replaced(out, earlier_thresholds, metadata.thresholds)
    return out, sidecar


def target_compute_capabilities(trt, config, flavour: str, wanted: Sequence[str]) -> None:
    """TensorRT for RTX builds ahead of time for a set of compute capabilities: `wanted` in place of its
    default set, each as "MAJOR.MINOR" (its ComputeCapability.SM<MAJOR><MINOR>) or "current".

    Turing (7.5) is refused: there TensorRT for RTX 1.7 compiles no float32 matrix product ("FP32 GEMM is
    not supported"), and every graph we export keeps its scoring in float32, the fp16 and int8 ones too.

    Raises:
        ConfigError: a capability it does not build for (Turing among them), or any with full TensorRT.
    """
    if not wanted:
        return
    if flavour != "tensorrt-rtx":
        raise ConfigError(f"--compute-capability is for TensorRT for RTX; {flavour} builds a plan for the GPU it "
                          "runs on: build on the machine (or the same GPU model) that will run the plan")
    known = {name[2:-1] + "." + name[-1]: getattr(trt.ComputeCapability, name)
             for name in dir(trt.ComputeCapability) if name.startswith("SM") and name[2:].isdigit()}
    if "7.5" in wanted:
        raise ConfigError("compute capability 7.5 (Turing: T4, RTX 20xx): TensorRT for RTX cannot compile the "
                          "graph's float32 matrix products for it; build the plan with full TensorRT (pip install "
                          "tensorrt) on that GPU")
    known.pop("7.5", None)
    unknown = [c for c in wanted if c not in known and c != "current"]
    if unknown:
        offered = [*sorted(known, key=lambda c: tuple(map(int, c.split(".")))), "current"]
        raise ConfigError(f"compute capability {unknown[0]!r}: TensorRT for RTX {trt.__version__} builds for "
                          f"{', '.join(offered)}")
    known["current"] = trt.ComputeCapability.CURRENT
    config.num_compute_capabilities = len(wanted)
    for i, capability in enumerate(wanted):
        config.set_compute_capability(known[capability], i)


def keep_float32(trt, config) -> None:
    """float32 layers computed in float32: TensorRT's TF32, on by default, rounds their operands to
    fp16's 10-bit mantissa, which the map's Mahalanobis distances amplify (engines/half_precision.py).
    An fp32 plan would then not match the fp32 graph, and an fp16 plan's fp32 statistics lose their point."""
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)


def _attach_timing_cache(config, cache_path: Path) -> None:
    """Starts from the cache at cache_path, or from an empty one where that is missing or unreadable."""
    reason = "from another TensorRT version, or corrupt"
    try:
        cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    except Exception as exc:  # some TensorRT versions raise on a foreign cache, others return None
        cache, reason = None, first_line(exc, 200)
    if cache is None:  # unreadable or from another TensorRT version: start a fresh one
        log.warning("timing cache %s not used (%s); starting a fresh one", cache_path, reason)
        cache = config.create_timing_cache(b"")
    if config.set_timing_cache(cache, ignore_mismatch=False) is False:  # made on another GPU model
        log.warning("timing cache %s was made on another GPU; starting a fresh one", cache_path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _target(config, flavour: str) -> str:
    if flavour == "tensorrt-rtx":
        # Ahead-of-time build: the plan runs on the compute capabilities it was built for.
        count = config.num_compute_capabilities
        caps = [config.get_compute_capability(i).name for i in range(count)]
        return "compute capabilities: " + (", ".join(caps) if caps else
                                           f"TensorRT-RTX default set ({RTX_COMPUTE_CAPABILITIES_TEXT})")
    return "the GPU this was built on (TensorRT plans are specific to GPU model and TensorRT version)"

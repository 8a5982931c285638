"""TensorRT engine plans on an NVIDIA GPU, with explicit buffers and one stream, in the manner of
TensorRT's samples/python/common_runtime.py, through cuda-python (`pip install "stmae-edge[gpu]"`).

Everything is allocated once, at the profile's largest batch: device buffers, page-locked (pinned)
host buffers for fast asynchronous copies, one non-blocking stream, and tensor addresses bound once.
A call copies the batch in, enqueues the engine, copies maps and scores out and waits on the stream.
With `cuda_graph=True` the copy-in, engine and copy-out are captured as a CUDA graph and replayed,
which removes most launch overhead at small batches. One graph is kept: a smaller batch is padded to
its size and replays it, a larger one re-captures, because a graph must not outlive a change of the
context's shapes. Engines that
TensorRT reports as not capturable run without a graph: `provider` says so, and a warning is logged.
Plans of TensorRT for RTX use its own whole-graph capture instead (set in the context's runtime config).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
from pathlib import Path

import numpy as np

from ..engine_plan import (
    RTX_COMPUTE_CAPABILITIES,
    collecting_logger,
    import_tensorrt,
    install_hint,
    read_plan,
    telling_error,
)
from ..errors import BackendError, EngineMismatchError, TensorRTMissingError, TensorRTUnloadableError, first_line
from ..machine import nvidia_platform
from ..metadata import INPUT_NAME, MAP_NAME, SCORE_NAME
from .devices import cuda_driver_state

logger = logging.getLogger(__name__)
_TENSORS = (INPUT_NAME, MAP_NAME, SCORE_NAME)


# The cuda-python for a CUDA 12 driver, and for JetPack 6's CUDA 12.6 (what the gpu extra takes on a Jetson)
CUDA12_PIN, JETPACK6_PIN = '"cuda-python>=12.6,<13"', '"cuda-python>=12.6,<12.7"'
NO_GPU_HINT = ("TensorRT plans need an NVIDIA GPU and a driver at least as new as cuda-python's CUDA major "
               f"version (cuda-python 13 needs a CUDA 13 driver; on CUDA 12 drivers pip install {CUDA12_PIN}, on "
               f"JetPack 6 {JETPACK6_PIN}, which the gpu extra takes on a Jetson); without a GPU run the .onnx file "
               "instead (--backend ort-cpu)")


# The cuda-python that the gpu extra takes, by machine.nvidia_platform(): its major version follows the
# CUDA driver, and a plain `pip install cuda-python` takes 13, which a CUDA 12 driver (JetPack 6's) cannot run
CUDA_PYTHON_FOR = {"jetson": JETPACK6_PIN, "x86-64": f"cuda-python ({CUDA12_PIN} on a CUDA 12 driver)",
                   "arm": f"cuda-python ({CUDA12_PIN} on a CUDA 12 driver)", "macos": "cuda-python",
                   "other": "cuda-python"}


def _native_handle(stream) -> int:
    """A cuda-python stream as the integer TensorRT takes: int(stream) is deprecated from cuda-python 13."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:  # cuda-python before 12.8
        return int(stream)
    return int(get_cuda_native_handle(stream))


def _rebuild_hint(flavour: str, props) -> str:
    """What to do about a plan this GPU cannot load."""
    capability = (int(props.major), int(props.minor))
    if flavour == "tensorrt-rtx" and capability not in RTX_COMPUTE_CAPABILITIES:
        return (f"TensorRT for RTX does not run on compute capability {capability[0]}.{capability[1]}: install full "
                "TensorRT (pip install tensorrt, or JetPack) and build the plan with it here")
    return "plans are specific to the GPU model: rebuild it here with `stmae-edge build`"


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python before 12.6
        except ImportError:
            raise BackendError("TensorRT plans need cuda-python for GPU buffers and streams: pip install "
                               f"\"stmae-edge[gpu]\" (or pip install {CUDA_PYTHON_FOR[nvidia_platform()]})") from None
    return cudart


class TensorRTBackend:
    name = "tensorrt"

    def __init__(self, plan_path: Path | str, cuda_graph: bool = False, device_index: int = 0):
        plan_path = Path(plan_path)
        data, sidecar, self.metadata = read_plan(plan_path)
        flavour, version = sidecar["tensorrt"]["flavour"], sidecar["tensorrt"]["version"]
        try:
            trt, _ = import_tensorrt(flavour)
        except TensorRTUnloadableError:  # installed: its own reason (a library not found) is what to fix
            raise
        except TensorRTMissingError as exc:  # a plan runs only on the TensorRT that built it: say so first
            raise TensorRTMissingError(f"{plan_path} was built with {flavour} {version}, which this machine lacks: "
                                       "rebuild the plan here from its .onnx with `stmae-edge build`, or run the "
                                       f".onnx (--backend ort-cpu); to build here, {install_hint()}") from exc
        if trt.__version__ != version:
            raise EngineMismatchError(f"{plan_path} was built with {flavour} {version} but this machine has "
                                      f"{trt.__version__}; plans only run on the TensorRT version that built "
                                      "them: rebuild it here with `stmae-edge build`")
        self.precision = str(sidecar.get("precision", "fp32"))
        # Asked of the driver itself, before cuda-python is needed: without a driver cuda-python says
        # "insufficient driver", and a machine without a GPU was first told to install cuda-python.
        # A driver that is there but fails (after an upgrade without a reboot) goes on to cuda-python's error.
        driver = cuda_driver_state()
        if driver in ("missing", "no GPU"):
            raise BackendError(f"{plan_path}: no NVIDIA GPU here (" + ("no CUDA driver is installed" if driver ==
                               "missing" else "the CUDA driver finds none") + "): a TensorRT plan runs on an NVIDIA "
                               "GPU; on this machine run the .onnx file it was built from (ONNX Runtime on the CPU)")
        self._cudart = cudart = _import_cudart()
        self._allocations: list[tuple[str, int]] = []
        self._graph: tuple | None = None  # (batch size, graph, executable)
        self._own_graphs = False  # TensorRT for RTX's whole-graph capture instead of capturing the stream here
        self._stream = None
        count = self._call(cudart.cudaGetDeviceCount(), "finding a CUDA GPU", hint=NO_GPU_HINT)
        if not 0 <= device_index < count:
            raise BackendError(f"CUDA device {device_index} does not exist ({count} found)")
        self._device_index = device_index
        with self._on_device():
            self._open(trt, data, plan_path, flavour, version, cuda_graph)

    @contextlib.contextmanager
    def _on_device(self):
        """This backend's GPU made current for the calling thread (CUDA's current device is per thread:
        a host may open the Detector on one thread and run it on another), and the thread's own choice
        put back after, as a guest in the host program should. A thread that never chose one reports
        GPU 0, so a backend on another GPU (device_index, which the Detector leaves at 0) makes GPU 0
        current there when it puts it back: CUDA then sets up GPU 0's context too."""
        cudart = self._cudart
        previous = self._call(cudart.cudaGetDevice(), "reading the current GPU")
        if previous != self._device_index:
            self._call(cudart.cudaSetDevice(self._device_index), "selecting the GPU")
        try:
            yield
        finally:
            if previous != self._device_index:
                cudart.cudaSetDevice(previous)

    def _open(self, trt, data: bytes, plan_path: Path, flavour: str, version: str, cuda_graph: bool) -> None:
        """The engine, its context, stream and buffers, on this backend's GPU (made current)."""
        cudart = self._cudart
        props = self._call(cudart.cudaGetDeviceProperties(self._device_index), "reading the GPU's properties")
        self.device = f"GPU: {props.name.decode(errors='replace').rstrip(chr(0))}"

        self._logger = collecting_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(data)
        if self._engine is None:
            raise EngineMismatchError(f"{plan_path}: TensorRT cannot load this plan on {self.device} "
                                      f"({telling_error(self._logger.errors)}); {_rebuild_hint(flavour, props)}")
        # TensorRT for RTX captures and replays its own CUDA graphs, per shape, when its runtime config asks
        # (NVIDIA's samples/apiUsage); capturing the stream here would need plans built with
        # REQUIRE_USER_ALLOCATION, and is_stream_capturable says no without it
        own = self._context_with_own_graphs(trt) if cuda_graph and flavour == "tensorrt-rtx" else None
        self._own_graphs = own is not None
        self._context = own or self._engine.create_execution_context()
        names = {self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)}
        if not set(_TENSORS) <= names:
            raise EngineMismatchError(f"{plan_path}: tensors {sorted(names)} are not a stmae-edge model's "
                                      f"{list(_TENSORS)}")
        low, _, high = (tuple(s) for s in self._engine.get_tensor_profile_shape(INPUT_NAME, 0))
        self.min_batch, self.max_batch = int(low[0]), int(high[0])
        self._image_shape = tuple(int(v) for v in high[1:])
        self.metadata.check_input_size(self._image_shape[1:], plan_path)
        self._stream = self._call(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "creating a stream")
        self._stream_handle = _native_handle(self._stream)  # what TensorRT takes
        self._buffers = self._allocate(trt)
        capturable = getattr(self._context, "is_stream_capturable", None)
        self.cuda_graph = cuda_graph and (self._own_graphs or capturable is None
                                          or bool(capturable(self._stream_handle)))
        if cuda_graph and not self.cuda_graph:  # asked for, and silently slower without this line
            logger.warning("%s: TensorRT reports this engine cannot be captured as a CUDA graph; running it "
                           "without CUDA graphs", plan_path.name)
        graphs = (", CUDA graphs" + (f" ({flavour}'s own)" if self._own_graphs else "") if self.cuda_graph
                  else (", CUDA graphs not possible for this engine" if cuda_graph else ""))
        self.provider = f"{flavour} {version} (cuda-python{graphs})"

    def _context_with_own_graphs(self, trt):
        """An execution context with TensorRT for RTX's whole-graph capture; None where this version has
        no such runtime config (before 1.2) or it refuses, and the context is to be made plainly."""
        strategy = getattr(getattr(trt, "CudaGraphStrategy", None), "WHOLE_GRAPH_CAPTURE", None)
        if strategy is None or not hasattr(self._engine, "create_runtime_config"):
            return None
        try:
            config = self._engine.create_runtime_config()
            config.cuda_graph_strategy = strategy
            return self._engine.create_execution_context(config)
        except (AttributeError, TypeError, RuntimeError) as exc:
            logger.warning("TensorRT for RTX's own CUDA graphs could not be set up (%s); capturing the stream "
                           "instead where the engine allows", first_line(exc))
            return None

    def _call(self, result, what: str, hint: str = ""):
        """cuda-python returns (error, *values): raise a typed error unless it succeeded."""
        err, *values = result
        if err != self._cudart.cudaError_t.cudaSuccess:
            name = getattr(err, "name", str(err))
            raise BackendError(f"CUDA error while {what}: {name}" + (f"; {hint}" if hint else ""))
        return values[0] if len(values) == 1 else (tuple(values) or None)

    def _allocate(self, trt) -> dict[str, tuple[np.ndarray, int, int]]:
        """Per tensor at the largest batch: (pinned host array, host pointer, device pointer)."""
        cudart = self._cudart
        self._set_batch(self.max_batch)
        buffers = {}
        for name in _TENSORS:
            if self._engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise EngineMismatchError(f"tensor {name!r} is {self._engine.get_tensor_dtype(name)}, not float32: "
                                          "not an engine built by stmae-edge")
            shape = tuple(int(v) for v in self._context.get_tensor_shape(name))
            nbytes = int(np.prod(shape)) * 4
            device = self._call(cudart.cudaMalloc(nbytes), f"allocating {nbytes} bytes on the GPU")
            self._allocations.append(("device", device))
            host_ptr = self._call(cudart.cudaMallocHost(nbytes), f"allocating {nbytes} bytes of pinned memory")
            self._allocations.append(("host", host_ptr))
            raw = (ctypes.c_byte * nbytes).from_address(int(host_ptr))
            host = np.frombuffer(raw, dtype=np.float32).reshape(shape)
            if not self._context.set_tensor_address(name, int(device)):
                raise BackendError(f"TensorRT refused the address of tensor {name!r}")
            buffers[name] = (host, int(host_ptr), int(device))
        return buffers

    def _set_batch(self, batch_size: int) -> None:
        if not self._context.set_input_shape(INPUT_NAME, (batch_size, *self._image_shape)):
            raise BackendError(f"TensorRT refused batch {batch_size} (profile {self.min_batch}..{self.max_batch})")

    def _enqueue(self, batch_size: int) -> None:
        cudart = self._cudart
        copy_in, copy_out = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        host, host_ptr, device = self._buffers[INPUT_NAME]
        per_image = host[0].nbytes
        self._call(cudart.cudaMemcpyAsync(device, host_ptr, batch_size * per_image, copy_in, self._stream), "copying in")
        if not self._context.execute_async_v3(self._stream_handle):
            raise BackendError(f"TensorRT failed to enqueue the engine: {telling_error(self._logger.errors)}")
        for name in (MAP_NAME, SCORE_NAME):
            host, host_ptr, device = self._buffers[name]
            self._call(cudart.cudaMemcpyAsync(host_ptr, device, batch_size * host[0].nbytes, copy_out, self._stream),
                       "copying out")

    def _graph_for(self, batch_size: int):
        if self._graph is not None and self._graph[0] == batch_size:
            return self._graph[2]
        self._drop_graph()
        cudart = self._cudart
        self._enqueue(batch_size)  # TensorRT sets up shape-dependent resources on the first enqueue
        self._call(cudart.cudaStreamSynchronize(self._stream), "warming up")
        self._call(cudart.cudaStreamBeginCapture(
            self._stream, cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal), "capturing a graph")
        try:
            self._enqueue(batch_size)
        except BaseException:
            err, graph = cudart.cudaStreamEndCapture(self._stream)  # a stream left capturing is unusable
            if graph is not None and err == cudart.cudaError_t.cudaSuccess:
                cudart.cudaGraphDestroy(graph)
            raise
        graph = self._call(cudart.cudaStreamEndCapture(self._stream), "capturing a graph")
        executable = self._call(cudart.cudaGraphInstantiate(graph, 0), "instantiating a graph")
        self._graph = (batch_size, graph, executable)
        return executable

    def _drop_graph(self) -> None:
        if self._graph is not None:
            self._cudart.cudaGraphExecDestroy(self._graph[2])
            self._cudart.cudaGraphDestroy(self._graph[1])
            self._graph = None

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = batch.shape[0]
        if self._stream is None:
            raise BackendError("this TensorRT backend was closed; create a new Detector")
        if n > self.max_batch:
            raise BackendError(f"batch of {n} exceeds the engine's profile maximum {self.max_batch}")
        padded = max(n, self.min_batch)  # below the profile's minimum: pad, then drop the padding
        if self.cuda_graph and not self._own_graphs and self._graph is not None and padded <= self._graph[0]:
            padded = self._graph[0]  # a short last chunk replays the captured graph instead of re-capturing
        host = self._buffers[INPUT_NAME][0]
        host[:n] = batch
        host[n:padded] = 0
        with self._on_device():
            self._set_batch(padded)
            if self.cuda_graph and not self._own_graphs:
                self._call(self._cudart.cudaGraphLaunch(self._graph_for(padded), self._stream), "launching a graph")
            else:  # TensorRT for RTX's own graphs are replayed inside its enqueue
                self._enqueue(padded)
            self._call(self._cudart.cudaStreamSynchronize(self._stream), "waiting for the GPU")
        return self._buffers[MAP_NAME][0][:n, 0].copy(), self._buffers[SCORE_NAME][0][:n].copy()

    def close(self) -> None:
        """Free the GPU now: graph, buffers, stream, then the execution context, engine and runtime
        (whose device memory TensorRT frees only when they are deleted: otherwise at garbage
        collection, which a host program that replaces detectors must not wait for). Closing twice,
        or a backend whose __init__ failed half-way, is harmless."""
        cudart = getattr(self, "_cudart", None)
        if cudart is None or not hasattr(self, "_device_index"):
            return
        try:
            with self._on_device():
                self._free(cudart)
                return
        except BackendError:  # the current GPU cannot be read (CUDA shutting down): free them as things are
            pass
        self._free(cudart)

    def _free(self, cudart) -> None:
        self._drop_graph()
        for kind, pointer in reversed(self._allocations):
            (cudart.cudaFree if kind == "device" else cudart.cudaFreeHost)(pointer)
        self._allocations = []
        self._buffers = {}  # their host arrays pointed into the pinned memory just freed
        if self._stream is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        # In this order: a context belongs to its engine, an engine to its runtime.
        self._context = None
        self._engine = None
        self._runtime = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the CUDA context may already be gone
            pass

"""`stmae-edge serve`: one model file behind a real Triton Inference Server, started by PyTriton.

    clients ──HTTP/gRPC──> tritonserver (dynamic batching, health, statistics, metrics)
                             └─ Python backend stub ──> this process: score_batch() per batch
                                                          └─ Detector (the runtime's backends)

PyTriton's Python backend stub is linked against libpython. It loads the one the dynamic linker finds,
which in a virtual environment made from another build of the same Python version fails at model
load; `use_own_libpython` puts this interpreter's own shared libpython first.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import wire_format as wire
from ..errors import BackendError, ConfigError, first_line
from ..runtime.detector import Detector
from ..scoring import fails, normalize

logger = logging.getLogger(__name__)
INSTALL_HINT = ("install the serve extra in its own environment (PyTriton needs numpy < 2), made from a Python "
                "with a shared libpython (the system's python3): `python3 -m venv serve-env && serve-env/bin/pip "
                "install \"stmae-edge[serve]\"`; in a clone, `bash scripts/setup_serve_env.sh` does this (README, "
                "\"Serving many cameras\")")
ADMIN_ENDPOINTS = ("shared-memory", "model-repository", "trace", "logging")
START_ATTEMPTS = 3
HANDSHAKE_RACE = "get_config_from_handshake_server"


LINUX_ONLY = ("serve runs on Linux only (PyTriton's wheels carry a Linux Triton server); on this machine, "
              "`stmae-edge triton-repo MODEL` writes a model repository for a Triton server on a Linux machine, "
              "and RemoteDetector scores through it (README, \"Serving many cameras\")")


def import_pytriton():
    if not sys.platform.startswith("linux"):
        raise BackendError(LINUX_ONLY)  # the extra installs nothing here: its hint would send users in a circle
    try:
        from pytriton.decorators import batch
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig
    except ImportError:
        raise BackendError(f"PyTriton is not installed: {INSTALL_HINT}") from None
    return batch, DynamicBatcher, ModelConfig, Tensor, Triton, TritonConfig, TritonSecurityConfig


def use_own_libpython(folder: Path) -> None:
    """Make this interpreter's shared libpython the one that the backend stub, started by tritonserver,
    loads: a link to it alone in `folder`, first on LD_LIBRARY_PATH (the whole LIBDIR could put other
    libraries ahead of tritonserver's own). Warns where the interpreter has none: the stub then finds
    the system's, which works only in an environment made from that same Python build."""
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "")
    names = [sysconfig.get_config_var(key) or "" for key in ("INSTSONAME", "LDLIBRARY")]
    library = next((libdir / n for n in names if ".so" in n and (libdir / n).is_file()), None)
    if library is None:
        logger.warning("this Python (%s) has no shared libpython; Triton's Python backend will load the system's, "
                       "which works only in an environment made from that same Python build", sys.executable)
        return
    folder.mkdir(parents=True, exist_ok=True)
    for name in {library.name, names[0]} - {""}:
        (folder / name).symlink_to(library.resolve())
    paths = [str(folder)] + [x for x in os.environ.get("LD_LIBRARY_PATH", "").split(":") if x]
    os.environ["LD_LIBRARY_PATH"] = ":".join(dict.fromkeys(paths))


def check_ports_free(address: str, ports: dict[str, int]) -> None:
    """Refuse ports that something already listens on: tritonserver would exit, and PyTriton would
    report it only as a timeout a minute later.

    Raises:
        ConfigError: two options name one port, or a port is taken or cannot be bound on `address`.
    """
    if len(set(ports.values())) < len(ports):
        raise ConfigError(f"{', '.join(ports)} must differ, got {', '.join(map(str, ports.values()))}")
    for option, port in ports.items():
        with socket.socket(socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, port))
            except OSError as exc:
                raise ConfigError(f"{option} {port} on {address}: {exc.strerror or exc}; stop what uses it or "
                                  f"choose another port") from None


def open_detectors(count: int, open_one: Callable[[], Detector]) -> list[Detector]:
    """`count` Detectors from `open_one`, one per model instance. If one fails to open, those already
    open are closed before its error goes on: each holds a backend (a GPU's memory, say) that nothing
    else would free until the process ends.

    Raises:
        whatever `open_one` raises (Detector: BackendError, CheckpointError, ConfigError, ...).
    """
    detectors: list[Detector] = []
    try:
        for _ in range(count):
            detectors.append(open_one())
    except BaseException:
        for detector in detectors:
            detector.close()
        raise
    return detectors


def score_batch(detector: Detector, images: np.ndarray) -> dict[str, np.ndarray]:
    """Preprocessed images (N, 3, H, W) float32 -> the outputs of wire_format.OUTPUTS, one row per image.
    An image with NaN or infinite values gets its own error; the others are scored."""
    count = len(images)
    height, width = detector.preprocessing.input_size
    scores = np.zeros(count, np.float32)
    maps = np.zeros((count, height, width), np.float32)
    errors = np.full((count, 1), b"", dtype=object)
    finite = np.isfinite(images.reshape(count, -1)).all(axis=1)
    errors[~finite, 0] = b"the image has NaN or infinite values; nothing was scored"
    good = np.flatnonzero(finite)
    for start in range(0, len(good), detector.batch_size):
        rows = good[start:start + detector.batch_size]
        try:
            maps[rows], scores[rows] = detector.run_tensors(np.ascontiguousarray(images[rows]))
        except BackendError as exc:  # one image's NaN output must not fail the other clients' requests in the batch
            logger.warning("a batch of %d images failed (%s); scoring them one by one", len(rows), first_line(exc, 200))
            for row in rows:
                try:
                    row_maps, row_scores = detector.run_tensors(np.ascontiguousarray(images[row:row + 1]))
                    maps[row], scores[row] = row_maps[0], row_scores[0]
                except BackendError as exc:
                    errors[row, 0] = str(exc).encode()
    scored = errors[:, 0] == b""
    normalized = np.where(scored, normalize(scores, detector.score_stats), 0.0).astype(np.float32)
    return {wire.SCORE: scores[:, None], wire.NORMALIZED_SCORE: normalized[:, None],
            wire.IS_ANOMALOUS: (fails(scores, detector.thresholds.image) & scored)[:, None], wire.ANOMALY_MAP: maps,
            wire.ERROR: errors}


def serve(model_path: Path | str, name: str | None = None, *, address: str = "127.0.0.1", http_port: int = 8000,
          grpc_port: int = 8001, metrics_port: int = 8002, max_batch: int = wire.DEFAULT_MAX_BATCH,
          max_queue_delay_us: int = 2000, instances: int = 1, backend: str = "auto", threads: int = 0) -> None:
    """Serve `model_path` until SIGINT or SIGTERM.

    Args:
        model_path: .onnx or .plan (with its sidecar), as the runtime's Detector opens them.
        name: the Triton model name (default: the file's stem).
        address: where the HTTP, gRPC and metrics endpoints listen (127.0.0.1: this machine only; 0.0.0.0:
            every interface, which the README says how to protect).
        http_port, grpc_port, metrics_port: the endpoints' ports.
        max_batch: the largest batch Triton forms from queued requests (capped by the model's profile).
        max_queue_delay_us: how long Triton waits for more requests to fill a batch.
        instances: model instances, each with its own Detector (for a GPU, or more CPU cores).
        backend: the runtime backend each instance's Detector opens ("auto" or a name of BACKEND_KINDS).
        threads: ONNX Runtime CPU threads per instance (0: its default).

    Raises:
        BackendError: PyTriton is missing or the server did not start. ConfigError: a bad argument.
    """
    name = wire.check_model_name(name) if name is not None else wire.model_name_for(model_path)
    if ":" in address:
        raise ConfigError(f"--address {address}: give an IPv4 address (0.0.0.0 for every interface, 127.0.0.1 "
                          "for this machine); PyTriton does not reach Triton over IPv6")
    wire.check_max_batch(max_batch)
    for option, value, low, high in (("--instances", instances, 1, wire.MAX_INSTANCES),
                                     ("--max-queue-delay-us", max_queue_delay_us, 0, wire.MAX_QUEUE_DELAY_US),
                                     ("--http-port", http_port, 1, 65535), ("--grpc-port", grpc_port, 1, 65535),
                                     ("--metrics-port", metrics_port, 1, 65535)):
        if not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"{option} must be a whole number from {low} to {high}, got {value!r}")
    check_ports_free(address, {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port})
    batch, DynamicBatcher, ModelConfig, Tensor, Triton, TritonConfig, TritonSecurityConfig = import_pytriton()
    # One Detector per instance; open_detectors closes those already open if a later one fails.
    detectors = open_detectors(instances, lambda: Detector(model_path, backend, batch_size=max_batch, threads=threads))
    workspace: Path | None = None
    previous_handlers: dict = {}
    triton = None
    try:  # from here on, the finally closes the detectors whatever fails
        max_batch = detectors[0].batch_size
        height, width = detectors[0].preprocessing.input_size

        def image_model(detector: Detector):
            @batch
            def infer(images):
                return score_batch(detector, images.astype(np.float32, copy=False))
            return infer

        def frame_model(detector: Detector):
            @batch
            def infer(frames):
                return score_batch(detector, detector.preprocess(list(frames)))
            return infer

        def metadata_model(detector: Detector):
            document = json.dumps(wire.metadata_document(name, max_batch, detector.metadata, detector.thresholds,
                                                         detector.info)).encode()

            @batch
            def infer(request):
                return {wire.METADATA: np.full((len(request), 1), document, dtype=object)}
            return infer

        outputs = [Tensor(name=wire.SCORE, dtype=np.float32, shape=(1,)),
                   Tensor(name=wire.NORMALIZED_SCORE, dtype=np.float32, shape=(1,)),
                   Tensor(name=wire.IS_ANOMALOUS, dtype=np.bool_, shape=(1,)),
                   Tensor(name=wire.ANOMALY_MAP, dtype=np.float32, shape=(height, width)),
                   Tensor(name=wire.ERROR, dtype=bytes, shape=(1,))]
        config = ModelConfig(max_batch_size=max_batch, batcher=DynamicBatcher(max_queue_delay_microseconds=max_queue_delay_us))
        models = [(name, image_model, [Tensor(name=wire.IMAGES, dtype=np.float32, shape=(3, height, width))], outputs),
                  (name + wire.FRAMES_SUFFIX, frame_model, [Tensor(name=wire.FRAMES, dtype=np.uint8, shape=(height, width, 3))],
                   outputs),
                  (name + wire.GRAY_SUFFIX, frame_model, [Tensor(name=wire.FRAMES, dtype=np.uint8, shape=(height, width))],
                   outputs),
                  (name + wire.METADATA_SUFFIX, metadata_model, [Tensor(name=wire.METADATA_REQUEST, dtype=np.int32, shape=(1,))],
                   [Tensor(name=wire.METADATA, dtype=bytes, shape=(1,))])]
        server_config = TritonConfig(http_address=address, http_port=http_port, grpc_address=address,
                                     grpc_port=grpc_port, metrics_port=metrics_port, exit_timeout_secs=5)
        workspace = Path(tempfile.mkdtemp(prefix="stmae-edge-serve-"))
        stop, previous_handlers = _stop_on_signals()  # Ctrl-C while Triton starts stops it once it is up
        use_own_libpython(workspace / "libpython")
        # Statistics stay open, as in a plain tritonserver (PyTriton would put them behind a token); the
        # endpoints that change the server stay behind the random token PyTriton makes.
        security = TritonSecurityConfig(restricted_endpoints=list(ADMIN_ENDPOINTS))
        for attempt in range(1, START_ATTEMPTS + 1):
            triton = Triton(config=server_config, security_config=security)
            for model_name, make, inputs, model_outputs in models:
                # the metadata model answers a constant: one instance, whatever --instances says
                instances_here = detectors[:1] if make is metadata_model else detectors
                triton.bind(model_name=model_name, infer_func=[make(d) for d in instances_here], inputs=inputs,
                            outputs=model_outputs, config=config, strict=True)
            try:
                triton.run()
                break
            except Exception as exc:  # PyTriton raises several types; the user needs the first line
                triton.stop()
                triton = None
                # PyTriton 0.7.0 races with several instances: a second instance may connect to the first
                # one's handshake socket between its bind and its listen. Seen once in four CI runs.
                if HANDSHAKE_RACE not in str(exc) or attempt == START_ATTEMPTS or stop["requested"]:
                    raise BackendError(f"Triton did not start: {first_line(exc)}") from exc
                logger.warning("Triton's model load lost PyTriton's handshake race (attempt %d); starting again",
                               attempt)
        info = detectors[0].info
        print(f"serving {name} ({Path(model_path).name}, batches up to {max_batch}; {info['backend']} on "
              f"{info['device']}) at http://{address}:{http_port}, "
              f"grpc {address}:{grpc_port}, metrics http://{address}:{metrics_port}/metrics; Ctrl-C stops", flush=True)
        while not stop["requested"] and triton.is_alive():
            time.sleep(0.2)
        if not stop["requested"]:
            raise BackendError("Triton stopped on its own (its server or a model's backend process exited)")
    finally:
        if triton is not None:
            triton.stop()
        for detector in detectors:
            detector.close()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
        if workspace is not None:
            shutil.rmtree(workspace, ignore_errors=True)


def _stop_on_signals() -> tuple[dict, dict]:
    """SIGINT and SIGTERM end serve() through its own loop, so that Triton is stopped and cleaned up.
    Only the main thread can set handlers; serve() called from another thread stops when the host
    process does. Returns the state and the handlers to restore."""
    state = {"requested": False}
    if threading.current_thread() is not threading.main_thread():
        return state, {}

    def handler(signum, frame):
        state["requested"] = True

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, handler)
    return state, previous

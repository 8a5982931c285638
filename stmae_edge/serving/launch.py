"""`stmae-edge serve` in a child process, for programs that need a server for a while (tests, benchmarks,
an integration check on the line PC): started on free loopback ports, waited for, stopped with SIGTERM.

    with serve_in_subprocess(".venv-serve/bin/python", "export/model.onnx", log="serve.log") as server:
        RemoteDetector(server.http, server.name).predict(images)
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import wire_format as wire
from ..errors import BackendError


@dataclass(frozen=True)
class ServedModel:
    name: str
    http: str  # http://127.0.0.1:PORT
    grpc: str  # grpc://127.0.0.1:PORT
    metrics: str  # http://127.0.0.1:PORT/metrics


def free_ports(count: int) -> list[int]:
    """Loopback ports nothing listens on now (the OS picks them; they stay free unless taken meanwhile)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextlib.contextmanager
def serve_in_subprocess(python: Path | str, model: Path | str, *options: str, name: str = "model",
                        log: Path | str, start_timeout: float = 120.0) -> Iterator[ServedModel]:
    """Run `python -m stmae_edge.cli serve MODEL --name NAME OPTIONS` on loopback until the block ends.

    Raises:
        BackendError: the server did not become ready within start_timeout, or did not exit 0 on SIGTERM
            (the message ends with its log's last lines).
    """
    http, grpc, metrics = free_ports(3)
    command = [str(python), "-m", "stmae_edge.cli", "serve", str(model), "--name", name, "--address", "127.0.0.1",
               "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics), *options]
    log = Path(log)
    with open(log, "wb") as sink:
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    served = ServedModel(name, f"http://127.0.0.1:{http}", f"grpc://127.0.0.1:{grpc}",
                         f"http://127.0.0.1:{metrics}/metrics")
    try:
        deadline = time.monotonic() + start_timeout
        while not _ready(f"{served.http}/v2/models/{name}{wire.METADATA_SUFFIX}/ready"):
            if server.poll() is not None or time.monotonic() > deadline:
                raise BackendError(f"the server did not start: {_tail(log)}")
            time.sleep(0.5)
        yield served
        server.send_signal(signal.SIGTERM)
        if server.wait(timeout=60) != 0:
            raise BackendError(f"the server exited with {server.returncode} on SIGTERM: {_tail(log)}")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _tail(log: Path) -> str:
    return " | ".join(log.read_text(errors="replace").strip().splitlines()[-15:])

"""Images/s and latency through `stmae-edge serve` (a real Triton server) at 1, 4 and 16 concurrent
clients, beside the in-process Detector at batch 8, in one run.

    bash scripts/setup_serve_env.sh && python benchmarks/serve_throughput.py [--onnx runs/bench_quality/stmae.fp32.onnx]

The server runs from .venv-serve on this machine (loopback, --max-batch 8, ONNX Runtime CPU); each client
is a thread with its own requests of one image each (RemoteDetector.predict over HTTP: decode and
preprocess here, network on the server, regions here), so both sides do the same work per image.
The in-process figure is measured before and after the server rows (median of both), with the server
idle. Issue 12's target on the CPU path: at 16 clients, at least 0.8x the in-process throughput.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quality_magnetic_tile import model_benchmark_args, write_table  # noqa: E402

from stmae_edge import data  # noqa: E402
from stmae_edge.runtime import Detector, RemoteDetector  # noqa: E402
from stmae_edge.serving.launch import serve_in_subprocess  # noqa: E402

BEGIN, END = "<!-- serve-throughput:begin -->", "<!-- serve-throughput:end -->"
SERVE_PYTHON = REPO / ".venv-serve" / "bin" / "python"
IMAGES_PER_ROUND = 96


def in_process(onnx: Path, paths: list[Path]) -> float:
    with Detector(onnx, "ort-cpu", batch_size=8) as detector:
        detector.predict(paths[:8])
        started = time.perf_counter()
        detector.predict(paths)
        return len(paths) / (time.perf_counter() - started)


def through_server(url: str, paths: list[Path], clients: int) -> tuple[float, list[float]]:
    remote = RemoteDetector(url, "bench")
    remote.predict(paths[0])
    latencies: list[float] = []
    lock = threading.Lock()
    per_client = IMAGES_PER_ROUND // clients

    def client(index: int) -> None:
        for k in range(per_client):
            started = time.perf_counter()
            remote.predict(paths[(index * per_client + k) % len(paths)])
            with lock:
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return clients * per_client / (time.perf_counter() - started), latencies


def main() -> None:
    args = model_benchmark_args(__doc__, lambda p: (
        p.add_argument("--onnx", type=Path, default=REPO / "runs" / "bench_quality" / "stmae.fp32.onnx"),
        p.add_argument("--rounds", type=int, default=3)))
    if not SERVE_PYTHON.is_file():
        raise SystemExit("needs .venv-serve: bash scripts/setup_serve_env.sh")
    samples = data.eval_samples(args.data)
    order = np.random.default_rng(0).permutation(len(samples))[:IMAGES_PER_ROUND]
    paths = [samples[i].path for i in sorted(order)]
    with serve_in_subprocess(SERVE_PYTHON, args.onnx, "--max-batch", "8", "--max-queue-delay-us", "5000",
                             "--backend", "ort-cpu", name="bench", log=args.onnx.with_name("serve_throughput.log"),
                             start_timeout=180) as server:
        local = [in_process(args.onnx, paths) for _ in range(args.rounds)]
        served = {}
        for clients in (1, 4, 16):
            runs = [through_server(server.http, paths, clients) for _ in range(args.rounds)]
            served[clients] = (float(np.median([r[0] for r in runs])), [x for r in runs for x in r[1]])
            print(clients, served[clients][0], flush=True)
        local += [in_process(args.onnx, paths) for _ in range(args.rounds)]
    baseline = float(np.median(local))
    rows = [f"| in-process Detector, batch 8 (ONNX Runtime CPU) | - | {baseline:.1f} | - | - | 1.00x |"]
    for clients, (rate, latencies) in served.items():
        ms = 1e3 * np.asarray(latencies)
        rows.append(f"| `stmae-edge serve`, HTTP, one image per request | {clients} | {rate:.1f} | "
                    f"{np.percentile(ms, 50):.0f} | {np.percentile(ms, 99):.0f} | {rate / baseline:.2f}x |")
    for r in rows:
        print(r)
    write_table(args.md, BEGIN, END, "python benchmarks/serve_throughput.py",
                f"{args.onnx.name}, {IMAGES_PER_ROUND} magnetic_tile test images per round, median of {args.rounds} "
                "rounds per row, in-process rounds before and after the server rows; server and clients on the "
                "same 2 cores, loopback",
                ["path", "concurrent clients", "images/s", "p50 latency ms", "p99 latency ms", "vs in-process"], rows)


if __name__ == "__main__":
    main()

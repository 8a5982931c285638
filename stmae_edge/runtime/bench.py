"""Latency and throughput of a Detector per batch size, split into preprocessing, inference and
postprocessing. Images are decoded once beforehand: a camera hands the runtime arrays, not files."""

from __future__ import annotations

import logging
import time

import numpy as np

from .detector import STAGES, Detector

logger = logging.getLogger(__name__)


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q) * 1e3)


def bench_batch(detector: Detector, images: list[np.ndarray], batch_size: int, iterations: int,
                warmup: int = 2) -> dict:
    """One batch size: `iterations` timed calls after `warmup` untimed ones."""
    batch = [images[i % len(images)] for i in range(batch_size)]
    for _ in range(warmup):
        detector.predict(batch)
    latencies, stages = [], {s: [] for s in STAGES}
    for _ in range(iterations):
        timings: dict = {}
        started = time.perf_counter()
        detector.predict(batch, timings=timings)
        latencies.append(time.perf_counter() - started)
        for stage in STAGES:
            stages[stage].append(timings[stage])
    median = float(np.median(latencies))
    row = {"batch": batch_size, "iterations": iterations,
           "p50_ms": percentile_ms(latencies, 50), "p90_ms": percentile_ms(latencies, 90),
           "p99_ms": percentile_ms(latencies, 99), "images_per_s": batch_size / median}
    for stage in STAGES:
        row[f"{stage}_ms"] = percentile_ms(stages[stage], 50)
    row["pre_post_share"] = (row["preprocess_ms"] + row["postprocess_ms"]) / (median * 1e3)
    return row


def benchmark(detector: Detector, images: list[np.ndarray], batch_sizes: list[int], iterations: int,
              warmup: int = 2, progress=None) -> list[dict]:
    rows = []
    for size in batch_sizes:
        rows.append(bench_batch(detector, images, size, iterations, warmup))
        if progress:
            progress()
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'batch':>5s} {'p50 ms':>9s} {'p90 ms':>9s} {'p99 ms':>9s} {'images/s':>9s} "
             f"{'pre ms':>8s} {'infer ms':>9s} {'post ms':>8s} {'pre+post':>8s}"]
    for r in rows:
        lines.append(f"{r['batch']:5d} {r['p50_ms']:9.2f} {r['p90_ms']:9.2f} {r['p99_ms']:9.2f} "
                     f"{r['images_per_s']:9.1f} {r['preprocess_ms']:8.2f} {r['infer_ms']:9.2f} "
                     f"{r['postprocess_ms']:8.2f} {100 * r['pre_post_share']:7.1f}%")
    return "\n".join(lines)


def bench_images(detector: Detector, folder=None, count: int = 32, seed: int = 0) -> tuple[list[np.ndarray], str]:
    """Decoded images to benchmark with, and what they are: a folder's images, else the model's own
    training images where they still are, else seeded synthetic gray frames as tall as the tallest
    training image, of a typical width/height (a size the model accepts, and about the most costly to
    preprocess), or of the input size for a model that records no training sizes."""
    from ..data import images_in, recorded_train_images
    from ..errors import DatasetError
    from ..preprocessing import TrainedSizes, load_image

    if folder is not None:
        paths, what = images_in(folder)[:count], f"images from {folder}"
        if not paths:  # not synthetic frames in their place, which the table would then describe
            raise DatasetError(f"{folder}: no image files in this folder to benchmark with")
    else:
        try:
            paths = recorded_train_images(detector.metadata.training, count, seed)
            what = "the model's training images"
        except DatasetError as exc:  # the table then says "synthetic"; this says why
            logger.warning("benchmarking on synthetic frames: %s", exc)
            paths = []
    if paths:
        images = [load_image(p) for p in paths]
        return images, f"{len(images)} {what} ({TrainedSizes.of([im.shape[:2] for im in images]).describe()})"
    if folder is not None:
        raise DatasetError(f"{folder}: no images to benchmark with")
    height, width = detector.preprocessing.input_size
    sizes = detector.metadata.trained_sizes
    if sizes:
        tall = sizes.height[1]
        wide = min(max(round(tall * (sizes.aspect[0] * sizes.aspect[1]) ** 0.5), sizes.width[0]), sizes.width[1])
        if not sizes.refusal(tall, wide):
            height, width = tall, wide
    rng = np.random.default_rng(seed)
    # a model that reads colour gets colour frames: the work its camera's frames cost, and no warning
    # that a gray frame is unlike its training images
    colour = detector.preprocessing.color == "rgb"
    shape = (height, width, 3) if colour else (height, width)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]
    return images, f"{count} synthetic {width}x{height} 8-bit {'colour' if colour else 'gray'} frames"

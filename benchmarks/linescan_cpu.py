"""Line-scan throughput on the CPU: the streaming inspector against raw batched inference.

    python benchmarks/linescan_cpu.py [--model runs/bench_quality/stmae.pt] [--rounds 3]

Strips 4096 and 8192 pixels wide (synthetic 8-bit textured web, seeded) go through
`StreamingInspector` in blocks of 256 rows, as `stmae-edge linescan` replays them. The same tiles,
preprocessed beforehand, then go through the backend alone in the same batches. Both run
side by side in every round, and the figures are medians. The difference is what tiling,
preprocessing, stitching and defect extraction cost (target: at most 10%). The rows per second of the
4096-pixel strip are the line rate that the CPU path sustains.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quality_magnetic_tile import model_benchmark_args, write_table  # noqa: E402

from stmae_edge.engines.export import export_onnx  # noqa: E402
from stmae_edge.runtime import Detector  # noqa: E402
from stmae_edge.runtime.detector import balanced_chunks  # noqa: E402
from stmae_edge.runtime.linescan import StreamingInspector, tile_starts  # noqa: E402

BEGIN, END = "<!-- linescan-cpu:begin -->", "<!-- linescan-cpu:end -->"
STRIPS = {4096: 2048, 8192: 1024}  # width: rows (8.4 megapixels each)
BLOCK_ROWS, OVERLAP, BATCH = 256, 32, 64


def web(rows: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = cv2.resize(rng.normal(128, 20, (rows // 16, width // 16)), (width, rows), interpolation=cv2.INTER_CUBIC)
    return np.clip(coarse + rng.normal(0, 4, (rows, width)), 0, 255).astype(np.uint8)


def run_inspector(detector: Detector, strip: np.ndarray) -> tuple[float, float, int, int]:
    """(seconds end to end, seconds of it inside the backend, tiles, defects)."""
    inspector = StreamingInspector(detector, overlap=OVERLAP)
    started = time.perf_counter()
    defects = 0
    for start in range(0, strip.shape[0], BLOCK_ROWS):
        defects += len(inspector.push(strip[start:start + BLOCK_ROWS]))
    defects += len(inspector.flush())
    return time.perf_counter() - started, inspector.seconds["infer"], inspector.tiles, defects


def raw_batches(detector: Detector, strip: np.ndarray) -> list[np.ndarray]:
    """The inspector's tiles, preprocessed ahead of time, in the batches it sends: the tile rows each
    block of BLOCK_ROWS completes go out together, in the Detector's balanced chunks."""
    tile = detector.preprocessing.input_size[0]
    stride = tile - OVERLAP
    cols = tile_starts(strip.shape[1], tile, tile - OVERLAP)
    groups, next_top = [], 0
    for pushed in range(BLOCK_ROWS, strip.shape[0] + BLOCK_ROWS, BLOCK_ROWS):
        tops = list(range(next_top, min(pushed, strip.shape[0]) - tile + 1, stride))
        if tops:
            groups.append(tops)
            next_top = tops[-1] + stride
    if next_top - stride + tile < strip.shape[0]:
        groups.append([strip.shape[0] - tile])  # flush: the last tile row, flush with the end
    batches = []
    for tops in groups:
        tiles = [strip[y:y + tile, x:x + tile] for y in tops for x in cols]
        batches += [detector.preprocess(tiles[a:b]) for a, b in balanced_chunks(len(tiles), detector.batch_size)]
    return batches


def run_raw(detector: Detector, batches: list[np.ndarray]) -> float:
    started = time.perf_counter()
    for batch in batches:
        detector._backend.run(batch)
    return time.perf_counter() - started


def main() -> None:
    args = model_benchmark_args(__doc__, lambda p: p.add_argument("--rounds", type=int, default=3))
    onnx_file, _ = export_onnx(args.model, args.model.with_name(f"{args.model.stem}.fp32.onnx"))
    detector = Detector(onnx_file, "ort-cpu", batch_size=BATCH)
    strips = {width: web(rows, width, seed=width) for width, rows in STRIPS.items()}
    batches = {width: raw_batches(detector, strip) for width, strip in strips.items()}
    run_inspector(detector, strips[4096][:512])  # warm-up
    times: dict[int, dict[str, list]] = {w: {"inspector": [], "inside": [], "raw": []} for w in strips}
    tiles, found = {}, {}
    for r in range(args.rounds):
        for width, strip in strips.items():
            # alternate which goes first, so that drift of the shared machine does not favour either
            order = ("inspector", "raw") if r % 2 == 0 else ("raw", "inspector")
            for what in order:
                if what == "raw":
                    times[width]["raw"].append(run_raw(detector, batches[width]))
                    continue
                seconds, inside, tiles[width], found[width] = run_inspector(detector, strip)
                times[width]["inspector"].append(seconds)
                times[width]["inside"].append(inside)
            assert tiles[width] == sum(len(b) for b in batches[width]), "raw run must score the same tiles"
            print(f"round {r + 1}: {width} px: inspector {times[width]['inspector'][-1]:.2f}s "
                  f"({times[width]['inside'][-1]:.2f}s of it in the backend), raw {times[width]['raw'][-1]:.2f}s, "
                  f"{found[width]} defects", flush=True)
    rows = []
    for width, strip in strips.items():
        inspector, inside, raw = (float(np.median(times[width][k])) for k in ("inspector", "inside", "raw"))
        own = float(np.median([t - i for t, i in zip(times[width]["inspector"], times[width]["inside"], strict=True)]))
        megapixels = strip.size / 1e6
        rows.append(f"| {width} | {strip.shape[0]} | {tiles[width]} | {found[width]} | {megapixels / inspector:.2f} | "
                    f"{megapixels / raw:.2f} | {100 * (inspector / raw - 1):+.1f}% | {100 * own / inside:.1f}% | "
                    f"{strip.shape[0] / inspector:.0f} |")
        print(rows[-1])
    rate = STRIPS[4096] / float(np.median(times[4096]["inspector"]))
    rows += ["", f"Highest line rate sustained at 4096 px on this CPU: **{rate:.0f} rows/s** ({rate / 1e3:.2f} kHz), "
             f"{detector.preprocessing.input_size[0]}-pixel tiles, {OVERLAP}-pixel overlap, blocks of {BLOCK_ROWS} rows."]
    write_table(args.md, BEGIN, END, f"python benchmarks/linescan_cpu.py --rounds {args.rounds}",
                f"the quality benchmark's model, fp32 graph on ONNX Runtime CPU; synthetic 8-bit strips, which that "
                f"model, trained on magnetic tiles, finds full of defects: a stress case for defect extraction; medians of "
                f"{args.rounds} rounds, inspector and raw inference side by side in each, in alternating order",
                ["width px", "rows", "tiles", "defects reported", "inspector MP/s", "raw inference MP/s",
                 "inspector against raw", "inspector's own time against its inference, same run", "inspector rows/s"],
                rows)


if __name__ == "__main__":
    main()

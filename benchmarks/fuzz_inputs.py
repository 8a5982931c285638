"""Coverage-guided fuzzing (atheris, libFuzzer) of every reader of user input, for a fixed time budget
per target; writes the fuzzing rows of docs/BENCHMARKS.md.

    python benchmarks/fuzz_inputs.py [--seconds 120] [--targets image,metadata,...]

Needs `pip install atheris`. Targets are tests/fuzz_targets.py; each runs in its own process on a
small exported model. Any exception other than the package's typed errors, and any input that takes
longer than --timeout seconds, is a finding: libFuzzer stops that target and writes the input to
runs/fuzz/findings/<target>/. Each finding, once fixed, goes into tests/data/fuzz/<target>/, which
tests/test_fuzz_corpus.py replays on every test run.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
WORK = ROOT / "runs" / "fuzz"
CORPUS = ROOT / "tests" / "data" / "fuzz"
BEGIN, END = "<!-- fuzz-inputs:begin -->", "<!-- fuzz-inputs:end -->"


def tiny_model() -> Path:
    """A tiny model trained for one epoch on a synthetic set and exported: what the runtime targets load."""
    onnx = WORK / "model" / "tiny.onnx"
    if onnx.is_file():
        return onnx
    from synthetic_data import make_synthetic_dataset

    from stmae_edge.engines.export import export_onnx
    from stmae_edge.models.stmae import preset
    from stmae_edge.training.train import TrainConfig, train

    data = make_synthetic_dataset(WORK / "data")
    train(data, WORK / "model" / "tiny.pt", preset("tiny"), TrainConfig(epochs=1, batch_size=8), backbone_weights="random")
    export_onnx(WORK / "model" / "tiny.pt", onnx)
    return onnx


def seeds(target: str) -> list[bytes]:
    """Valid inputs to start from: the fuzzer mutates its way out from these."""
    import cv2
    import numpy as np

    if target == "image":
        gray = np.random.default_rng(0).integers(0, 256, (24, 32), dtype=np.uint8)
        out = [cv2.imencode(ext, gray)[1].tobytes() for ext in (".png", ".jpg", ".bmp", ".tif")]
        out.append(cv2.imencode(".png", gray.astype(np.uint16) * 257)[1].tobytes())
        out.append(cv2.imencode(".tif", cv2.cvtColor(gray, cv2.COLOR_GRAY2BGRA))[1].tobytes())
        return out
    if target in ("metadata", "sidecar"):
        return [b"\x00" + bytes(range(16)), b"\x04\x01\x00\x03\x02\x05\x07", b"\x02garbage"]
    return [bytes(range(64)), bytes(64), b"\xff" * 64]


def worker(target: str, onnx: Path, libfuzzer_args: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["stmae_edge"]):
        import fuzz_targets

        import stmae_edge.engine_plan  # noqa: F401  (instrumented before first use)
        import stmae_edge.metadata  # noqa: F401
        import stmae_edge.preprocessing  # noqa: F401
        import stmae_edge.runtime.linescan  # noqa: F401
    context = fuzz_targets.make_context(onnx)
    function = fuzz_targets.FUNCTIONS[target]
    atheris.Setup([sys.argv[0], *libfuzzer_args], lambda data: function(data, context))
    atheris.Fuzz()


def run_target(target: str, onnx: Path, seconds: int, timeout: int, seed: int = 1) -> dict:
    corpus = WORK / "corpus" / target
    findings = WORK / "findings" / target
    corpus.mkdir(parents=True, exist_ok=True)
    findings.mkdir(parents=True, exist_ok=True)
    for i, start in enumerate(seeds(target)):
        (corpus / f"seed-{i}").write_bytes(start)
    kept = CORPUS / target  # earlier findings, fixed: start from them too
    before = set(findings.iterdir())
    args = [str(corpus), *([str(kept)] if kept.is_dir() else []), f"-max_total_time={seconds}",
            f"-timeout={timeout}", f"-seed={seed}", "-rss_limit_mb=6000", f"-artifact_prefix={findings}/", "-print_final_stats=1"]
    started = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--worker", target, "--model", str(onnx), "--", *args],
                       capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    elapsed = time.perf_counter() - started
    log = r.stdout + r.stderr
    (WORK / f"{target}.log").write_text(log)
    runs = [int(m) for m in re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)]
    if not runs:
        runs = [int(m) for m in re.findall(r"^#(\d+)", log, re.M)]
    new = sorted(set(findings.iterdir()) - before)
    error = re.findall(r"=== Uncaught Python exception: ===\n(.*?)\n", log)
    slow = re.findall(r"Slowest unit: (\d+) s", log)
    if not error and any(name.name.startswith(("slow-unit", "timeout")) for name in new):
        error = [f"an input that took {slow[0]} s" if slow else "a hang"]
    return {"target": target, "seconds": elapsed, "runs": max(runs) if runs else 0, "findings": [p.name for p in new],
            "exception": error[0] if error else "", "corpus": len(list(corpus.iterdir())), "returncode": r.returncode}


def write_rows(rows: list[dict], seconds: int, command: str) -> None:
    path = ROOT / "docs" / "BENCHMARKS.md"
    from quality_magnetic_tile import machine

    lines = [BEGIN, f"Measured {time.strftime('%Y-%m-%d')} on {machine()}, Python {platform.python_version()}, "
             f"atheris (libFuzzer), by `{command}` ({seconds} s budget per target; a finding stops its target).", "",
             "| target | what it reads | inputs tried | corpus kept | findings | first finding |",
             "|---|---|---|---|---|---|"]
    what = {"image": "image file bytes: header, decode, checks, tensor",
            "metadata": "model metadata JSON and ONNX files", "sidecar": "engine sidecar JSON beside a plan",
            "linescan": "line-scan blocks of any shape, dtype and width", "detector": "Detector and predict arguments"}
    for r in rows:
        lines.append(f"| {r['target']} | {what[r['target']]} | {r['runs']:,} | {r['corpus']} | {len(r['findings'])} | "
                     f"{r['exception'] or '-'} |")
    lines.append(END)
    text = path.read_text()
    block = "\n".join(lines)
    if BEGIN in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Fuzzing the readers of user input (issue 11)\n\n" + block + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=int, default=120, help="budget per target")
    parser.add_argument("--timeout", type=int, default=20, help="seconds after which one input counts as a hang")
    parser.add_argument("--targets", default="image,metadata,sidecar,linescan,detector")
    parser.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/BENCHMARKS.md")
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # libFuzzer's own arguments follow "--"
    args = parser.parse_args(argv[:cut])
    if args.worker:
        worker(args.worker, args.model, argv[cut + 1:])
        return
    onnx = tiny_model()
    rows = []
    for target in args.targets.split(","):
        row = run_target(target, onnx, args.seconds, args.timeout, args.seed)
        rows.append(row)
        print(f"{target}: {row['runs']:,} inputs in {row['seconds']:.0f}s, findings {row['findings']} "
              f"{row['exception']}", flush=True)
    if not args.no_write:
        command = "python benchmarks/fuzz_inputs.py" + (f" --seconds {args.seconds}" if args.seconds != 120 else "")
        write_rows(rows, args.seconds, command)


if __name__ == "__main__":
    main()

"""What each way of choosing the image threshold costs on magnetic_tile, as `stmae-edge threshold` reports it.

    python benchmarks/operating_point_magnetic_tile.py [--model runs/bench_quality/stmae.fp32.onnx]

Scores the test set once through the runtime (ONNX Runtime CPU, as `threshold` and `report` do), then
applies the same choices as `stmae-edge threshold MODEL DATA` with each target: the model's own rule
(mean + 3 std of its good scores, cross-fitted or held-out), at most 1% false rejects, at least 95% recall. Each row
gives the counts behind its rates and their 95% Wilson intervals. Illustration only: a real choice is
made on a validation set kept apart from the set quality is reported on.

The model is the quality benchmark's default (`quality_magnetic_tile.py` trains it; export it with
`stmae-edge export runs/bench_quality/stmae.pt --out runs/bench_quality/stmae.fp32.onnx`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from quality_magnetic_tile import machine, write_rows  # noqa: E402

from stmae_edge.cli import use_available_cores  # noqa: E402
from stmae_edge.evaluation.operating_point import choose, evaluate_threshold  # noqa: E402
from stmae_edge.evaluation.validation import score_dataset  # noqa: E402
from stmae_edge.scoring import threshold_scoring  # noqa: E402

BEGIN, END = "<!-- operating-point:begin -->", "<!-- operating-point:end -->"


def cells(point) -> str:
    ci = point.intervals()

    def rate(name: str, count: int, total: int, value: float) -> str:
        low, high = ci[name]
        return f"{count} of {total}: {100 * value:.1f}% ({100 * low:.1f} to {100 * high:.1f})"

    return (f"{point.threshold:.4f} | {rate('false_reject_rate', point.false_rejects, point.goods, point.false_reject_rate)}"
            f" | {rate('escape_rate', point.escapes, point.defects, point.escape_rate)} | "
            f"{100 * point.precision:.1f}% | {100 * point.recall:.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "runs" / "bench_quality" / "stmae.fp32.onnx")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "datasets" / "magnetic_tile")
    parser.add_argument("--md", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()
    use_available_cores()

    scored = score_dataset(args.model, args.data, "ort-cpu", description="scoring the test set")
    good, defective = scored.good_scores, scored.defect_scores
    stats = scored.detector.score_stats
    thresholds = scored.detector.thresholds
    points = [
        # how its good scores were scored, from the training record (a rule's stored words can predate it)
        (f"the model's default rule (mean + 3 std of its {threshold_scoring(scored.detector.metadata.training)} "
         "good scores)",
         evaluate_threshold(thresholds.image, good, defective, thresholds.rule)),
        ("`stmae-edge threshold MODEL DATA --max-false-reject 0.01`", choose(good, defective, max_false_reject=0.01)),
        ("`stmae-edge threshold MODEL DATA --min-recall 0.95`", choose(good, defective, min_recall=0.95)),
        ("`stmae-edge threshold MODEL DATA --sigma 2`",
         choose(good, defective, sigma=2.0, stats=stats, scored=threshold_scoring(scored.detector.metadata.training))),
    ]
    for name, point in points:
        print(name, point.describe(), sep="\n")
    model_name = args.model.relative_to(REPO) if args.model.is_relative_to(REPO) else args.model
    header = (f"Measured {dt.date.today().isoformat()} on {machine()}, ONNX Runtime CPU, by "
              f"`python benchmarks/operating_point_magnetic_tile.py` (model `{model_name}`, the quality "
              f"benchmark's default exported in fp32; the magnetic_tile test set: {good.size} good, "
              f"{defective.size} defective images). Illustration only: a real choice is made on a validation "
              "set kept apart from the set quality is reported on.\n\n"
              "| command | threshold | false rejects (95% interval) | escapes (95% interval) | precision | recall |\n"
              "|---|---|---|---|---|---|")
    write_rows(args.md, [f"| {name} | {cells(point)} |" for name, point in points], header, BEGIN, END)
    print(f"wrote {args.md}")


if __name__ == "__main__":
    main()

"""scripts/gpu_acceptance.py's verdict on the INT8 plan against the FP16 plan (issue 14): what it
passes and fails, from rows shaped like those it collects. The GPU paths themselves need a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

_saved = list(sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from gpu_acceptance import int8_against_fp16  # noqa: E402

sys.path[:] = _saved  # the script puts the repository and tests/ first; leave the session's path as it was


def rows(fp16_ms: float, int8_ms: float) -> list[dict]:
    bench = lambda ms: [{"batch": 1, "infer_ms": ms / 4}, {"batch": 8, "infer_ms": ms}]  # noqa: E731
    return [{"path": "tensorrt fp16", "precision": "fp16", "status": "passed", "bench": bench(fp16_ms)},
            {"path": "tensorrt int8", "precision": "int8", "status": "passed", "bench": bench(int8_ms)},
            {"path": "tensorrt+graph int8", "precision": "int8", "status": "passed", "bench": bench(1.0)}]


def plans(folder: Path, fp16_bytes: int, int8_bytes: int) -> Path:
    (folder / "m.fp16.plan").write_bytes(b"\0" * fp16_bytes)
    (folder / "m.int8.plan").write_bytes(b"\0" * int8_bytes)
    return folder


def test_int8_plan_must_be_no_larger_and_no_slower_than_fp16(tmp_path):
    verdict = int8_against_fp16(rows(10.0, 8.0), plans(tmp_path, 1000, 900), all_layers=False)
    assert verdict["status"] == "passed" and verdict["checks"][0]["plan_size_vs_fp16"] == 0.9
    assert verdict["checks"][1]["speed_vs_fp16"] == 1.25
    assert int8_against_fp16(rows(10.0, 8.0), plans(tmp_path, 1000, 1001), all_layers=False)["status"] == "failed"
    assert int8_against_fp16(rows(10.0, 11.0), plans(tmp_path, 1000, 900), all_layers=False)["status"] == "failed"
    assert int8_against_fp16(rows(10.0, 10.4), plans(tmp_path, 1000, 900), all_layers=False)["status"] == "passed"


def test_skipped_with_a_reason_where_there_is_nothing_to_compare(tmp_path):
    tiny = int8_against_fp16(rows(10.0, 8.0), plans(tmp_path, 1000, 900), all_layers=True)
    assert tiny["status"] == "skipped" and "--model" in tiny["why"]
    no_int8 = [r for r in rows(10.0, 8.0) if r["path"] != "tensorrt int8"]
    assert int8_against_fp16(no_int8, tmp_path, all_layers=False)["status"] == "skipped"
    skipped = [r | {"status": "skipped"} if r["path"] == "tensorrt fp16" else r for r in rows(10.0, 8.0)]
    assert int8_against_fp16(skipped, tmp_path, all_layers=False)["why"] == "no fp16 and int8 plans ran here"

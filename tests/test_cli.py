"""The command line: the real console entry point, one-line errors, non-zero exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stmae_edge.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def _assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_train_evaluate_info(synthetic_dataset, tmp_path):
    model = tmp_path / "m.pt"
    r = run("train", str(synthetic_dataset), "--out", str(model), "--preset", "tiny", "--epochs", "2",
            "--backbone-weights", "random")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and model.is_file()
    report = tmp_path / "report.json"
    r = run("evaluate", str(model), str(synthetic_dataset), "--out", str(report))
    assert r.returncode == 0, r.stderr
    result = json.loads(report.read_text())
    assert {"image_auroc", "pixel_auroc", "aupro", "f1", "per_defect_type"} <= set(result)
    assert set(result["per_defect_type"]) == {"scratch"}
    assert "image AUROC" in r.stdout
    r = run("info", str(model))
    assert r.returncode == 0 and json.loads(r.stdout)["thresholds"]["image"] > 0


@pytest.mark.parametrize("args,fragment", [
    (("train", "/nonexistent/data"), "no train/good folder"),
    (("evaluate", "/nonexistent/model.pt", "/nonexistent/data"), "no such model file"),
    (("train", "/nonexistent/data", "--preset", "huge"), "unknown preset"),
])
def test_user_mistakes_are_one_line(args, fragment):
    _assert_one_line_error(run(*args), fragment)


def test_corrupt_model_file_is_one_line(tmp_path, synthetic_dataset):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x00" * 100)
    _assert_one_line_error(run("evaluate", str(bad), str(synthetic_dataset)), "not a loadable")


def test_vgg19_without_weights_offline_is_one_line(synthetic_dataset, tmp_path):
    r = run("train", str(synthetic_dataset), "--preset", "tiny", "--backbone", "vgg19", "--backbone-weights",
            str(tmp_path / "missing_vgg19.pth"), "--out", str(tmp_path / "m.pt"))
    _assert_one_line_error(r, "backbone-weights")

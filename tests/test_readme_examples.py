"""The README's Python examples run as written: the in-process Detector's and the line-scan
inspector's blocks are executed on the tiny model, with the README's file names pointed at it and the
camera's frames and blocks made up. An example that drifts from the API fails here, not in a user's
first program. (The served model's example needs a server: tests/test_remote_checks.py covers it.)"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def block_using(name: str) -> str:
    found = [block for block in python_blocks() if name in block]
    assert len(found) == 1, f"one README example using {name}, not {len(found)}"
    return found[0]


@pytest.fixture
def in_readme_folder(tiny_export, tmp_path, monkeypatch):
    """A working folder with export/model.onnx and export/web.onnx: the README's names, the tiny model."""
    (tmp_path / "export").mkdir()
    for name in ("model.onnx", "web.onnx"):
        shutil.copy(tiny_export[1], tmp_path / "export" / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_detector_example_runs_as_written(in_readme_folder):
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (64, 64, 3), np.uint8)
    frames = [frame, rng.integers(0, 65536, (64, 64), np.uint16), frame[..., 0]]
    namespace = {"frame": frame, "frames": frames}
    exec(compile(block_using("Detector(\"export/model.onnx\")"), "README.md", "exec"), namespace)
    detector = namespace["detector"]
    assert detector.thresholds.image == 3.8 and detector.thresholds.pixel == 7.0  # the example's last line
    assert len(namespace["results"]) == len(frames)
    assert namespace["result"].anomaly_map.shape == frame.shape[:2]


def test_the_line_scan_example_runs_as_written(in_readme_folder):
    from stmae_edge.metadata import ModelMetadata

    height, width = ModelMetadata.from_onnx(in_readme_folder / "export" / "web.onnx").preprocessing.input_size
    rng = np.random.default_rng(1)
    reported = []

    def camera_blocks():
        for rows in (7, height, 3 * height // 2, 5):  # any number of rows per block
            yield rng.integers(0, 256, (rows, 3 * width), np.uint8)

    namespace = {"camera_blocks": camera_blocks, "print": lambda *values: reported.append(values)}
    exec(compile(block_using("StreamingInspector"), "README.md", "exec"), namespace)
    assert namespace["inspector"].rows_pushed == 7 + height + 3 * height // 2 + 5
    assert reported and all(len(values) == 6 for values in reported)  # noise is a defect to this model: report() ran

"""serve()'s start-up without PyTriton: the Detectors of its model instances, opened and closed
together. Real Detectors on the tiny model's ONNX file."""

from __future__ import annotations

import numpy as np
import pytest

from stmae_edge.errors import BackendError, ConfigError
from stmae_edge.runtime import Detector
from stmae_edge.serving.server import open_detectors


def test_an_instance_that_fails_to_open_closes_those_already_open(tiny_export, tmp_path):
    onnx_path = tiny_export[1]
    opened: list[Detector] = []

    def open_one() -> Detector:
        # the third instance's model is gone, as when a file is replaced while the server starts
        detector = Detector(onnx_path if len(opened) < 2 else tmp_path / "gone.onnx")
        opened.append(detector)
        return detector

    with pytest.raises(BackendError, match="no such model file"):
        open_detectors(3, open_one)
    assert len(opened) == 2
    height, width = opened[0].preprocessing.input_size
    batch = np.zeros((1, 3, height, width), np.float32)
    for detector in opened:  # closed: their backends are freed, not left until the process ends
        with pytest.raises(BackendError, match="was closed"):
            detector.run_tensors(batch)
    detectors = open_detectors(2, lambda: Detector(onnx_path))
    assert len(detectors) == 2 and all(np.isfinite(d.run_tensors(batch)[1]).all() for d in detectors)
    for detector in detectors:
        detector.close()


def test_a_repository_takes_model_files_by_kind_whatever_the_case_of_their_suffix(tiny_export, tmp_path):
    from stmae_edge.serving.repository import write_repository

    checkpoint, onnx_path, _ = tiny_export
    upper = tmp_path / "Line3.ONNX"
    upper.write_bytes(onnx_path.read_bytes())
    folder = write_repository(upper, tmp_path / "repo")
    assert (folder / "1" / "model.onnx").read_bytes() == onnx_path.read_bytes()
    with pytest.raises(ConfigError, match="Triton serves .onnx or .plan files"):
        write_repository(checkpoint, tmp_path / "repo2")


def test_serve_listens_on_this_machine_only_unless_told():
    """Inference is unauthenticated and the bundled Triton has no request-size limit (README, Serving)."""
    import inspect

    from typer.testing import CliRunner

    from stmae_edge.cli import app
    from stmae_edge.serving.server import serve

    assert inspect.signature(serve).parameters["address"].default == "127.0.0.1"
    help_text = CliRunner().invoke(app, ["serve", "--help"], terminal_width=200).output
    assert "127.0.0.1" in help_text and "0.0.0.0" in help_text

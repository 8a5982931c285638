"""The in-process Detector's own checks and what it logs: the network's outputs, and the batch size
that a model's profile caps. Real ONNX Runtime on the tiny model."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from stmae_edge.errors import BackendError
from stmae_edge.runtime import Detector, RemoteError, backends
from stmae_edge.runtime.detector import DEFAULT_BATCH_SIZE, check_network_outputs


def test_a_batch_size_above_the_models_maximum_is_capped_and_logged(tiny_export, monkeypatch, caplog):
    # ONNX Runtime takes any batch: a smaller maximum stands in for a TensorRT plan's profile (1:4:8, say)
    monkeypatch.setattr(backends, "MAX_BATCH", 8)
    onnx_path = tiny_export[1]
    with caplog.at_level(logging.INFO, logger="stmae_edge.runtime.detector"):
        chosen = Detector(onnx_path, batch_size=16)
    assert chosen.batch_size == 8
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == ("batch_size 16 exceeds the largest batch that m.onnx takes (8); "
                                   "batches of at most 8")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="stmae_edge.runtime.detector"):
        default = Detector(onnx_path)  # the default meeting a small profile: routine, said at info
        fits = Detector(onnx_path, batch_size=8)  # nothing capped, nothing said
    assert default.batch_size == fits.batch_size == 8
    [record] = caplog.records
    assert record.levelno == logging.INFO and f"batch_size {DEFAULT_BATCH_SIZE} exceeds" in record.getMessage()
    # and the capped detector scores a batch larger than its maximum in several calls, as before
    height, width = default.preprocessing.input_size
    images = np.random.default_rng(0).integers(0, 255, (10, height, width, 3), dtype=np.uint8)
    assert len(chosen.predict(images)) == 10


def test_network_outputs_are_checked_by_one_function_for_every_runtime():
    maps, scores = np.zeros((2, 4, 6), np.float32), np.zeros(2, np.float32)
    check_network_outputs(maps, scores, 2, (4, 6))
    with pytest.raises(BackendError, match=r"the network returned maps \(2, 4, 6\) and scores \(2,\) for a batch of 3"):
        check_network_outputs(maps, scores, 3, (4, 6))
    with pytest.raises(BackendError, match="does not fit"):
        check_network_outputs(maps, scores, 2, (6, 4))
    for bad in (np.nan, np.inf, -np.inf):
        nan_scores, nan_maps = scores.copy(), maps.copy()
        nan_scores[1], nan_maps[0, 3, 5] = bad, bad
        for args in ((maps, nan_scores), (nan_maps, scores)):
            with pytest.raises(BackendError, match="^the network produced NaN or infinite values"):
                check_network_outputs(*args, 2, (4, 6))
    # a server's answer: its own error type, and the message says which server and model
    with pytest.raises(RemoteError, match=r"^http://h:8000, model m: the network produced NaN"):
        check_network_outputs(maps, nan_scores, 2, (4, 6), where="http://h:8000, model m: ", error=RemoteError)

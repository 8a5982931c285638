"""predict's overlays drawn, encoded and written by a pool of threads while the next batch is scored:
the same files as one after another, at most two batches held, and a failure in a pool thread fails
the run as one in the scoring thread did, leaving the earlier run whole."""

from __future__ import annotations

import json
import time

import pytest

from stmae_edge.errors import ConfigError, OutputError
from stmae_edge.outputs import STAGING_PREFIX
from stmae_edge.runtime import Detector, files


@pytest.fixture(scope="module")
def inputs(synthetic_dataset):
    return sorted((synthetic_dataset / "test").rglob("*.png"))[:7]


def _written(out) -> dict:
    return {p.name: p.read_bytes() for p in out.iterdir()}


def test_overlays_from_the_pool_are_those_written_one_after_another(tiny_export, inputs, tmp_path):
    with Detector(tiny_export[1], batch_size=2) as detector:
        alone = files.predict_to_folder(detector, inputs, tmp_path / "alone", overlay_threads=0)
        pooled = files.predict_to_folder(detector, inputs, tmp_path / "pooled", overlay_threads=3)
    assert pooled["results"] == alone["results"] and len(alone["results"]) == len(inputs)
    assert all("overlay_sha256" in entry for entry in pooled["results"])
    assert _written(tmp_path / "pooled") == _written(tmp_path / "alone")  # results.json too, byte for byte


def test_a_batch_is_drawn_while_the_next_is_scored_and_no_more_than_two_are_held(tiny_export, inputs, tmp_path,
                                                                                 monkeypatch):
    """Overlays slower than scoring (4 MP PNGs) must not pile up: when batch k + 2 is scored, every
    overlay of batch k is written."""
    real_write = files._write_overlay
    monkeypatch.setattr(files, "_write_overlay", lambda *args: (time.sleep(0.2), real_write(*args))[1])
    out = tmp_path / "out"
    with Detector(tiny_export[1], batch_size=2) as detector:
        staged_when_scored = []
        real_predict = detector.predict

        def predict(*args, **kwargs):
            staging = next(out.glob(f"{STAGING_PREFIX}*"))
            staged_when_scored.append(len(list(staging.glob("*.png"))))
            return real_predict(*args, **kwargs)

        monkeypatch.setattr(detector, "predict", predict)
        summary = files.predict_to_folder(detector, inputs, out, overlay_threads=2)
    assert len(staged_when_scored) == 4 and len(summary["results"]) == 7
    assert all(staged >= 2 * (call - 1) for call, staged in enumerate(staged_when_scored)), staged_when_scored
    # and drawn while the next is scored: one after another, batch 0's two overlays (0.2 s each) would be written
    assert staged_when_scored[1] < 2, staged_when_scored
    assert len(list(out.glob("*.png"))) == 7


def test_an_overlay_that_fails_in_a_pool_thread_fails_the_run_and_leaves_the_earlier_one(tiny_export, inputs,
                                                                                       tmp_path, monkeypatch):
    out = tmp_path / "out"
    with Detector(tiny_export[1], batch_size=2) as detector:
        files.predict_to_folder(detector, inputs, out)
        earlier = _written(out)
        real_write, writes = files.write_staged, []

        def full_disk_at_the_fourth(path, data):
            writes.append(path.name)
            if len(writes) == 4:
                raise OSError(28, "No space left on device")
            real_write(path, data)

        monkeypatch.setattr(files, "write_staged", full_disk_at_the_fourth)
        with pytest.raises(OutputError, match=r"cannot write .*\.png: no space left on the disk .*nothing was replaced"):
            files.predict_to_folder(detector, inputs, out, pixel_threshold=0.0, overlay_threads=3)
    assert _written(out) == earlier  # the earlier run whole, and no staging folder left
    assert json.loads(earlier["results.json"])["images"] == 7


def test_overlay_threads_below_zero_are_refused(tiny_export, inputs, tmp_path):
    with Detector(tiny_export[1]) as detector, pytest.raises(ConfigError, match="overlay_threads=-1"):
        files.predict_to_folder(detector, inputs, tmp_path / "out", overlay_threads=-1)
    assert not (tmp_path / "out").exists()

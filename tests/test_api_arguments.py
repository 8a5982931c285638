"""The public API given what an integrator's code gets wrong (a str for a Path, one path for a list, a
float for a count, the wrong object): each refused with the typed error its docstring names, before any
work, and nothing left behind. Found by an audit of the docstrings' Raises sections against behaviour."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from stmae_edge.errors import ConfigError, DatasetError, OutputError
from stmae_edge.runtime import Detector, StreamingInspector
from stmae_edge.runtime.files import expand_inputs, predict_to_folder


@pytest.fixture(scope="module")
def good_images(synthetic_dataset) -> list[Path]:
    return sorted((synthetic_dataset / "test" / "good").glob("*.png"))[:3]


def test_predict_to_folder_takes_str_paths_and_folder_as_the_cli_does(tiny_export, good_images, tmp_path):
    """`out` as a str raised TypeError (str / str), str paths AttributeError ('str' has no 'stem')."""
    with Detector(tiny_export[1]) as detector:
        summary = predict_to_folder(detector, [str(p) for p in good_images], str(tmp_path / "out"))
    assert len(summary["results"]) == 3 and (tmp_path / "out" / "results.json").is_file()
    assert len(list((tmp_path / "out").glob("*.png"))) == 3


def test_a_results_json_that_is_a_folder_is_refused_before_any_overlay_is_moved(tiny_export, good_images, tmp_path):
    """The overlays were moved into --out before results.json's rename failed: a folder of overlays
    without their record."""
    (tmp_path / "out" / "results.json").mkdir(parents=True)
    with Detector(tiny_export[1]) as detector, pytest.raises(OutputError, match="results.json is a folder"):
        predict_to_folder(detector, good_images, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["results.json"]


def test_a_failed_predict_to_folder_leaves_no_empty_folder_it_made(tiny_export, good_images, tmp_path):
    detector = Detector(tiny_export[1])
    detector.close()
    with pytest.raises(Exception, match="closed"):
        predict_to_folder(detector, good_images, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_expand_inputs_takes_one_path_as_well_as_a_list(good_images):
    """expand_inputs("parts") iterated the characters: "p, a, r, t, s: no such file or folder"."""
    folder = good_images[0].parent
    assert expand_inputs(str(folder)).paths == expand_inputs([folder]).paths == expand_inputs(folder).paths
    with pytest.raises(DatasetError, match="must be paths"):
        expand_inputs([None])


def test_write_thresholds_refuses_what_is_not_thresholds_and_leaves_the_file(tiny_export, tmp_path):
    from stmae_edge.model_files import write_thresholds

    model = tmp_path / "m.onnx"
    shutil.copy(tiny_export[1], model)
    before = model.read_bytes()
    for wrong in ({"image": 1.0, "pixel": 2.0}, None, 3.0):
        with pytest.raises(ConfigError, match="must be a stmae_edge.scoring.Thresholds"):
            write_thresholds(model, wrong)
    assert model.read_bytes() == before


def test_calibrate_refuses_bad_counts_and_names_unreadable_images(tiny_export, good_images, tmp_path):
    """batch_size=0 was "ONNX Runtime's quantisation failed ... export the model again"; missing
    images a raw FileNotFoundError from the cache key's hashing."""
    from stmae_edge.engines.calibrate import calibrate

    onnx_path = tiny_export[1]
    for options in ({"batch_size": 0}, {"batch_size": 2.5}, {"count": -1}, {"count": 8.0}):
        with pytest.raises(ConfigError, match="must be a whole number, at least 1"):
            calibrate(onnx_path, good_images, tmp_path / "q.onnx", cache_dir=tmp_path / "c", **options)
    missing = [tmp_path / f"missing{i}.png" for i in range(8)]
    # all counted, the first five named: a folder of broken files must not make a line of thousands
    with pytest.raises(DatasetError, match=r"8 of 8 calibration images cannot be read: .*missing0.png.*missing4.png"
                                           r"[^;]*; and 3 more\. Calibrate from") as caught:
        calibrate(onnx_path, missing, tmp_path / "q.onnx", cache_dir=tmp_path / "c", min_weight_elements=1)
    assert "missing5" not in str(caught.value)
    with pytest.raises(DatasetError, match="must be a list of image file paths"):
        calibrate(onnx_path, str(good_images[0].parent), tmp_path / "q.onnx", cache_dir=tmp_path / "c")
    assert not (tmp_path / "q.onnx").exists()


def test_verify_refuses_bad_batch_sizes_and_tolerances_before_loading_anything(tmp_path):
    from stmae_edge.engines.verify import verify

    for batch_sizes in ([], [0], [-1], [1.5], 2, "8"):
        with pytest.raises(ConfigError, match="batch sizes"):
            verify(tmp_path / "absent.onnx", tmp_path / "absent.pt", batch_sizes=batch_sizes)
    for rtol in (float("nan"), -1.0, 0.0, "1e-3"):
        with pytest.raises(ConfigError, match="rtol"):
            verify(tmp_path / "absent.onnx", tmp_path / "absent.pt", rtol=rtol)


def test_train_config_refuses_a_float_count_before_training():
    """TrainConfig(epochs=1.5) was accepted and failed after the backbone pass with a TypeError."""
    from stmae_edge.training.config import TrainConfig

    for options in ({"epochs": 1.5}, {"epochs": "2"}, {"epochs": None}, {"batch_size": 8.0}, {"lr": "x"},
                    {"seed": 0.5}):
        with pytest.raises(ConfigError):
            TrainConfig(**options)


def test_build_engine_takes_a_tuple_and_refuses_other_batch_values(tiny_export, tmp_path):
    from stmae_edge.engines.build import build_engine

    for batch in (None, 8, [1, 8, 32], (1, 8)):
        with pytest.raises(ConfigError, match="MIN:OPT:MAX"):
            build_engine(tiny_export[1], batch=batch, out=tmp_path / "m.plan")
    with pytest.raises(ConfigError, match=r"batch range '8:1:32' needs"):
        build_engine(tiny_export[1], batch=(8, 1, 32), out=tmp_path / "m.plan")


def test_streaming_inspector_refuses_an_on_rows_that_cannot_be_called(tiny_export):
    with Detector(tiny_export[1]) as detector, pytest.raises(ConfigError, match="on_rows must be a function"):
        StreamingInspector(detector, on_rows=5)


def test_progress_shown_takes_true_or_false_only():
    from stmae_edge.progress import progress_shown

    with pytest.raises(ConfigError, match="True or False"), progress_shown("false"):
        pass


def test_overlay_threads_takes_numpy_integers_and_refuses_bools(tiny_export, good_images, tmp_path):
    with Detector(tiny_export[1]) as detector:
        summary = predict_to_folder(detector, good_images, tmp_path / "out", overlay_threads=np.int64(2))
        assert len(summary["results"]) == 3
        with pytest.raises(ConfigError, match="overlay_threads=True"):
            predict_to_folder(detector, good_images, tmp_path / "out", overlay_threads=True)

"""Choosing the operating point (`stmae-edge threshold`): exact thresholds for each target on known
scores, intervals, refusals, and --write on each kind of model file without touching its digest."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import needs_tensorrt
from test_cli import _assert_one_line_error, run

from stmae_edge.checkpoint import read_checkpoint
from stmae_edge.errors import ConfigError, OutputError
from stmae_edge.evaluation.operating_point import choose, holdout_check, wilson_interval
from stmae_edge.metadata import ModelMetadata
from stmae_edge.model_files import read_metadata, write_thresholds
from stmae_edge.runtime import Detector
from stmae_edge.scoring import ScoreStats, Thresholds

GOOD = np.arange(100) / 100  # 0.00 .. 0.99
DEFECTIVE = np.array([0.5, 0.95, 1.2, 1.5, 2.0])


@pytest.mark.parametrize("target, threshold, false_rejects, escapes", [
    ({"max_false_reject": 0.05}, 0.945, 5, 1),  # between the 6th-highest good score (0.94) and the next (0.95)
    ({"max_false_reject": 0.0}, 1.095, 0, 2),  # above every good score, halfway to the defect at 1.2
    ({"max_false_reject": 0.049}, 0.955, 4, 2),  # 4.9 of 100 goods: at most 4 may fail
    ({"min_recall": 0.8}, 0.945, 5, 1),  # 4 of 5 defects: under 0.95, halfway down to 0.94
    ({"min_recall": 1.0}, 0.495, 50, 0),
    ({"min_recall": 0.5}, 1.095, 0, 2),  # 3 of 5: under 1.2, halfway down to the highest good score
    ({"min_recall": 1e-10}, 1.75, 0, 4),  # at least one defect: the highest
    ({"max_false_reject": 0.9999999999}, 0.005, 99, 0),  # all but the lowest good image may fail
])
def test_each_target_gives_its_exact_threshold(target, threshold, false_rejects, escapes):
    point = choose(GOOD, DEFECTIVE, **target)
    assert point.threshold == pytest.approx(threshold, abs=1e-6)
    assert np.float32(point.threshold) == point.threshold  # compared with float32 maps as it is
    assert (point.false_rejects, point.escapes, point.goods, point.defects) == (false_rejects, escapes, 100, 5)
    assert point.thresholds().image == point.thresholds().pixel == point.threshold
    # The last gap between observed scores that meets the target: the next one beyond it does not.
    observed = np.concatenate([GOOD, DEFECTIVE])
    if "max_false_reject" in target:
        low = observed[observed <= point.threshold].max()
        assert (GOOD > np.nextafter(low, -np.inf)).mean() > target["max_false_reject"]
    else:
        higher = observed[observed > point.threshold].min()
        assert (DEFECTIVE > higher).mean() < target["min_recall"]


def test_sigma_rule_intervals_and_description():
    stats = ScoreStats(count=50, mean=0.4, std=0.1, min=0.1, max=0.8, p50=0.4, p95=0.6, p99=0.7)
    point = choose(GOOD, DEFECTIVE, sigma=3.0, stats=stats)
    assert point.threshold == pytest.approx(0.7, abs=1e-6) and point.false_rejects == 29
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(5, 10)
    assert (low, high) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    # exactly 0 and 1 at the ends (the report's JSON showed 2.7755575615628914e-17)
    assert [wilson_interval(0, n)[0] for n in (3, 190, 2500)] == [0.0] * 3
    assert [wilson_interval(n, n)[1] for n in (3, 190, 2500)] == [1.0] * 3
    text = point.describe()
    assert "29 of 100 good images" in text and "95% CI" in text and "mean + 3 * std" in text
    caught = point.defects - point.escapes  # every figure with the counts it rests on, as the README says
    assert f"{caught} of {caught + 29} failed images defective" in text
    assert f"{caught} of {point.defects} defective images failed" in text
    assert json.loads(json.dumps(point.to_dict()))["intervals_95"]["recall"][1] <= 1.0


@pytest.mark.parametrize("above, held_out, bound, advised", [
    (0, 76, "4.8%", False),  # magnetic_tile's tenth of train/good: 3.84 / (76 + 3.84)
    (0, 72, "5.1%", True),  # the first count whose bound passes 5%
    (0, 24, "13.8%", True),  # the ELPV demo's held-out cells
    (3, 100, "8.5%", True),
])
def test_train_says_how_far_its_held_out_images_carry_the_threshold(above, held_out, bound, advised):
    line = holdout_check(above, held_out)
    assert line.startswith(f"{above} of {held_out} held-out good images above the threshold")
    assert f"up to {bound} (95% upper bound)" in line
    assert ("hold out more good images to narrow it (train --holdout, --holdout-dir)" in line) == advised
    assert float(bound[:-1]) == pytest.approx(100 * wilson_interval(above, held_out)[1], abs=0.05)


def test_cross_fitted_scores_are_named_so_and_advise_more_training_images():
    line = holdout_check(0, 24, remedy="add them to train/good", scored="cross-fitted")
    assert line.startswith("0 of 24 cross-fitted good images above the threshold")
    assert "train on more good images to narrow it (add them to train/good)" in line and "hold out" not in line


def test_the_advice_names_the_options_of_the_command_that_trained():
    line = holdout_check(0, 24, remedy="demo --max-train 0")
    assert "hold out more good images to narrow it (demo --max-train 0)" in line and "train --holdout" not in line


@pytest.mark.parametrize("kwargs, fragment", [
    ({}, "exactly one target"),
    ({"max_false_reject": 0.1, "min_recall": 0.9}, "exactly one target"),
    ({"max_false_reject": 1.0}, "fraction in [0, 1)"),
    ({"max_false_reject": float("nan")}, "fraction in [0, 1)"),
    ({"min_recall": 0.0}, "fraction in (0, 1]"),
    ({"sigma": 3.0}, "needs the model's score statistics"),
])
def test_bad_targets_are_refused(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        choose(GOOD, DEFECTIVE, **kwargs)


def test_a_target_the_data_cannot_support_is_refused():
    with pytest.raises(ConfigError, match="no good images"):
        choose(np.array([]), DEFECTIVE, max_false_reject=0.01)
    with pytest.raises(ConfigError, match="no defective images"):
        choose(GOOD, np.array([]), min_recall=0.9)


def test_threshold_command_writes_only_the_thresholds(tiny_export, synthetic_dataset, tmp_path):
    import shutil

    checkpoint, onnx_file = tmp_path / "m.pt", tmp_path / "m.onnx"
    shutil.copy(tiny_export[0], checkpoint)
    shutil.copy(tiny_export[1], onnx_file)
    before = read_metadata(onnx_file)
    detector = Detector(onnx_file, "ort-cpu")
    paths = sorted((synthetic_dataset / "test").rglob("*.png"))
    maps, scores = detector.raw_maps(paths)
    labels = np.array([p.parent.name != "good" for p in paths])
    expected = choose(scores[~labels], scores[labels], max_false_reject=0.2)
    # The tiny model has a score head: the pixel threshold meets the same target on the maps' maxima.
    assert before.map_stats is not None
    maxima = maps.reshape(len(maps), -1).max(axis=1)
    expected_pixel = choose(maxima[~labels], maxima[labels], max_false_reject=0.2)
    assert expected_pixel.threshold != pytest.approx(expected.threshold, rel=1e-3)

    for model in (onnx_file, checkpoint):
        r = run("threshold", str(model), str(synthetic_dataset), "--max-false-reject", "0.2", "--write")
        assert r.returncode == 0, r.stderr
        assert "false rejects" in r.stdout and "95% CI" in r.stdout and "unchanged" in r.stdout
        assert "pixel threshold" in r.stdout and "maps' maxima" in r.stdout
        assert "keep their own thresholds: write the one the line runs too" in r.stdout  # .onnx and .pt alike
        after = read_metadata(model)
        assert after.thresholds.image == pytest.approx(expected.threshold, rel=1e-5)
        assert after.thresholds.pixel == pytest.approx(expected_pixel.threshold, rel=1e-5)
        assert "false rejects <= 20%" in after.thresholds.rule and "pixel: the same target" in after.thresholds.rule
        assert after.model_hash == before.model_hash and after.score_stats == before.score_stats
    read_checkpoint(checkpoint)  # digest still matches
    r = run("info", str(onnx_file))  # and what `info` shows of either file
    assert r.returncode == 0 and json.loads(r.stdout)["thresholds"]["rule"].startswith("false rejects <= 20%")
    assert torch.load(checkpoint, weights_only=True)["metadata"]["thresholds"]["rule"].startswith("false rejects")
    assert Detector(onnx_file, "ort-cpu").thresholds.image == pytest.approx(expected.threshold, rel=1e-5)
    r = run("threshold", str(onnx_file), str(synthetic_dataset), "--min-recall", "1.0")
    assert r.returncode == 0 and "nothing written" in r.stdout
    assert read_metadata(onnx_file).thresholds.image == pytest.approx(expected.threshold, rel=1e-5)


def test_threshold_command_refuses_a_target_its_data_cannot_support(tiny_export, synthetic_dataset, tmp_path):
    import shutil

    only_good = tmp_path / "only_good"
    shutil.copytree(synthetic_dataset / "test" / "good", only_good / "test" / "good")
    _assert_one_line_error(run("threshold", str(tiny_export[1]), str(only_good), "--min-recall", "0.9"),
                           "no defective images: recall cannot be measured")
    r = run("threshold", str(tiny_export[1]), str(only_good), "--max-false-reject", "0.1")
    assert r.returncode == 0 and "0 of 0 defective" in r.stdout, r.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--max-false-reject", "1.5"], "fraction in [0, 1)"),
    ([], "give a target (--max-false-reject, --min-recall or --sigma) or a value"),
    (["--sigma", "3", "--min-recall", "0.9"], "exactly one target"),
])
def test_threshold_command_refuses_bad_targets_in_one_line(tiny_export, synthetic_dataset, args, fragment):
    _assert_one_line_error(run("threshold", str(tiny_export[1]), str(synthetic_dataset), *args), fragment)


def test_a_threshold_is_set_by_value_or_sigma_without_scoring_any_image(tiny_export, synthetic_dataset, tmp_path):
    import shutil

    model = tmp_path / "m.onnx"
    shutil.copy(tiny_export[1], model)
    before = read_metadata(model)
    assert before.map_stats is not None  # a score head: the pixel threshold has its own scale, and is kept
    r = run("threshold", str(model), "--threshold", "2.5", "--write")
    assert r.returncode == 0, r.stderr
    assert "give a labelled DATA_DIR to see what each costs" in r.stdout and "restart them" in r.stdout
    after = read_metadata(model)
    assert (after.thresholds.image, after.thresholds.pixel) == (2.5, before.thresholds.pixel)
    assert after.thresholds.rule == f"image: set by hand (2.5); pixel: as before ({before.thresholds.pixel:g})"
    assert after.model_hash == before.model_hash
    r = run("threshold", str(model), "--threshold", "3", "--pixel-threshold", "4.5", "--write")
    assert r.returncode == 0 and (read_metadata(model).thresholds.image, read_metadata(model).thresholds.pixel) == (3, 4.5)
    # --sigma from the model's own statistics, as training set the default, with no data to score
    r = run("threshold", str(model), "--sigma", "2", "--write")
    assert r.returncode == 0, r.stderr
    expected = Thresholds.from_stats(before.score_stats, 2.0, before.map_stats, "cross-fitted")
    assert read_metadata(model).thresholds == expected
    # with DATA_DIR, a value shows what it costs there, as a target does
    r = run("threshold", str(model), str(synthetic_dataset), "--threshold", "2.5")
    assert r.returncode == 0 and "false rejects" in r.stdout and "95% CI" in r.stdout and "nothing written" in r.stdout
    assert "threshold 2.5 (image: set by hand (2.5)" in r.stdout
    _assert_one_line_error(run("threshold", str(model), "--max-false-reject", "0.01"),
                           "--max-false-reject is measured on labelled images: give DATA_DIR")
    _assert_one_line_error(run("threshold", str(model), "--threshold", "1", "--sigma", "3"), "not both")
    _assert_one_line_error(run("threshold", str(model), "--threshold", "nan"), "finite number")
    _assert_one_line_error(run("threshold", str(model)), "give a target (--max-false-reject, --min-recall or "
                           "--sigma) or a value (--threshold, --pixel-threshold)")
    _assert_one_line_error(run("threshold", str(model), "--sigma", "2", "--backend", "ort-cpu"),
                           "--backend, --batch-size and --bit-depth say how DATA_DIR is scored")
    assert read_metadata(model).thresholds == expected  # nothing written by a refusal


@needs_tensorrt
def test_a_plan_is_rethresholded_in_its_sidecar_without_a_rebuild(tiny_export, tmp_path, caplog):
    from stmae_edge.engine_plan import read_plan
    from stmae_edge.engines.build import build_engine

    plan, _ = build_engine(tiny_export[1], None, "1:2:4", tmp_path / "m.plan", timing_cache=tmp_path / "t.cache")
    plan_bytes = plan.read_bytes()
    write_thresholds(plan, Thresholds(image=7.5, pixel=7.5, rule="false rejects <= 1% on line 3"))
    data, sidecar, metadata = read_plan(plan)  # what the TensorRT backend reads: sha256 still matches
    assert data == plan_bytes and metadata.thresholds == Thresholds(7.5, 7.5, "false rejects <= 1% on line 3")
    assert metadata.model_hash == ModelMetadata.from_onnx(tiny_export[1]).model_hash
    # from the command line too, on a machine without a GPU: no image is scored for a value
    r = run("threshold", str(plan), "--threshold", "6", "--pixel-threshold", "6.5", "--write")
    assert r.returncode == 0, r.stderr
    assert read_plan(plan)[2].thresholds == Thresholds(6, 6.5, "image: set by hand (6); pixel: set by hand (6.5)")
    # a rebuild carries the .onnx's thresholds: the line's own are named, with the command that sets them again
    with caplog.at_level("WARNING", logger="stmae_edge.model_files"):
        build_engine(tiny_export[1], None, "1:2:4", plan, timing_cache=tmp_path / "t.cache")
    assert read_plan(plan)[2].thresholds == ModelMetadata.from_onnx(tiny_export[1]).thresholds
    assert f"{plan} carried other thresholds (image 6, pixel 6.5" in caplog.text
    assert f"stmae-edge threshold {plan} --threshold 6.0 --pixel-threshold 6.5 --write" in caplog.text


def test_only_other_values_of_the_same_model_are_warned_about(tiny_export, tmp_path, caplog):
    import shutil
    from dataclasses import replace

    from stmae_edge.model_files import thresholds_to_be_replaced

    source = ModelMetadata.from_onnx(tiny_export[1])
    out = tmp_path / "m.onnx"
    with caplog.at_level("WARNING", logger="stmae_edge.model_files"):
        assert thresholds_to_be_replaced(out, source) is None  # nothing there
        shutil.copy(tiny_export[1], out)
        assert thresholds_to_be_replaced(out, source) is None  # the same thresholds
        write_thresholds(out, replace(source.thresholds, rule="other words"))
        assert thresholds_to_be_replaced(out, source) is None  # the same values, in other words
        assert not caplog.text  # the same model's file, with the same thresholds: nothing to say
        out.write_bytes(b"not a model")
        assert thresholds_to_be_replaced(out, source) is None  # nothing readable to keep...
        assert f"{out} is replaced; it was not a readable model file" in caplog.text  # ...but it is said
        shutil.copy(tiny_export[1], out)
        write_thresholds(out, Thresholds(1.5, 2.5, "line 3"))
        caplog.clear()
        assert thresholds_to_be_replaced(out, replace(source, model_hash="0" * 64)) is None  # another model's file...
        assert (f"{out} is replaced; it held the model (stmae, trained on {source.training['data_dir']}, image "
                f"threshold 1.5, model sha256 {source.model_hash[:12]}...)") in caplog.text  # ...named before it goes
        assert thresholds_to_be_replaced(out, source) == Thresholds(1.5, 2.5, "line 3")


def test_training_over_another_model_says_which_before_it_starts(tiny_export, synthetic_dataset, tmp_path, caplog):
    import shutil

    from stmae_edge.models.stmae import preset
    from stmae_edge.training.train import TrainConfig, train

    out = tmp_path / "model.pt"
    shutil.copy(tiny_export[0], out)
    earlier = ModelMetadata.from_onnx(tiny_export[1])
    cfg = TrainConfig(epochs=1, batch_size=8, max_images=12, score_folds=0)
    with caplog.at_level("WARNING", logger="stmae_edge.model_files"):
        train(synthetic_dataset, out, preset("tiny"), cfg, backbone_weights="random")
    said = f"{out} is replaced; it held the model (stmae, trained on {earlier.training['data_dir']}"
    assert said in caplog.text and caplog.records[0].getMessage().startswith(said)  # said first, before training


def test_without_a_score_head_the_thresholds_stay_equal_and_a_failing_image_has_a_region(synthetic_dataset, tmp_path):
    """The score is the map's maximum when the model has no score head (`small-map-score`, the filtering
    autoencoder): one scale, equal thresholds, and fail <=> a region, through training and `threshold --write`."""
    from dataclasses import replace

    from stmae_edge.models.stmae import preset
    from stmae_edge.training.train import TrainConfig, train

    model = tmp_path / "no_head.pt"
    meta = train(synthetic_dataset, model, replace(preset("tiny"), score_layers=()), TrainConfig(epochs=1, batch_size=8),
                 backbone_weights="random")
    assert meta.map_stats is None and meta.thresholds.image == meta.thresholds.pixel
    assert "map_stats" not in meta.to_dict()
    r = run("threshold", str(model), str(synthetic_dataset), "--max-false-reject", "0.2", "--write")
    assert r.returncode == 0, r.stderr
    assert "pixel threshold" not in r.stdout
    after = read_metadata(model)
    assert after.thresholds.pixel == after.thresholds.image and "pixel:" not in after.thresholds.rule
    r = run("threshold", str(model), "--threshold", "5", "--write")  # a value given: the pixel one follows it
    assert r.returncode == 0 and read_metadata(model).thresholds == Thresholds(
        5, 5, "image: set by hand (5); pixel: the image threshold (5)")
    paths = sorted((synthetic_dataset / "test").rglob("*.png"))
    results = Detector(model, "torch-cpu").predict(paths)
    assert any(r.is_anomalous for r in results) and not all(r.is_anomalous for r in results)
    assert all(bool(r.regions) == r.is_anomalous for r in results)


def test_a_recall_target_without_good_images_is_warned_about(caplog):
    from stmae_edge.evaluation.operating_point import check_support

    with caplog.at_level("WARNING", logger="stmae_edge.evaluation.operating_point"):
        check_support(None, 0.95, goods=0, defects=5)
    assert "has no good images (test/good): a threshold for recall alone may fail every good part" in caplog.text


def test_threshold_keeps_each_maps_maximum_not_the_maps(tiny_export, synthetic_dataset):
    """`threshold` needs two numbers per image; it held every map (5 GB for 20,000 images at 256 x 256)."""
    from stmae_edge.evaluation.validation import score_dataset

    whole = score_dataset(tiny_export[1], synthetic_dataset, batch_size=5)
    light = score_dataset(tiny_export[1], synthetic_dataset, batch_size=5, keep_maps=False)
    assert light.maps is None and whole.maps.shape[0] == len(whole.samples) > 5  # batches filled in place
    np.testing.assert_array_equal(light.scores, whole.scores)
    np.testing.assert_array_equal(light.map_maxima, whole.maps.reshape(len(whole.maps), -1).max(axis=1))


def test_threshold_write_refuses_a_model_file_replaced_while_its_images_were_scored(tiny_export, other_tiny_export,
                                                                                    synthetic_dataset, tmp_path,
                                                                                    monkeypatch):
    """A threshold measured on one model was written into the file that another export had put there
    meanwhile, which then said "model hash ... unchanged" of the other model's hash."""
    import shutil

    from typer.testing import CliRunner

    from stmae_edge import cli

    model = tmp_path / "m.onnx"
    shutil.copy(tiny_export[1], model)
    replaced = other_tiny_export[1].read_bytes()
    other_hash = read_metadata(other_tiny_export[1]).model_hash
    assert other_hash != read_metadata(model).model_hash
    measure = cli._threshold_from_data

    def measured_while_replaced(*args, **kwargs):
        chosen = measure(*args, **kwargs)
        model.write_bytes(replaced)  # an export to the same name finished meanwhile
        return chosen

    monkeypatch.setattr(cli, "_threshold_from_data", measured_while_replaced)
    result = CliRunner().invoke(cli.app, ["threshold", str(model), str(synthetic_dataset), "--max-false-reject", "0.2",
                                          "--write"])
    # the CLI's main() prints a StmaeError as one line and exits 2 (test_cli); CliRunner hands it back
    assert isinstance(result.exception, OutputError), result.output
    assert f"holds another model now (hash {other_hash[:12]}; the thresholds were measured on" in str(result.exception)
    assert model.read_bytes() == replaced  # nothing written

"""The head learnt from labelled defects (`train --defects`, training/defect_head.py): what it adds to the
map, that the rest of the model is the model trained without it, that it travels in every exported graph,
and that labelled sets it must not learn from are refused in one line."""

from __future__ import annotations

import shutil
from dataclasses import asdict, replace
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
from conftest import needs_tensorrt
from synthetic_data import make_synthetic_dataset
from test_cli import _assert_one_line_error, run

from stmae_edge import data
from stmae_edge.checkpoint import load_model
from stmae_edge.engines.build import build_engine
from stmae_edge.engines.calibrate import calibrate
from stmae_edge.engines.export import TENSORRT_OPS, export_onnx
from stmae_edge.engines.verify import verify
from stmae_edge.errors import ConfigError, DatasetError, OutputError
from stmae_edge.evaluation.evaluate import evaluate
from stmae_edge.models.stmae import STMAEConfig, preset
from stmae_edge.preprocessing import Preprocessing
from stmae_edge.training.add_defects import add_defects
from stmae_edge.training.defect_head import grid_labels, labelled_defects
from stmae_edge.training.image_set import good_images
from stmae_edge.training.train import TrainConfig, train, warn_about_labelled_colour, with_defect_head
from stmae_edge.wire_format import without_folders

TINY = TrainConfig(epochs=2, batch_size=8)  # tiny_export's settings: its checkpoint is the model without the head


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Labelled defects of other synthetic parts than the training set's (another seed): 12 defective, 2 good."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("labelled"), n_train=4, n_good=2, n_bad=12, seed=1)


@pytest.fixture(scope="module")
def with_head(synthetic_dataset, labelled, tmp_path_factory):
    out = tmp_path_factory.mktemp("with_head") / "m.pt"
    meta = train(synthetic_dataset, out, preset("tiny"), TrainConfig(epochs=2, batch_size=8, defects_dir=str(labelled)),
                 backbone_weights="random")
    return out, meta


def test_the_head_raises_the_pixel_figures_and_the_rest_of_the_model_is_the_model_trained_without(
        with_head, tiny_export, synthetic_dataset):
    path, meta = with_head
    assert meta.training["defect_head"] | {"folder": ""} == {
        "folder": "", "defective_images": 12, "types": {"scratch": 12}, "good_images": 2,
        "cells": (14 + 22) * 16 * 16, "defect_share": meta.training["defect_head"]["defect_share"],
        "training_good_images": 22, "loss": meta.training["defect_head"]["loss"]}
    assert 0 < meta.training["defect_head"]["defect_share"] < 0.05
    plain_model, _ = load_model(tiny_export[0])
    head_model, _ = load_model(path)
    plain, headed = plain_model.state_dict(), head_model.state_dict()
    assert sorted(set(headed) - set(plain)) == ["defect_hidden_bias", "defect_hidden_weight", "defect_output_bias",
                                                "defect_output_weight", "defect_stats"]
    assert all(torch.equal(plain[k], headed[k]) for k in plain)  # the head moved no other weight
    without, learnt = evaluate(tiny_export[0], synthetic_dataset), evaluate(path, synthetic_dataset)
    # the synthetic scratches: pixel AUROC about 0.93 -> 0.99, AUPRO about 0.76 -> 0.96 when measured
    assert learnt["pixel_auroc"] > without["pixel_auroc"] + 0.03
    assert learnt["aupro"] > without["aupro"] + 0.1
    assert learnt["image_auroc"] == without["image_auroc"]  # the score head scores images, unchanged


def test_the_head_travels_in_the_fp32_fp16_and_int8_graphs(with_head, tiny_export, synthetic_dataset, tmp_path):
    path, _ = with_head
    onnx_path, figures = export_onnx(path, tmp_path / "m.onnx")
    ops = {n.op_type for n in onnx.load(str(onnx_path)).graph.node}
    assert ops <= TENSORRT_OPS and "Relu" in ops, ops - TENSORRT_OPS
    assert figures["smoke_max_rel_diff"] < 1e-4
    verify(onnx_path, path)  # raises VerificationError where ONNX Runtime differs from PyTorch
    fp16_path, _ = export_onnx(path, tmp_path / "m.fp16.onnx", precision="fp16")
    # the head's folded weights (scaled by up to 1 / the std floor) stay fp32; its z-score's two numbers
    # are folded into constants by the exporter
    head = {t.name.rpartition(".")[2]: t.data_type for t in onnx.load(str(fp16_path)).graph.initializer
            if t.name.rpartition(".")[2].startswith("defect_")}
    assert head == dict.fromkeys(["defect_hidden_weight", "defect_hidden_bias", "defect_output_weight",
                                  "defect_output_bias"], onnx.TensorProto.FLOAT), head
    # the tiny model's INT8 needs its small layers quantised too (calibrate refuses otherwise)
    int8_path, _ = calibrate(onnx_path, cache_dir=tmp_path / "calibration", count=8, min_weight_elements=1)
    reference = evaluate(path, synthetic_dataset)["pixel_auroc"]
    without = evaluate(tiny_export[0], synthetic_dataset)["pixel_auroc"]
    for graph in (onnx_path, fp16_path, int8_path):  # measured: 0.9880, 0.9881 and 0.9878, against 0.9275
        assert abs(evaluate(graph, synthetic_dataset)["pixel_auroc"] - reference) < 0.005, graph
    assert reference > without + 0.03


@needs_tensorrt
def test_a_graph_with_the_head_builds_an_engine(with_head, tmp_path):
    onnx_path, _ = export_onnx(with_head[0], tmp_path / "m.onnx")
    plan, _ = build_engine(onnx_path, "fp32", "1:4:8", tmp_path / "m.fp32.plan")
    assert plan.stat().st_size > 100_000


def test_a_mask_is_laid_out_as_its_image():
    """A defect mirrored into the margin of a fitted image is where the network sees it mirrored."""
    mask = np.zeros((40, 100), bool)
    mask[5:20, 70:95] = True
    image = np.where(mask, 255, 0).astype(np.uint8)
    prep = Preprocessing(input_size=(64, 64), keep_aspect=True, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    seen = prep.tensor(image)[0]  # the image's pixels as the network takes them, 0..1
    laid_out = prep.mask_tensor(mask)
    assert laid_out.shape == (64, 64) and np.allclose(seen, laid_out, atol=1 / 255)
    assert laid_out[:16].any() and laid_out[48:].any()  # mirrored into both margins


def test_grid_labels_are_the_share_of_defect_in_each_cell(tmp_path):
    folder = tmp_path / "ground_truth" / "dent"
    folder.mkdir(parents=True)
    (tmp_path / "test" / "dent").mkdir(parents=True)
    image, mask = np.full((64, 64), 128, np.uint8), np.zeros((64, 64), np.uint8)
    mask[:, :16] = 255  # the left quarter
    cv2.imwrite(str(tmp_path / "test" / "dent" / "a.png"), image)
    cv2.imwrite(str(folder / "a_mask.png"), mask)
    sample = data.EvalSample(tmp_path / "test" / "dent" / "a.png", "dent", folder / "a_mask.png")
    labels = grid_labels(Preprocessing(input_size=(32, 32)), sample, (64, 64), 8)
    assert labels.shape == (8, 8) and np.allclose(labels[:, :2], 1) and np.allclose(labels[:, 2:], 0)


def test_few_labelled_defects_are_warned_about(synthetic_dataset, labelled, caplog):
    with caplog.at_level("WARNING", logger="stmae_edge.training.defect_head"):
        defects = labelled_defects(labelled, synthetic_dataset)
    assert len(defects.defective) == 12 and len(defects.samples) == 14
    assert "12 labelled defective images" in caplog.text and "at least 30" in caplog.text


def test_labelled_images_from_another_kind_of_camera_are_warned_about(synthetic_dataset, labelled, tmp_path, caplog):
    """Colour labelled images beside gray good ones (or the other way round) likely come from another camera."""
    goods = good_images(data.train_images(synthetic_dataset), TrainConfig())
    assert not goods.colour
    defects = labelled_defects(labelled, synthetic_dataset)
    caplog.clear()
    with caplog.at_level("WARNING", logger="stmae_edge.training.train"):
        warn_about_labelled_colour(defects, goods)
    assert "camera" not in caplog.text  # gray beside gray: nothing to say
    tinted = tmp_path / "tinted"
    shutil.copytree(labelled, tinted)
    for path in sorted((tinted / "test" / "scratch").glob("*.png"))[:3]:
        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(path), np.dstack([gray, gray, np.clip(gray.astype(int) + 40, 0, 255).astype(np.uint8)]))
    defects = labelled_defects(tinted, synthetic_dataset)
    assert len(defects.colour) == 3
    with caplog.at_level("WARNING", logger="stmae_edge.training.train"):
        warn_about_labelled_colour(defects, goods)
    assert "3 of the 14 labelled images are colour (first: 000.png)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="stmae_edge.training.train"):
        warn_about_labelled_colour(labelled_defects(labelled, synthetic_dataset), replace(goods, colour=(goods.train[0],)))
    assert "all 14 labelled images are gray, and 1 of the" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="stmae_edge.training.train"):  # train says it before training
        train(synthetic_dataset, tmp_path / "m.pt", preset("tiny"), TrainConfig(epochs=1, batch_size=8,
              defects_dir=str(tinted)), backbone_weights="random")
    assert "3 of the 14 labelled images are colour" in caplog.text


def test_the_config_names_the_head_only_where_there_is_one():
    """Models of good images alone keep their config dictionary of earlier versions, which read them."""
    plain = preset("small")
    assert "defect_hidden" not in plain.to_dict()
    assert STMAEConfig.from_dict(plain.to_dict()) == plain
    headed = preset("small", defect_hidden=128)
    assert headed.to_dict()["defect_hidden"] == 128 and STMAEConfig.from_dict(headed.to_dict()) == headed
    assert "defect_rectified" not in headed.to_dict()  # heads trained before it read as they were: signed
    rectified = with_defect_head(preset("small"))
    assert rectified.to_dict()["defect_rectified"] is True and STMAEConfig.from_dict(rectified.to_dict()) == rectified
    with pytest.raises(ConfigError, match="wide window"):
        preset("small-sharp-map", defect_hidden=128)
    with pytest.raises(ConfigError, match="defect_rectified needs the labelled-defect head"):
        preset("small", defect_rectified=True)


@torch.no_grad()
def test_a_head_lowers_no_cell_of_the_map(with_head, tiny_export, synthetic_dataset):
    """A head that takes every cell for normal (a kind of defect its labelled images lack) leaves the map
    of the model without it; one that takes every cell for a defect raises it; signed, as heads trained
    before, it would lower the map."""
    plain_model, meta = load_model(tiny_export[0])
    head_model, _ = load_model(with_head[0])
    assert head_model.config.defect_rectified
    images = torch.from_numpy(meta.preprocessing([s.path for s in data.eval_samples(synthetic_dataset)][:6]))
    plain_maps = plain_model(images)[0]
    head_model.defect_output_bias.fill_(-1e4)
    assert torch.equal(head_model(images)[0], plain_maps)
    head_model.defect_output_bias.fill_(1e4)
    assert (head_model(images)[0] > plain_maps + 1).all()
    head_model.defect_output_bias.fill_(-1e4)
    signed = load_model(with_head[0])[0]
    signed.load_state_dict(head_model.state_dict())
    signed.config = replace(signed.config, defect_rectified=False)
    assert (signed(images)[0] < plain_maps - 1).all()


def test_labelled_sets_it_must_not_learn_from_are_refused(synthetic_dataset, labelled, tmp_path, caplog):
    with pytest.raises(DatasetError, match="the training set's own test images"):
        labelled_defects(synthetic_dataset, synthetic_dataset)
    with pytest.raises(DatasetError, match="no such folder; put the labelled defective images in DEFECTS/test"):
        labelled_defects(tmp_path / "missing", synthetic_dataset)
    (tmp_path / "empty" / "test").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images in test/<type>/"):
        labelled_defects(tmp_path / "empty", synthetic_dataset)
    with pytest.raises(DatasetError, match="no test folder"):
        labelled_defects(synthetic_dataset / "ground_truth", synthetic_dataset)
    copied = tmp_path / "copied"
    shutil.copytree(labelled, copied)
    shutil.copy(synthetic_dataset / "test" / "scratch" / "000.png", copied / "test" / "scratch" / "copy.png")
    shutil.copy(synthetic_dataset / "ground_truth" / "scratch" / "000_mask.png",
                copied / "ground_truth" / "scratch" / "copy_mask.png")
    with pytest.raises(DatasetError, match="1 of its images are also in .*first: copy.png"):
        labelled_defects(copied, synthetic_dataset)
    (copied / "test" / "scratch" / "copy.png").unlink()
    (copied / "ground_truth" / "scratch" / "000_mask.png").unlink()
    with pytest.raises(DatasetError, match="1 of 12 defective images have no mask .*000.png"):
        labelled_defects(copied, synthetic_dataset)
    masks = copied / "ground_truth" / "scratch"
    shutil.copy(labelled / "ground_truth" / "scratch" / "000_mask.png", masks / "000_mask.png")
    good_mask = cv2.imread(str(masks / "001_mask.png"), cv2.IMREAD_GRAYSCALE)
    for wrong, message in ((cv2.resize(good_mask, (48, 96)), "is 48x96, its image 001.png 96x96"),
                           (255 - good_mask, "check that it is not inverted")):
        cv2.imwrite(str(masks / "001_mask.png"), wrong)
        with pytest.raises(DatasetError, match=message):
            labelled_defects(copied, synthetic_dataset)
    cv2.imwrite(str(masks / "001_mask.png"), np.zeros_like(good_mask))  # marks nothing: left out, and said
    with caplog.at_level("WARNING", logger="stmae_edge.training.defect_head"):
        kept = labelled_defects(copied, synthetic_dataset)
    assert "1 masks mark no defect pixel" in caplog.text and "001_mask.png" in caplog.text
    assert len(kept.defective) == 11 and all(s.path.name != "001.png" for s in kept.defective)
    assert set(kept.sizes) == {s.path for s in kept.samples}  # what warnings count: the images learnt from
    only_good = tmp_path / "only_good"
    shutil.copytree(labelled / "test" / "good", only_good / "test" / "good")
    with pytest.raises(DatasetError, match="no defective images"):
        labelled_defects(only_good, synthetic_dataset)


@pytest.mark.parametrize("family_config, cfg, message", [
    ("filtering", TrainConfig(defects_dir="x"), "an stmae option"),
    ("small-sharp-map", TrainConfig(defects_dir="x"), "wide Gaussian"),
])
def test_models_that_cannot_take_the_head_are_refused_before_training(synthetic_dataset, tmp_path, family_config,
                                                                     cfg, message):
    from stmae_edge.models.filtering_ae import FilteringAEConfig

    config = FilteringAEConfig() if family_config == "filtering" else preset(family_config)
    with pytest.raises(ConfigError, match=message):
        train(synthetic_dataset, tmp_path / "m.pt", config, cfg)
    assert not (tmp_path / "m.pt").exists()


def test_defects_with_crops_are_refused_and_folders_are_kept_as_text():
    with pytest.raises(ConfigError, match="--defects and --crop"):
        TrainConfig(defects_dir="x", crop=32)
    # a Path kept as such would go into the checkpoint, which weights_only loading then refuses
    assert TrainConfig(defects_dir=Path("x"), holdout_dir=Path("y")).defects_dir == "x"
    with pytest.raises(ConfigError, match="must be a folder's path"):
        TrainConfig(defects_dir=3)


def test_a_server_does_not_show_the_labelled_folder(with_head):
    training = without_folders(with_head[1].training)
    assert "folder" not in training["defect_head"] and "defects_dir" not in training["train_config"]
    assert training["defect_head"]["defective_images"] == 12


def test_the_cli_says_in_one_line_why_a_labelled_set_is_refused(synthetic_dataset, tmp_path):
    result = run("train", str(synthetic_dataset), "--preset", "tiny", "--backbone-weights", "random",
                 "--epochs", "1", "--defects", str(synthetic_dataset), "--out", str(tmp_path / "m.pt"))
    _assert_one_line_error(result, "the training set's own test images")
    assert not (tmp_path / "m.pt").exists()


def same_models(trained: Path, added: Path) -> None:
    """What train --defects and add-defects write alike: weights, statistics, thresholds, the record but
    for what add-defects adds (what it was added to, its time) and MODEL's own time."""
    (trained_model, trained), (added_model, meta) = load_model(trained), load_model(added)
    trained_state, added_state = trained_model.state_dict(), added_model.state_dict()
    assert set(trained_state) == set(added_state)
    assert all(torch.equal(trained_state[k], added_state[k]) for k in trained_state)
    assert meta.thresholds == trained.thresholds and meta.map_stats == trained.map_stats
    assert meta.score_stats == trained.score_stats
    assert meta.config == trained.config and meta.preprocessing == trained.preprocessing
    head = dict(meta.training["defect_head"])
    assert head.pop("seconds") >= 0 and len(head.pop("added_to")) == 64
    assert head == trained.training["defect_head"]
    ignored = ("defect_head", "seconds", "data_dir")
    assert {k: v for k, v in meta.training.items() if k not in ignored} == \
        {k: v for k, v in trained.training.items() if k not in ignored}


@pytest.mark.parametrize("score_head", [True, False])
def test_a_head_added_to_a_trained_model_is_the_head_trained_with_it(synthetic_dataset, labelled, tmp_path,
                                                                     monkeypatch, score_head):
    """add-defects writes the model that train --defects writes with the same settings, to the bit, from
    a dataset given where it has moved; the model it was added to is not touched. The head sees 5 of the
    22 training images as normal here (150 by default, more than there are), so that the images it draws
    are drawn again, as on a real dataset."""
    from stmae_edge.training import defect_head

    monkeypatch.setattr(defect_head, "DEFECT_GOOD_IMAGES", 5)
    config = preset("tiny") if score_head else preset("tiny", score_layers=())
    base, trained = tmp_path / "base.pt", tmp_path / "trained.pt"
    train(synthetic_dataset, base, config, TINY, backbone_weights="random")
    train(synthetic_dataset, trained, config, replace(TINY, defects_dir=str(labelled)), backbone_weights="random")
    moved = tmp_path / "moved"
    shutil.copytree(synthetic_dataset, moved)
    before = base.read_bytes()
    meta = add_defects(base, labelled, tmp_path / "added.pt", data_dir=moved)
    same_models(trained, tmp_path / "added.pt")
    assert meta.training["defect_head"]["training_good_images"] == 5
    assert meta.training["defect_head"]["added_to"] == load_model(base)[1].model_hash
    assert meta.training["data_dir"] == str(moved.resolve())  # where verify and calibrate will read it
    assert base.read_bytes() == before
    if not score_head:  # the image score is the map's maximum: the head moves it, and its statistics
        assert meta.score_stats != load_model(base)[1].score_stats


def test_a_head_is_added_only_where_the_model_was_trained_on_the_data_given(tiny_export, labelled, synthetic_dataset,
                                                                            tmp_path):
    """Other good images would give the head's scale and the map's statistics from images the model was
    not trained on: more of them, or one whose pixels changed, are refused; so are, for a model that
    records no fingerprint of them (an earlier version's), held-out images that score otherwise."""
    from stmae_edge.checkpoint import save_checkpoint

    moved = tmp_path / "moved"
    shutil.copytree(synthetic_dataset, moved)
    extra = moved / "train" / "good" / "extra.png"
    shutil.copy(labelled / "train" / "good" / "000.png", extra)
    with pytest.raises(DatasetError, match="training and .* held-out good images, where .* was trained on"):
        add_defects(tiny_export[0], labelled, tmp_path / "a.pt", data_dir=moved)
    extra.unlink()
    first = sorted((moved / "train" / "good").glob("*.png"))[0]
    image = cv2.imread(str(first))
    cv2.imwrite(str(first), np.roll(image, 7, axis=1))  # one image of the 26, the same name
    with pytest.raises(DatasetError, match="its good images are not those .* was trained on"):
        add_defects(tiny_export[0], labelled, tmp_path / "a.pt", data_dir=moved)
    model, meta = load_model(tiny_export[0])
    earlier = tmp_path / "earlier.pt"
    save_checkpoint(earlier, model, replace(meta, training={k: v for k, v in meta.training.items()
                                                            if k != "good_images_sha256"}))
    for path in sorted((moved / "train" / "good").glob("*.png")):  # as many images, of other parts
        cv2.imwrite(str(path), np.roll(image, 3 * int(path.stem) % 40, axis=0))
    with pytest.raises(DatasetError, match="do not score as when .* was trained"):
        add_defects(earlier, labelled, tmp_path / "a.pt", data_dir=moved)
    shutil.rmtree(moved)
    shutil.copytree(synthetic_dataset, moved)
    goods = good_images(data.train_images(moved), TrainConfig(**meta.training["train_config"]))
    cv2.imwrite(str(goods.train[3]), np.roll(cv2.imread(str(goods.train[3])), 7, axis=1))  # a training image only
    with pytest.raises(DatasetError, match="its training images are not those .* was trained on"):
        add_defects(earlier, labelled, tmp_path / "a.pt", data_dir=moved)
    assert not (tmp_path / "a.pt").exists()
    with pytest.raises(OutputError, match="--out"):  # the model itself stays as it is
        add_defects(tiny_export[0], labelled, tiny_export[0])


def test_thresholds_set_after_training_are_kept_where_the_head_does_not_move_them(tiny_export, with_head, labelled,
                                                                                  tmp_path, caplog):
    """With a score head the image threshold measures what the head does not change: a user's is kept;
    the pixel threshold, on the map, is set again by the training's rule, and the user is told. A head
    added again replaces the earlier one, and the user is told that too."""
    from stmae_edge import __version__
    from stmae_edge.checkpoint import read_checkpoint, save_checkpoint
    from stmae_edge.scoring import Thresholds

    model, meta = load_model(tiny_export[0])
    chosen = Thresholds(image=meta.thresholds.image * 1.5, pixel=meta.thresholds.pixel * 1.5, rule="chosen on site")
    tuned = tmp_path / "tuned.pt"
    save_checkpoint(tuned, model, replace(meta, thresholds=chosen, package_version="0.0.9"))
    with caplog.at_level("WARNING", logger="stmae_edge.training.add_defects"):
        added = add_defects(tuned, labelled, tmp_path / "out.pt")
    assert added.thresholds.image == chosen.image
    assert added.thresholds.pixel == with_head[1].thresholds.pixel != chosen.pixel
    assert added.thresholds.rule == "chosen on site; pixel: set by the training's rule when the defect head was added"
    assert "pixel threshold was set after training (chosen on site)" in caplog.text
    assert read_checkpoint(tmp_path / "out.pt")[0].thresholds == added.thresholds
    assert added.package_version == __version__  # the version that wrote the head, not the model's
    caplog.clear()
    with caplog.at_level("WARNING", logger="stmae_edge.training.add_defects"):
        again = add_defects(tmp_path / "out.pt", labelled, tmp_path / "again.pt")
    assert "has a defect head already, learnt from 12 labelled defective images" in caplog.text
    assert "threshold was set after training" not in caplog.text  # the pixel one is the rule's now
    assert again.thresholds == added.thresholds  # the rule's words not added twice
    # the training's rule worded by an earlier version, and the user's image threshold alone
    caplog.clear()
    worded = tmp_path / "worded.pt"
    save_checkpoint(worded, model, replace(meta, thresholds=replace(meta.thresholds, rule="an earlier wording")))
    image_only = tmp_path / "image_only.pt"
    save_checkpoint(image_only, model, replace(meta, thresholds=replace(meta.thresholds, image=chosen.image)))
    with caplog.at_level("WARNING", logger="stmae_edge.training.add_defects"):
        assert add_defects(worded, labelled, tmp_path / "w.pt").thresholds == with_head[1].thresholds
        kept = add_defects(image_only, labelled, tmp_path / "i.pt").thresholds
    assert "threshold was set after training" not in caplog.text
    assert (kept.image, kept.pixel) == (chosen.image, with_head[1].thresholds.pixel)


def test_a_moved_holdout_folder_is_given_as_holdout_dir(synthetic_dataset, tiny_export, labelled, tmp_path):
    """A model trained with --holdout-dir records that folder; where it has moved, --holdout-dir says
    where it is now (its images' fingerprint still proves them the same)."""
    held = tmp_path / "held"
    shutil.copytree(synthetic_dataset / "test" / "good", held)
    base = tmp_path / "base.pt"
    train(synthetic_dataset, base, preset("tiny"), replace(TINY, holdout_dir=str(held)), backbone_weights="random")
    moved = held.rename(tmp_path / "moved_held")
    result = run("add-defects", str(base), str(labelled), "--out", str(tmp_path / "out.pt"))
    _assert_one_line_error(result, f"held out the good images of {held}, not a folder here; give that folder as "
                                   "--holdout-dir")
    meta = add_defects(base, labelled, tmp_path / "out.pt", holdout_dir=moved)
    assert meta.training["train_config"]["holdout_dir"] == str(moved.resolve())
    with pytest.raises(ConfigError, match="held out good images drawn from train/good"):
        add_defects(tiny_export[0], labelled, tmp_path / "x.pt", holdout_dir=moved)


def edited(tiny_export, tmp_path, **training) -> Path:
    """The tiny model with its training record edited (a key given None is taken out)."""
    from stmae_edge.checkpoint import save_checkpoint

    model, meta = load_model(tiny_export[0])
    record = {**meta.training, **training}
    path = tmp_path / "edited.pt"
    save_checkpoint(path, model, replace(meta, training={k: v for k, v in record.items() if v is not None}))
    return path


@pytest.mark.parametrize("training, message", [
    ({"train_config": None}, "does not record the settings it was trained with"),
    ({"data_dir": None}, "does not record the folder it was trained on; give it as --data"),
    ({"data_dir": "/nonexistent/dataset"}, "was trained on /nonexistent/dataset, not a folder here; give the dataset"),
    ({"train_config": {**asdict(TINY), "crop": 32}}, "was trained on --crop tiles"),
    ({"train_config": {**asdict(TINY), "holdout_dir": "/nonexistent/held"}}, "held out the good images of "
                                                                              "/nonexistent/held, not a folder here"),
])
def test_add_defects_says_in_one_line_why_it_cannot(tiny_export, labelled, tmp_path, training, message):
    result = run("add-defects", str(edited(tiny_export, tmp_path, **training)), str(labelled), "--out",
                 str(tmp_path / "out.pt"))
    _assert_one_line_error(result, message)
    assert not (tmp_path / "out.pt").exists()


def test_add_defects_refuses_other_models_and_folders_in_one_line(tiny_export, labelled, synthetic_dataset, tmp_path):
    from stmae_edge.models import filtering_ae

    filtering = tmp_path / "filtering.pt"
    train(synthetic_dataset, filtering, filtering_ae.preset("tiny"), TrainConfig(epochs=1, batch_size=8))
    result = run("add-defects", str(filtering), str(labelled), "--out", str(tmp_path / "f.pt"))
    _assert_one_line_error(result, "is a filtering-ae model; a defect head is an stmae model's")
    result = run("add-defects", str(tiny_export[0]), str(tmp_path / "missing"))
    _assert_one_line_error(result, "no such folder")
    assert not (tiny_export[0].parent / "m_defects.pt").exists()


def test_add_defects_writes_beside_the_model_by_default(tiny_export, labelled, tmp_path):
    model = tmp_path / "line.pt"
    shutil.copy(tiny_export[0], model)
    result = run("add-defects", str(model), str(labelled))
    assert result.returncode == 0, result.stderr
    assert "with a defect head from 12 labelled defective images (scratch 12)" in result.stdout
    assert load_model(tmp_path / "line_defects.pt")[1].training["defect_head"]["defective_images"] == 12


def test_the_report_says_the_model_has_a_head_and_from_what(with_head, tiny_export, labelled, tmp_path):
    from stmae_edge.evaluation.report import training_summary

    assert "defect head" not in training_summary(load_model(tiny_export[0])[1].training)
    assert training_summary(with_head[1].training)["defect head"] == "from 12 labelled defective images (scratch 12)"
    added = add_defects(tiny_export[0], labelled, tmp_path / "added.pt")
    assert training_summary(added.training)["defect head"] == (
        f"from 12 labelled defective images (scratch 12), added to the model {load_model(tiny_export[0])[1].model_hash[:12]}...")

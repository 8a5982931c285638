"""Training writes one self-describing checkpoint that loads with weights_only=True and is verified."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from stmae_edge import __version__, data
from stmae_edge.checkpoint import load_model, read_checkpoint
from stmae_edge.errors import BackendError, CheckpointError, DatasetError
from stmae_edge.models.stmae import STMAE, preset
from stmae_edge.scoring import ScoreStats
from stmae_edge.training.image_set import good_images, split_holdout
from stmae_edge.training.train import (
    TrainConfig,
    extract_feature_pairs,
    fit_score_head_cross_fitted,
    score_images,
    train,
)

CFG = TrainConfig(epochs=3, batch_size=8, seed=0)


@pytest.fixture(scope="module")
def trained(synthetic_dataset, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    meta = train(synthetic_dataset, path, preset("tiny"), CFG, backbone_weights="random")
    return path, meta


def test_checkpoint_is_self_describing_and_safe_to_load(trained):
    path, meta = trained
    blob = torch.load(path, map_location="cpu", weights_only=True)  # no arbitrary unpickling needed
    md = blob["metadata"]
    assert md["schema"] == "stmae-edge/metadata" and md["package_version"] == __version__
    assert md["config"] == preset("tiny").to_dict()
    assert md["preprocessing"]["input_size"] == [64, 64]
    assert set(md["score_stats"]) >= {"mean", "std", "count", "p99"}
    assert md["thresholds"]["image"] == pytest.approx(meta.score_stats.mean + 3 * meta.score_stats.std)
    assert md["training"]["train_config"]["epochs"] == 3
    assert any(k.startswith("features.body.") for k in blob["state_dict"])  # backbone travels along


def test_the_image_threshold_rests_on_every_good_images_cross_fitted_score(trained, synthetic_dataset):
    """The score head is fitted on every good image; the image statistics are the scores that heads
    fitted on the other folds give each one, recomputed here from the images."""
    path, meta = trained
    model, loaded = load_model(path)
    assert loaded.model_hash == meta.model_hash
    train_paths, holdout = split_holdout(data.train_images(synthetic_dataset), CFG.holdout_fraction, CFG.seed)
    goods = train_paths + holdout
    assert loaded.score_stats.count == len(goods) and loaded.training["holdout_images"] == len(holdout)
    assert loaded.training["score_head"] == (f"fitted on all {len(goods)} good images; its scales and the image "
                                             f"threshold from {CFG.score_folds}-fold cross-fitted scores")
    fresh = STMAE(preset("tiny"), backbone_weights="random")
    fresh.load_state_dict(model.state_dict())
    features = extract_feature_pairs(fresh, loaded.preprocessing, goods, with_score=True)[1]
    scores = fit_score_head_cross_fitted(fresh, features, CFG.score_folds, CFG.seed).numpy()
    assert ScoreStats.from_scores(scores).mean == pytest.approx(loaded.score_stats.mean, rel=1e-5)
    assert ScoreStats.from_scores(scores).std == pytest.approx(loaded.score_stats.std, rel=1e-5)
    assert loaded.training["holdout_above_threshold"] == int((scores > loaded.thresholds.image).sum())
    assert loaded.training["threshold_scores"] == len(goods)  # every good image's, not the held-out count
    assert loaded.thresholds.rule.startswith("mean + 3 * std of cross-fitted good image scores")
    torch.testing.assert_close(fresh.score_scale_stats, model.score_scale_stats)
    torch.testing.assert_close(fresh.score_precision, model.score_precision)


def test_fewer_good_images_than_score_folds_still_train(synthetic_dataset, tmp_path):
    cfg = replace(CFG, epochs=1, max_images=4)  # two train, two held out: four folds of one image
    meta = train(synthetic_dataset, tmp_path / "m.pt", preset("tiny"), cfg, backbone_weights="random")
    assert meta.score_stats.count == 4
    assert meta.training["score_head"] == ("fitted on all 4 good images; its scales and the image threshold "
                                           "from 4-fold cross-fitted scores")


def test_without_score_folds_the_held_out_images_give_the_statistics(synthetic_dataset, tmp_path):
    cfg = replace(CFG, epochs=1, score_folds=0)
    meta = train(synthetic_dataset, tmp_path / "m.pt", preset("tiny"), cfg, backbone_weights="random")
    model, loaded = load_model(tmp_path / "m.pt")
    _, holdout = split_holdout(data.train_images(synthetic_dataset), cfg.holdout_fraction, cfg.seed)
    _, scores = score_images(model, loaded.preprocessing, holdout)
    assert loaded.score_stats.count == len(holdout) and "score_head" not in meta.training
    assert ScoreStats.from_scores(scores).mean == pytest.approx(loaded.score_stats.mean, rel=1e-5)
    assert loaded.training["holdout_above_threshold"] == int((scores > loaded.thresholds.image).sum())
    assert loaded.training["threshold_scores"] == len(holdout)
    assert loaded.thresholds.rule.startswith("mean + 3 * std of held-out good image scores")


def test_a_head_with_one_smoothing_is_calibrated_on_the_held_out_images_and_says_so(synthetic_dataset, tmp_path,
                                                                                     caplog):
    with caplog.at_level("INFO", logger="stmae_edge.training.train"):
        meta = train(synthetic_dataset, tmp_path / "m.pt", preset("tiny", score_wide_sigma=0.0), replace(CFG, epochs=1),
                     backbone_weights="random")
    assert "score_head" not in meta.training and meta.score_stats.count == meta.training["holdout_images"]
    assert "--score-folds applies to heads with two smoothings" in caplog.text


def test_training_is_seeded(trained, synthetic_dataset, tmp_path):
    path, meta = trained
    again = train(synthetic_dataset, tmp_path / "again.pt", preset("tiny"), CFG, backbone_weights="random")
    assert again.model_hash == meta.model_hash
    other = train(synthetic_dataset, tmp_path / "other.pt", preset("tiny"), replace(CFG, seed=1, max_steps=1),
                  backbone_weights="random")
    assert other.model_hash != meta.model_hash  # the seed given is the one used, not one fixed inside


def test_tampered_weights_fail_the_checksum(trained, tmp_path):
    path, _ = trained
    blob = torch.load(path, map_location="cpu", weights_only=True)
    name = next(k for k in blob["state_dict"] if k.startswith("head."))
    blob["state_dict"][name] = blob["state_dict"][name] + 1e-3
    bad = tmp_path / "tampered.pt"
    torch.save(blob, bad)
    with pytest.raises(CheckpointError, match="sha256"):
        read_checkpoint(bad)


def _deep_tuple(levels: int):
    value: tuple = ()
    for _ in range(levels):
        value = (value,)
    return value


def _deep(levels: int):
    value: dict = {}
    for _ in range(levels):
        value = {"x": value}
    return value


@pytest.mark.parametrize("change,why", [
    # a 1 GiB tensor from one float: the digest would make it real before any other check
    (lambda b: b["state_dict"].update(bomb=torch.zeros(1).expand(1 << 14, 1 << 14)), "an expanded view"),
    (lambda b: b["state_dict"].update({f"view{i}": torch.zeros(1 << 16)[:] for i in range(1)}) or
     b["state_dict"].update({f"alias{i}": b["state_dict"]["view0"] for i in range(2000)}), "shared storage"),
    (lambda b: b["state_dict"].update({1: torch.zeros(1)}), "not by a string"),
    (lambda b: b["state_dict"].update(sparse=torch.zeros(3, 3).to_sparse()), "torch.sparse_coo"),
    (lambda b: b["state_dict"].update(q=torch.quantize_per_tensor(torch.zeros(4), 0.1, 0, torch.qint8)), "qint8"),
    (lambda b: b["state_dict"].update(c=torch.zeros(4, dtype=torch.complex64)), "complex64"),
    (lambda b: b["metadata"].update(training=_deep(200)), "nests deeper than"),
    (lambda b: b["metadata"].update(training={"x": _deep_tuple(200)}), "nests deeper than"),
    (lambda b: b["metadata"].update(training={"stowaway": torch.zeros(3)}), "holds a value JSON cannot"),
])
@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_a_crafted_checkpoint_is_refused_before_its_weights_are_read(trained, tmp_path, change, why):
    path, _ = trained
    blob = torch.load(path, map_location="cpu", weights_only=True)
    change(blob)
    crafted = tmp_path / "crafted.pt"
    torch.save(blob, crafted)
    assert crafted.stat().st_size < path.stat().st_size + (1 << 20)  # each a small file
    with pytest.raises(CheckpointError, match=why):
        read_checkpoint(crafted)


@pytest.mark.parametrize("content", [b"", b"not a model at all", b"PK\x03\x04broken zip"])
def test_garbage_files_give_a_checkpoint_error(tmp_path, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError):
        load_model(bad)


@pytest.mark.parametrize("name,content,why", [
    ("model.onnx", b"\x08\x07\x12\x0bonnx-bytes", "it is an ONNX graph, not a checkpoint"),
    ("graph.pt", b"\x08\x07\x12\x0bonnx-bytes", "it is not a PyTorch file"),
    ("cut.pt", b"PK\x03\x04broken zip", "damaged (truncated?)"),
    # the format before PyTorch 1.6, whose declared sizes torch.load allocates before reading them
    ("legacy.pt", None, "in the format before PyTorch 1.6, not a stmae-edge checkpoint"),
])
def test_an_unloadable_file_is_named_for_what_it_is(trained, tmp_path, name, content, why):
    bad = tmp_path / name
    if content is None:  # a real checkpoint, saved in the old format
        torch.save(torch.load(trained[0], weights_only=True), bad, _use_new_zipfile_serialization=False)
    else:
        bad.write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        read_checkpoint(bad)
    message = str(caught.value)
    assert why in message and "give the .pt file that `stmae-edge train` wrote" in message
    assert "weights_only" not in message and "miniz" not in message  # torch's internals stay out of it


def test_the_training_folder_is_recorded_absolute_and_a_relative_record_is_explained(trained, tmp_path,
                                                                                       monkeypatch):
    _, meta = trained
    source = meta.training["data_dir"]
    assert Path(source).is_absolute() and (Path(source) / "train" / "good").is_dir()
    monkeypatch.chdir(tmp_path)  # elsewhere, the record still finds the images
    assert len(data.recorded_train_images(meta.training, 4)) == 4
    with pytest.raises(DatasetError, match="relative to where it was trained.*give --images"):
        data.recorded_train_images({"data_dir": "data"}, 4)  # as models trained before the change record it


def test_pickled_code_is_refused(tmp_path):
    bad = tmp_path / "evil.pt"
    torch.save({"format": "stmae-edge/checkpoint", "payload": np.random.default_rng(0)}, bad)
    with pytest.raises(CheckpointError):
        load_model(bad)


def test_missing_file_and_foreign_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such model file") as caught:
        load_model(tmp_path / "absent.pt")
    # one kind for a missing model file wherever it is opened: the runtime's callers catch BackendError
    assert isinstance(caught.value, BackendError) and type(caught.value).__name__ == "ModelFileMissingError"
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="not a stmae-edge model"):
        load_model(foreign)


def test_edited_architecture_or_preprocessing_fails_the_checksum(trained, tmp_path):
    path, _ = trained
    blob = torch.load(path, map_location="cpu", weights_only=True)
    blob["metadata"]["preprocessing"]["max_pixels"] = 1000
    edited = tmp_path / "edited.pt"
    torch.save(blob, edited)
    with pytest.raises(CheckpointError, match="metadata was changed after training"):
        read_checkpoint(edited)
    # A file from before the metadata digest: the weights' sha256, which covers preprocessing, still refuses it
    del blob["metadata"]["metadata_digest"]
    torch.save(blob, edited)
    with pytest.raises(CheckpointError, match="sha256"):
        read_checkpoint(edited)


def test_marker_without_contents_is_a_checkpoint_error(tmp_path):
    bad = tmp_path / "hollow.pt"
    torch.save({"format": "stmae-edge/checkpoint"}, bad)
    with pytest.raises(CheckpointError, match="without metadata"):
        load_model(bad)


def test_holdout_dir_sets_the_statistics_and_trains_on_every_image(synthetic_dataset, tmp_path):
    """Held-out images of other parts: all of train/good trains, the folder's images give the statistics."""
    cfg = TrainConfig(epochs=1, batch_size=8, seed=0, holdout_dir=str(synthetic_dataset / "test" / "good"))
    meta = train(synthetic_dataset, tmp_path / "m.pt", preset("tiny"), cfg, backbone_weights="random")
    held = data.images_in(synthetic_dataset / "test" / "good")
    assert meta.training["train_images"] == len(data.train_images(synthetic_dataset))
    assert meta.training["holdout_images"] == len(held)
    assert meta.training["holdout"] == f"from {synthetic_dataset / 'test' / 'good'}"
    model, loaded = load_model(tmp_path / "m.pt")
    _, scores = score_images(model, loaded.preprocessing, held)
    assert ScoreStats.from_scores(scores).mean == pytest.approx(loaded.score_stats.mean, rel=1e-5)
    assert "score_head" not in meta.training  # other parts calibrate it: no cross-fitting over train/good


def test_holdout_dir_sharing_a_training_image_is_refused(synthetic_dataset, tmp_path):
    held = tmp_path / "held"
    held.mkdir()
    for path in data.train_images(synthetic_dataset)[:1] + data.images_in(synthetic_dataset / "test" / "good")[:2]:
        (held / f"copy_{path.parent.parent.name}_{path.name}").write_bytes(path.read_bytes())
    cfg = TrainConfig(epochs=1, batch_size=8, seed=0, holdout_dir=str(held))
    first = data.train_images(synthetic_dataset)[0]
    with pytest.raises(DatasetError, match=f"1 of its images is also in train/good \\(first: copy_train_{first.name}, "
                                           f"the same pixels as {first.name}\\)"):
        train(synthetic_dataset, tmp_path / "m.pt", preset("tiny"), cfg, backbone_weights="random")
    with pytest.raises(DatasetError, match="not a folder of images"):
        train(synthetic_dataset, tmp_path / "m.pt", preset("tiny"),
              TrainConfig(holdout_dir=str(tmp_path / "missing")), backbone_weights="random")


def test_holdout_dir_is_checked_before_training(synthetic_dataset, tmp_path, caplog):
    held = tmp_path / "held"
    held.mkdir()
    for path in data.images_in(synthetic_dataset / "test" / "good")[:2]:
        (held / path.name).write_bytes(path.read_bytes())
    (held / "frame.webp").write_bytes(b"RIFF")  # left out as in train/good, and said as there (it was not)
    paths = data.train_images(synthetic_dataset)
    with caplog.at_level("WARNING"):
        goods = good_images(paths, TrainConfig(holdout_dir=str(held)))
    assert goods.train == paths and len(goods.holdout) == 2 and goods.holdout_source == f"from {held}"
    assert f"{held}: not read: 1 file in another format" in caplog.text and "set on the 2 images" in caplog.text
    with pytest.raises(DatasetError, match="training needs at least two"):
        good_images(paths[:1], TrainConfig(holdout_dir=str(held)))
    (held / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="1 of 3 held-out good images in .* cannot be read: .*broken.png"):
        good_images(paths, TrainConfig(holdout_dir=str(held)))


def test_pytorch_scoring_refuses_a_model_that_produces_nan(trained, synthetic_dataset):
    """What a diverged model gives `evaluate` on a .pt file: one line naming the images, not a ValueError
    deep in the metrics."""
    from stmae_edge.errors import TrainingError

    path, _ = trained
    model, meta = load_model(path)
    with torch.no_grad():
        next(p for p in model.parameters() if p.dtype.is_floating_point).fill_(float("nan"))
    images = data.train_images(synthetic_dataset)[:5]
    with pytest.raises(TrainingError, match="NaN or infinite values on images 0 to 3 of 5"):
        score_images(model, meta.preprocessing, images, batch_size=4)


def _resaved(source: Path, target: Path, preprocessing: dict | None = None, **config_changes) -> None:
    """`source` with its architecture config (and preprocessing) changed and its digests made to match,
    as an author who knows the format would craft it: the checksum cannot stop this, the checks must."""
    from stmae_edge.checkpoint import FORMAT, model_digest

    metadata, state = read_checkpoint(source)
    metadata.config = dict(metadata.config, **config_changes)
    metadata.preprocessing = replace(metadata.preprocessing, **(preprocessing or {}))
    metadata.model_hash = model_digest(state, metadata)
    torch.save({"format": FORMAT, "metadata": metadata.to_dict(), "state_dict": state}, target)


@pytest.mark.parametrize("changes,why", [
    # 2M wide: the encoder's first MLP alone would take 64 TB; built on the meta device, nothing is allocated
    ({"embed_dim": 2_000_000}, "do not fit the recorded architecture: wrongly shaped"),
    ({"depth": 3}, "do not fit the recorded architecture: missing encoder.1"),
    ({"depth": 10_000}, "depth 10000 and decoder depth 1 must be within 0..64"),
    ({"patch": 0}, "need 1 <= patch"),
])
def test_a_config_that_does_not_match_the_weights_is_refused_before_the_model_is_built(trained, tmp_path, changes,
                                                                                     why):
    crafted = tmp_path / "crafted.pt"
    _resaved(trained[0], crafted, **changes)
    with pytest.raises(CheckpointError, match=why):
        load_model(crafted)


def test_a_config_asking_for_millions_of_tokens_is_refused_before_they_are_counted_out(trained, tmp_path):
    crafted = tmp_path / "tokens.pt"
    _resaved(trained[0], crafted, {"input_size": (4096, 4096)}, input_size=4096, grid=4096, patch=1, mask_unit=1)
    with pytest.raises(CheckpointError, match="16,777,216 tokens"):
        load_model(crafted)


def test_a_repacked_checkpoint_with_compressed_entries_is_refused(trained, tmp_path):
    """torch.save stores its entries; a deflated one is how a small file unpacks to gigabytes."""
    import zipfile

    packed = tmp_path / "deflated.pt"
    with zipfile.ZipFile(trained[0]) as original, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as out:
        for entry in original.infolist():
            out.writestr(entry.filename, original.read(entry))
    assert torch.load(packed, weights_only=True)["format"] == "stmae-edge/checkpoint"  # torch itself would read it
    with pytest.raises(CheckpointError, match="is compressed, which torch.save never does"):
        read_checkpoint(packed)

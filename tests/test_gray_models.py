"""Models trained on gray images read every image as gray: a colour camera's frame, or a mono camera's
frame saved as a colour file, is scored on the intensities the model learnt (Preprocessing.color)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from synthetic_data import texture

from stmae_edge.data import survey
from stmae_edge.errors import ConfigError
from stmae_edge.preprocessing import Preprocessing, looks_gray
from stmae_edge.training.config import TrainConfig
from stmae_edge.training.image_set import GoodImages, choose_color


def _colour_frame(seed: int = 0, size: int = 96) -> np.ndarray:
    """A BGR frame whose channels differ: tinted, and with a coloured patch."""
    rng = np.random.default_rng(seed)
    gray = texture(rng, size)
    frame = np.stack([gray * 0.6, gray * 0.9, np.clip(gray * 1.2, 0, 255)], axis=2)
    frame[20:40, 30:60] = (30, 200, 60)
    return frame.astype(np.uint8)


def test_a_gray_model_reads_a_colour_image_as_its_gray_version_and_gray_images_as_before():
    frame = _colour_frame()
    gray = Preprocessing(color="gray", keep_aspect=True, input_size=(64, 80))
    colour = Preprocessing(color="rgb", keep_aspect=True, input_size=(64, 80))
    as_gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)  # what a gray camera would give, to a level
    np.testing.assert_allclose(gray.tensor(frame), colour.tensor(cv2.cvtColor(frame.astype(np.float32) / 255,
                                                                             cv2.COLOR_BGR2GRAY)), atol=2e-6)
    np.testing.assert_allclose(gray.tensor(frame), colour.tensor(as_gray), atol=1.01 / 255 / 0.5)
    assert not np.allclose(colour.tensor(frame), gray.tensor(frame), atol=0.05)  # the colour model sees colour
    for image in (as_gray, as_gray[:, :, None], np.repeat(as_gray[:, :, None], 3, axis=2),
                  np.dstack([as_gray] * 3 + [np.full_like(as_gray, 255)])):  # gray in any layout, alpha too
        np.testing.assert_allclose(gray.tensor(image), colour.tensor(as_gray), atol=2e-6)
    with pytest.raises(ConfigError, match="color is one of rgb, gray"):
        Preprocessing(color="bgr")


def test_gray_is_told_from_colour_as_a_mono_camera_saves_it():
    rng = np.random.default_rng(1)
    plane = texture(rng, 120).astype(np.uint8)
    assert looks_gray(plane) and looks_gray(plane[:, :, None])
    saved = cv2.imdecode(cv2.imencode(".jpg", np.dstack([plane] * 3), [cv2.IMWRITE_JPEG_QUALITY, 85])[1],
                         cv2.IMREAD_COLOR)  # a mono frame through a colour JPEG: channels off by a level or two
    assert saved.ndim == 3 and looks_gray(saved)
    assert looks_gray(np.dstack([plane] * 3).astype(np.uint16) * 16)  # 12-bit data in uint16
    assert not looks_gray(_colour_frame())
    tinted = np.dstack([plane, plane, np.clip(plane.astype(int) + 12, 0, 255).astype(np.uint8)])
    assert not looks_gray(tinted)  # a uniform cast of 12 levels is colour
    assert looks_gray(np.zeros((8, 8, 3), np.uint8))
    # the runtime's per-frame check reads 4096 pixels, not 64K: the same verdicts, on a 4 MP frame too
    from stmae_edge.runtime.detector import GRAY_CHECK_PIXELS

    large = cv2.resize(_colour_frame(), (2048, 2048))
    for image in (plane, saved, tinted, _colour_frame(), large, cv2.cvtColor(large, cv2.COLOR_BGR2GRAY)[:, :, None]):
        assert looks_gray(image, GRAY_CHECK_PIXELS) == looks_gray(image)


def _goods(folder: Path, frames: list[np.ndarray]) -> GoodImages:
    folder.mkdir()
    paths = []
    for i, frame in enumerate(frames):
        cv2.imwrite(str(folder / f"{i}.png"), frame)
        paths.append(folder / f"{i}.png")
    found = survey(paths, "good images", progress=False)
    return GoodImages(paths[1:], paths[:1], "test", found.sizes, [], found.colour)


def test_training_reads_images_as_gray_where_every_good_image_is_gray(tmp_path, caplog):
    rng = np.random.default_rng(2)
    grays = [texture(rng, 64).astype(np.uint8) for _ in range(4)]
    all_gray = _goods(tmp_path / "gray", [grays[0], np.dstack([grays[1]] * 3), *grays[2:]])
    assert all_gray.colour == ()
    color, why = choose_color(TrainConfig(), all_gray)
    assert color == "gray" and why.startswith("all 4 good images are gray")
    mixed = _goods(tmp_path / "mixed", [*grays[:3], _colour_frame(size=64)])
    color, why = choose_color(TrainConfig(), mixed)
    assert color == "rgb" and why.startswith("1 of 4 good images are colour (first: 3.png)")
    assert choose_color(TrainConfig(color="rgb"), all_gray) == ("rgb", "--color rgb")
    caplog.set_level("INFO", logger="stmae_edge.training.image_set")
    assert choose_color(TrainConfig(color="gray"), mixed) == ("gray", "--color gray")
    assert "1 of 4 good images are colour and are read as gray" in caplog.text
    with pytest.raises(ConfigError, match="color 'grey': use one of auto, gray, rgb"):
        TrainConfig(color="grey")


def test_a_model_trained_on_gray_images_scores_a_colour_frame_as_its_gray_version(tiny_export):
    """Through training's choice, the metadata, export and ONNX Runtime: what the runtime gets."""
    from stmae_edge.runtime import Detector

    _, onnx_path, _ = tiny_export
    detector = Detector(onnx_path, backend="ort-cpu", check_size=False)
    assert detector.metadata.preprocessing.color == "gray"
    assert detector.metadata.training["color"].startswith("all 24 good images are gray")
    assert detector.metadata.to_dict()["schema_version"] == 3
    frame = _colour_frame()
    colour, gray = detector.predict([frame, cv2.cvtColor(frame.astype(np.float32) / 255, cv2.COLOR_BGR2GRAY)])
    assert colour.score == pytest.approx(gray.score, rel=1e-4, abs=1e-5)
    np.testing.assert_allclose(colour.anomaly_map, gray.anomaly_map, rtol=1e-4, atol=1e-4)


def test_a_gray_frame_given_to_a_model_trained_on_colour_images_is_said_once(synthetic_dataset, tmp_path, caplog):
    """The reverse of a gray model: a colour model meets a mono camera's frames. They are scored (copied
    to three channels), but nothing like them was trained on: said once a Detector, naming the frame."""
    import shutil

    from stmae_edge.models.stmae import preset
    from stmae_edge.runtime import Detector
    from stmae_edge.training.train import train

    tinted = tmp_path / "tinted"
    shutil.copytree(synthetic_dataset, tinted)
    for path in (tinted / "train" / "good").glob("*.png"):
        plane = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.float32)
        cv2.imwrite(str(path), np.dstack([plane * 0.7, plane * 0.9, np.clip(plane * 1.1 + 20, 0, 255)]).astype(np.uint8))
    model = tmp_path / "colour.pt"
    meta = train(tinted, model, preset("tiny"), TrainConfig(epochs=1, batch_size=8, max_images=12, score_folds=0),
                 backbone_weights="random")
    assert meta.preprocessing.color == "rgb" and meta.training["colour_images"] == 12
    frames = [cv2.imread(str(p)) for p in sorted((tinted / "train" / "good").glob("*.png"))[:2]]
    gray = cv2.cvtColor(frames[0], cv2.COLOR_BGR2GRAY)
    with caplog.at_level("WARNING", logger="stmae_edge.runtime.detector"):
        detector = Detector(model, check_size=False)
        detector.predict(frames)
        assert "gray image" not in caplog.text  # colour frames, as trained
        detector.predict([frames[1], gray, gray])
        detector.predict([gray])
    said = [r.getMessage() for r in caplog.records if "gray image" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"array[1] is a gray image, and {model} was trained on colour "
                                                 "images (12 of them)"), said
    # a served model's frame endpoints preprocess through Detector.preprocess: said there too, once
    caplog.clear()
    with caplog.at_level("WARNING", logger="stmae_edge.runtime.detector"):
        served = Detector(model, check_size=False)
        np.testing.assert_array_equal(served.preprocess([frames[0], gray]), detector.preprocess([frames[0], gray]))
        served.preprocess([gray])
    said = [r.getMessage() for r in caplog.records if "gray image" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("array[1] is a gray image"), said


def test_only_a_model_trained_on_colour_images_alone_finds_a_gray_frame_unlike_its_training(tiny_export):
    """One stray colour image among gray ones makes auto read colour, but gray frames are then what
    the model mostly saw: the warning that a gray frame "looks like no training image" was wrong."""
    from dataclasses import replace

    from stmae_edge.metadata import ModelMetadata
    from stmae_edge.runtime.detector import trained_on_colour

    metadata = ModelMetadata.from_onnx(tiny_export[1])
    rgb = replace(metadata.preprocessing, color="rgb")
    for colour, expected in ((24, True), (23, False), (1, False), (0, False)):
        training = {**metadata.training, "train_images": 20, "holdout_images": 4, "colour_images": colour}
        assert trained_on_colour(replace(metadata, preprocessing=rgb, training=training)) is expected, colour
    training = {**metadata.training, "train_images": 20, "holdout_images": 4, "colour_images": 24}
    assert not trained_on_colour(replace(metadata, training=training))  # a gray model converts every frame

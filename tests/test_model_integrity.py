"""What a model file vouches for: images far from the training images' sizes are refused before they
get a verdict, and metadata edited by hand after training (score statistics, preprocessing) is refused
instead of moving verdicts without a word; thresholds stay movable."""

from __future__ import annotations

import json
import re

import cv2
import numpy as np
import onnx
import pytest
import torch
from test_cli import run

from stmae_edge.errors import CheckpointError, InvalidImageError
from stmae_edge.metadata import METADATA_DIGEST_KEY, ONNX_METADATA_KEY, ModelMetadata
from stmae_edge.model_files import read_metadata, write_thresholds
from stmae_edge.preprocessing import TrainedSizes, read_image_bytes
from stmae_edge.runtime import Detector
from stmae_edge.scoring import Thresholds


# --- the sizes a model accepts ----------------------------------------------------------------------
def test_the_accepted_range_is_the_training_images_widened_by_stated_factors():
    sizes = TrainedSizes.of([(100, 200), (120, 150), (80, 240)])
    assert sizes.height == (80, 120) and sizes.width == (150, 240) and sizes.aspect == (1.25, 3.0)
    assert sizes.refusal(100, 200) is None
    assert sizes.refusal(20, 40) is None and sizes.refusal(480, 960) is None  # sides within a factor 4
    assert "40x19 pixels is far from" in sizes.refusal(19, 40)  # a side below a quarter of the smallest
    assert sizes.refusal(481, 962) is not None  # above four times the largest
    assert sizes.refusal(100, 63) is None and sizes.refusal(100, 62) is not None  # width/height below 1.25 / 2
    assert sizes.refusal(100, 600) is None and sizes.refusal(100, 601) is not None  # above 3.0 * 2
    assert "150 to 240 wide, 80 to 120 high, width/height 1.25 to 3.00" in sizes.refusal(1, 1)
    assert TrainedSizes.from_dict(json.loads(json.dumps(sizes.to_dict()))) == sizes


def test_training_records_the_sizes_and_predict_refuses_far_ones(tiny_export, synthetic_dataset):
    _, onnx_path, _ = tiny_export
    detector = Detector(onnx_path, "ort-cpu")
    assert detector.metadata.trained_sizes == TrainedSizes((96, 96), (96, 96), (1.0, 1.0))  # the synthetic set
    good = sorted((synthetic_dataset / "test" / "good").glob("*.png"))[0]
    for shape in [(1, 1), (4, 3000), (8, 8), (2000, 2000)]:
        with pytest.raises(InvalidImageError, match=re.escape(f"{shape[1]}x{shape[0]} pixels is far from the images")):
            detector.predict([good, np.zeros(shape, np.uint8)])
    assert detector.predict(good).score == pytest.approx(detector.predict(cv2.imread(str(good))).score)  # still usable
    # near the training size, and opted out of the check: scored
    detector.predict(np.zeros((70, 130), np.uint8))
    lenient = Detector(onnx_path, "ort-cpu", check_size=False)
    assert len(lenient.predict([np.zeros((1, 1), np.uint8), np.zeros((4, 3000), np.uint8)])) == 2
    # raw maps (the line-scan inspector's tiles, evaluation) are the network's own output: never refused
    assert detector.raw_maps([np.zeros((4, 3000), np.uint8)])[0].shape == (1, *detector.preprocessing.input_size)


def test_predict_reports_a_far_image_by_name_scores_the_rest_and_any_size_scores_it(tiny_export, synthetic_dataset,
                                                                                      tmp_path):
    _, onnx_path, _ = tiny_export
    folder = tmp_path / "frames"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes((synthetic_dataset / "test" / "good" / "000.png").read_bytes())
    cv2.imwrite(str(folder / "strip.png"), np.full((4, 3000), 128, np.uint8))
    r = run("predict", str(onnx_path), str(folder), "--out", str(tmp_path / "p"), "--no-overlays")
    assert r.returncode == 3, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "strip.png: 3000x4 pixels is far from the images this model was trained on" in errors[0]
    assert "--any-size" in errors[0] and "Traceback" not in r.stderr
    assert len(json.loads((tmp_path / "p" / "results.json").read_text())["results"]) == 2
    r = run("predict", str(onnx_path), str(folder), "--out", str(tmp_path / "q"), "--no-overlays", "--any-size")
    assert r.returncode == 0, r.stderr
    assert len(json.loads((tmp_path / "q" / "results.json").read_text())["results"]) == 3


def test_a_file_far_from_the_training_sizes_is_refused_by_its_header_before_decoding(tiny_export, tmp_path):
    """A small file can decode to gigabytes within the pixel cap (a 16-bit RGBA PNG): a size the model
    refuses anyway is refused before the decoder allocates it. Here the image data after the header is
    garbage, so only a check before decoding can name the size."""
    detector = Detector(tiny_export[1], "ort-cpu")
    ok, png = cv2.imencode(".png", np.zeros((4000, 4000), np.uint8))
    header_only = tmp_path / "big.png"
    header_only.write_bytes(png.tobytes()[:33] + bytes(64))  # the IHDR chunk, then nothing decodable
    with pytest.raises(InvalidImageError, match="4000x4000 pixels is far from the images"):
        detector.predict(header_only)
    with pytest.raises(InvalidImageError, match="cannot be decoded"):  # the check can fail: it is undecodable
        Detector(tiny_export[1], "ort-cpu", check_size=False).predict(header_only)
    r = run("predict", str(tiny_export[1]), str(header_only), "--out", str(tmp_path / "p"))  # and the command
    # its one image refused: nothing scored, so the command failed (2), each reason on its own line
    assert r.returncode == 2 and "4000x4000 pixels is far from the images" in r.stderr, r.stderr


def test_a_folder_or_a_device_given_as_an_image_says_what_it_is(tmp_path):
    with pytest.raises(InvalidImageError, match="is a folder, not an image file"):
        read_image_bytes(tmp_path)
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    with pytest.raises(InvalidImageError, match="is not a regular file"):
        read_image_bytes(tmp_path / "zero.png")
    with pytest.raises(InvalidImageError, match="no such image file"):
        read_image_bytes(tmp_path / "absent.png")


def test_an_image_removed_or_out_of_reach_while_it_is_read_is_refused_in_one_line(tmp_path, monkeypatch):
    """The OS's refusals were bare OSErrors: a file removed between the check and the read, a name too
    long (and a folder without permission, which root cannot be shown here)."""
    import os

    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), np.zeros((8, 8), np.uint8))
    assert len(read_image_bytes(image)) == image.stat().st_size
    real_stat = os.stat

    def removed_after_the_check(path, *args, **kwargs):  # another program moves the file away meanwhile
        result = real_stat(path, *args, **kwargs)
        if str(path) == str(image):
            image.unlink()
        return result

    monkeypatch.setattr(os, "stat", removed_after_the_check)
    with pytest.raises(InvalidImageError, match="no such image file"):
        read_image_bytes(image)
    monkeypatch.undo()
    with pytest.raises(InvalidImageError, match=r"cannot be read \(File name too long\)"):
        read_image_bytes(tmp_path / ("x" * 5000 + ".png"))
    with pytest.raises(InvalidImageError, match="no such image file"):  # a name from a C string: a ValueError
        read_image_bytes(str(tmp_path / "a\x00b.png"))
    for model in ("y" * 5000 + ".onnx", "y" * 5000 + ".pt"):
        with pytest.raises(CheckpointError, match=r"cannot be read \(File name too long\)"):
            Detector(tmp_path / model)
    with pytest.raises(CheckpointError, match=r"cannot be read \(File name too long\)"):
        read_metadata(tmp_path / ("y" * 5000 + ".pt"))


def test_an_image_swapped_for_a_pipe_while_it_is_read_is_refused_not_waited_on(tmp_path, monkeypatch):
    """Opening a pipe for reading waits for a writer: a file replaced by one between the check and the
    open hung the reader (and its host's thread) for good."""
    import os
    import threading

    image = tmp_path / "frame.png"
    cv2.imwrite(str(image), np.zeros((8, 8), np.uint8))
    real_stat = os.stat

    def swapped_after_the_check(path, *args, **kwargs):
        result = real_stat(path, *args, **kwargs)
        if str(path) == str(image):
            image.unlink()
            os.mkfifo(image)
        return result

    monkeypatch.setattr(os, "stat", swapped_after_the_check)
    outcome = []

    def read():
        try:
            read_image_bytes(image)
        except InvalidImageError as exc:
            outcome.append(str(exc))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive() and "is not a regular file" in outcome[0]


# --- metadata edited after training -----------------------------------------------------------------
def _edited_checkpoint(source, target, edit) -> None:
    blob = torch.load(source, map_location="cpu", weights_only=True)
    edit(blob["metadata"])
    torch.save(blob, target)


@pytest.mark.parametrize("edit", [
    lambda m: m["score_stats"].update(mean=-50.0),
    lambda m: m["preprocessing"].update(mean=[0.0, 0.0, 0.0]),
    lambda m: m["trained_sizes"].update(height=[1, 100000]),
    lambda m: m.update(model_family="filtering-ae"),
], ids=["score_stats", "preprocessing", "trained_sizes", "model_family"])
def test_a_checkpoint_whose_metadata_was_edited_is_refused(tiny_export, tmp_path, edit):
    checkpoint, _, _ = tiny_export
    _edited_checkpoint(checkpoint, tmp_path / "edited.pt", edit)
    with pytest.raises(CheckpointError, match="metadata was changed after training"):
        read_metadata(tmp_path / "edited.pt")
    image = tmp_path / "part.png"  # an image to score: predict reads its inputs before loading the model
    cv2.imwrite(str(image), np.zeros((64, 64), np.uint8))
    r = run("predict", str(tmp_path / "edited.pt"), str(image), "--out", str(tmp_path / "p"))
    assert r.returncode == 2 and "metadata was changed after training" in r.stderr and "Traceback" not in r.stderr


def _edited_onnx(source, target, edit) -> None:
    model = onnx.load(str(source))
    for prop in model.metadata_props:
        if prop.key == ONNX_METADATA_KEY:
            document = json.loads(prop.value)
            edit(document)
            prop.value = json.dumps(document)
    onnx.save(model, str(target))


def test_an_onnx_file_whose_metadata_was_edited_is_refused_but_thresholds_move(tiny_export, tmp_path):
    _, onnx_path, _ = tiny_export
    _edited_onnx(onnx_path, tmp_path / "mean0.onnx", lambda d: d["preprocessing"].update(mean=[0.0, 0.0, 0.0]))
    with pytest.raises(CheckpointError, match="metadata was changed after training"):
        Detector(tmp_path / "mean0.onnx", "ort-cpu")
    r = run("verify", str(tmp_path / "mean0.onnx"), "--model", str(tiny_export[0]))
    assert r.returncode == 2 and "metadata was changed after training" in r.stderr
    # the thresholds are the user's to move, by hand as by `stmae-edge threshold --write`
    _edited_onnx(onnx_path, tmp_path / "moved.onnx", lambda d: d["thresholds"].update(image=1.5))
    assert Detector(tmp_path / "moved.onnx", "ort-cpu").thresholds.image == 1.5
    write_thresholds(tmp_path / "moved.onnx", Thresholds(image=2.5, pixel=2.5, rule="the line's"))
    assert Detector(tmp_path / "moved.onnx", "ort-cpu").thresholds.image == 2.5


def test_files_from_before_the_digest_are_read_as_before(tiny_export):
    metadata = read_metadata(tiny_export[1]).to_dict()
    assert len(metadata[METADATA_DIGEST_KEY]) == 64
    del metadata[METADATA_DIGEST_KEY], metadata["trained_sizes"]
    old = ModelMetadata.from_dict(metadata)
    assert old.trained_sizes is None and old.score_stats == read_metadata(tiny_export[1]).score_stats

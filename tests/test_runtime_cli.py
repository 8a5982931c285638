"""`stmae-edge predict` and `stmae-edge bench` through the real console entry point."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
from test_cli import _assert_one_line_error, run

# As on a machine without the train extra: every import of torch (or scipy, which the train extra
# brought too) fails as a missing package does, and torch is not in sys.modules at all.
TORCH_BLOCKED = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "scipy"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
from stmae_edge.cli import main
sys.argv[0] = "stmae-edge"
main()
"""


def run_without_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", TORCH_BLOCKED, *args], capture_output=True, text=True, timeout=300)


def test_predict_writes_json_and_overlays_and_reports_unreadable_files(tiny_export, synthetic_dataset, tmp_path):
    inputs = tmp_path / "in"
    shutil.copytree(synthetic_dataset / "test" / "scratch", inputs)
    (inputs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n-broken-")
    extra = tmp_path / "other" / "000.png"  # same stem as a file in the folder: overlay names stay unique
    extra.parent.mkdir()
    cv2.imwrite(str(extra), cv2.resize(cv2.imread(str(inputs / "000.png")), (130, 70)))
    out = tmp_path / "out"
    r = run_without_torch("predict", str(tiny_export[1]), str(inputs), str(extra), "--out", str(out))
    assert r.returncode == 3, r.stderr  # one file was unreadable: partial success, everything else written
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.png" in errors[0] and "Traceback" not in r.stderr
    summary = json.loads((out / "results.json").read_text())
    assert summary["images"] == 8 and len(summary["results"]) == 7 and summary["unreadable"] == 1
    assert summary["runtime"]["backend"] in ("ort-cpu", "ort-cuda")
    for result in summary["results"]:
        overlay = cv2.imread(str(out / result["overlay"]))
        assert overlay.shape == (*result["image_size"], 3)
        assert result["decision"] in ("pass", "fail") and result["is_anomalous"] == (result["decision"] == "fail")
        assert set(result) >= {"score", "normalized_score", "regions", "image_threshold", "pixel_threshold"}
    assert summary["results"][-1]["image_size"] == [70, 130] and summary["results"][-1]["overlay"] == "000_2.png"
    assert f"7 scored: {summary['failed']} fail" in r.stdout and "7 overlays" in r.stdout and "next: " in r.stdout


def test_one_image_the_model_cannot_take_is_reported_and_the_rest_scored(tiny_export, synthetic_dataset, tmp_path):
    """A uint16 frame above the bit depth passes the reader and fails in preprocessing, in the middle of
    a batch: that file alone is reported, by name, and every other one is scored and written."""
    inputs = tmp_path / "in"
    shutil.copytree(synthetic_dataset / "test" / "good", inputs)
    cv2.imwrite(str(inputs / "002_u16.png"), np.full((64, 64), 65000, np.uint16))  # sorts inside the first batch
    out = tmp_path / "out"
    r = run("predict", str(tiny_export[1]), str(inputs), "--bit-depth", "12", "--batch-size", "4", "--out", str(out),
            "--no-overlays")
    assert r.returncode == 3, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "002_u16.png: uint16 pixels up to 65000 exceed the 12-bit range" in errors[0]
    summary = json.loads((out / "results.json").read_text())
    assert summary["unreadable"] == 1 and len(summary["results"]) == 6
    assert summary["input"] == {"bit_depth": 12, "sizes_checked": True}  # both change verdicts: recorded
    assert [p["source"] for p in summary["results"]] == [str(p) for p in sorted(inputs.iterdir()) if "u16" not in p.name]
    assert "next: on a labelled set" in r.stdout and "overlays" not in r.stdout  # none were written


def test_predict_refuses_a_folder_without_images_and_a_negative_sigma(tiny_export, synthetic_dataset, tmp_path):
    empty = tmp_path / "webp"
    empty.mkdir()
    (empty / "frame.webp").write_bytes(b"RIFF")
    r = run("predict", str(tiny_export[1]), str(empty), "--out", str(tmp_path / "out"))
    _assert_one_line_error(r, "no image files (.bmp, .jfif, .jpe, .jpeg, .jpg, .png, .tif, .tiff) in this folder; not "
                              "read: 1 file in another format or linking to nothing (first: frame.webp")
    assert not (tmp_path / "out").exists()  # an empty run is not "all passed"
    r = run("predict", str(tiny_export[1]), str(synthetic_dataset / "test" / "good"), "--sigma", "-3", "--out",
            str(tmp_path / "out"))
    _assert_one_line_error(r, "Invalid value for '--sigma': Input should be greater than or equal to 0")


def test_predict_records_what_its_folders_hold_that_it_does_not_score(tiny_export, synthetic_dataset, tmp_path):
    """A .webp and a subfolder's images were named in one warning only: results.json said every file was
    scored, so the record of what was inspected was wrong."""
    inputs = tmp_path / "in"
    shutil.copytree(synthetic_dataset / "test" / "good", inputs)
    (inputs / "frame.webp").write_bytes(b"RIFF")
    (inputs / "later").mkdir()
    shutil.copy(inputs / "000.png", inputs / "later" / "000.png")
    out = tmp_path / "out"
    r = run("predict", str(tiny_export[1]), str(inputs), "--out", str(out), "--no-overlays")
    assert r.returncode == 0, r.stderr  # files that are not images of a read format are not errors
    assert (f"warning: {inputs}: not scored: 1 file in another format or linking to nothing (first: frame.webp"
            in r.stderr and "and 1 image in its subfolders" in r.stderr)
    assert "nor what 1 of the folders hold in other formats or subfolders (warning lines)" in r.stdout
    summary = json.loads((out / "results.json").read_text())
    assert len(summary["results"]) == 6
    assert [entry["folder"] for entry in summary["left_out"]] == [str(inputs)]
    assert "frame.webp" in summary["left_out"][0]["not_scored"]
    for _ in range(2):  # predict's own overlays, in a folder below its inputs, are not inputs left out
        r = run("predict", str(tiny_export[1]), str(inputs), "--out", str(inputs / "pred"))
        assert r.returncode == 0, r.stderr
    left_out = json.loads((inputs / "pred" / "results.json").read_text())["left_out"][0]["not_scored"]
    assert left_out.endswith("and 1 image in its subfolders"), left_out


def test_a_link_back_to_the_folder_is_not_its_subfolder_and_deeper_images_are_pointed_at(tmp_path):
    """A link `loop -> .` counted the folder's own images as its subfolders'; a tree by date and camera,
    with every image two folders down, was "no image files" with no word of the folders."""
    from stmae_edge.data import not_read_in
    from stmae_edge.errors import DatasetError
    from stmae_edge.runtime.files import expand_inputs

    folder = tmp_path / "line"
    (folder / "2024-06-01" / "cam1").mkdir(parents=True)
    cv2.imwrite(str(folder / "2024-06-01" / "cam1" / "a.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(DatasetError, match="no image files .* not read: 1 subfolder \\(images are read from the "
                                           "folder given, not below it\\)"):
        expand_inputs([folder])
    cv2.imwrite(str(folder / "b.png"), np.zeros((8, 8), np.uint8))
    (folder / "loop").symlink_to(folder)
    (folder / "up").symlink_to(tmp_path)
    assert not_read_in(folder) == "1 subfolder (images are read from the folder given, not below it)"


def test_without_torch_an_onnx_file_is_evaluated_and_a_checkpoint_says_what_to_install(tiny_export, synthetic_dataset,
                                                                                         tmp_path):
    r = run_without_torch("evaluate", str(tiny_export[1]), str(synthetic_dataset), "--out", str(tmp_path / "e.json"))
    assert r.returncode == 0, r.stderr
    from stmae_edge.evaluation.evaluate import evaluate

    evaluated, with_torch = json.loads((tmp_path / "e.json").read_text()), evaluate(tiny_export[1], synthetic_dataset)
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1"):  # the same figures (AUPRO's regions: OpenCV)
        assert evaluated[key] is not None and evaluated[key] == pytest.approx(with_torch[key], abs=1e-6), key
    r = run_without_torch("info", str(tiny_export[0]))
    _assert_one_line_error(r, 'needs torch, which is not installed here: pip install "stmae-edge[train]"')
    r = run_without_torch("predict", str(tiny_export[0]), str(synthetic_dataset / "test" / "good"), "--out",
                          str(tmp_path / "p"))
    _assert_one_line_error(r, "PyTorch is not installed here: run the exported .onnx file")


def test_a_second_run_into_the_same_folder_replaces_the_first_whole(tiny_export, synthetic_dataset, tmp_path):
    good = sorted((synthetic_dataset / "test" / "good").glob("*.png"))
    out = tmp_path / "predictions"
    assert run("predict", str(tiny_export[1]), *map(str, good[:4]), "--out", str(out)).returncode == 0
    (out / "notes.txt").write_text("the line's own file")
    (out / "other.png").write_bytes(b"not ours")
    r = run("predict", str(tiny_export[1]), str(good[0]), str(good[5]), "--out", str(out))
    assert r.returncode == 0 and "removed 3 overlays of the earlier run there" in r.stdout, r.stdout
    assert "checking the earlier run's overlays: 2/2 in " in r.stderr  # hashed under a bar, not in silence
    listed = {entry["overlay"] for entry in json.loads((out / "results.json").read_text())["results"]}
    assert listed == {good[0].stem + ".png", good[5].stem + ".png"}
    assert {p.name for p in out.iterdir()} == listed | {"results.json", "notes.txt", "other.png"}
    # a results.json that is not one, or not of this shape: nothing is removed, nothing fails
    for text in ("{not json", '{"results": 5}', '{"results": null}', '{"results": [{"overlay": ["a.png"]}]}', "[]"):
        (out / "results.json").write_text(text)
        r = run("predict", str(tiny_export[1]), str(good[1]), "--out", str(out), "--no-overlays")
        assert r.returncode == 0 and "removed" not in r.stdout and "Traceback" not in r.stderr, (text, r.stderr)
        assert listed <= {p.name for p in out.iterdir()}



def test_a_run_touches_no_file_it_did_not_write_and_writes_through_no_link(tiny_export, synthetic_dataset, tmp_path):
    """A stale or crafted results.json names a user's own PNG, and links planted in a shared output folder
    point outside it: the PNG stays, the links are replaced, their targets untouched."""
    good = sorted((synthetic_dataset / "test" / "good").glob("*.png"))
    out, outside = tmp_path / "predictions", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    (out / "my_drawing.png").write_bytes(b"a user's drawing")
    (out / "results.json").write_text(json.dumps({"results": [
        {"overlay": "my_drawing.png", "overlay_sha256": "0" * 64}, {"overlay": "my_drawing.png"}]}))
    r = run("predict", str(tiny_export[1]), str(good[0]), "--out", str(out))
    assert r.returncode == 0 and "removed" not in r.stdout, r.stdout + r.stderr
    assert (out / "my_drawing.png").read_bytes() == b"a user's drawing"
    for name in ("results.json", good[1].stem + ".png"):
        (out / name).unlink(missing_ok=True)
        (outside / name).write_bytes(b"outside the folder")
        (out / name).symlink_to(outside / name)
    r = run("predict", str(tiny_export[1]), str(good[1]), "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert all((outside / name).read_bytes() == b"outside the folder" for name in ("results.json", good[1].stem + ".png"))
    assert not (out / "results.json").is_symlink() and json.loads((out / "results.json").read_text())["results"]
    # the link at the overlay's name is not this command's: left as it is, the overlay takes the next name
    assert json.loads((out / "results.json").read_text())["results"][0]["overlay"] == f"{good[1].stem}_2.png"
    assert (out / f"{good[1].stem}.png").is_symlink() and not (out / f"{good[1].stem}_2.png").is_symlink()
    assert (f"1 overlays took another name, as {out} holds files of theirs that this command did not write "
            f"(first: {good[1].stem}_2.png for {good[1]})") in r.stderr  # not only inside results.json


def test_an_overlay_never_replaces_a_users_file_of_its_name_and_long_names_are_cut(tiny_export, synthetic_dataset,
                                                                                   tmp_path):
    """A user's own img.png in --out, and an input img.png: the overlay took its name and replaced it. A
    230-character stem made the atomic writer's temporary name too long, and the length check on a name
    that is not UTF-8 raised: a traceback, the run lost."""
    good = sorted((synthetic_dataset / "test" / "good").glob("*.png"))
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    out.mkdir()
    shutil.copy(good[0], inputs / "img0001.png")
    shutil.copy(good[1], inputs / ("a" * 240 + ".png"))
    shutil.copy(good[2], inputs / ("a" * 240 + "b.png"))  # the same first 187 bytes: still two names
    shutil.copy(good[3], inputs / os.fsdecode(b"caf\xe9.png"))  # Latin-1 from a Windows share: not UTF-8
    (out / "img0001.png").write_bytes(b"the user's own image")
    for _ in range(2):  # the second run replaces the first run's overlays, and still not the user's file
        r = run("predict", str(tiny_export[1]), str(inputs), "--out", str(out))
        assert r.returncode == 0, r.stderr
        assert (out / "img0001.png").read_bytes() == b"the user's own image"
        overlays = [entry["overlay"] for entry in json.loads((out / "results.json").read_text())["results"]]
        assert len(set(overlays)) == 4 and "img0001_2.png" in overlays
        assert all(len(os.fsencode(name)) <= 214 and (out / name).is_file() for name in overlays)
    assert sorted(p.name for p in out.iterdir()) == sorted([*overlays, "img0001.png", "results.json"])


def test_a_gpu_backend_that_cannot_start_and_a_pickle_are_one_line_each(tiny_export, synthetic_dataset, tmp_path):
    image = str(sorted((synthetic_dataset / "test" / "good").glob("*.png"))[0])
    # Here ONNX Runtime either lacks the CUDA provider or cannot load CUDA: either way its own log lines
    # must not come before the one error line (`-v` shows them)
    r = run("predict", str(tiny_export[1]), image, "--out", str(tmp_path / "p"), "--backend", "ort-cuda")
    _assert_one_line_error(r, "CUDA")
    evil = tmp_path / "evil.pt"
    evil.write_bytes(__import__("pickle").dumps({"format": "stmae-edge/checkpoint", "payload": object}, protocol=4))
    r = run("predict", str(evil), image, "--out", str(tmp_path / "q"))
    _assert_one_line_error(r, "evil.pt")


def test_predict_never_writes_into_the_folder_of_its_inputs(tiny_export, synthetic_dataset, tmp_path):
    inputs = tmp_path / "in"
    shutil.copytree(synthetic_dataset / "test" / "scratch", inputs)
    before = {p.name: p.read_bytes() for p in inputs.iterdir()}
    for args in ([str(inputs)], [str(inputs / "000.png")], [str(inputs / ".." / "in" / "001.png")]):
        r = run("predict", str(tiny_export[1]), *args, "--out", str(inputs))
        _assert_one_line_error(r, "is the folder of the input")
        assert {p.name: p.read_bytes() for p in inputs.iterdir()} == before  # nothing written, nothing replaced
    r = run("predict", str(tiny_export[1]), str(inputs), "--out", str(inputs / "predictions"), "--no-overlays")
    assert r.returncode == 0, r.stderr  # a folder below the inputs is fine: a folder is scored without its subfolders


def test_no_command_writes_over_its_own_input(tiny_export, tmp_path):
    checkpoint, onnx_file = tiny_export[0], tiny_export[1]
    copy = tmp_path / "m.onnx"
    shutil.copy(onnx_file, copy)
    before = copy.read_bytes()
    checkpoint_before = checkpoint.read_bytes()  # export's output is an .onnx: its input's name is refused as such
    _assert_one_line_error(run("export", str(checkpoint), "--out", str(checkpoint)), "give a name ending in .onnx")
    assert checkpoint.read_bytes() == checkpoint_before
    _assert_one_line_error(run("build", str(copy), "--out", str(copy)), "give a name ending in .plan or .engine")
    _assert_one_line_error(run("calibrate", str(copy), "--out", str(copy)), "is an input of this command")
    assert copy.read_bytes() == before


def test_predict_thresholds_from_the_command_line(tiny_export, synthetic_dataset, tmp_path):
    folder = synthetic_dataset / "test" / "scratch"
    r = run("predict", str(tiny_export[1]), str(folder), "--out", str(tmp_path / "a"), "--threshold", "-1e9",
            "--no-overlays")
    summary = json.loads((tmp_path / "a" / "results.json").read_text())
    assert r.returncode == 0 and summary["failed"] == 6 and summary["thresholds"]["image"] == -1e9
    assert not list((tmp_path / "a").glob("*.png"))
    r = run("predict", str(tiny_export[1]), str(folder), "--out", str(tmp_path / "b"), "--sigma", "1e9")
    summary = json.loads((tmp_path / "b" / "results.json").read_text())
    assert r.returncode == 0 and summary["failed"] == 0
    assert all(res["regions"] == [] for res in summary["results"])
    # a results.json says where each threshold came from, to be audited later
    r = run("predict", str(tiny_export[1]), str(folder), "--out", str(tmp_path / "c"), "--threshold", "1",
            "--sigma", "2", "--no-overlays")
    rule = json.loads((tmp_path / "c" / "results.json").read_text())["thresholds"]["rule"]
    assert r.returncode == 0 and rule.startswith("image: given for this call (1); pixel: sigma 2 (mean + 2"), rule


def test_bench_json_on_an_onnx_file_without_torch(tiny_export):
    # the model as a positional, as every other command takes it (--engine, the design's spelling, below)
    r = run_without_torch("bench", str(tiny_export[1]), "--batch", "1,3", "--iterations", "4", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["runtime"]["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider")
    assert report["runtime"]["device"].startswith(("CPU:", "GPU:"))
    assert [row["batch"] for row in report["rows"]] == [1, 3]
    for row in report["rows"]:
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["images_per_s"] > 0 and 0 < row["pre_post_share"] < 1
        assert row["preprocess_ms"] + row["infer_ms"] + row["postprocess_ms"] <= row["p99_ms"] * 1.05


def test_bench_table_for_a_pytorch_checkpoint_and_bad_options(tiny_export, synthetic_dataset):
    r = run("bench", "--engine", str(tiny_export[0]), "--batch", "2", "--iterations", "2",
            "--images", str(synthetic_dataset / "test" / "good"))
    assert r.returncode == 0, r.stderr
    assert "torch-cpu" in r.stdout and "PyTorch" in r.stdout and "p99 ms" in r.stdout
    assert "6 images from" in r.stdout
    _assert_one_line_error(run("bench", "--engine", str(tiny_export[1]), "--batch", "8,x"), "comma-separated")
    _assert_one_line_error(run("bench", "--engine", str(tiny_export[1]), "--backend", "ort-gpu"), "unknown backend")
    _assert_one_line_error(run("bench", "--batch", "1"), "bench takes one model")
    _assert_one_line_error(run("bench", str(tiny_export[1]), "--engine", str(tiny_export[1])), "not both")
    _assert_one_line_error(run("predict", str(tiny_export[1]).replace(".onnx", ".nope"), "x.png"), "no such model")


def test_bench_frames_without_the_training_images_are_of_a_size_the_model_accepts(tiny_export, tmp_path, caplog):
    from stmae_edge.runtime import Detector
    from stmae_edge.runtime.bench import bench_images

    detector = Detector(tiny_export[1], "ort-cpu")
    detector.metadata.training = {}  # the training images are not where they were (another machine)
    with caplog.at_level("WARNING", logger="stmae_edge.runtime.bench"):
        images, what = bench_images(detector, count=4)
    assert "benchmarking on synthetic frames: no --images given and the model records no training folder" in caplog.text
    assert "synthetic 96x96" in what and all(image.shape == (96, 96) for image in images)  # the tiny set's size
    assert len(detector.predict(images)) == 4  # not refused as far from the training images
    # a model that reads colour is timed on colour frames (the tiny model is gray: made to read colour here)
    detector.preprocessing = dataclasses.replace(detector.preprocessing, color="rgb")
    images, what = bench_images(detector, count=2)
    assert "8-bit colour frames" in what and all(image.shape == (96, 96, 3) for image in images)
    # bench measures speed, not verdicts: frames far larger than the training images are timed too
    # (a --crop model's full frames)
    frames = tmp_path / "frames"
    frames.mkdir()
    cv2.imwrite(str(frames / "large.png"), np.full((900, 900), 120, np.uint8))
    r = run("bench", "--engine", str(tiny_export[1]), "--batch", "1", "--iterations", "1", "--images", str(frames))
    assert r.returncode == 0 and "1 images from" in r.stdout, r.stderr


def test_overlay_for_16_bit_and_alpha_images():
    from stmae_edge.runtime.overlay import render_overlay
    from stmae_edge.runtime.postprocess import postprocess
    from stmae_edge.scoring import ScoreStats, Thresholds

    stats = ScoreStats(10, 1.0, 0.5, 0.0, 2.0, 1.0, 1.8, 1.9)
    maps = np.zeros((2, 64, 64), np.float32)
    maps[0, 20:30, 20:30] = 4.0
    detections = postprocess(maps, np.array([4.0, 0.0], np.float32), [(100, 150), (50, 40)], ["a", "b"],
                             Thresholds(2.0, 2.0), stats)
    images = [np.full((100, 150), 40000, np.uint16), np.zeros((50, 40, 4), np.uint8)]
    for image, detection in zip(images, detections, strict=True):
        overlay = render_overlay(image, detection, stats)
        assert overlay.shape == (*image.shape[:2], 3) and overlay.dtype == np.uint8
    assert detections[0].is_anomalous and len(detections[0].regions) == 1 and not detections[1].regions


@pytest.mark.parametrize("bit_depth", [16, 12, 10])
def test_a_16_bit_image_shows_the_bytes_of_its_float_values_rounded(bit_depth):
    """display_image reads uint16 pixels through a table (7x faster at 4 MP): every value gives the byte
    the float round trip gives, gray and colour, and values beyond the bit depth are still refused."""
    from stmae_edge.errors import InvalidImageError
    from stmae_edge.preprocessing import to_rgb_float
    from stmae_edge.runtime.overlay import display_image

    every = np.arange(1 << bit_depth, dtype=np.uint16)
    gray = np.resize(every, (len(every) // 64, 64))
    colour = np.stack([gray, gray[::-1], np.roll(gray, 7)], axis=2)
    for image in (gray, gray[..., None], colour, np.concatenate([colour, gray[..., None]], axis=2)):
        expected = np.rint(to_rgb_float(image, bit_depth)[:, :, ::-1] * 255).clip(0, 255).astype(np.uint8)
        shown = display_image(image, bit_depth)
        assert shown.flags.c_contiguous and np.array_equal(shown, expected)
    assert display_image(np.full((2, 2), 257 * 200, np.uint16))[0, 0].tolist() == [200] * 3  # 8-bit content
    if bit_depth < 16:
        with pytest.raises(InvalidImageError, match="exceed"):
            display_image(np.full((2, 2), 1 << bit_depth, np.uint16), bit_depth)


def test_the_overlay_says_the_score_against_the_threshold_it_was_judged_by():
    """A threshold chosen below the good scores' mean (`threshold --min-recall`): a failed image and a
    passed one both read "-0.1 sd", which said nothing of the verdict."""
    from stmae_edge.runtime.overlay import verdict_label
    from stmae_edge.runtime.postprocess import postprocess
    from stmae_edge.scoring import ScoreStats, Thresholds

    stats = ScoreStats(10, 0.117, 1.037, -1.0, 2.0, 0.1, 1.8, 1.9)
    maps = np.zeros((2, 8, 8), np.float32)
    failed, passed = postprocess(maps, np.array([0.0101, -0.0027], np.float32), [(8, 8), (8, 8)], ["a", "b"],
                                 Thresholds(0.004, 0.004), stats)
    assert round(failed.normalized_score, 1) == round(passed.normalized_score, 1) == -0.1
    assert verdict_label(failed) == "FAIL 0.0101 > 0.004" and verdict_label(passed) == "PASS -0.0027 <= 0.004"


def test_the_overlay_boxes_a_region_under_the_pixel_threshold_in_its_own_colour():
    from stmae_edge.runtime.overlay import FAIL_COLOR, LOOK_COLOR, render_overlay
    from stmae_edge.runtime.postprocess import postprocess
    from stmae_edge.scoring import ScoreStats, Thresholds

    stats = ScoreStats(10, 1.0, 0.5, 0.0, 2.0, 1.0, 1.8, 1.9)
    maps = np.zeros((2, 64, 64), np.float32)
    maps[0, 20:30, 20:30], maps[1, 20:30, 20:30] = 3.0, 5.0  # both fail; only the second is over the pixel threshold
    detections = postprocess(maps, np.array([4.0, 4.0], np.float32), [(64, 64)] * 2, ["a", "b"],
                             Thresholds(2.0, 4.0), stats)
    assert [[r.above_pixel_threshold for r in d.regions] for d in detections] == [[False], [True]]
    image = np.zeros((64, 64), np.uint8)
    for detection, color in zip(detections, (LOOK_COLOR, FAIL_COLOR), strict=True):
        edge = render_overlay(image, detection, stats)[20, 25]  # on the box's top edge
        assert tuple(int(v) for v in edge) == color


def test_overlay_names_never_collide(monkeypatch):
    from pathlib import Path

    from stmae_edge.runtime.files import overlay_names

    names = overlay_names([Path("a.png"), Path("a.jpg"), Path("x/a_2.png"), Path("y/a.png"), Path("b.tif")])
    assert len(set(names)) == 5 and names[0] == "a.png" and names[-1] == "b.png"
    # on macOS's disk "é" as one character and as e and an accent name one file, as Part1 and part1 do
    import unicodedata

    composed, decomposed = unicodedata.normalize("NFC", "rayé.png"), unicodedata.normalize("NFD", "rayé.png")
    names = overlay_names([Path("cam1") / composed, Path("cam2") / decomposed, Path("Part1.png"), Path("x/part1.png")])
    assert names[1] == unicodedata.normalize("NFD", "rayé_2.png") and names[3] == "part1_2.png"
    # one stem in many folders (parts/*/image.png): each name found in a step or two, not counted up
    # from 1 again (20,000 of them took minutes)
    from stmae_edge.runtime import files

    compared = []

    def may_be_one_file(name: str) -> str:
        compared.append(name)
        return unicodedata.normalize("NFC", name).casefold()

    monkeypatch.setattr(files, "may_be_one_file", may_be_one_file)
    names = overlay_names([Path(f"part{i}/image.png") for i in range(2000)])
    assert names[:3] == ["image.png", "image_2.png", "image_3.png"] and len(set(names)) == 2000
    assert len(compared) <= 2 * 2000  # each checked once and recorded once


def test_predict_names_the_first_twenty_broken_files_and_counts_the_rest(tiny_export, synthetic_dataset, tmp_path):
    """A line's folder of broken files wrote one error line each: 2,000 lines for 2,000 empty files."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(25):
        (folder / f"broken{i:02d}.png").write_bytes(b"")
    shutil.copy(next((synthetic_dataset / "test" / "good").glob("*.png")), folder / "good.png")
    r = run("predict", str(tiny_export[1]), str(folder), "--out", str(tmp_path / "out"), "--no-overlays")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 3 and len(errors) == 21, r.stderr
    assert errors[-1] == "error: and 5 more files; results.json names every one ('errors', and 'overlay_error' in its results)"
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())["errors"]) == 25


def test_predict_that_scores_nothing_fails_says_so_and_leaves_the_earlier_run(tiny_export, synthetic_dataset,
                                                                              tmp_path):
    """Every file refused is the command failing (2), not a partial success (3). It used to write a
    results.json of its failures over the earlier run in --out, whose overlays it removed: a mistyped
    folder (`imgz` for `imgs`) wiped the last good run. Now a path that does not exist at all is refused
    before the model loads, and a run that scores nothing leaves --out as it was (or not made at all)."""
    out = tmp_path / "out"
    good = next((synthetic_dataset / "test" / "good").glob("*.png"))
    assert run("predict", str(tiny_export[1]), str(good), "--out", str(out)).returncode == 0
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    r = run("predict", str(tiny_export[1]), str(tmp_path / "imgz"), "--out", str(out))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {tmp_path / 'imgz'}: no such file or folder"]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n-broken-")
    r = run("predict", str(tiny_export[1]), str(broken), str(tmp_path / "absent.png"), "--out", str(out))
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 3 and str(broken) in lines[0] and "absent.png" in lines[1], r.stderr
    assert lines[-1] == f"error: none of the 2 images could be scored; {out} was left as it was"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier
    r = run("predict", str(tiny_export[1]), str(broken), "--out", str(tmp_path / "new" / "out"))
    assert r.returncode == 2 and not (tmp_path / "new").exists()  # no empty folder made for nothing


def test_a_name_in_the_output_folder_is_hashed_once_however_often_it_is_asked_about(tmp_path, monkeypatch):
    """predict asks about a name when it chooses overlay names and again to say which took another:
    the second answer is remembered (20,000 overlays at 4 MP took a minute to hash)."""
    from stmae_edge.runtime import files

    (tmp_path / "a.png").write_bytes(b"changed since the earlier run wrote it")
    hashed = []
    monkeypatch.setattr(files, "sha256_file", lambda path: hashed.append(path) or "1" * 64)
    taken = files.replaceable(tmp_path, {"a.png": "0" * 64})
    assert taken("a.png") and taken("a.png") and not taken("b.png")
    assert hashed == [tmp_path / "a.png"]

"""The command line: the real console entry point, one-line errors, non-zero exit codes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from stmae_edge.runtime.devices import cuda_device_count


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stmae_edge.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


PROGRESS_LINE = re.compile(r"^.+: \d+/\d+ in \d+\.\ds ")  # progress.progress_bar's line on a pipe


def _assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    """One error line, whatever progress lines of work done before it (reading the images) came first."""
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and not PROGRESS_LINE.match(line)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_train_evaluate_info(synthetic_dataset, tmp_path):
    model = tmp_path / "m.pt"
    r = run("train", str(synthetic_dataset), "--out", str(model), "--preset", "tiny", "--epochs", "2",
            "--max-steps", "1", "--backbone-weights", "random", "--bit-depth", "12")  # 8-bit PNGs: unaffected, but recorded
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and model.is_file()
    # The step budget stops after whole epochs, at least one, and says so.
    assert "training 1 of 2 epochs" in r.stderr and "after 1 epoch(s)" in r.stdout
    # the work after the last epoch shows too: two passes over the 22 training images' features, one over the 2 held out
    assert "residual statistics: 22/22 in " in r.stderr and "Gaussian statistics: 46/46 in " in r.stderr
    assert "2 held out (drawn at random from train/good); score head fitted on all 24 good images" in r.stdout
    assert "of 24 cross-fitted good images above the threshold" in r.stdout and "(95% upper bound)" in r.stdout
    assert "train on more good images to narrow it (add them to train/good)" in r.stdout  # 24 allow 13.8%
    assert "input shape: training images' width/height from 1.00 to 1.00: stretched to the input" in r.stdout
    assert "trained on images 96 wide, 96 high, width/height 1.00: `predict` refuses images far from these" in r.stdout
    report = tmp_path / "report.json"
    r = run("evaluate", str(model), str(synthetic_dataset), "--out", str(report))
    assert r.returncode == 0, r.stderr
    result = json.loads(report.read_text())
    assert {"image_auroc", "pixel_auroc", "aupro", "f1", "per_defect_type"} <= set(result)
    assert set(result["per_defect_type"]) == {"scratch"}
    assert "image AUROC" in r.stdout and f"wrote {report}" in r.stdout and "next: stmae-edge report" in r.stdout
    failed = round(result["false_reject_rate"] * 6)
    assert f"good images failed {failed} of 6 ({100 * result['false_reject_rate']:.1f}%)" in r.stdout
    assert f"the model's threshold {result['threshold']:.6g} (mean + 3 * std of " in r.stdout
    assert result["threshold_rule"].startswith("mean + 3 * std of ")
    r = run("info", str(model))
    assert r.returncode == 0 and json.loads(r.stdout)["thresholds"]["image"] > 0
    assert json.loads(r.stdout)["preprocessing"]["bit_depth"] == 12


@pytest.mark.parametrize("args,fragment", [
    (("train", "/nonexistent/data"), "no train/good folder"),
    (("evaluate", "/nonexistent/model.pt", "/nonexistent/data"), "no such model file"),
    (("train", "/nonexistent/data", "--preset", "huge"), "unknown preset"),
    (("train", "/nonexistent/data", "--family", "vae"), "unknown model family 'vae'"),
    (("train", "/nonexistent/data", "--family", "filtering-ae", "--preset", "paper"), "unknown filtering-ae preset"),
    (("train", "/nonexistent/data", "--family", "filtering-ae", "--backbone", "vgg19"), "has no backbone"),
    (("train", "/nonexistent/data", "--family", "filtering-ae", "--self-supervised"), "are stmae options"),
    (("train", "/nonexistent/data", "--family", "filtering-ae", "--backbone-weights", "w.pth"), "are stmae options"),
    # a default given explicitly is still given: it would otherwise be ignored without a word
    (("train", "/nonexistent/data", "--family", "filtering-ae", "--corruptions-per-image", "2"), "are stmae options"),
    (("train", "/nonexistent/data", "--holdout", "0.1", "--holdout-dir", "/nonexistent/held"), "give one of the two"),
    (("train", "/nonexistent/data", "--aspect", "square"), "aspect 'square': use one of auto, keep, stretch"),
    (("train", "/nonexistent/data", "--backbone", "resnet18"), "unknown backbone 'resnet18'; use one of"),
])
def test_user_mistakes_are_one_line(args, fragment):
    _assert_one_line_error(run(*args), fragment)


def test_a_mistyped_model_leaves_no_empty_output_folder(tmp_path):
    """export made its default folder (export/) in the user's folder before it found the checkpoint missing."""
    _assert_one_line_error(run("export", "mistyped.pt", cwd=tmp_path), "mistyped.pt: no such model file")
    assert list(tmp_path.iterdir()) == []


def test_holdout_dir_of_training_images_is_one_line(synthetic_dataset, tmp_path):
    r = run("train", str(synthetic_dataset), "--out", str(tmp_path / "m.pt"), "--preset", "tiny",
            "--backbone-weights", "random", "--holdout-dir", str(synthetic_dataset / "train" / "good"))
    _assert_one_line_error(r, "24 of its images are also in train/good")
    assert not (tmp_path / "m.pt").exists()
    r = run("train", str(synthetic_dataset), "--holdout", "0.2", "--holdout-dir", str(tmp_path))
    _assert_one_line_error(r, "give one of the two")


def test_unreadable_good_images_stop_training_before_it_starts_or_are_left_out(synthetic_dataset, tmp_path):
    """A corrupt file found by the backbone pass, or, held out, only after the transformer's minutes of
    training, threw those minutes away and named one file; every file is now decoded first."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_dataset, root)
    goods = sorted((root / "train" / "good").glob("*.png"))
    truncated, scrambled = goods[5], goods[17]
    truncated.write_bytes(truncated.read_bytes()[:len(truncated.read_bytes()) * 2 // 3])  # header intact
    raw = bytearray(scrambled.read_bytes())
    raw[60:400] = bytes(340)  # the pixel data zeroed, the header and the file's length as they were
    scrambled.write_bytes(bytes(raw))
    model = tmp_path / "m.pt"
    args = ("train", str(root), "--out", str(model), "--preset", "tiny", "--epochs", "1", "--max-steps", "1",
            "--backbone-weights", "random")
    r = run(*args)
    # libpng prints its own line on the scrambled file (C code writing to stderr): ours is the one error
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "2 of 24 good images in train/good cannot be read: " in errors[0], r.stderr
    assert truncated.name in r.stderr and scrambled.name in r.stderr and "--skip-unreadable" in r.stderr
    assert "backbone features" not in r.stderr and not model.exists()  # before any training
    r = run(*args, "--skip-unreadable")
    assert r.returncode == 0, r.stderr
    assert "2 of 24 good images in train/good cannot be read and are left out: " in r.stderr
    assert "20 training images, 2 held out (drawn at random from train/good) (2 unreadable left out)" in r.stdout
    training = json.loads(run("info", str(model)).stdout)["training"]
    assert training["unreadable_left_out"] == 2 and training["train_images"] + training["holdout_images"] == 22
    # what falls back to the model's training images leaves them out too (bench stopped at one)
    r = run("bench", "--engine", str(model), "--batch", "1", "--iterations", "1", "--warmup", "0")
    assert r.returncode == 0 and "cannot be read and are left out" in r.stderr, r.stderr


def test_good_images_that_are_one_picture_are_refused(tmp_path):
    """Eight PNGs of the same pixels (bytes differing by compression) trained a model whose threshold sat
    on their one score: it failed every image, its own training images among them."""
    import cv2
    import numpy as np

    from stmae_edge.errors import TrainingError
    from stmae_edge.training.train import check_scores_vary

    good = tmp_path / "data" / "train" / "good"
    good.mkdir(parents=True)
    picture = np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8)
    for i in range(8):
        cv2.imwrite(str(good / f"same_{i}.png"), picture, [cv2.IMWRITE_PNG_COMPRESSION, i])
    r = run("train", str(tmp_path / "data"), "--out", str(tmp_path / "m.pt"), "--preset", "tiny",
            "--backbone-weights", "random")
    _assert_one_line_error(r, "the 8 good images in train/good all show the same pixels")
    check_scores_vary(np.array([0.5, 0.5001]), "scores")
    with pytest.raises(TrainingError, match="the 3 good images' scores are all 0: the good images look alike"):
        check_scores_vary(np.zeros(3), "good images' scores")


def test_evaluate_names_unreadable_test_images_and_masks_before_scoring(tiny_export, synthetic_dataset, tmp_path):
    """A truncated test image stopped evaluate in the middle of scoring, and a mask that could not be read
    stopped it once every image had been scored, the image metrics lost with it."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_dataset, root)
    image = sorted((root / "test" / "good").glob("*.png"))[3]
    image.write_bytes(image.read_bytes()[:100])
    mask = sorted((root / "ground_truth" / "scratch").glob("*.png"))[-1]
    mask.write_bytes(b"not a mask")
    r = run("evaluate", str(tiny_export[1]), str(root), "--out", str(tmp_path / "e.json"))
    _assert_one_line_error(r, "1 of 12 test images cannot be read: ")
    assert image.name in r.stderr and "evaluating (" not in r.stderr  # before any image is scored
    shutil.copy(synthetic_dataset / "test" / "good" / image.name, image)
    r = run("evaluate", str(tiny_export[1]), str(root), "--out", str(tmp_path / "e.json"))
    _assert_one_line_error(r, f"1 of 6 masks cannot be read: {mask}: not a PNG, JPEG, BMP or TIFF file")
    assert "evaluating (" not in r.stderr and not (tmp_path / "e.json").exists()
    r = run("threshold", str(tiny_export[1]), str(root), "--max-false-reject", "0.2")  # reads no mask
    assert r.returncode == 0 and "masks" not in r.stderr, r.stderr


def test_evaluate_takes_a_backend_and_records_the_one_it_used(tiny_export, synthetic_dataset, tmp_path):
    """evaluate was the one scoring command without --backend (threshold and report had it)."""
    report = tmp_path / "e.json"
    r = run("evaluate", str(tiny_export[1]), str(synthetic_dataset), "--out", str(report))
    assert r.returncode == 0 and json.loads(report.read_text())["backend"] == "ort-cpu", r.stderr
    r = run("evaluate", str(tiny_export[1]), str(synthetic_dataset), "--out", str(report), "--backend", "auto")
    used = json.loads(report.read_text())["backend"]
    assert r.returncode == 0 and used in ("ort-cpu", "ort-cuda", "ort-tensorrt")
    if cuda_device_count() == 0:  # no GPU here: auto's choice is the CPU
        assert used == "ort-cpu"
    _assert_one_line_error(run("evaluate", str(tiny_export[1]), str(synthetic_dataset), "--backend", "torch-cpu"),
                           "is an ONNX file; it runs with --backend ort-tensorrt or ort-cuda or ort-cpu")

    _assert_one_line_error(run("evaluate", str(tiny_export[1]), str(tmp_path / "absent")),  # not "no test folder"
                           "absent: no such folder; give a dataset folder")
    # By default beside the model under its whole name: m.pt's and m.onnx's reports were both m.eval.json,
    # the second replacing the first without a word
    import shutil

    for model in tiny_export[:2]:
        shutil.copy(model, tmp_path / model.name)
        assert run("evaluate", str(tmp_path / model.name), str(synthetic_dataset)).returncode == 0
    assert sorted(p.name for p in tmp_path.glob("*.eval.json")) == sorted(f"{m.name}.eval.json" for m in tiny_export[:2])


def test_corrupt_model_file_is_one_line(tmp_path, synthetic_dataset):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x00" * 100)
    _assert_one_line_error(run("evaluate", str(bad), str(synthetic_dataset)), "not a loadable")


def test_vgg19_without_weights_offline_is_one_line(synthetic_dataset, tmp_path):
    r = run("train", str(synthetic_dataset), "--preset", "tiny", "--backbone", "vgg19", "--backbone-weights",
            str(tmp_path / "missing_vgg19.pth"), "--out", str(tmp_path / "m.pt"))
    # Beside the error, one warning: no score head was measured for VGG19, so the score is the map's maximum.
    warning, rest = r.stderr.split("\n", 1)
    assert "no score head has been measured for the vgg19 backbone" in warning
    _assert_one_line_error(subprocess.CompletedProcess(r.args, r.returncode, r.stdout, rest), "backbone-weights")


def test_every_preset_is_named_in_the_help_and_no_other():
    """--preset's help lists the presets by hand (importing them needs torch, which `--help` must not)."""
    import inspect
    import re

    from stmae_edge import cli
    from stmae_edge.models.filtering_ae import PRESETS as FILTERING
    from stmae_edge.models.stmae_config import PRESETS as STMAE

    text = inspect.signature(cli.train).parameters["preset_name"].default.help
    stmae_part, filtering_part = text.split("; filtering-ae: ")
    bare = re.sub(r" \([^)]*\)", "", stmae_part.removeprefix("stmae: "))  # the names, without what each is
    named = set(re.split(r", | and ", bare))
    assert named == set(STMAE), named ^ set(STMAE)
    assert set(filtering_part.split(", ")) == set(FILTERING)


@pytest.mark.parametrize("args,fragment", [
    (("evaluate", "model.pt", "data", "--batch-size", "0"), "batch-size"),
    (("train", "data", "--sigma", "-1"), "sigma"),
])
def test_out_of_range_options_are_refused_by_the_parser(args, fragment):
    r = run(*args)
    assert r.returncode == 2 and fragment in r.stderr and "Traceback" not in r.stderr


def test_unwritable_output_fails_before_training(synthetic_dataset, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run("train", str(synthetic_dataset), "--out", str(blocker / "m.pt"), "--preset", "tiny",
            "--backbone-weights", "random")
    _assert_one_line_error(r, "cannot write")
    assert "training" not in r.stderr  # refused before any work


def test_backbone_weights_none_is_refused(synthetic_dataset, tmp_path):
    r = run("train", str(synthetic_dataset), "--backbone-weights", "none", "--out", str(tmp_path / "m.pt"))
    _assert_one_line_error(r, "uninitialised")


def test_export_and_verify_commands(tiny_export, synthetic_dataset, tmp_path):
    model = tmp_path / "m.pt"  # the train command is tested above; this one's model is the shared one
    shutil.copy(tiny_export[0], model)
    onnx_file = tmp_path / "m.onnx"
    r = run("export", str(model), "--out", str(onnx_file))
    assert r.returncode == 0 and onnx_file.is_file() and "TensorRT allow-list" in r.stdout, r.stderr
    # the exporter's notes about torchvision's ops and torch's pytree stay off the terminal; its progress
    # (on a pipe: one line at the end) is all there is
    assert r.stderr.splitlines() == [line for line in r.stderr.splitlines() if line.startswith("exporting m.pt: 3/3 in ")]
    assert len(r.stderr.splitlines()) == 1, r.stderr
    # and the exporter's own status lines stay off stdout (verbose=False, not a process-wide swap of stdout)
    assert [line.split(" ")[0] for line in r.stdout.splitlines()] == ["wrote", "ops"], r.stdout
    r = run("verify", str(onnx_file), "--model", str(model), "--images", str(synthetic_dataset / "test" / "good"))
    assert r.returncode == 0 and "batch 8" in r.stdout and r.stdout.strip().endswith("(CPUExecutionProvider)")
    assert "verifying m.onnx: 3/3 in " in r.stderr
    assert f"real images of {(synthetic_dataset / 'test' / 'good').resolve()} (" in r.stdout  # which images it used
    _assert_one_line_error(run("verify", str(tmp_path / "absent.onnx"), "--model", str(model)), "absent.onnx: no such model file")
    for command in (["build", "absent.onnx"], ["calibrate", "absent.onnx"], ["evaluate", "absent.onnx", str(tmp_path)]):
        _assert_one_line_error(run(*command, cwd=tmp_path), "absent.onnx: no such model file")  # one wording everywhere
    # an --images folder without images is refused, not replaced by the training images (nor by
    # synthetic frames in bench), which the output would then name as what was used
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_one_line_error(run("verify", str(onnx_file), "--model", str(model), "--images", str(empty)),
                           "no images to verify with: the --images folder holds no image files")
    _assert_one_line_error(run("calibrate", str(onnx_file), "--images", str(empty), "--out", str(tmp_path / "q.onnx")),
                           "0 calibration images; give at least")
    _assert_one_line_error(run("bench", "--engine", str(onnx_file), "--images", str(empty)),
                           f"{empty}: no image files in this folder to benchmark with")


ONNXSCRIPT_MISSING = """
import importlib.abc, sys
class NoOnnxscript(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "onnxscript":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoOnnxscript())
from stmae_edge.cli import main
sys.argv[0] = "stmae-edge"
main()
"""


def test_export_without_onnxscript_says_which_extra_brings_it(tiny_export, tmp_path):
    """The exporter's own error hid the missing package: "ONNX export failed: import of onnxscript halted"."""
    r = subprocess.run([sys.executable, "-c", ONNXSCRIPT_MISSING, "export", str(tiny_export[0]), "--out",
                        str(tmp_path / "m.onnx")], capture_output=True, text=True, timeout=300)
    _assert_one_line_error(r, "this command needs onnxscript, which is not installed here: pip install "
                              '"stmae-edge[train]"')


def test_image_folder_options_are_checked(tmp_path):
    for command in (("verify", "m.onnx", "--model", "m.pt"), ("calibrate", "m.onnx")):
        _assert_one_line_error(run(*command, "--images", str(tmp_path / "absent")), "not a folder of images")


def test_usage_errors_are_one_line_too(synthetic_dataset):
    # click's own errors (a value out of range, an unknown option, a missing argument) were a boxed,
    # many-line panel; they follow the rest: one line, what to do, exit code 2
    _assert_one_line_error(run("train", str(synthetic_dataset), "--holdout", "0"), "Invalid value for '--holdout'")
    _assert_one_line_error(run("predict", "--bogus"), "No such option: --bogus")
    r = run("train")
    _assert_one_line_error(r, "Missing argument 'data_dir'; see `")
    assert r.stderr.strip().endswith("train --help`")


@pytest.mark.parametrize("failure", [MemoryError(), RuntimeError(
    "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    "274877906944 bytes")])
def test_running_out_of_memory_is_one_line_that_says_what_to_do(monkeypatch, capsys, failure):
    import stmae_edge.cli as cli

    def command(**_):
        raise failure

    monkeypatch.setattr(cli, "app", command)  # where a command's allocation fails (torch's allocator, numpy)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1
    assert lines[0].startswith("error: out of memory") and "--max-images" in lines[0]


def test_evaluate_threshold_and_report_score_with_the_same_default_backend(tiny_export, synthetic_dataset, tmp_path,
                                                                          monkeypatch, caplog):
    """threshold and report took `auto` (the GPU on a GPU machine) where evaluate took the CPU: a threshold
    chosen from other scores than those evaluate reports. Here a GPU is pretended for `auto`: none of the
    three may ask for it without --backend, and each scores on the CPU backend."""
    import logging

    from typer.testing import CliRunner

    import stmae_edge.runtime.backends as backends
    from stmae_edge.cli import app
    from stmae_edge.evaluation.validation import EVALUATION_BACKENDS

    assert EVALUATION_BACKENDS == {"checkpoint": "torch-cpu", "onnx": "ort-cpu", "plan": "tensorrt"}
    monkeypatch.setattr(backends, "device_present", lambda name: True)  # auto would take ort-cuda
    model, data = str(tiny_export[1]), str(synthetic_dataset)
    for command in (["evaluate", model, data, "--out", str(tmp_path / "e.json")],
                    ["threshold", model, data, "--max-false-reject", "0.2"],
                    ["report", model, data, "--out", str(tmp_path / "report")]):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="stmae_edge.runtime.backends"):
            result = CliRunner().invoke(app, command)
        assert result.exit_code == 0, (command[0], result.output)
        assert "backend auto" not in caplog.text, (command[0], caplog.text)  # auto was never asked
        assert "(ort-cpu)" in result.output, (command[0], result.output)  # its progress line names the backend
    assert json.loads((tmp_path / "e.json").read_text())["backend"] == "ort-cpu"
    # and the check can fail: named, auto goes for the pretended GPU
    with caplog.at_level(logging.INFO, logger="stmae_edge.runtime.backends"):
        CliRunner().invoke(app, ["threshold", model, data, "--max-false-reject", "0.2", "--backend", "auto"])
    assert "backend auto" in caplog.text


def test_the_command_alone_shows_the_help_with_the_pipeline_and_exit_codes():
    r = run()
    assert r.returncode == 0 and "error" not in r.stderr, r.stderr  # the help was the answer, not a mistake
    text = " ".join(r.stdout.replace("│", " ").split())  # as wrapped in the help's box
    assert "train -> evaluate" in text and "130 interrupted" in text, text


def test_no_flag_is_shown_as_taking_a_value():
    """typer showed "--json <bool>", which reads as "--json true" (refused: an extra argument)."""
    from typer.testing import CliRunner

    from stmae_edge.cli import app

    commands = [c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands]
    assert {"train", "add-defects", "predict", "triton-repo", "demo"} <= set(commands), commands
    for command in ([], *([c] for c in commands)):
        result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0 and "Usage" in result.output, (command, result.output)
        shown = [line for line in result.output.splitlines() if "<bool>" in line]  # typer's own --help too
        assert not shown, (command, shown)


def test_a_model_written_under_a_name_no_command_reads_is_refused_before_the_work(tiny_export, synthetic_dataset,
                                                                                  tmp_path):
    """train -o notamodel.txt trained for minutes, then every command refused the file by its suffix."""
    _assert_one_line_error(run("train", str(synthetic_dataset), "-o", str(tmp_path / "notamodel.txt")),
                           "a PyTorch checkpoint is read by its suffix; give a name ending in .pt")
    assert not (tmp_path / "notamodel.txt").exists()
    _assert_one_line_error(run("export", str(tiny_export[0]), "-o", str(tmp_path / "out.txt")),
                           "an ONNX file is read by its suffix; give a name ending in .onnx")
    _assert_one_line_error(run("build", str(tiny_export[1]), "-o", str(tmp_path / "m.bin")),
                           "a TensorRT plan is read by its suffix; give a name ending in .plan or .engine")


def test_a_checkpoint_given_where_a_graph_goes_is_named_for_what_it_is(tiny_export, tmp_path):
    for command in (["verify", str(tiny_export[0]), "--model", str(tiny_export[0])],
                    ["calibrate", str(tiny_export[0]), "--out", str(tmp_path / "q.onnx")],
                    ["build", str(tiny_export[0]), "--out", str(tmp_path / "m.plan")]):
        _assert_one_line_error(run(*command), "a zip file (a PyTorch checkpoint?), not an ONNX graph; give the .onnx "
                                              "file that `stmae-edge export` wrote")
    # a plan, its sidecar, an image or an empty file: protobuf's "Wire format was corrupt" said none of that
    plan = tmp_path / "m.plan"
    plan.write_bytes(b"ftrt\x00\x00\x00\x01" + bytes(range(200)))
    (tmp_path / "m.plan.json").write_text('{"plan": {}}')
    (tmp_path / "part.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (tmp_path / "empty.onnx").write_bytes(b"")
    for given, what in (("m.plan", "a TensorRT plan"), ("m.plan.json", "a JSON file (a plan's sidecar?)"),
                        ("part.png", "a PNG image"), ("empty.onnx", "an empty file")):
        for command in (["build", str(tmp_path / given), "--out", str(tmp_path / "x.plan")], ["info", str(tmp_path / given)]):
            if command[0] == "info" and given != "empty.onnx":
                continue  # info takes plans and checkpoints as they are
            _assert_one_line_error(run(*command), f"{tmp_path / given}: {what}, not an ONNX graph; give the .onnx")


def test_evaluate_threshold_and_report_take_the_bit_depth_predict_takes(tiny_export, synthetic_dataset, tmp_path):
    """A Mono12 line scored by `predict --bit-depth 12` must be evaluated, and its threshold chosen, on the
    same scores: the three scoring commands take the option too (only predict and linescan had it)."""
    import cv2
    import numpy as np

    from stmae_edge.evaluation.validation import score_dataset
    from stmae_edge.runtime import Detector

    data = tmp_path / "mono12"
    for folder in ("good", "scratch"):
        (data / "test" / folder).mkdir(parents=True)
        for image in sorted((synthetic_dataset / "test" / folder).glob("*.png"))[:4]:
            pixels = cv2.imread(str(image), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 16  # 12 significant bits
            cv2.imwrite(str(data / "test" / folder / image.name), pixels)
    scored = score_dataset(tiny_export[1], data, bit_depth=12, masks=False)
    paths = [s.path for s in scored.samples]
    as_predict = [d.score for d in Detector(tiny_export[1], "ort-cpu", bit_depth=12).predict(paths)]
    assert np.allclose(scored.scores, as_predict, rtol=1e-6)
    assert not np.allclose(score_dataset(tiny_export[1], data, masks=False).scores, as_predict, rtol=1e-3)
    report = tmp_path / "e.json"
    r = run("evaluate", str(tiny_export[1]), str(data), "--bit-depth", "12", "--out", str(report))
    assert r.returncode == 0 and json.loads(report.read_text())["bit_depth"] == 12, r.stderr
    r = run("threshold", str(tiny_export[1]), str(data), "--bit-depth", "12", "--max-false-reject", "0.25")
    assert r.returncode == 0, r.stderr


def test_main_called_from_a_program_puts_its_signal_handlers_back(monkeypatch):
    """main() turns SIGINT, SIGTERM and SIGHUP into KeyboardInterrupt for the command's run; a program (or
    a test) that calls it kept those handlers, and a later Ctrl-C was recorded as the command's."""
    import signal

    from stmae_edge import cli

    names = [name for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)]
    before = {name: signal.getsignal(getattr(signal, name)) for name in names}
    monkeypatch.setattr(sys, "argv", ["stmae-edge", "--version"])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 0
    assert {name: signal.getsignal(getattr(signal, name)) for name in names} == before


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGUSR1"), reason="emulates Windows' SIGBREAK with SIGUSR1")
def test_ctrl_break_stops_a_command_as_ctrl_c_does(monkeypatch):
    """Windows' Ctrl-Break (SIGBREAK) ended a command with no cleanup: its temporary files stayed. Here
    SIGUSR1 stands in for SIGBREAK, which Linux has not."""
    import signal

    from stmae_edge import cli

    monkeypatch.setattr(signal, "SIGBREAK", signal.SIGUSR1, raising=False)
    before = signal.getsignal(signal.SIGUSR1)
    replaced = cli._stop_on_signals()
    try:
        assert signal.SIGUSR1 in replaced
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGUSR1)
        assert cli._STOPPED_BY == [signal.SIGUSR1]
    finally:
        for signum, handler in replaced.items():
            signal.signal(signum, handler)
    assert signal.getsignal(signal.SIGUSR1) == before


def test_bench_refuses_a_batch_below_one_for_its_option_before_loading_the_model(tmp_path):
    """`bench --batch 0` named an internal parameter (batch_size) after loading the model."""
    _assert_one_line_error(run("bench", str(tmp_path / "not-even-there.onnx"), "--batch", "1,0"),
                           "--batch '1,0': batch sizes are 1 or more")


def test_a_command_that_fails_leaves_no_empty_output_folder_of_its_own(tiny_export, synthetic_dataset, tmp_path):
    """`--out a/b/x` was made before the inputs were read: a command refused for a wrong model or an
    empty dataset left a/b/ behind. Folders that were there before stay, and so does one that holds
    anything."""
    kept = tmp_path / "kept"
    kept.mkdir()
    _assert_one_line_error(run("export", str(tiny_export[1]), "--out", str(kept / "ex" / "sub" / "e.onnx")),
                           "not a checkpoint")
    empty = tmp_path / "empty-dataset"
    (empty / "train" / "good").mkdir(parents=True)
    _assert_one_line_error(run("train", str(empty), "--out", str(kept / "m" / "x.pt")), "0 images")
    _assert_one_line_error(run("evaluate", str(tiny_export[0]), str(empty), "--out", str(kept / "ev" / "e.json")), "")
    assert list(kept.iterdir()) == []
    r = run("evaluate", str(tiny_export[1]), str(synthetic_dataset), "--out", str(kept / "ev" / "e.json"))
    assert r.returncode == 0 and (kept / "ev" / "e.json").is_file(), r.stderr

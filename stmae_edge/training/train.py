"""Training. ST-MAE: frozen-backbone features are extracted once, then the transformer learns on them.
The filtering autoencoder has its own data and loss (filtering.py); both families share one
training loop (loop.py: TrainConfig, optimize) and end here, in one checkpoint.

The backbone is frozen and images are not augmented, so caching its features (in fp16, to hold them in
memory) changes them only by that rounding and makes each epoch cost only the transformer. Held-out
good images give the score statistics and the default threshold through the same forward() that
export and the runtime use.
"""

from __future__ import annotations

import logging
import random
import secrets
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from .. import data
from ..checkpoint import save_checkpoint
from ..errors import ConfigError, OutputError, TrainingError
from ..metadata import ModelMetadata
from ..model_files import warn_replacing
from ..models.backbones import BACKBONE_PREPROCESSING
from ..models.families import STMAE_FAMILY
from ..models.filtering_ae import FAMILY as FILTERING_FAMILY
from ..models.filtering_ae import FilteringAEConfig
from ..models.gaussian import GAUSSIAN_CHUNK, PositionGaussianSums
from ..models.intensity import image_statistics
from ..models.stmae import STMAE, STMAEConfig, random_split
from ..outputs import check_writable
from ..preprocessing import ImageInput, Preprocessing, TrainedSizes, load_image
from ..progress import progress_bar
from ..scoring import ScoreStats, Thresholds, fails, map_maxima
from .corruption import corrupt
from .defect_head import (
    DEFECT_HIDDEN,
    LabelledDefects,
    fit_defect_head,
    kept_feature_sets,
    labelled_defects,
    normal_images,
)
from .filtering import DONORS, train_filtering
from .image_set import GoodImages, capped, choose_color, choose_keep_aspect, good_images, hint_bit_depth, warn_about_sizes
from .loop import FITTED_STD_FLOOR, TrainConfig, batches, mean_and_std, optimize, z_score_table
from .memory import kept_bytes_per_image, warn_if_short

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def preprocessing_for(config: STMAEConfig | FilteringAEConfig, bit_depth: int = 16,
                      keep_aspect: bool = False, color: str = "rgb") -> Preprocessing:
    """ST-MAE normalises as its backbone was trained; the filtering autoencoder takes the default."""
    size = (config.input_size, config.input_size)
    if isinstance(config, FilteringAEConfig):
        return Preprocessing(input_size=size, bit_depth=bit_depth, keep_aspect=keep_aspect, color=color)
    norm = BACKBONE_PREPROCESSING[config.backbone]
    return Preprocessing(input_size=size, mean=norm["mean"], std=norm["std"], bit_depth=bit_depth,
                         keep_aspect=keep_aspect, color=color)


@torch.no_grad()
def extract_features(model: STMAE, preprocessing: Preprocessing, paths: Sequence[ImageInput],
                     batch_size: int = 16, description: str = "features") -> torch.Tensor:
    """Raw backbone features of every image, stored in fp16 to halve memory: (N, C, G, G)."""
    return extract_feature_pairs(model, preprocessing, paths, batch_size, description, with_score=False)[0]


@torch.no_grad()
def extract_feature_pairs(model: STMAE, preprocessing: Preprocessing, paths: Sequence[ImageInput],
                          batch_size: int = 16, description: str = "features",
                          with_score: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """extract_features and, for a model with a score head (and `with_score`), its raw features
    (N, C_s, S, S) in fp16, from the same backbone pass; None without."""
    out, score_out = [], []
    with progress_bar(description, len(paths)) as advance:
        for chunk in batches(paths, batch_size):
            images = torch.from_numpy(preprocessing(chunk))
            features, score_features = model.extract_with_score(images) if with_score else (model.extract(images), None)
            out.append(features.to(torch.float16))
            if score_features is not None:
                score_out.append(score_features.to(torch.float16))
            advance(len(chunk))
    return torch.cat(out), torch.cat(score_out) if score_out else None


def features_of(model: STMAE, preprocessing: Preprocessing, images: Sequence[ImageInput]) -> torch.Tensor:
    """One batch: preprocess, run the frozen backbone, keep fp16."""
    return model.extract(torch.from_numpy(preprocessing(images))).to(torch.float16)


@torch.no_grad()
def score_images(model: STMAE, preprocessing: Preprocessing, paths: Sequence[ImageInput], batch_size: int = 16,
                 description: str = "scoring") -> tuple[np.ndarray, np.ndarray]:
    """The full forward pass (as exported): maps (N, H, W) at input size, laid out over each image
    (Preprocessing.to_image_frame), and scores (N,)."""
    model.eval()
    maps, scores = [], []
    with progress_bar(description, len(paths)) as advance:
        for first, chunk in zip(range(0, len(paths), batch_size), batches(paths, batch_size), strict=True):
            images = [load_image(item, preprocessing.max_pixels) for item in chunk]
            m, s = model(torch.from_numpy(preprocessing(images, sources=chunk)))
            if not (torch.isfinite(m).all() and torch.isfinite(s).all()):
                raise TrainingError(f"the model produced NaN or infinite values on images {first} to "
                                    f"{first + len(chunk) - 1} of {len(paths)}; train it again (with a lower --lr "
                                    "where its loss diverged)")
            maps.append(preprocessing.to_image_frame(m[:, 0].numpy(), [image.shape[:2] for image in images]))
            scores.append(s.numpy())
            advance(len(chunk))
    return np.concatenate(maps), np.concatenate(scores)


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over images and positions: (1, C, 1, 1) each."""
    mean, std = mean_and_std(features.split(64), dims=(0, 2, 3))
    return mean, std.clamp_min(1e-4)


@torch.no_grad()
def residual_statistics(model: STMAE, features: torch.Tensor, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the eval-mode residual at each grid position over the training images.

    Training rather than held-out images: 686 against 76 samples per position, and measured on
    magnetic_tile, image AUROC 0.883 against 0.870. Per-position stds there are 0.06..0.09, far from
    the floor below."""
    model.eval()
    residuals = []
    with progress_bar("residual statistics", len(features)) as advance:
        for chunk in features.split(batch_size):
            f = model.standardize(chunk.float())
            residuals.append(model.residual(f, model.reconstruct(f)))
            advance(len(chunk))
    residuals = torch.cat(residuals)
    return residuals.mean(dim=0, keepdim=True), residuals.std(dim=0, keepdim=True).clamp_min(FITTED_STD_FLOOR)


@torch.no_grad()
def corrupted_features(model: STMAE, preprocessing: Preprocessing, items: Sequence[ImageInput],
                       cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of `corruptions_per_image` seeded corrupted versions of every item, and for
    each the index of the item whose good features it must be restored to. Other training images
    lend their textures to the defects."""
    rng = np.random.default_rng(cfg.seed)
    donor_ids = rng.permutation(len(items))[:DONORS]
    donors = [load_image(items[int(i)]) for i in donor_ids]
    features, targets_of = [], []
    with progress_bar("corrupted features", len(items)) as advance:
        for chunk in batches(range(len(items)), max(1, 16 // cfg.corruptions_per_image)):
            samples = []
            for i in chunk:  # corrupted on the fly, chunk by chunk: only features are kept
                image = load_image(items[i])
                for k in range(cfg.corruptions_per_image):
                    samples.append(corrupt(image, donors, np.random.default_rng((cfg.seed, i, k)),
                                           bit_depth=preprocessing.bit_depth).corrupted)
                    targets_of.append(i)
            features.append(features_of(model, preprocessing, samples))
            advance(len(chunk))
    return torch.cat(features), torch.tensor(targets_of)


def fit(model: STMAE, features: torch.Tensor, cfg: TrainConfig, inputs: torch.Tensor | None = None,
        targets_of: torch.Tensor | None = None) -> list[float]:
    """Train the transformer on cached raw features; returns the mean loss of each epoch.

    Plain training reconstructs `features` from themselves. Self-supervised training reconstructs
    `features[targets_of[k]]`, the good image's features, from `inputs[k]`, a corrupted version's."""
    if inputs is None:
        inputs, targets_of = features, torch.arange(features.shape[0])
    tokens = model.config.tokens_per_side ** 2

    def loss_of(idx: torch.Tensor, epoch: int, generator: torch.Generator) -> torch.Tensor:
        seen = model.standardize(inputs[idx].float())
        wanted = model.standardize(features[targets_of[idx]].float())
        split_a, split_b = random_split(len(idx), tokens, generator, units=model.mask_units)
        return model.loss(wanted, model.reconstruct(seen, split_a, split_b))

    return optimize(model, inputs.shape[0], cfg, loss_of)


def train(data_dir: Path | str, out: Path | str, model_config: STMAEConfig | FilteringAEConfig, cfg: TrainConfig,
          backbone_weights: str = "imagenet") -> ModelMetadata:
    """Train the family that `model_config` belongs to on DATA_DIR/train/good; write one checkpoint.

    Args:
        data_dir: a dataset in the MVTec AD layout; only DATA_DIR/train/good is read.
        out: the checkpoint (.pt) to write; checked before any training starts.
        model_config: STMAEConfig (presets: models/stmae.py) or FilteringAEConfig.
        cfg: epochs, batch, held-out fraction, threshold rule, crops, input shape (TrainConfig).
        backbone_weights: "imagenet", a torchvision-compatible weight file, or "random" (tests).

    Returns:
        The model's metadata, as written into the checkpoint.

    Raises:
        ConfigError: inconsistent settings ("none" backbone weights for ST-MAE).
        WeightsError: the backbone's weights are missing or do not match its architecture.
        DatasetError: no training images, good images that all show the same pixels, or an unreadable one
            (all counted, the first five named, before training starts; cfg.skip_unreadable leaves them out instead, and
            then too few readable ones).
        ConfigError: also too few good images to hold some out and still train.
        TrainingError: the loss or the model's output is NaN or infinite, or the good images' scores do
            not vary (a threshold on them would fail every other image).
        OutputError: `out` cannot be written.
        DatasetError, ConfigError: with cfg.defects_dir, a labelled set that defect_head.labelled_defects
            refuses, or a model that cannot take the head (with_defect_head), before any training.
    """
    is_filtering = isinstance(model_config, FilteringAEConfig)
    if backbone_weights == "none" and not is_filtering:
        raise ConfigError("backbone weights 'none' would train on an uninitialised backbone; "
                          "use 'imagenet', a weight file path, or 'random'")
    defects = None
    if cfg.defects_dir:
        model_config = with_defect_head(model_config)
    check_writable(out)
    warn_replacing(out)  # said before minutes of training, while the user can still stop them
    seed_everything(cfg.seed)
    paths = data.train_images(data_dir)
    if cfg.defects_dir:  # every labelled file read before the good ones and before any training
        defects = labelled_defects(cfg.defects_dir, data_dir)
    paths = capped(paths, cfg)
    goods = good_images(paths, cfg)  # every file read and decoded once, before any training
    train_paths, holdout_paths, holdout_source = goods.train, goods.holdout, goods.holdout_source
    paths = [p for p in paths if p in goods.sizes]
    logger.info("%d good images held out for the threshold, %s", len(holdout_paths), holdout_source)
    # Cross-fitting needs the held-out images to be like the training ones, and one image per item
    score_folds = 0 if cfg.holdout_dir or cfg.crop else cfg.score_folds
    if cfg.score_folds and not score_folds:
        logger.info("score head calibrated on the held-out images, not cross-fitted (--holdout-dir or --crop)")
    train_items, holdout_items = train_paths, holdout_paths
    size_of = goods.sizes  # for the crop check, the aspect choice and the sizes the runtime will accept
    if cfg.crop:
        # The model then takes crop x crop inputs: tiles cut at native scale, never resized.
        model_config = replace(model_config, input_size=cfg.crop)
        small = sum(min(size_of[p]) <= cfg.crop for p in paths)
        if small:  # every crop of such an image is the same mirrored image: fewer distinct samples than counted
            logger.warning("%d of %d good images are no larger than --crop %d on a side: their crops repeat one "
                           "another (mirror-padded), so the held-out crops overstate how far the threshold is "
                           "measured; crop smaller than the images", small, len(paths), cfg.crop)
        train_items = data.random_crops(train_paths, cfg.crop, cfg.crops_per_image, cfg.seed)
        holdout_items = data.random_crops(holdout_paths, cfg.crop, cfg.crops_per_image, cfg.seed + 1,
                                          "cutting held-out crops")

    started = time.perf_counter()
    keep_aspect, aspect_reason = choose_keep_aspect(cfg, paths, [size_of[p] for p in paths])
    logger.info("input shape: %s", aspect_reason)
    if not cfg.crop:  # crops are cut at the input size: neither enlarged nor squashed
        warn_about_sizes(size_of, model_config.input_size, keep_aspect)
    color, color_reason = choose_color(cfg, goods)
    logger.info("colour: %s", color_reason)
    preprocessing = preprocessing_for(model_config, cfg.bit_depth, keep_aspect, color)
    if cfg.bit_depth == 16:
        hint_bit_depth(paths)
    # What the runtime accepts: crops are the model's whole input; whole images come in their sizes.
    trained_sizes = TrainedSizes.of([(cfg.crop, cfg.crop)] if cfg.crop
                                    else [size_of[p] for p in (*train_paths, *holdout_paths)])
    logger.info("images accepted at run time: near %s", trained_sizes.describe())
    if defects is not None:
        warn_about_labelled_sizes(defects, trained_sizes)
        warn_about_labelled_colour(defects, goods)
    cross_fitted = None
    if is_filtering:
        model, history = train_filtering(model_config, preprocessing, train_items, cfg)
        family, provenance = FILTERING_FAMILY, {"self_supervised": True}
    else:
        model, history, cross_fitted, defect_head = train_stmae(
            model_config, preprocessing, train_items, cfg, backbone_weights, holdout_items, score_folds,
            image_count=len(train_paths) + len(holdout_paths), defects=defects)
        family, provenance = STMAE_FAMILY, {"self_supervised": cfg.self_supervised,
                                            "backbone_weights": backbone_weights}
        if defect_head is not None:
            provenance["defect_head"] = defect_head
        if cross_fitted is not None:
            provenance["score_head"] = (f"fitted on all {len(cross_fitted)} good images; its scales and the image "
                                        f"threshold from {min(score_folds, len(cross_fitted))}-fold cross-fitted "
                                        "scores")

    holdout_maps, holdout_scores = score_images(model, preprocessing, holdout_items, description="held-out scores")
    if cross_fitted is not None:
        holdout_scores = cross_fitted.numpy()  # the image threshold's good scores: every good image's
    check_scores_vary(holdout_scores, "good images' scores")
    stats = ScoreStats.from_scores(holdout_scores)
    # A score head scores images on its own scale: regions in the map get statistics of their own.
    map_stats = None
    if getattr(model_config, "score_layers", ()):
        check_scores_vary(map_maxima(holdout_maps), "held-out good images' map maxima")
        map_stats = ScoreStats.from_scores(map_maxima(holdout_maps))
    thresholds = Thresholds.from_stats(stats, cfg.sigma, map_stats,
                                       scored="held-out" if cross_fitted is None else "cross-fitted")
    metadata = ModelMetadata(
        model_family=family,
        config=model_config.to_dict(),
        preprocessing=preprocessing,
        score_stats=stats,
        map_stats=map_stats,
        thresholds=thresholds,
        trained_sizes=trained_sizes,
        training={
            "data_dir": str(Path(data_dir).resolve()),  # absolute: verify and calibrate read it from anywhere
            "train_images": len(train_paths),
            "holdout_images": len(holdout_paths),
            "holdout": holdout_source,
            "good_images_sha256": goods.fingerprint(),  # which images trained and which were held out
            "unreadable_left_out": len(goods.left_out),  # good images that could not be read (skip_unreadable)
            # How many held-out scores (images, or crops with `crop`; with a cross-fitted score head, every
            # good image's) the image threshold fails: with score_stats.count, how far it can be trusted
            # (evaluation.operating_point.holdout_check).
            "holdout_above_threshold": int(np.count_nonzero(fails(holdout_scores, thresholds.image))),
            "threshold_scores": int(len(holdout_scores)),  # of how many: every good image's, where cross-fitted
            "crop": cfg.crop,  # 0: whole images resized to the input size; else native-scale crops
            "aspect": aspect_reason,
            "color": color_reason,
            "colour_images": len(goods.colour),  # good images in colour: where > 0, gray frames later are news
            **provenance,
            "train_config": recorded_settings(cfg),
            "loss_per_epoch": history,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )
    return save_where_possible(Path(out), model, metadata)


def recorded_settings(cfg: TrainConfig) -> dict:
    """The settings as the training record keeps them: defects_dir only where given (older readers,
    TrainConfig(**it), take the rest); folders as absolute paths (add-defects draws the same held-out
    images again, from wherever it runs)."""
    settings = {k: v for k, v in asdict(cfg).items() if k != "defects_dir" or v}
    for name in ("holdout_dir", "defects_dir"):
        if settings.get(name):
            settings[name] = str(Path(settings[name]).resolve())
    return settings


def save_where_possible(out: Path, model: torch.nn.Module, metadata: ModelMetadata) -> ModelMetadata:
    """The checkpoint at `out`; where that fails after training (its disk filled up meanwhile, say), in the
    temp folder instead, so that the training is not lost, and an error naming both.

    Raises:
        OutputError: `out` could not be written (the message says where the model went, if anywhere).
    """
    try:
        return save_checkpoint(out, model, metadata)
    except OutputError as exc:
        rescue = Path(tempfile.gettempdir()) / f"{out.stem}.{secrets.token_hex(4)}{out.suffix}"
        try:
            save_checkpoint(rescue, model, metadata)
        except OutputError:
            raise exc from None
        raise OutputError(f"{exc}; the trained model was saved to {rescue} instead: move it where it belongs "
                          "(the training is not lost)") from exc


def check_scores_vary(scores: np.ndarray, what: str) -> None:
    """Raises TrainingError where the good images' scores do not vary: the threshold, mean + sigma x std,
    would then sit on their one value and fail every other image (copies of one picture in train/good,
    re-encoded or shifted by noise the model cannot see)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.std() <= 1e-9 * max(1.0, abs(float(scores.mean()))):
        raise TrainingError(f"the {scores.size} {what} are all {scores.mean():.6g}: the good images look alike to "
                            "the model, and a threshold on them would fail every other image; train on "
                            "photographs of several good parts")


def warn_about_labelled_sizes(defects: LabelledDefects, trained_sizes: TrainedSizes) -> None:
    """Says where labelled images are of sizes that `predict` refuses for this model: the head learns
    from them all the same, but nothing on the line will look like them."""
    refused = [(path, size) for path, size in defects.sizes.items() if trained_sizes.refusal(*size)]
    if refused:
        (first, (height, width)) = refused[0]
        logger.warning("--defects: %d of the %d labelled images are of sizes that `predict` refuses for this model "
                       "(first: %s, %dx%d; trained on %s); the head learns from them all the same: label images "
                       "like the line's", len(refused), len(defects.sizes), first.name, width, height,
                       trained_sizes.describe())


def warn_about_labelled_colour(defects: LabelledDefects, goods: GoodImages) -> None:
    """Says where the labelled images are colour and every good image gray, or the other way round: they
    then likely come from another camera than the line's, and the head learns a difference that the
    line's parts will not show (a gray model reads colour images as gray all the same)."""
    count, good_count = len(defects.sizes), len(goods.train) + len(goods.holdout)
    if defects.colour and not goods.colour:
        logger.warning("--defects: %d of the %d labelled images are colour (first: %s), and all %d good images gray; "
                       "label images from the line's camera", len(defects.colour), count, defects.colour[0].name,
                       good_count)
    elif goods.colour and not defects.colour:
        logger.warning("--defects: all %d labelled images are gray, and %d of the %d good images colour; label "
                       "images from the line's camera", count, len(goods.colour), good_count)


def with_defect_head(model_config: STMAEConfig | FilteringAEConfig) -> STMAEConfig:
    """The config with the labelled-defect head that --defects trains (training/defect_head.py).

    Raises:
        ConfigError: a filtering autoencoder, or a preset whose map has no wide Gaussian.
    """
    if isinstance(model_config, FilteringAEConfig):
        raise ConfigError("--defects is an stmae option: the filtering autoencoder learns from synthetic defects")
    if not model_config.wide_window:
        raise ConfigError("--defects needs a preset whose map has the wide Gaussian (small, tiny, small-wide-map): "
                          "the head reads both Gaussians")
    return replace(model_config, defect_hidden=model_config.defect_hidden or DEFECT_HIDDEN, defect_rectified=True)


def train_stmae(model_config: STMAEConfig, preprocessing: Preprocessing, items: Sequence[ImageInput],
                cfg: TrainConfig, backbone_weights: str, holdout: Sequence[ImageInput] = (),
                score_folds: int = 0, image_count: int | None = None, defects: LabelledDefects | None = None,
                ) -> tuple[STMAE, list[float], torch.Tensor | None, dict | None]:
    """Features once (and the score head's), then the transformer on them; residual statistics from
    the training images; with a fused map, the per-position Gaussian from the training images and the
    fusion's scale from the held-out ones. The score head with two smoothings and score_folds: fitted on
    the training and held-out images together, cross-fitted (fit_score_head_cross_fitted), and the
    cross-fitted image scores returned (else None: the head from the training images, its scales from
    the held-out ones). `image_count`: the good images behind `items` and `holdout` (fewer where they
    are crops), for the memory estimate's --max-images. With `defects`, last, the labelled-defect head,
    and what the metadata records of it returned (else None)."""
    model = STMAE(model_config, backbone_weights=backbone_weights)
    # said before the backbone pass: every item's features (crops', corrupted copies') are kept
    kept_sets = (len(items) + len(holdout) + (cfg.corruptions_per_image * len(items) if cfg.self_supervised else 0)
                 + (kept_feature_sets(defects, len(items)) if defects is not None else 0))
    warn_if_short(image_count or len(items) + len(holdout), kept_sets,
                  kept_bytes_per_image(model, preprocessing.input_size))
    if model_config.intensity_norm:
        fit_intensity_target(model, preprocessing, items)
    features, score_features = extract_feature_pairs(model, preprocessing, items, description="backbone features")
    two_scales = bool(model_config.score_layers) and model_config.score_wide_sigma > 0
    cross_fit = two_scales and score_folds > 0
    if score_folds > 0 and not cross_fit and model_config.score_layers:
        logger.info("the score head has one smoothing in this preset: its scale and the image threshold come from "
                    "the held-out images (--score-folds applies to heads with two smoothings)")
    if score_features is not None and not cross_fit:
        fit_score_head(model, score_features)
        score_features = None
    mean, std = feature_statistics(features)
    model.feature_mean.copy_(mean)
    model.feature_std.copy_(std)
    inputs = targets_of = None
    if cfg.self_supervised:
        inputs, targets_of = corrupted_features(model, preprocessing, items, cfg)
    history = fit(model, features, cfg, inputs, targets_of)
    del inputs
    if model_config.position_norm:
        mean, std = residual_statistics(model, features)
        model.residual_mean.copy_(mean)
        model.residual_std.copy_(std)
    cross_fitted = None
    if model_config.gaussian_weight > 0 or two_scales:
        if len(holdout) < 2:
            raise ConfigError("the fused map and the score head's two smoothings need at least two held-out "
                              "good images for their scales")
        holdout_features, holdout_score_features = extract_feature_pairs(
            model, preprocessing, holdout, description="held-out features", with_score=two_scales)
        if model_config.gaussian_weight > 0:
            fit_gaussian(model, features, holdout_features)
        if cross_fit:
            goods = torch.cat([score_features, holdout_score_features])
            if len(goods) < score_folds:  # a handful of good images: one fold each
                logger.info("%d good images: the score head cross-fitted in %d folds, not %d", len(goods),
                            len(goods), score_folds)
            cross_fitted = fit_score_head_cross_fitted(model, goods, min(score_folds, len(goods)), cfg.seed)
        elif two_scales:
            fit_score_scales(model, holdout_score_features)
        if defects is not None:
            labelled = extract_features(model, preprocessing, [s.path for s in defects.samples],
                                        description="labelled defects")
            normal = features[torch.from_numpy(normal_images(len(features), cfg.seed))]
            return model, history, cross_fitted, fit_defect_head(model, preprocessing, defects, labelled, normal,
                                                                 holdout_features, cfg.seed)
    return model, history, cross_fitted, None


@torch.no_grad()
def fit_intensity_target(model: STMAE, preprocessing: Preprocessing, items: Sequence[ImageInput],
                         batch_size: int = 32) -> None:
    """The intensity every image is brought to: the training images' average mean and std, after
    preprocessing (models/intensity.py)."""
    means, stds = [], []
    with progress_bar("intensity", len(items)) as advance:
        for chunk in batches(items, batch_size):
            mean, std = image_statistics(torch.from_numpy(preprocessing(chunk)).double())
            means.append(mean.flatten())
            stds.append(std.flatten())
            advance(len(chunk))
    model.intensity.target.copy_(torch.tensor([torch.cat(means).mean(), torch.cat(stds).mean()]))


PCA_SAMPLES = 200_000  # feature vectors, at most, that principal directions are computed from


class VectorSample:
    """Principal directions of feature vectors (N, C, G, G) over images and positions, from a seeded
    sample of at most `samples` (PCA_SAMPLES) vectors, gathered from consecutive chunks of the N images:
    the same sample, in the same order, however the images are chunked, so the same directions without
    the N images' features in memory at once."""

    def __init__(self, images: int, positions: int, channels: int, samples: int | None = None, seed: int = 0):
        samples = PCA_SAMPLES if samples is None else samples
        total = images * positions
        self.positions, self.seen = positions, 0
        self.chosen = (torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:samples]
                       if total > samples else None)  # None: every vector, in order
        self.rows: list[torch.Tensor] | torch.Tensor = [] if self.chosen is None else torch.empty(len(self.chosen), channels)

    def add(self, chunk: torch.Tensor) -> None:
        """The next images' features (b, C, G, G)."""
        vectors = chunk.permute(0, 2, 3, 1).reshape(-1, chunk.shape[1])
        if self.chosen is None:
            self.rows.append(vectors.clone())
        else:
            start = self.seen * self.positions
            inside = (self.chosen >= start) & (self.chosen < start + len(vectors))
            self.rows[inside] = vectors[self.chosen[inside] - start]
        self.seen += len(chunk)

    def directions(self, count: int) -> torch.Tensor:
        """The top `count` principal directions (C, count) of the sample."""
        vectors = (torch.cat(self.rows) if isinstance(self.rows, list) else self.rows).double()
        _, _, directions = torch.linalg.svd(vectors - vectors.mean(dim=0), full_matrices=False)
        return directions[:count].T.float()


@torch.no_grad()
def fit_score_head(model: STMAE, score_features: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """The image score head from the training images' raw deep features (as score_inputs gives them to
    it): their principal directions, and a Gaussian per score-grid position of the projected features.
    `rows`: the images of score_features to fit on (default: all), without copying them out.

    Two passes over the images, GAUSSIAN_CHUNK at a time (principal directions from their sample of
    vectors, then the Gaussian's sums), so that the head's inputs are never all in memory."""
    rows = torch.arange(len(score_features)) if rows is None else rows

    def input_chunks():
        for start in range(0, len(rows), GAUSSIAN_CHUNK):
            yield model.score_inputs(score_features[rows[start:start + GAUSSIAN_CHUNK]])

    sample = None
    for inputs in input_chunks():
        if sample is None:
            sample = VectorSample(len(rows), inputs.shape[2] * inputs.shape[3], inputs.shape[1])
        sample.add(inputs)
    projection = sample.directions(model.score_projection.shape[1])
    del sample
    model.score_projection.copy_(projection)
    sums = PositionGaussianSums()
    for inputs in input_chunks():
        sums.add(torch.einsum("bchw,cd->bdhw", inputs, projection))
    mean, precision = sums.fit(model.config.gaussian_eps)
    model.score_mean.copy_(mean)
    model.score_precision.copy_(precision)


@torch.no_grad()
def fit_score_scales(model: STMAE, holdout_score_features: torch.Tensor) -> None:
    """The (mean, std) over held-out good images of the score head's narrow and wide maxima, which put
    the two on one scale (STMAE.image_score)."""
    model.score_scale_stats.copy_(z_score_table([[m] for m in scale_maxima_of(model, holdout_score_features)]))


@torch.no_grad()
def scale_maxima_of(model: STMAE, score_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the score head's narrow and wide maxima (STMAE.scale_maxima), in chunks."""
    maxima = [model.scale_maxima(model.score_distance(chunk)) for chunk in score_features.split(64)]
    return torch.cat([n for n, _ in maxima]), torch.cat([w for _, w in maxima])


@torch.no_grad()
def fit_score_head_cross_fitted(model: STMAE, score_features: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """The score head fitted on every good image in `score_features`, with its two smoothings' scales
    from cross-fitted maxima: the images in seeded folds, each fold's maxima from a head fitted on the
    other folds. Returns each image's score from those maxima (N,): good scores that no head was fitted on.

    Raises:
        ConfigError: fewer images than folds.
    """
    count = len(score_features)
    if count < folds:
        raise ConfigError(f"{count} good images are too few for {folds} score folds; use fewer (--score-folds)")
    fold = torch.from_numpy(np.random.default_rng(seed).permutation(count) % folds)
    narrow, wide = torch.zeros(count), torch.zeros(count)
    with progress_bar("score head, cross-fitted", folds) as advance:
        for k in range(folds):
            inside = fold == k
            fit_score_head(model, score_features, torch.nonzero(~inside).flatten())
            narrow[inside], wide[inside] = scale_maxima_of(model, score_features[inside])
            advance()
    fit_score_head(model, score_features)
    model.score_scale_stats.copy_(z_score_table([[narrow], [wide]]))
    return model.scale_score(narrow, wide)


@torch.no_grad()
def fit_gaussian(model: STMAE, features: torch.Tensor, holdout_features: torch.Tensor, batch_size: int = 32) -> None:
    """The fused map's parts: projection, per-position Gaussian of the Gaussian's inputs (training
    images), with wide_window the wide Gaussian of the same inputs averaged over neighbouring cells,
    and the (mean, std) of each map over held-out good images, which put them on one scale.

    The inputs are never all in memory (720 KB per image on the default preset: 5,000 images would not
    fit 16 GB): the transformer runs over the training features twice, once for the principal
    directions' sample of vectors, once for the Gaussians' sums, GAUSSIAN_CHUNK images at a time."""
    c = model.config

    def pieces(raw: torch.Tensor):  # moves the progress bar opened below, a chunk at a time
        for chunk in raw.split(batch_size):
            f = model.standardize(chunk.float())
            recon = model.reconstruct(f)
            yield f, recon, model.gaussian_input(f, recon)
            advance(len(chunk))

    def input_groups():
        """The Gaussian's inputs of the training images, in consecutive groups of GAUSSIAN_CHUNK."""
        waiting: list[torch.Tensor] = []
        for _, _, x in pieces(features):
            waiting.append(x)
            while sum(len(w) for w in waiting) >= GAUSSIAN_CHUNK:
                joined = torch.cat(waiting)
                yield joined[:GAUSSIAN_CHUNK]
                waiting = [joined[GAUSSIAN_CHUNK:]] if len(joined) > GAUSSIAN_CHUNK else []
        if waiting:
            yield torch.cat(waiting)

    passes = 1 + bool(c.gaussian_dim or c.wide_window)  # over the training features; then the held-out ones
    with progress_bar("Gaussian statistics", passes * len(features) + len(holdout_features)) as advance:
        if c.gaussian_dim or c.wide_window:  # first pass: the samples the principal directions come from
            sharp = wide = None
            for group in input_groups():
                if sharp is None:
                    shape = (len(features), group.shape[2] * group.shape[3], group.shape[1])
                    sharp, wide = VectorSample(*shape), VectorSample(*shape)
                sharp.add(group)
                if c.wide_window:
                    wide.add(model.wide_input(group))
            if c.gaussian_dim:
                model.gaussian_projection.copy_(sharp.directions(c.gaussian_dim))
            if c.wide_window:
                model.wide_projection.copy_(wide.directions(model.wide_projection.shape[1]))
            del sharp, wide
        sharp_sums, wide_sums = PositionGaussianSums(), PositionGaussianSums()
        for group in input_groups():  # second pass: the Gaussians' sums
            sharp_sums.add(torch.einsum("bchw,cd->bdhw", group, model.gaussian_projection))
            if c.wide_window:
                wide_sums.add(torch.einsum("bchw,cd->bdhw", model.wide_input(group), model.wide_projection))
        mean, precision = sharp_sums.fit(c.gaussian_eps)
        model.gaussian_mean.copy_(mean)
        model.gaussian_precision.copy_(precision)
        if c.wide_window:
            mean, precision = wide_sums.fit(c.gaussian_eps)
            model.wide_mean.copy_(mean)
            model.wide_precision.copy_(precision)
        transition, gaussian, wide = [], [], []
        for f, recon, x in pieces(holdout_features):
            transition.append(model.transition_map(f, recon))
            gaussian.append(model.gaussian_map(x))
            if c.wide_window:
                wide.append(model.wide_map(x))
        model.fusion_stats.copy_(z_score_table([transition, gaussian]))
        if c.wide_window:
            model.wide_stats.copy_(z_score_table([wide]))

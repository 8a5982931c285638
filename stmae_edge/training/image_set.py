"""The good images a training run uses, read once before any training starts.

    train/good (or --max-images of it) --> survey: every file read, hashed and decoded once, with a
    progress bar; an unreadable one stops the run here, all counted at once, five named (or, with
    skip_unreadable, is left out with a warning) --> copies warned about --> training and held-out
    images (a seeded fraction, or --holdout-dir's) --> their shapes, for the input's aspect and the
    sizes the runtime will accept.

Decoding costs about half a millisecond per magnetic_tile image, against the minutes of training that
a file found corrupt in the middle of the run (or, for a held-out image, after it) would throw away.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import data
from ..data import MIN_GOOD_IMAGES, SurveyedImages, survey
from ..errors import ConfigError, DatasetError
from ..preprocessing import TrainedSizes, declared_image_size, load_image
from .loop import TrainConfig

logger = logging.getLogger(__name__)

# "auto" keeps the aspect ratio where the training images' width-to-height ratios differ by more than
# this factor: stretching them all to one square then distorts their texture by different amounts
# (magnetic_tile: 0.36 to 2.61). Images of one shape are stretched alike and keep every input pixel.
ASPECT_SPREAD_TO_KEEP = 1.25
TRAINING_REMEDY = "Replace or remove them, or train without them (--skip-unreadable)"
COMPANY = 0.01  # a good image with fewer others than this fraction near its size is said (at least one)
ENLARGED_AT_MOST = 2  # a good image enlarged more than this to the input is said
SQUASHED_AT_MOST = 4  # a good image stretched to the square input from a wider aspect than this is said


@dataclass(frozen=True)
class GoodImages:
    """What a training run fits on and what it holds out, every file among them read and decoded."""
    train: list[Path]
    holdout: list[Path]
    holdout_source: str  # where the held-out images come from, in words
    sizes: dict[Path, tuple[int, int]]  # every image's (height, width) as shown
    left_out: list[str]  # the messages of unreadable files left out (skip_unreadable)
    colour: tuple[Path, ...] = ()  # those whose pixels are not gray (preprocessing.looks_gray)
    digests: dict[Path, str] = field(default_factory=dict)  # each image's decoded pixels' sha256 (data.survey)

    def fingerprint(self) -> str:
        """A sha256 of which images, by name and pixels, are training and which held-out ones: what a model
        records of them, so that a head added later (training/add_defects.py) is fitted on the same ones."""
        lines = [f"{role}\t{path.name}\t{self.digests[path]}\n"
                 for role, paths in (("train", self.train), ("holdout", self.holdout)) for path in paths]
        return hashlib.sha256("".join(lines).encode()).hexdigest()


def capped(paths: Sequence[Path], cfg: TrainConfig) -> list[Path]:
    """train/good's images, or cfg.max_images of them drawn by the seed (in their order): what training,
    and add-defects after it, draw the good images from."""
    if not cfg.max_images:
        return list(paths)
    return [paths[i] for i in sorted(np.random.default_rng(cfg.seed).permutation(len(paths))[:cfg.max_images])]


def good_images(paths: Sequence[Path], cfg: TrainConfig) -> GoodImages:
    """The training images and the held-out good images: cfg.holdout_dir's images beside every image in
    `paths`, or a seeded holdout_fraction of `paths`. Every file is surveyed first.

    Raises:
        DatasetError: an unreadable image (unless cfg.skip_unreadable); good images that all show the
            same pixels; fewer than two training images;
            holdout_dir is not a folder of at least two images, or shares an image with `paths` (the same
            pixels): its images would then be scored by a model fitted on them.
        ConfigError: too few good images to hold some out and still train.
    """
    goods = survey(paths, "good images in train/good", cfg.skip_unreadable, TRAINING_REMEDY)
    if goods.turned:  # a phone's photos, say: the line's frames must come turned the same way
        logger.warning("%d of the good images are turned or mirrored by their files' orientation tags (EXIF; "
                       "first: %s), as viewers show them, and the model learns them so: frames from a camera "
                       "given as arrays carry no such tag, so give them in the same orientation",
                       len(goods.turned), goods.turned[0].name)
    if goods.unreadable and len(goods.paths) < MIN_GOOD_IMAGES:  # what --skip-unreadable left
        raise DatasetError(f"{len(goods.paths)} of the {len(paths)} good images in train/good can be read; training "
                           f"needs at least {MIN_GOOD_IMAGES}")
    if len(goods.paths) > 1 and len(set(goods.digests.values())) == 1:
        raise DatasetError(f"the {len(goods.paths)} good images in train/good all show the same pixels: a model "
                           "needs photographs of several good parts (or of one part, taken apart) to learn "
                           "how they vary")
    if not cfg.holdout_dir:
        warn_about_copies(goods)
        train, holdout = split_holdout(goods.paths, cfg.holdout_fraction, cfg.seed)
        return GoodImages(train, holdout, "drawn at random from train/good", goods.sizes, goods.unreadable, goods.colour,
                          goods.digests)
    if len(goods.paths) < 2:
        raise DatasetError(f"{len(goods.paths)} training image(s): training needs at least two")
    held = data.images_in(cfg.holdout_dir)
    if left_out := data.not_read_in(Path(cfg.holdout_dir)):
        logger.warning("%s: not read: %s; the threshold is set on the %d images directly in it", cfg.holdout_dir,
                       left_out, len(held))
    if len(held) < 2:
        raise DatasetError(f"{cfg.holdout_dir}: {len(held)} images; hold out at least two good images")
    held = survey(held, f"held-out good images in {cfg.holdout_dir}", cfg.skip_unreadable, TRAINING_REMEDY)
    if len(held.paths) < 2:
        raise DatasetError(f"{cfg.holdout_dir}: {len(held.paths)} readable images; hold out at least two good images")
    shared = set(held.digests.values()) & set(goods.digests.values())
    if shared:
        first = next(path for path, digest in held.digests.items() if digest in shared)
        twin = next(path for path, digest in goods.digests.items() if digest == held.digests[first])
        count = f"{len(shared)} of its images are" if len(shared) > 1 else "1 of its images is"
        raise DatasetError(f"{cfg.holdout_dir}: {count} also in train/good (first: {first.name}, the same "
                           f"pixels as {twin.name}); hold out good images of parts that train/good does not show")
    return GoodImages(list(goods.paths), held.paths, f"from {cfg.holdout_dir}", goods.sizes | held.sizes,
                      goods.unreadable + held.unreadable, goods.colour + held.colour, goods.digests | held.digests)


def image_sizes(paths: Sequence[Path]) -> list[tuple[int, int]]:
    """(height, width) of each image file, from its header (nothing decoded).

    Raises:
        InvalidImageError: naming the file whose header declares no usable size.
    """
    return [declared_image_size(path) for path in paths]


def choose_keep_aspect(cfg: TrainConfig, paths: Sequence[Path],
                       sizes: Sequence[tuple[int, int]] | None = None) -> tuple[bool, str]:
    """(keep the aspect ratio?, why), for TrainConfig.aspect. Crops are square and never resized.
    `sizes`: the images' (height, width), where the caller has read them already."""
    if cfg.crop:
        return False, "crops are taken at the input size"
    if cfg.aspect != "auto":
        return cfg.aspect == "keep", f"--aspect {cfg.aspect}"
    ratios = np.array([width / height for height, width in (sizes if sizes is not None else image_sizes(paths))])
    spread = float(ratios.max() / ratios.min())
    keep = spread > ASPECT_SPREAD_TO_KEEP
    why = (f"training images' width/height from {ratios.min():.2f} to {ratios.max():.2f}: "
           + ("aspect kept, mirror-padded" if keep else "stretched to the input"))
    return keep, why


def choose_color(cfg: TrainConfig, goods: GoodImages) -> tuple[str, str]:
    """(Preprocessing.color, why), for TrainConfig.color: "auto" reads images as gray where every good
    image is gray, so that a colour camera's frames later are scored on the intensities the model learnt."""
    count = len(goods.train) + len(goods.holdout)
    colour = len(goods.colour)
    if cfg.color == "auto":
        if not colour:
            return "gray", f"all {count} good images are gray: images are read as gray (colour ones converted)"
        return "rgb", (f"{colour} of {count} good images are colour (first: {goods.colour[0].name}): images are "
                       "read in colour")
    if cfg.color == "gray" and colour:
        logger.info("--color gray: %d of %d good images are colour and are read as gray", colour, count)
    if cfg.color == "rgb" and not colour:
        logger.info("--color rgb: all %d good images are gray; a colour image later will look unlike every one of "
                    "them", count)
    return cfg.color, f"--color {cfg.color}"


def warn_about_sizes(sizes: dict[Path, tuple[int, int]], input_size: int, keep_aspect: bool) -> None:
    """Say so where some good images are far from the others' size, or would be resized far from theirs.

    The sizes the runtime accepts reach from the smallest training image to the largest (TrainedSizes):
    one stray thumbnail or strip among the parts widens them to almost anything. An image far below the
    input is enlarged (its texture blurred, as the line's parts will not be), and one much wider than
    high is squashed into the square input where aspects are not kept (--crop cuts strips into tiles).
    """
    if not sizes:
        return
    far = sorted(p for p, alone in zip(sizes, sizes_without_company(list(sizes.values())), strict=True) if alone)
    if far:
        h, w = sizes[far[0]]
        logger.warning("%d of %d good images have a size that hardly any other has (first: %s, %dx%d): the "
                       "runtime accepts sizes near any training image, so they widen what it takes to %s; remove "
                       "them unless the line shows parts that way", len(far), len(sizes), far[0].name, w, h,
                       TrainedSizes.of(list(sizes.values())).describe())
    # fitted inside the input, an image is enlarged by input / its longer side; stretched, by input / its shorter
    small = sorted(p for p, (h, w) in sizes.items()
                   if (max(h, w) if keep_aspect else min(h, w)) * ENLARGED_AT_MOST < input_size)
    if small:
        h, w = sizes[small[0]]
        logger.warning("%d of %d good images are enlarged more than %dx to the model's %d-pixel input (first: %s, "
                       "%dx%d): their texture is blurred; a smaller preset's input suits such images better",
                       len(small), len(sizes), ENLARGED_AT_MOST, input_size, small[0].name, w, h)
    if not keep_aspect:
        squashed = sorted(p for p, (h, w) in sizes.items() if max(h / w, w / h) > SQUASHED_AT_MOST)
        if squashed:
            h, w = sizes[squashed[0]]
            logger.warning("%d of %d good images are squashed more than %dx into the square input (first: %s, "
                           "%dx%d): for strips, train on square tiles cut from them (--crop)", len(squashed),
                           len(sizes), SQUASHED_AT_MOST, squashed[0].name, w, h)


def sizes_without_company(sizes: Sequence[tuple[int, int]], chunk: int = 512) -> np.ndarray:
    """(N,) bool: whether an image has fewer than COMPANY of the others (at least one) near its size, as
    near as the runtime's check (TrainedSizes.refusal) holds an image to a training image's. Tiles of
    many shapes (magnetic_tile: width/height 0.36 to 2.61) each have many; a stray thumbnail has none."""
    h, w = (np.array(side, dtype=np.float64) for side in zip(*sizes, strict=True))
    a = w / h
    side, wide = TrainedSizes.SIDE_FACTOR, TrainedSizes.ASPECT_FACTOR
    needed = max(1, int(np.ceil(COMPANY * len(sizes))))
    company = np.zeros(len(sizes), dtype=np.int64)
    for start in range(0, len(sizes), chunk):  # (chunk, N) comparisons at a time: bounded memory
        hs, ws, as_ = (x[start:start + chunk, None] for x in (h, w, a))
        near = ((h / side <= hs) & (hs <= h * side) & (w / side <= ws) & (ws <= w * side)
                & (a / wide <= as_) & (as_ <= a * wide))
        company[start:start + chunk] = near.sum(axis=1) - 1  # not itself
    return company < needed


def hint_bit_depth(paths: Sequence[Path], sample: int = 8) -> None:
    """Say so where 16-bit training images never go above 12 (or 10) bits: a Mono12 or Mono10 camera's
    frames stored in 16-bit files, which `--bit-depth 16` reads at a sixteenth (or less) of the range."""
    images = [load_image(path) for path in paths[:sample]]
    if not images or any(image.dtype != np.uint16 for image in images):
        return
    top = max(int(image.max()) for image in images)
    for bits in (10, 12):
        if 0 < top < 1 << bits:
            logger.warning("the training images are 16-bit files whose pixels stop at %d (the first %d read): if "
                           "the camera gives %d bits (Mono%d), train with --bit-depth %d so they span the full range",
                           top, len(images), bits, bits, bits)
            return


def warn_about_copies(images: SurveyedImages) -> None:
    """Say so where train/good holds one picture more than once (the same pixels under two names or in
    two formats, a link to another of its files): copies fall on both sides of the held-out split and
    of the cross-fitting folds, and the good images' count overstates how far the threshold is measured."""
    by_content: dict[str, list[Path]] = {}
    for path in images.paths:
        by_content.setdefault(images.digests[path], []).append(path)
    copies = [group for group in by_content.values() if len(group) > 1]
    if copies:
        extra = sum(len(group) - 1 for group in copies)
        logger.warning("train/good holds %s in it, the same pixels (first: %s); they count as more good images "
                       "than there are, on both sides of the held-out split: remove them",
                       "1 copy of another image" if extra == 1 else f"{extra} copies of other images",
                       " = ".join(p.name for p in copies[0]))


def split_holdout(paths: Sequence[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """(training images, held-out images): a seeded `fraction` of `paths` held out, at least two.

    Raises:
        ConfigError: too few images to hold out and still train on two.
    """
    order = np.random.default_rng(seed).permutation(len(paths))
    n_holdout = max(2, int(round(len(paths) * fraction)))
    if len(paths) - n_holdout < 2:
        raise ConfigError(f"{len(paths)} good images are too few to hold out {n_holdout} and still train (add "
                          "good images, or raise --max-images if it limits them)")
    holdout = sorted(paths[i] for i in order[:n_holdout])
    train = sorted(paths[i] for i in order[n_holdout:])
    return train, holdout

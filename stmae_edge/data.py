"""Datasets in the MVTec AD layout: train/good, test/<type>, ground_truth/<type>/<name>_mask.png (the
folders' names in any case), and the one reading of a set of image files before long work uses them
(survey: every file decoded once, all unreadable ones named together).

A mask may also carry the image's own name (ground_truth/<type>/<name>.png), as datasets converted to
this layout often do, and any image suffix the reader takes."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import unicodedata
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DatasetError, InvalidImageError
from .machine import available_cores
from .preprocessing import (
    check_image,
    cv2,
    declared_image_size,
    decode,
    load_image,
    looks_gray,
    mirror_pad,
    read_image_bytes,
    shown_size,
    turned_by_its_file,
)
from .progress import progress_bar

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".tif", ".tiff"}
LOSSY_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif"}
# Image formats that are not read: a folder holding such files says so, rather than seeming to hold fewer
UNREAD_IMAGE_SUFFIXES = {".webp", ".gif", ".jp2", ".j2k", ".heic", ".heif", ".avif", ".pgm", ".ppm", ".pnm",
                         ".exr", ".hdr", ".dng", ".raw"}
UNREADABLE_NAMED = 5  # unreadable files named in an error or warning; the rest counted
MIN_GOOD_IMAGES = 4  # training takes at least this many good images
SURVEY_THREADS = min(8, available_cores())
MASK_COVERS_MOST = 0.9  # a mask marking more of its image than this is likely inverted
GOOD = "good"  # the folder of defect-free images, in train/ and test/ (any case: Good, GOOD)
# Mask file names tried for an image <name>, in this order: MVTec AD's, then the image's own name.
MASK_NAMES = ("{name}_mask", "{name}")

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSample:
    path: Path
    defect_type: str  # "good" (test/good in any case) or the defect folder's name
    mask_path: Path | None  # None for good images and for datasets without ground truth

    @property
    def label(self) -> int:
        return int(self.defect_type != GOOD)


def images_in(folder: Path | str) -> list[Path]:
    """The image files of one folder, sorted by name. Hidden files are not images: macOS leaves a
    `._name.png` (AppleDouble metadata) beside every file it copies to a foreign disk. What else the
    folder holds that a user may take for images: not_read_in."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: not a folder of images")
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def not_read_in(folder: Path, ignore: Sequence[Path] = ()) -> str:
    """What images_in leaves out of `folder` that a user may take for images, in words ("" if nothing):
    images in a format that is not read (UNREAD_IMAGE_SUFFIXES), links that lead to no file, and the
    images of its subfolders but those in `ignore` (a command's own output folder there)."""
    other = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")
                   and (p.suffix.lower() in UNREAD_IMAGE_SUFFIXES or (p.suffix.lower() in IMAGE_SUFFIXES
                                                                     and not p.exists())))
    nested = subfolders = 0
    ignored = {Path(p).resolve() for p in ignore}
    here = folder.resolve()
    for sub in folder.iterdir():
        if not sub.is_dir() or sub.name.startswith("."):
            continue
        target = sub.resolve()
        if target in ignored or target == here or target in here.parents:  # a link back up: this folder's own
            continue
        subfolders += 1
        with contextlib.suppress(OSError):  # a subfolder this user may not list: nothing to say of it
            nested += len(images_in(sub))
    parts = []
    if other:
        parts.append(f"{len(other)} file{'s' if len(other) > 1 else ''} in another format or linking to nothing "
                     f"(first: {other[0]}; images are read from {', '.join(sorted(IMAGE_SUFFIXES))} files)")
    if nested:
        parts.append(f"{nested} image{'s' if nested > 1 else ''} in its subfolders")
    elif subfolders:  # images deeper down (a tree by date, line and camera): say the folders are there
        parts.append(f"{subfolders} subfolder{'s' if subfolders > 1 else ''} (images are read from the folder "
                     "given, not below it)")
    return " and ".join(parts)


def child_folder(parent: Path, name: str) -> Path:
    """parent/name, or the one folder of that name in another case or Unicode form (Train/Good as
    written by hand; a name with an accent written on a Mac), as the disk spells it; parent/name where
    there is none. By listing, not by trying the name: a case-insensitive disk (macOS's) finds
    parent/name under any spelling, and messages would then show the spelling asked for."""
    try:
        entries = list(parent.iterdir())
    except OSError:  # not a folder, or one that may be entered but not listed (mode 711): the name as given
        return parent / name
    matches = [p for p in entries if name_key(p.name) == name_key(name) and p.is_dir()]
    exact = [p for p in matches if p.name == name]
    return (exact or matches)[0] if len(exact or matches) == 1 else parent / name


@dataclass(frozen=True)
class SurveyedImages:
    """Image files that were read and decoded: each one's (height, width) as shown and a sha256 of its
    decoded pixels (the same picture under two names or in two formats has one); `unreadable` holds
    the message of each file that could not be, in the order given."""
    paths: list[Path]
    sizes: dict[Path, tuple[int, int]]
    digests: dict[Path, str]
    unreadable: list[str]
    turned: tuple[Path, ...] = ()  # read turned or mirrored by their files' orientation tags (EXIF)
    colour: tuple[Path, ...] = ()  # whose pixels are not gray (preprocessing.looks_gray)


def survey(paths: Sequence[Path], role: str, skip_unreadable: bool = False,
           remedy: str = "Replace or remove them", digests: bool = True, progress: bool = True) -> SurveyedImages:
    """Read and decode every file once (nothing kept but its size and, with `digests`, its pixels'
    digest), on a few threads: OpenCV's decoders and hashlib let go of the GIL.

    Args:
        paths: image files.
        role: what they are, in words, for the progress bar and messages ("good images in train/good").
        skip_unreadable: leave unreadable files out with a warning instead of raising.
        remedy: what the error tells the user to do.
        digests: take each image's pixel_digest (for copies; an empty dict without).
        progress: show a progress bar (a sample of a few dozen images needs none).

    Raises:
        DatasetError: a file cannot be read or decoded (all such files counted, the first few named),
            unless `skip_unreadable`.
    """
    if not paths:
        return SurveyedImages([], {}, {}, [])

    def examine(path: Path) -> tuple[tuple[int, int], str, bool, bool] | str:
        try:
            raw = read_image_bytes(path)
            size = shown_size(raw)
            pixels = decode(raw, str(path))
            check_image(pixels, str(path))
        except InvalidImageError as exc:
            return str(exc) if str(path) in str(exc) else f"{path}: {exc}"
        return size, pixel_digest(pixels) if digests else "", turned_by_its_file(raw), not looks_gray(pixels)

    sizes, found, unreadable, turned, colour = {}, {}, [], [], []
    bar = progress_bar(f"reading {role}", len(paths)) if progress else contextlib.nullcontext(lambda n=1: None)
    with bar as advance, ThreadPoolExecutor(max_workers=min(SURVEY_THREADS, len(paths))) as pool:
        for path, outcome in zip(paths, pool.map(examine, paths), strict=True):  # in order, as they finish
            if isinstance(outcome, str):
                unreadable.append(outcome)
            else:
                sizes[path], digest, was_turned, is_colour = outcome
                if digests:
                    found[path] = digest
                if was_turned:
                    turned.append(path)
                if is_colour:
                    colour.append(path)
            advance()
    if unreadable:
        if not skip_unreadable:
            raise DatasetError(f"{len(unreadable)} of {len(paths)} {role} cannot be read: {first_named(unreadable)}. "
                               f"{remedy}")
        logger.warning("%d of %d %s cannot be read and are left out: %s", len(unreadable),
                       len(paths), role, first_named(unreadable))
    return SurveyedImages([p for p in paths if p in sizes], sizes, found, unreadable, tuple(turned), tuple(colour))


def first_named(unreadable: Sequence[str]) -> str:
    """The first UNREADABLE_NAMED files that cannot be read, then how many more, for one line."""
    more = len(unreadable) - UNREADABLE_NAMED
    return "; ".join(unreadable[:UNREADABLE_NAMED]) + (f"; and {more} more" if more > 0 else "")


def pixel_digest(pixels: np.ndarray) -> str:
    """sha256 of an image's shape, type and pixels: equal for the same picture in any file format."""
    return hashlib.sha256(f"{pixels.shape} {pixels.dtype.str} ".encode() + pixels.tobytes()).hexdigest()


def train_images(root: Path | str) -> list[Path]:
    """DATA_DIR/train/good's images (that folder alone: images in its subfolders are not read, and said so).

    Raises:
        DatasetError: no such folder (naming DATA_DIR's parent where DATA_DIR is train/good itself), or
            fewer than 4 images.
    """
    root = Path(root)
    folder = child_folder(child_folder(root, "train"), GOOD)
    if not folder.is_dir():
        hint = (f"; give the dataset's folder, {root.parent.parent}, not train/good itself"
                if root.name.lower() == GOOD and root.parent.name == "train" else "")
        raise DatasetError(f"{root}: no train/good folder; expected the MVTec AD layout "
                           f"(DATA_DIR/train/good/*.png, DATA_DIR/test/<type>/*.png){hint}")
    paths = images_in(folder)
    left_out = not_read_in(folder)
    if left_out:
        logger.warning("%s: not read: %s; training uses the %d images directly in it", folder, left_out, len(paths))
    if len(paths) < MIN_GOOD_IMAGES:
        where = f" (not read: {left_out})" if left_out else ""
        raise DatasetError(f"{folder}: {len(paths)} image{'s' if len(paths) != 1 else ''}{where}; training needs at "
                           f"least {MIN_GOOD_IMAGES} good images")
    return paths


def eval_samples(root: Path | str, both_classes: bool = True, warn_unmasked: bool = True) -> list[EvalSample]:
    """DATA_DIR/test/<type>/* with their masks; with `both_classes`, refused unless good and defective
    images are both there (AUROC needs both; a false-reject threshold needs only good ones). Without
    `warn_unmasked`, defective images without a mask are left for the caller to say."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: " + ("not a folder" if root.exists() else "no such folder")
                           + "; give a dataset folder in the MVTec AD layout (DATA_DIR/test/...)")
    folder = child_folder(root, "test")
    truth = child_folder(root, "ground_truth")
    if not folder.is_dir():
        raise DatasetError(f"{root}: no test folder; expected DATA_DIR/test/good and DATA_DIR/test/<defect>")
    samples = []
    if loose := images_in(folder):  # a user's first try at the layout: said, not silently left out
        logger.warning("%s: %d image%s directly in it (first: %s) not scored: test images go in test/good and "
                       "test/<defect type>", folder, len(loose), "s" if len(loose) > 1 else "", loose[0].name)
    for type_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        # test/Good or test/GOOD are the good images too: counted as a defect type, their scores would
        # set a threshold that fails every part
        defect_type = GOOD if name_key(type_dir.name) == GOOD else type_dir.name
        masks = {} if defect_type == GOOD else files_by_name(child_folder(truth, type_dir.name))  # listed once
        found = images_in(type_dir)
        for path in found:
            samples.append(EvalSample(path, defect_type, None if defect_type == GOOD else find_mask(masks, path)))
        if left_out := not_read_in(type_dir):
            logger.warning("%s: not scored: %s", type_dir, left_out)
        elif not found:  # a type with no images would vanish from the per-type figures without a word
            logger.warning("%s: no images; its type is left out of the figures", type_dir)
    labels = {s.label for s in samples}
    if not samples or (both_classes and labels != {0, 1}):
        raise DatasetError(f"{folder}: evaluation needs both good and defective test images, found "
                           f"{sorted({s.defect_type for s in samples}) or 'none'}")
    unmasked = [s for s in samples if s.label == 1 and s.mask_path is None]
    if unmasked and truth.is_dir() and warn_unmasked:
        first = unmasked[0]
        logger.warning("%d of %d defective test images have no mask (first: %s, looked for %s), so pixel "
                       "metrics are left out", len(unmasked), sum(s.label for s in samples), first.path,
                       " or ".join(f"ground_truth/{first.defect_type}/{n.format(name=first.path.stem)}.png"
                                   for n in MASK_NAMES) + ", or another image suffix")
    return samples


def files_by_name(folder: Path) -> dict[str, Path]:
    """The files of `folder` by name_key (none where it is missing)."""
    return {name_key(p.name): p for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}


def name_key(name: str) -> str:
    """A file name as matched: lower case, Unicode composed (macOS writes "é" as e and an accent, other
    systems as one character, so an image and its mask named alike could differ byte for byte). Lower
    case, not case folded: folding makes "Maße" and "Masse" one name, which no disk does."""
    return unicodedata.normalize("NFC", name).lower()


def may_be_one_file(name: str) -> str:
    """A key under which two names that some disk may take for one file are equal: case folded and
    composed, as macOS's and Windows' case-insensitive disks compare them, or more. For names this
    package writes, where taking two names for one costs only a suffix."""
    return unicodedata.normalize("NFC", name).casefold()


def find_mask(by_name: dict[str, Path], image: Path) -> Path | None:
    """The ground-truth mask of `image` among a mask folder's files (files_by_name): MASK_NAMES, any
    image suffix in any case, .png first; or None."""
    suffixes = [".png", *sorted(IMAGE_SUFFIXES - {".png"})]
    for pattern in MASK_NAMES:
        for suffix in suffixes:
            candidate = by_name.get(name_key(pattern.format(name=image.stem) + suffix))
            if candidate is not None:
                return candidate
    return None


def folder_of(paths: Sequence[Path]) -> str:
    """Where a set of images lies, for a user reading what a command used: their folder, or how many."""
    folders = {str(Path(p).parent.resolve()) for p in paths}
    return folders.pop() if len(folders) == 1 else f"{len(folders)} folders"


def recorded_train_images(training: dict, count: int, seed: int = 0) -> list[Path]:
    """A seeded sample of the good images a model was trained on (its metadata's `training` record),
    when they are still where training found them: the default for verification and calibration."""
    source = training.get("data_dir")
    if not source:
        raise DatasetError("no --images given and the model records no training folder")
    if not Path(source).is_absolute() and not (Path(source) / "train" / "good").is_dir():
        # models trained before the record was made absolute: relative to wherever training ran
        raise DatasetError(f"the model records its training folder as {source!r}, relative to where it was trained, "
                           "and it is not found from here: give --images FOLDER of good images")
    paths = train_images(source)
    order = np.random.default_rng(seed).permutation(len(paths))[:count]
    # a model trained with --skip-unreadable left some out: so do its verification, calibration and bench
    return survey([paths[i] for i in sorted(order)], f"training images in {source}", skip_unreadable=True,
                  digests=False, progress=False).paths


def has_masks(samples: list[EvalSample]) -> bool:
    """Pixel metrics are meaningful only when every defective image has a mask."""
    return all(s.mask_path is not None for s in samples if s.label == 1)


def load_mask(sample: EvalSample, size: tuple[int, int]) -> np.ndarray:
    """Ground truth at (height, width) as bool; all False for good images."""
    return fit_mask(sample, size)[0]


def fit_mask(sample: EvalSample, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int] | None, float]:
    """(ground truth at (height, width) as bool, the mask file's own (height, width), None without one,
    and the share of the mask file's own pixels that mark a defect: a thin scratch may vanish in the
    fitted mask and still be there)."""
    if sample.mask_path is None:
        return np.zeros(size, dtype=bool), None, 0.0
    mask = load_image(sample.mask_path)
    if mask.ndim == 3:
        # Colour channels only: an alpha channel (a mask saved as RGBA or gray+alpha by an image
        # editor) is 255 wherever the mask is opaque, which is everywhere
        mask = (mask[:, :, :3] if mask.shape[2] == 4 else mask[:, :, :1] if mask.shape[2] == 2 else mask).max(axis=2)
    # Any nonzero pixel is defect in a lossless mask (0/255, 0/1 and label masks alike); in a JPEG mask,
    # whose compression leaves faint noise around each region, only pixels above half its maximum
    lossy = sample.mask_path.suffix.lower() in LOSSY_SUFFIXES
    defect = mask > (mask.max() / 2 if lossy else 0)
    # Nearest keeps the mask binary; maps are compared at the same resolution.
    fitted = cv2.resize(defect.astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST) > 0
    return fitted, mask.shape[:2], float(defect.mean())


def mask_faults(mask_size: tuple[int, int], image_size: tuple[int, int], covered: float) -> set[str]:
    """What is wrong with a defect mask (fit_mask's size and share of defect, its image's size): "size"
    (another size than its image: likely another image's mask), "empty" (it marks no pixel), "inverted"
    (it marks more than MASK_COVERS_MOST of the image: defects black on white, or an opaque background).
    `evaluate` warns of each; `train --defects` refuses all but an empty one, whose image it leaves out."""
    faults = {"size"} if mask_size != image_size else set()
    if covered == 0:
        faults.add("empty")
    elif covered > MASK_COVERS_MOST:
        faults.add("inverted")
    return faults


def load_masks(samples: list[EvalSample], size: tuple[int, int]) -> np.ndarray:
    """Every sample's ground truth at (height, width), stacked (N, H, W) bool. Masks whose own size
    differs from their image's are resized all the same, and one warning says how many: a mask of
    another shape usually belongs to another image, and the pixel metrics would then mislead."""
    masks, mismatched, empty, most, vanished = [], [], [], [], []
    for sample in samples:
        mask, mask_size, covered = fit_mask(sample, size)  # decoded once; its image's size from its header
        masks.append(mask)
        if mask_size is None:
            continue
        faults = mask_faults(mask_size, image_size := declared_image_size(sample.path), covered)
        if "size" in faults:
            mismatched.append((sample, mask_size, image_size))
        if covered > 0 and not mask.any():
            vanished.append(sample.mask_path)
        if "empty" in faults:
            empty.append(sample.mask_path)
        elif "inverted" in faults:
            most.append((sample.mask_path, covered))
    if empty:  # its image's pixels all count as normal, its defect as a false alarm
        logger.warning("%d masks of defective images mark no defect pixel (first: %s): their images' pixels all "
                       "count as normal in the pixel metrics", len(empty), empty[0])
    if vanished:  # a defect thinner than a pixel of the maps: scored as normal, its detection a false alarm
        logger.warning("%d masks lose every defect pixel when brought to the maps' %dx%d (first: %s): their defects "
                       "are thinner than the maps resolve, and count as normal pixels in the pixel metrics",
                       len(vanished), size[1], size[0], vanished[0])
    if most:  # an inverted mask (defects black on white), or a background of label 1 or opaque white
        logger.warning("%d masks mark more than %d%% of their image as defect (first: %s, %.0f%%): defects must "
                       "be the nonzero (white) pixels on a zero (black) background; check that they are not "
                       "inverted", len(most), round(100 * MASK_COVERS_MOST), most[0][0], 100 * most[0][1])
    if mismatched:
        first, (mh, mw), (ih, iw) = mismatched[0]
        logger.warning("%d of %d masks differ in size from their images (first: %s is %dx%d, its image %dx%d); "
                       "they were resized to fit: check that each mask belongs to its image", len(mismatched),
                       sum(s.mask_path is not None for s in samples), first.mask_path, mw, mh, iw, ih)
    return np.stack(masks) if masks else np.zeros((0, *size), bool)


def random_crops(paths: list[Path], size: int, per_image: int, seed: int = 0,
                 description: str = "cutting crops") -> list[np.ndarray]:
    """`per_image` seeded random size x size crops of each image at its native resolution (no
    resizing), for models that will see tiles of a larger image, such as a line-scan strip. Images
    smaller than the crop are mirrored at their borders up to it. A progress bar: line-scan strips of
    tens of megapixels take a while to decode."""
    rng = np.random.default_rng(seed)
    crops = []
    with progress_bar(description, len(paths)) as advance:
        for path in paths:
            image = mirror_pad(load_image(path), size, size)
            for _ in range(per_image):
                y = int(rng.integers(0, image.shape[0] - size + 1))
                x = int(rng.integers(0, image.shape[1] - size + 1))
                crops.append(np.ascontiguousarray(image[y:y + size, x:x + size]))
            advance()
    return crops

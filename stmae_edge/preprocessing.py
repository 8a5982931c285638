"""The one definition of preprocessing, shared by training, evaluation, export and the runtime.

numpy and OpenCV only (no torch), so the edge runtime uses exactly the code that training used.
Pipeline: decode (8- or 16-bit, gray, colour or with alpha) -> float in [0, 1] (uint16: bit_depth bits)
-> [gray models: colour to gray] -> resize to the model's input size -> RGB (gray replicated) ->
(x - mean) / std per channel -> NCHW float32.

A model trained on gray images (`color="gray"`, chosen by `train` where every good image is gray) reads
colour images as gray, as it learnt them: a colour camera on a line trained with a mono one, or a mono
camera's frames saved as colour files, are scored on the intensities the model knows.

With `keep_aspect` the resize keeps the image's aspect ratio (its long side fills the input) and the
rest of the input is the image mirrored, centred (`content_box`); the network's maps then cover more
than the image, and `to_image_frame` crops them to the image's box and resizes that to the input size,
so every consumer (thresholds, regions, evaluation against masks) sees maps laid out as without it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .checks import is_whole
from .errors import ConfigError, InvalidImageError
from .image_header import declared_size, jpeg_orientation, tiff_orientation, tiff_pages

# What a file may make the decoder allocate: checked against the size its header declares, before
# decoding (image_header). OpenCV's own process-wide cap (OPENCV_IO_MAX_IMAGE_PIXELS) is left to the host
# program: a line-scan host reloading its own long strips must not find them refused after importing us.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024

MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_INPUT_SIDE = 4096

COLORS = ("rgb", "gray")  # Preprocessing.color
# An image whose channels differ by at most this, on average over its pixels and relative to its
# brightest value, is gray: a mono camera's frames saved as colour JPEGs differ by a level or two.
GRAY_SPREAD_AT_MOST = 0.02

ImageInput = str | os.PathLike | np.ndarray


def as_items(images) -> tuple[list, bool]:
    """(the images as a list, whether one image was given). A list, a tuple or a 4-d array is a batch;
    anything else is one image (and load_image says clearly when it is not one): the one rule of the
    Detector's calls and of Preprocessing."""
    single = not (isinstance(images, (list, tuple)) or (isinstance(images, np.ndarray) and images.ndim == 4))
    return ([images] if single else list(images)), single


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input tensor. Stored in every checkpoint and ONNX file."""

    input_size: tuple[int, int] = (256, 256)  # (height, width) fed to the network
    # "rgb": the network sees colour images' channels, gray images replicated to three; "gray": every
    # image is read as gray (colour converted, 0.299 R + 0.587 G + 0.114 B) and replicated to three.
    color: str = "rgb"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # on [0, 1] intensities
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    layout: str = "NCHW"
    resize: str = "area"  # cv2.INTER_AREA: alias-free downscaling of large camera frames
    max_pixels: int = field(default=MAX_IMAGE_PIXELS)
    # Significant bits of uint16 pixels: 16 for full-range data, 10 or 12 for Mono10 / Mono12 cameras,
    # whose uint16 values stop at 1023 or 4095. uint8 pixels are 8-bit whatever this says.
    bit_depth: int = 16
    # Keep the image's aspect ratio (mirror-padded to the input size) instead of stretching it: texture
    # keeps its proportions on images of varying shape (docs/BENCHMARKS.md, issue 15).
    keep_aspect: bool = False

    def __post_init__(self) -> None:
        if self.color not in COLORS or self.layout != "NCHW":
            raise ConfigError(f"unsupported preprocessing color={self.color!r} layout={self.layout!r}; "
                              f"color is one of {', '.join(COLORS)}, layout NCHW")
        if self.resize not in _INTERPOLATION:
            raise ConfigError(f"unknown resize mode {self.resize!r}; use one of {sorted(_INTERPOLATION)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("mean and std need three values each, std > 0")
        if len(self.input_size) != 2 or not all(16 <= v <= MAX_INPUT_SIDE for v in self.input_size):
            raise ConfigError(f"input size {self.input_size} must be two sides within 16..{MAX_INPUT_SIDE}")
        check_bit_depth(self.bit_depth)
        if not 0 < self.max_pixels <= MAX_IMAGE_PIXELS:
            raise ConfigError(f"max_pixels {self.max_pixels} must be within 1..{MAX_IMAGE_PIXELS}")
        if not isinstance(self.keep_aspect, bool):
            raise ConfigError(f"keep_aspect must be true or false, got {self.keep_aspect!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        if self.bit_depth == 16:
            # Written only when it differs from 16: the model digest covers this dictionary, so models
            # made before the setting existed keep their digest, and older runtimes still read 16-bit ones.
            del d["bit_depth"]
        if not self.keep_aspect:
            del d["keep_aspect"]  # as bit_depth: digests of earlier models unchanged, older runtimes read them
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        d = dict(d)
        d["input_size"] = tuple(int(v) for v in d["input_size"])
        d["mean"] = tuple(float(v) for v in d["mean"])
        d["std"] = tuple(float(v) for v in d["std"])
        return cls(**d)  # bit_depth as written: 12.9 is refused, not read as 12

    def __call__(self, images: ImageInput | Sequence[ImageInput],
                 sources: Sequence[ImageInput] | None = None) -> np.ndarray:
        """One image or a list of them -> float32 batch (N, 3, H, W).

        Args:
            sources: what each image was read from, where the caller decoded the files itself: an
                error then names the file.

        Raises:
            InvalidImageError: naming the file (or the image's index in the call).
        """
        images, _ = as_items(images)
        batch = np.empty((len(images), 3, *self.input_size), np.float32)
        for i, image in enumerate(images):
            try:
                self.tensor(load_image(image, self.max_pixels), out=batch[i])
            except InvalidImageError as exc:
                raise InvalidImageError(name_the_image(image if sources is None else sources[i], i, exc)) from None
        return batch

    def tensor(self, image: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """A decoded image (H, W[, C], uint8/uint16/float) -> normalised (3, H, W) float32, into `out`
        if given. Resizing happens before the gray-to-RGB and channel-order steps: resize works per
        channel, so the result is the same as converting first, at a fraction of the work. A gray model's
        colour image is made gray first, for the same reason."""
        x = to_float(image, self.bit_depth)
        if self.color == "gray" and x.ndim == 3 and x.shape[2] == 3:
            x = cv2.cvtColor(x, cv2.COLOR_BGR2GRAY)
        x = self._laid_out(x, _INTERPOLATION[self.resize])
        out = np.empty((3, *self.input_size), np.float32) if out is None else out
        for c, plane in enumerate(rgb_planes(x)):  # (x - mean) / std, straight into the channel-first slot
            np.multiply(plane, np.float32(1.0 / self.std[c]), out=out[c])
            out[c] -= np.float32(self.mean[c] / self.std[c])
        return out

    def _laid_out(self, x: np.ndarray, interpolation: int) -> np.ndarray:
        """Pixels (H, W[, C]) laid out over the network's input: resized to it, or with keep_aspect fitted
        into it and mirror-padded."""
        height, width = self.input_size
        if self.keep_aspect:
            top, left, box_height, box_width = self.content_box(*x.shape[:2])
            if x.shape[:2] != (box_height, box_width):
                x = cv2.resize(x, (box_width, box_height), interpolation=interpolation)
            # OpenCV mirrors again where a margin is wider than the image (a 1-pixel line is repeated)
            return cv2.copyMakeBorder(x, top, height - box_height - top, left, width - box_width - left,
                                      cv2.BORDER_REFLECT_101)
        if x.shape[:2] != (height, width):
            x = cv2.resize(x, (width, height), interpolation=interpolation)
        return x

    def mask_tensor(self, mask: np.ndarray) -> np.ndarray:
        """A defect mask over an image's own pixels (H, W), bool -> the share of defect in each pixel of
        the network's input (input_size, float32), laid out as tensor() lays out the image: where the
        image is mirrored into a margin, so is its defect (a head trained on labelled defects learns
        from what the network sees there)."""
        return self._laid_out(np.asarray(mask, np.float32), cv2.INTER_AREA)

    def content_box(self, image_height: int, image_width: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the image inside the network's input: all of it when stretching;
        with keep_aspect, the image scaled to fit, centred."""
        height, width = self.input_size
        if not self.keep_aspect:
            return 0, 0, height, width
        scale = min(height / image_height, width / image_width)
        box_height = min(height, max(1, round(image_height * scale)))
        box_width = min(width, max(1, round(image_width * scale)))
        return (height - box_height) // 2, (width - box_width) // 2, box_height, box_width

    def to_image_frame(self, maps: np.ndarray, sizes: Sequence[tuple[int, int]]) -> np.ndarray:
        """The network's maps (N, H, W) -> maps at the input size covering each image's own extent (the
        image of size sizes[i] stretched), as a model without keep_aspect gives them. Unchanged without it."""
        if not self.keep_aspect:
            return maps
        height, width = self.input_size
        out = np.empty((len(maps), height, width), np.float32)
        for i, (image_height, image_width) in enumerate(sizes):
            top, left, box_height, box_width = self.content_box(image_height, image_width)
            box = np.ascontiguousarray(maps[i, top:top + box_height, left:left + box_width], dtype=np.float32)
            out[i] = box if box.shape == (height, width) else cv2.resize(box, (width, height),
                                                                          interpolation=cv2.INTER_LINEAR)
        return out


@dataclass(frozen=True)
class TrainedSizes:
    """The sizes of the images a model was trained on, and how far from them an image may be before
    it is refused rather than scored: a camera whose region of interest was set wrong (a thin strip, a
    thumbnail, a frame four times larger) would otherwise get a confident verdict on features the
    model never saw at that scale or shape. Recorded by `train`; models without it accept any size.

    An image passes with each side within [smallest / SIDE_FACTOR, largest * SIDE_FACTOR] of the
    training images' and its width/height within [narrowest / ASPECT_FACTOR, widest * ASPECT_FACTOR].
    """

    height: tuple[int, int]  # (smallest, largest) training image height, pixels
    width: tuple[int, int]
    aspect: tuple[float, float]  # (smallest, largest) width / height

    SIDE_FACTOR = 4.0
    ASPECT_FACTOR = 2.0

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            low, high = getattr(self, name)
            if not (is_whole(low) and is_whole(high) and 1 <= low <= high):
                raise ConfigError(f"trained image {name}s {getattr(self, name)!r} must be two whole numbers, "
                                  "1 <= smallest <= largest")
        low, high = self.aspect
        if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and 0 < low <= high < float("inf")):
            raise ConfigError(f"trained width/height range {self.aspect!r} must be two numbers, 0 < smallest <= largest")

    @classmethod
    def of(cls, sizes: Sequence[tuple[int, int]]) -> TrainedSizes:
        """From the (height, width) of every training image."""
        heights, widths = [h for h, _ in sizes], [w for _, w in sizes]
        aspects = [w / h for h, w in sizes]
        return cls((min(heights), max(heights)), (min(widths), max(widths)), (min(aspects), max(aspects)))

    def refusal(self, height: int, width: int) -> str | None:
        """Why an image of this size is refused (None: accepted)."""
        side, wide = self.SIDE_FACTOR, self.ASPECT_FACTOR
        if not (self.height[0] / side <= height <= self.height[1] * side
                and self.width[0] / side <= width <= self.width[1] * side
                and self.aspect[0] / wide <= width / height <= self.aspect[1] * wide):
            return (f"{width}x{height} pixels is far from the images this model was trained on ({self.describe()}); "
                    "check the camera's region of interest and send the whole part as in training, or score it "
                    "anyway with --any-size (Detector(..., check_size=False))")
        return None

    def describe(self) -> str:
        (h0, h1), (w0, w1), (a0, a1) = self.height, self.width, self.aspect
        widths = f"{w0}" if w0 == w1 else f"{w0} to {w1}"
        heights = f"{h0}" if h0 == h1 else f"{h0} to {h1}"
        return f"{widths} wide, {heights} high, width/height {a0:.2f}" + ("" if a0 == a1 else f" to {a1:.2f}")

    def to_dict(self) -> dict:
        return {"height": list(self.height), "width": list(self.width), "aspect": list(self.aspect)}

    @classmethod
    def from_dict(cls, d: dict) -> TrainedSizes:
        return cls(tuple(d["height"]), tuple(d["width"]), tuple(float(v) for v in d["aspect"]))


def name_the_image(image: ImageInput, index: int, error: InvalidImageError) -> str:
    """The error's message led by what the user gave: the file's path, or the image's index in the call
    for an array, so that one bad image in a batch is found without a search."""
    if isinstance(image, (str, os.PathLike)):
        return str(error) if str(image) in str(error) else f"{image}: {error}"
    return f"image {index}: {error}"


def check_bit_depth(bit_depth) -> None:
    """Raises ConfigError unless `bit_depth` is a whole number within 9..16 (Preprocessing.bit_depth)."""
    if not is_whole(bit_depth) or not 9 <= bit_depth <= 16:
        raise ConfigError(f"bit depth {bit_depth!r} must be an integer within 9..16 (the significant bits of "
                          "uint16 pixels: 10 or 12 for Mono10/Mono12 cameras, 16 for full range)")


_INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image(image: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS,
               sizes_accepted: TrainedSizes | None = None) -> np.ndarray:
    """Read a file (or check an array) and return it as decoded pixels, untouched: (H, W) or (H, W, C).

    Raises:
        InvalidImageError: not an image, unreadable, over `max_pixels`, or far from `sizes_accepted`
            (a file's by its header, before anything is decoded).
    """
    if isinstance(image, np.ndarray):
        array = image
        source = f"array of shape {image.shape} and dtype {image.dtype}"
    elif not isinstance(image, (str, os.PathLike)):
        raise InvalidImageError(f"{type(image).__name__} is not an image: give a numpy array or a file path")
    else:
        source = str(image)
        array = decode(read_image_bytes(image), source, max_pixels, sizes_accepted)  # size checked first
    check_image(array, source, max_pixels)
    if isinstance(image, np.ndarray) and sizes_accepted is not None and (why := sizes_accepted.refusal(*array.shape[:2])):
        raise InvalidImageError(why)  # a file's was checked on its header, in decode
    return array


def declared_image_size(path: Path | str) -> tuple[int, int]:
    """(height, width) that an image file's header declares; nothing is decoded.

    Raises:
        InvalidImageError: naming the file: unreadable, or a header that declares no usable size.
    """
    try:
        return shown_size(read_image_bytes(path))
    except InvalidImageError as exc:
        raise InvalidImageError(name_the_image(path, 0, exc)) from None


def shown_size(data: np.ndarray) -> tuple[int, int]:
    """(height, width) that an image file's bytes declare, as viewers show it (EXIF orientation applied).

    Raises:
        InvalidImageError: a header that declares no usable size.
    """
    return _declared(memoryview(data))[1]


def turned_by_its_file(data: np.ndarray) -> bool:
    """Whether an image file's orientation tag (a JPEG's EXIF, a TIFF's) turns or mirrors its pixels
    when read: a camera's frames handed over as arrays carry no such tag."""
    fmt, _, orientation = _declared(memoryview(data))
    return (tiff_orientation(memoryview(data)) if fmt == "TIFF" else orientation) != 1


def _declared(data: memoryview) -> tuple[str, tuple[int, int], int]:
    """(format, (height, width) as shown, the EXIF orientation to apply after decoding: 1 but for a JPEG
    that says otherwise). A TIFF's Orientation tag turns the shown size only: OpenCV turns its pixels."""
    fmt, width, height = declared_size(data)
    orientation = jpeg_orientation(data) if fmt == "JPEG" else 1
    turn = tiff_orientation(data) if fmt == "TIFF" else orientation
    return fmt, ((width, height) if turn >= 5 else (height, width)), orientation  # a quarter turn swaps


def read_image_bytes(path: Path | str) -> np.ndarray:
    """An image file's bytes (uint8), after its size is checked against MAX_FILE_BYTES: the one way
    every reader of user images (decoding, headers for shapes) opens them. The file is opened once and
    checked through that handle, so a file replaced or removed meanwhile is refused, not half-read.

    Raises:
        InvalidImageError: no such file, an empty or oversized one, or one that cannot be read (a
            folder without permission, a name too long, a file removed while it is read).
    """
    path = Path(path)
    try:
        # before opening: opening a pipe for reading would wait for a writer
        kind = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError, ValueError):  # ValueError: a NUL byte, which no name holds
        raise InvalidImageError(f"{path}: no such image file") from None
    except OSError as exc:  # a folder without permission, a name too long, a loop of links
        raise InvalidImageError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if stat.S_ISDIR(kind):
        raise InvalidImageError(f"{path} is a folder, not an image file")
    if not stat.S_ISREG(kind):
        raise InvalidImageError(f"{path} is not a regular file (a device, pipe or socket); give an image file")
    try:
        # non-blocking: a file swapped for a pipe since the check must not wait for a writer
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with open(descriptor, "rb") as file:
            opened = os.fstat(file.fileno())
            if not stat.S_ISREG(opened.st_mode):  # replaced by something else since the check above
                raise InvalidImageError(f"{path} is not a regular file (a device, pipe or socket); give an image file")
            size = opened.st_size
            if size == 0:
                raise InvalidImageError(f"{path}: an empty file (0 bytes), not an image")
            if size > MAX_FILE_BYTES:
                raise InvalidImageError(f"{path}: file size {size} bytes is above {MAX_FILE_BYTES} "
                                        f"({MAX_FILE_BYTES >> 20} MiB), the most an image file may have")
            data = np.empty(size, dtype=np.uint8)
            read = file.readinto(memoryview(data))  # a file cut short meanwhile gives fewer bytes
    except FileNotFoundError:
        raise InvalidImageError(f"{path}: no such image file") from None
    except OSError as exc:
        raise InvalidImageError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if not read:
        raise InvalidImageError(f"{path}: an empty file (0 bytes), not an image")
    return data[:read]


def decode(data: np.ndarray, source: str, max_pixels: int = MAX_IMAGE_PIXELS,
           sizes_accepted: TrainedSizes | None = None) -> np.ndarray:
    """File bytes -> pixels, for the formats image_header reads, after their declared size is checked
    against `max_pixels`, and against `sizes_accepted` where given (as decoding will turn the image).

    Raises:
        InvalidImageError: an unsupported format, a declared size over `max_pixels` or far from
            `sizes_accepted`, a TIFF of several pages, or bytes OpenCV cannot decode (corrupt, truncated, or rewritten while it
            was read, as in a camera's hot folder).
    """
    try:
        fmt, (height, width), orientation = _declared(memoryview(data))
    except InvalidImageError as exc:
        raise InvalidImageError(f"{source}: {exc}") from None
    if width * height > max_pixels:
        raise InvalidImageError(f"{source}: {width}x{height} pixels exceeds the limit of {max_pixels} "
                                f"(declared by its {fmt} header); crop or downscale it first")
    if sizes_accepted is not None and (why := sizes_accepted.refusal(height, width)):
        raise InvalidImageError(f"{source}: {why}")
    if fmt == "TIFF" and (pages := tiff_pages(memoryview(data))) > 1:
        # OpenCV decodes the first page only: the rest of the part would pass uninspected, without a word
        raise InvalidImageError(f"{source}: a TIFF of {pages} pages, of which only the first would be scored; "
                                "save each page as an image file of its own")
    try:
        array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # some codecs raise instead of returning None
        reason = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else "decoder error"
        raise InvalidImageError(f"{source}: {fmt} data cannot be decoded ({reason}); the file is corrupt, "
                                "truncated or was being written") from None
    if array is None:
        raise InvalidImageError(f"{source}: {fmt} data cannot be decoded; the file is corrupt, truncated "
                                "or was being written")
    # As viewers and annotation tools show it (and masks are drawn on): IMREAD_UNCHANGED leaves EXIF
    # orientation unapplied, so a phone's portrait photo would be scored, and its mask laid, on its side
    return oriented(array, orientation)


def oriented(array: np.ndarray, orientation: int) -> np.ndarray:
    """The stored pixels turned and mirrored as EXIF orientation 1..8 says a viewer shows them."""
    if orientation == 2:
        return cv2.flip(array, 1)
    if orientation == 3:
        return cv2.rotate(array, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(array, 0)
    if orientation == 5:  # transpose
        return np.ascontiguousarray(np.swapaxes(array, 0, 1))
    if orientation == 6:
        return cv2.rotate(array, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:  # transverse
        return np.ascontiguousarray(np.swapaxes(array, 0, 1)[::-1, ::-1])
    if orientation == 8:
        return cv2.rotate(array, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return array


def check_image(array: np.ndarray, source: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    if array.ndim not in (2, 3) or array.size == 0:
        raise InvalidImageError(f"{source}: expected an image of shape (H, W) or (H, W, C), not {array.shape}")
    if array.ndim == 3 and array.shape[2] not in (1, 3, 4):
        # (N, H, W): most likely a stack of gray frames, which one 3-d array cannot be told from
        batch = (f"; for a batch of {array.shape[0]} gray frames give a list, or an array (N, H, W, 1)"
                 if array.shape[2] > 4 else "")
        raise InvalidImageError(f"{source}: {array.shape[2]} channels; use 1 (gray), 3 (BGR) or 4 (BGRA){batch}")
    if array.shape[0] * array.shape[1] > max_pixels:
        raise InvalidImageError(f"{source}: {array.shape[1]}x{array.shape[0]} pixels exceeds the limit of "
                                f"{max_pixels}; crop or downscale it first")
    if array.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        raise InvalidImageError(f"{source}: pixel type {array.dtype} unsupported; use uint8, uint16 or float")
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise InvalidImageError(f"{source}: contains NaN or infinite values")
        # Float pixels mean intensities in [0, 1]; 0..255 floats straight from a camera SDK would
        # otherwise be scored, wrongly, without a word.
        low, high = float(array.min()), float(array.max())
        if low < -0.01 or high > 1.01:
            raise InvalidImageError(f"{source}: float pixels range {low:g}..{high:g}; float images must be "
                                    "in [0, 1] (values of 0..255 or 0..65535: store or pass them as 8- or 16-bit "
                                    "integers)")


def looks_gray(image: np.ndarray, pixels_read: int = 65536) -> bool:
    """Whether decoded pixels (H, W[, C], OpenCV's channel order) are gray: one channel, or colour
    channels that differ by at most GRAY_SPREAD_AT_MOST (alpha ignored). Read on a grid of about
    `pixels_read` pixels, so a large frame costs no more than a small one (the default: a training
    image's survey; the runtime's per-frame check reads fewer)."""
    if image.ndim == 2 or image.shape[2] == 1:
        return True
    step = max(1, int((image.shape[0] * image.shape[1] / pixels_read) ** 0.5))
    pixels = image[::step, ::step, :3].astype(np.float32)
    peak = float(pixels.max())
    if peak <= 0:
        return True
    spread = float((pixels.max(axis=2) - pixels.min(axis=2)).mean())
    return spread <= GRAY_SPREAD_AT_MOST * peak


def mirror_pad(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Extend an image at its bottom and right edge, mirrored, to at least height x width: for crops and
    tiles taken from images smaller than them. Works for any shortfall, even a one-row image."""
    pad_y, pad_x = max(0, height - image.shape[0]), max(0, width - image.shape[1])
    if not (pad_y or pad_x):
        return image
    return cv2.copyMakeBorder(image, 0, pad_y, 0, pad_x, cv2.BORDER_REFLECT_101)


def to_float(image: np.ndarray, bit_depth: int = 16) -> np.ndarray:
    """uint8 / uint16 / float pixels -> float32 in [0, 1], channels as they were except alpha, dropped.
    uint16 pixels hold `bit_depth` significant bits (Preprocessing.bit_depth).

    Raises:
        InvalidImageError: uint16 values above what `bit_depth` bits hold (the setting does not match the camera).
    """
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[:, :, :3]
    if image.dtype == np.uint8:
        return np.multiply(image, np.float32(1 / 255.0), dtype=np.float32)
    if image.dtype == np.uint16:
        check_within_bit_depth(image, bit_depth)
        return np.multiply(image, np.float32(1 / ((1 << bit_depth) - 1)), dtype=np.float32)
    return image.astype(np.float32)


def check_within_bit_depth(image: np.ndarray, bit_depth: int) -> None:
    """Raises InvalidImageError where uint16 pixels exceed what `bit_depth` bits hold (the setting does
    not match the camera); other pixel types pass."""
    top = (1 << bit_depth) - 1
    if image.dtype == np.uint16 and bit_depth < 16 and image.size and int(image.max()) > top:
        raise InvalidImageError(f"uint16 pixels up to {int(image.max())} exceed the {bit_depth}-bit range "
                                f"0..{top}; set the bit depth to the camera's (16 for full-range data)")


def rgb_planes(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H, W), (H, W, 1) gray or (H, W, 3) BGR -> the R, G and B planes (views, no copies)."""
    if x.ndim == 2:
        return x, x, x
    if x.shape[2] == 1:
        return x[:, :, 0], x[:, :, 0], x[:, :, 0]
    return x[:, :, 2], x[:, :, 1], x[:, :, 0]


def to_rgb_float(image: np.ndarray, bit_depth: int = 16) -> np.ndarray:
    """uint8 / uint16 / float [0, 1] in OpenCV's channel order (gray, BGR, BGRA) -> RGB float32 in [0, 1]."""
    return np.stack(rgb_planes(to_float(image, bit_depth)), axis=2)

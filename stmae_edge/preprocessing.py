"""The one definition of preprocessing, shared by training, evaluation, export and the runtime.

numpy and OpenCV only (no torch), so the edge runtime uses exactly the code that training used.
Pipeline: decode (8- or 16-bit, gray, colour or with alpha) -> float in [0, 1] -> RGB -> resize to the
model's input size -> (x - mean) / std per channel -> NCHW float32.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from .errors import ConfigError, InvalidImageError

# OpenCV reads this once, at import; it bounds what a hostile file can make the decoder allocate.
MAX_IMAGE_PIXELS = 64 * 1024 * 1024
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))
import cv2  # noqa: E402  (must follow the environment variable above)

MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_INPUT_SIDE = 4096

ImageInput = Union[str, os.PathLike, np.ndarray]


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input tensor. Stored in every checkpoint and ONNX file."""

    input_size: tuple[int, int] = (256, 256)  # (height, width) fed to the network
    color: str = "rgb"  # the network sees RGB; gray input is replicated to three channels
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # on [0, 1] intensities
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    layout: str = "NCHW"
    resize: str = "area"  # cv2.INTER_AREA: alias-free downscaling of large camera frames
    max_pixels: int = field(default=MAX_IMAGE_PIXELS)

    def __post_init__(self) -> None:
        if self.color != "rgb" or self.layout != "NCHW":
            raise ConfigError(f"unsupported preprocessing color={self.color!r} layout={self.layout!r}; "
                              "only rgb/NCHW is implemented")
        if self.resize not in _INTERPOLATION:
            raise ConfigError(f"unknown resize mode {self.resize!r}; use one of {sorted(_INTERPOLATION)}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("mean and std need three values each, std > 0")
        if len(self.input_size) != 2 or not all(16 <= v <= MAX_INPUT_SIDE for v in self.input_size):
            raise ConfigError(f"input size {self.input_size} must be two sides within 16..{MAX_INPUT_SIDE}")
        if not 0 < self.max_pixels <= MAX_IMAGE_PIXELS:
            raise ConfigError(f"max_pixels {self.max_pixels} must be within 1..{MAX_IMAGE_PIXELS}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        d = dict(d)
        d["input_size"] = tuple(int(v) for v in d["input_size"])
        d["mean"] = tuple(float(v) for v in d["mean"])
        d["std"] = tuple(float(v) for v in d["std"])
        return cls(**d)

    def __call__(self, images: Union[ImageInput, Sequence[ImageInput]]) -> np.ndarray:
        """One image or a list of them -> float32 batch (N, 3, H, W)."""
        if isinstance(images, (str, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim <= 3):
            images = [images]
        return np.stack([self.tensor(load_image(im, self.max_pixels)) for im in images])

    def tensor(self, image: np.ndarray) -> np.ndarray:
        """A decoded image (H, W[, C], uint8/uint16/float) -> normalised (3, H, W) float32."""
        rgb = to_rgb_float(image)
        height, width = self.input_size
        if rgb.shape[:2] != (height, width):
            rgb = cv2.resize(rgb, (width, height), interpolation=_INTERPOLATION[self.resize])
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        return np.ascontiguousarray(((rgb - mean) / std).transpose(2, 0, 1), dtype=np.float32)


_INTERPOLATION = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_image(image: ImageInput, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Read a file (or check an array) and return it as decoded pixels, untouched: (H, W) or (H, W, C)."""
    if isinstance(image, np.ndarray):
        array = image
        source = f"array of shape {image.shape} and dtype {image.dtype}"
    else:
        path = Path(image)
        source = str(path)
        if not path.is_file():
            raise InvalidImageError(f"{path}: no such image file")
        size = path.stat().st_size
        if size == 0 or size > MAX_FILE_BYTES:
            raise InvalidImageError(f"{path}: file size {size} bytes is outside 1..{MAX_FILE_BYTES}")
        data = np.fromfile(path, dtype=np.uint8)
        declared = header_size(data[:65536].tobytes())
        if declared and declared[0] * declared[1] > max_pixels:
            raise InvalidImageError(f"{path}: {declared[0]}x{declared[1]} pixels exceeds the limit of "
                                    f"{max_pixels}; crop or downscale it first")
        array = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
        if array is None:
            raise InvalidImageError(f"{path}: not a readable image (corrupt, truncated or unknown format)")
    check_image(array, source, max_pixels)
    return array


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def header_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) that a PNG or JPEG header declares, read before decoding so that a small file
    declaring a huge image is refused before it allocates anything (OpenCV's own cap applies only if
    this module set it before anything else imported cv2). None for other formats."""
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if head[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_SOF:
            return int.from_bytes(head[i + 7:i + 9], "big"), int.from_bytes(head[i + 5:i + 7], "big")
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # markers without a length
            i += 2
            continue
        i += 2 + int.from_bytes(head[i + 2:i + 4], "big")
    return None


def check_image(array: np.ndarray, source: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    if array.ndim not in (2, 3) or array.size == 0:
        raise InvalidImageError(f"{source}: expected an image of shape (H, W) or (H, W, C), not {array.shape}")
    if array.ndim == 3 and array.shape[2] not in (1, 3, 4):
        raise InvalidImageError(f"{source}: {array.shape[2]} channels; use 1 (gray), 3 (BGR) or 4 (BGRA)")
    if array.shape[0] * array.shape[1] > max_pixels:
        raise InvalidImageError(f"{source}: {array.shape[1]}x{array.shape[0]} pixels exceeds the limit of "
                                f"{max_pixels}; crop or downscale it first")
    if array.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        raise InvalidImageError(f"{source}: pixel type {array.dtype} unsupported; use uint8, uint16 or float")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InvalidImageError(f"{source}: contains NaN or infinite values")


def to_rgb_float(image: np.ndarray) -> np.ndarray:
    """uint8 / uint16 / float [0, 1] in OpenCV's channel order (gray, BGR, BGRA) -> RGB float32 in [0, 1]."""
    if image.dtype == np.uint8:
        x = image.astype(np.float32) / 255.0
    elif image.dtype == np.uint16:
        x = image.astype(np.float32) / 65535.0
    else:
        x = image.astype(np.float32)
    if x.ndim == 2:
        x = x[:, :, None]
    channels = x.shape[2]
    if channels == 1:
        return np.repeat(x, 3, axis=2)
    return np.ascontiguousarray(x[:, :, 2::-1])  # BGR(A) -> RGB, alpha dropped

"""The embedding API: one object that turns images into decisions.

    from stmae_edge.runtime import Detector

    detector = Detector("export/model.onnx")          # or engines/model.fp16.plan
    result = detector.predict("part.png")              # one image (path or numpy array) -> Detection
    results = detector.predict(frames)                 # a list (or an (N, H, W, C) array) -> list of Detections
    detector.thresholds                                 # from the metadata; assign to move them
    detector.predict(frames, sigma=4.0)                 # or override for one call

numpy, OpenCV and the backend only (torch only for a .pt file, opened by its torch backend). A
Detector may be shared between threads: the backend call is serialised by a lock, preprocessing and
postprocessing run in the callers' threads. A bad
image raises InvalidImageError naming it; nothing is half-done and the detector stays usable.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

from ..checks import is_whole
from ..errors import BackendError, ConfigError, InvalidImageError
from ..metadata import MAX_BATCH, ModelMetadata
from ..preprocessing import (
    ImageInput,
    Preprocessing,
    TrainedSizes,
    as_items,
    check_bit_depth,
    load_image,
    looks_gray,
    name_the_image,
)
from ..scoring import ScoreStats, Thresholds
from .backend_table import BACKENDS
from .backends import Backend, describe, open_backend
from .postprocess import AssignableThresholds, Detection, postprocess, resolve_thresholds

logger = logging.getLogger(__name__)
DEFAULT_BATCH_SIZE = 32
STAGES = ("preprocess", "infer", "postprocess")
# Pixels read to tell a camera's gray frame from a colour one (preprocessing.looks_gray): a training
# survey's 64K took a quarter of a 4 MP frame's preprocessing, 4096 about 1%.
GRAY_CHECK_PIXELS = 4096


class ImageScorer(AssignableThresholds):
    """What turns images into Detections, for any network that `run_tensors` reaches: the in-process
    Detector's backend, or a served model (RemoteDetector). A subclass sets `metadata`, `preprocessing`,
    `score_stats`, `map_stats`, `min_region_area`, `batch_size` and `sizes_accepted` (and `_gray_news`:
    trained_on_colour), and defines run_tensors(batch, offset) -> (maps, scores), checked."""

    _gray_news = False  # whether a gray frame is still to be warned about

    metadata: ModelMetadata
    preprocessing: Preprocessing
    score_stats: ScoreStats
    map_stats: ScoreStats
    min_region_area: int
    batch_size: int
    sizes_accepted: TrainedSizes | None

    def run_tensors(self, batch: np.ndarray, offset: int | Sequence[int] = 0) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    # The shape of the result follows the call: one path, one Detection; a list or tuple, a list; an
    # array is one image (H, W[, C]) or a batch (N, H, W, C), which only its ndim tells at run time.
    @overload
    def predict(self, images: str | os.PathLike, *, return_errors: Literal[False] = False, **kw: Any) -> Detection: ...

    @overload
    def predict(self, images: str | os.PathLike, *, return_errors: Literal[True],
                **kw: Any) -> Detection | InvalidImageError: ...

    @overload
    def predict(self, images: list[ImageInput] | tuple[ImageInput, ...], *, return_errors: Literal[False] = False,
                **kw: Any) -> list[Detection]: ...

    @overload
    def predict(self, images: list[ImageInput] | tuple[ImageInput, ...], *, return_errors: Literal[True],
                **kw: Any) -> list[Detection | InvalidImageError]: ...

    @overload
    def predict(self, images: np.ndarray, *, return_errors: bool = False,
                **kw: Any) -> Detection | list[Detection] | InvalidImageError | list[Detection | InvalidImageError]: ...

    def predict(self, images: ImageInput | Sequence[ImageInput], *, image_threshold: float | None = None,
                pixel_threshold: float | None = None, sigma: float | None = None,
                timings: dict | None = None, return_errors: bool = False,
                ) -> Detection | InvalidImageError | list[Detection] | list[Detection | InvalidImageError]:
        """Score one image or a list (paths or arrays: gray, BGR or BGRA; uint8, uint16 or float in [0, 1]).

        Args:
            images: one image (a path or an array) -> one Detection; a list, a tuple or an (N, H, W, C)
                array -> a list of Detections, in order.
            image_threshold, pixel_threshold: raw score units, for this call only (default: `thresholds`).
            sigma: sets both to mean + sigma * std of the good images' scores (the pixel threshold: of
                their maps' maxima, where the model has a score head); a raw threshold given too wins.
            timings: if given, accumulates seconds per stage (preprocess, infer, postprocess).
            return_errors: an image that cannot be read or used gets its InvalidImageError in its
                place in the returned list (one image: returned), and every other image is scored;
                by default the error is raised. For a batch in which one bad frame must not cost the rest.

        Returns:
            A Detection (one image) or a list of them in the order given (see Detection for its
            fields and units); with return_errors, an InvalidImageError in place of each image that
            could not be scored.

        Raises:
            InvalidImageError: an image cannot be read or used (naming the file, or its index in the
                call); nothing of the call is returned and the detector stays usable. Not with
                return_errors.
            ConfigError: a threshold that is not a finite number, or sigma below 0.
            BackendError: the backend failed (or was closed), or the network produced NaN or infinite
                values or outputs of the wrong shape (RemoteError from a served model: also a server
                that cannot be reached or refused a request).
        """
        items, single = as_items(images)
        _check_timings(timings)
        if not isinstance(return_errors, bool):
            raise ConfigError(f"return_errors {return_errors!r} must be True or False")
        thresholds = resolve_thresholds(self.thresholds, self.score_stats, image_threshold, pixel_threshold, sigma,
                                        self.map_stats)
        spent = dict.fromkeys(STAGES, 0.0)
        errors: dict[int, InvalidImageError] | None = {} if return_errors else None
        scored: list[Detection] = []
        for start, stop in balanced_chunks(len(items), self.batch_size):
            scored += self._predict_batch(items[start:stop], start, thresholds, spent, errors)
        _add_timings(timings, spent, STAGES)
        if errors:  # each error in its image's place, the Detections of the others in order between them
            remaining = iter(scored)
            detections = [errors[i] if i in errors else next(remaining) for i in range(len(items))]
        else:
            detections = scored
        return detections[0] if single else detections

    __call__ = predict

    def preprocess(self, images: ImageInput | Sequence[ImageInput]) -> np.ndarray:
        """The network's input tensor for these images: the same definition training used.

        Args:
            images: one image or a batch, as predict takes them.

        Returns:
            float32 (N, 3, H, W) at the model's input size, N = 1 for one image.

        Raises:
            InvalidImageError: an image cannot be read or used (the size check of predict is not made).
        """
        if not self._gray_news:
            return self.preprocessing(images)
        items, _ = as_items(images)  # a served model's frames come this way: a gray one is news there too
        gray: list[str] = []
        batch, _, _ = decode_batch(list(items), 0, self.preprocessing, gray=gray)
        self._say_gray(gray)
        return batch

    def _say_gray(self, gray: list[str] | None) -> None:
        """The first gray frame of a model trained on colour images alone, said once a Detector: a mono
        camera gives nothing but gray frames."""
        if gray:
            self._gray_news = False
            logger.warning("%s is a gray image, and %s was trained on colour images (%d of them): a gray frame is "
                           "scored as a colour one that looks like no training image, so its score is not comparable "
                           "with theirs; train on the camera's own images", gray[0], self.model_path,
                           self.metadata.training["colour_images"])

    def raw_maps(self, images: ImageInput | Sequence[ImageInput], timings: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The network's own output for a list of images, batched: maps (N, H, W) at the model's input
        size and raw scores (N,), without thresholds or regions. For callers that combine maps
        themselves, such as the line-scan inspector, which feeds tiles of exactly that size; so
        predict's check of each image's size against the training sizes is not made here.

        Args:
            images: a list, a tuple or an (N, H, W, C) array of images (one image alone gives N = 1).
            timings: if given, accumulates seconds per stage (preprocess, infer).

        Raises:
            InvalidImageError, ConfigError, BackendError: as `predict`.
        """
        images, _ = as_items(images)
        _check_timings(timings)
        spent = dict.fromkeys(STAGES, 0.0)
        outputs = [self._infer_batch(list(images[start:stop]), start, spent)
                   for start, stop in balanced_chunks(len(images), self.batch_size)]
        _add_timings(timings, spent, ("preprocess", "infer"))
        if not outputs:
            height, width = self.preprocessing.input_size
            return np.empty((0, height, width), np.float32), np.empty(0, np.float32)
        return np.concatenate([o[0] for o in outputs]), np.concatenate([o[1] for o in outputs])

    def _infer_batch(self, items: list, offset: int, spent: dict, sizes_accepted: TrainedSizes | None = None,
                     errors: dict | None = None):
        """Decode, check and preprocess `items`, run the backend: (maps, scores, sizes, sources).
        With `errors`, images that cannot be used are put there by index in the call, and left out."""
        started = time.perf_counter()
        gray = [] if self._gray_news else None
        batch, sizes, sources = decode_batch(items, offset, self.preprocessing, sizes_accepted, errors, gray)
        self._say_gray(gray)
        if not len(batch):
            height, width = self.preprocessing.input_size
            return np.empty((0, height, width), np.float32), np.empty(0, np.float32), sizes, sources
        inferred = time.perf_counter()
        # where images were left out, each kept one's own index in the call, for a served model's messages
        kept = offset if not errors else [offset + i for i in range(len(items)) if offset + i not in errors]
        maps, scores = self.run_tensors(batch, kept)
        framed = time.perf_counter()
        maps = self.preprocessing.to_image_frame(maps, sizes)
        spent["preprocess"] += inferred - started
        spent["infer"] += framed - inferred
        spent["postprocess"] += time.perf_counter() - framed
        return maps, scores, sizes, sources

    def _predict_batch(self, items: list, offset: int, thresholds: Thresholds, spent: dict,
                       errors: dict | None = None) -> list[Detection]:
        maps, scores, sizes, sources = self._infer_batch(items, offset, spent, self.sizes_accepted, errors)
        started = time.perf_counter()
        detections = postprocess(maps, scores, sizes, sources, thresholds, self.score_stats, self.min_region_area,
                                 self.map_stats)
        spent["postprocess"] += time.perf_counter() - started
        return detections


class Detector(ImageScorer):
    """A model file opened on a backend, turning images into Detections (see the module docstring).

        images ──> load_image + the model's Preprocessing ──> (N, 3, H, W) float32, batch_size at a time
               ──> backend.run (under the lock) ──> maps (N, H, W) and raw scores (N,), checked
               ──> postprocess: maps at each image's size, thresholds, regions ──> Detections

    Attributes:
        metadata: the model's ModelMetadata, read from the file.
        preprocessing: how images become the network's input (the model's, with `bit_depth` applied).
        thresholds: raw-score thresholds used when a call does not override them (assignable; a
            threshold kept in the file: model_files.write_thresholds).
        score_stats: the good images' scores stored with the model; `normalized_score` is a z-score
            against them, and Thresholds.from_stats(score_stats, sigma, map_stats) sets thresholds
            at mean + sigma * std.
        map_stats: the same for the good images' map maxima, which regions' `peak_normalized` and
            the pixel threshold are read against (score_stats where the score is the map's maximum).
        batch_size: most images per backend call, after the cap by the model's batch maximum.
        min_region_area: smaller regions, in image pixels, are not reported.
        info: the backend, provider, device and precision that run the model.

    Safe to share between threads; `close()` (or a with block) frees the backend, and a call after it
    raises BackendError.
    """

    def __init__(self, model_path: Path | str, backend: str = "auto", *, batch_size: int = DEFAULT_BATCH_SIZE,
                 min_region_area: int = 1, cuda_graph: bool = False, threads: int = 0,
                 spin_threads: bool = False, bit_depth: int | None = None, check_size: bool = True):
        """Open a model file for scoring.

        Args:
            model_path: .onnx (ONNX Runtime), .plan with its sidecar (TensorRT) or .pt (PyTorch, to compare).
            backend: "auto" or a name from runtime.backends.
            batch_size: most images per network call (capped by the model's batch profile).
            min_region_area: smaller regions, in image pixels, are not reported.
            cuda_graph: TensorRT only: replay each batch size as a CUDA graph.
            threads: ONNX Runtime's CPU threads (0: its default, one per physical core); not used by
                the GPU backends.
            spin_threads: ONNX Runtime's CPU threads busy-wait for work between and within calls (its
                own default): a few percent lower latency for about 40% more CPU time per frame
                arriving at intervals, taken from the host's own threads; off by default.
            bit_depth: significant bits of the uint16 frames this detector will see (10 or 12 for
                Mono10 / Mono12 cameras) where they differ from the training images'; default: the model's.
            check_size: refuse, in `predict`, images far from the sizes the model was trained on
                (InvalidImageError; `metadata.trained_sizes` says how far); False scores any size.

        Raises:
            BackendError: the backend cannot run here. CheckpointError, EngineMismatchError: the file is
                not a usable model. ConfigError: an argument is out of range, the file's suffix is none
                that a backend runs, or the backend named cannot run this kind of file.
        """
        _check_arguments(model_path, backend, batch_size, min_region_area, cuda_graph, threads, bit_depth)
        for name, value in (("check_size", check_size), ("spin_threads", spin_threads)):
            if not isinstance(value, bool):
                raise ConfigError(f"{name} {value!r} must be True or False")
        self.model_path = Path(model_path)
        self._backend: Backend = open_backend(model_path, backend, cuda_graph=cuda_graph, threads=threads,
                                              spin_threads=spin_threads)
        self.metadata = self._backend.metadata
        self.preprocessing = self.metadata.preprocessing
        if bit_depth is not None:  # the camera's, where it differs from the training images'
            self.preprocessing = dataclasses.replace(self.preprocessing, bit_depth=int(bit_depth))
        self.score_stats = self.metadata.score_stats
        self.map_stats = self.metadata.region_stats  # what map values (regions, overlays) are measured against
        self.thresholds = self.metadata.thresholds
        self.min_region_area = min_region_area
        self.sizes_accepted = accepted_sizes(self.metadata, check_size)
        self._gray_news = trained_on_colour(self.metadata)
        self.batch_size = max(1, min(batch_size, self._backend.max_batch))
        if self.batch_size < batch_size:
            # The default meeting a plan's smaller profile is routine; a size the caller chose is not
            # what they will get, which they should hear about.
            logger.log(logging.INFO if batch_size == DEFAULT_BATCH_SIZE else logging.WARNING,
                       "batch_size %d exceeds the largest batch that %s takes (%d); batches of at most %d",
                       batch_size, self.model_path.name, self._backend.max_batch, self.batch_size)
        self._lock = threading.Lock()
        self.closed = False  # close() was called

    @property
    def info(self) -> dict:
        """What runs this detector: backend, provider, device, precision, batch range, model hash."""
        return describe(self._backend)

    def run_tensors(self, batch: np.ndarray, offset: int | Sequence[int] = 0) -> tuple[np.ndarray, np.ndarray]:
        """The network on preprocessed images (N, 3, H, W) float32, N at most the backend's batch maximum:
        maps (N, H, W) and raw scores (N,). For callers that preprocess elsewhere (the Triton server's
        tensor input). `offset` (the batch's place in a call) is for a served model's messages; here the
        backend is the same for every image.

        Raises:
            ConfigError: the batch has the wrong shape or dtype. BackendError: the network failed or
                produced NaN or infinite values.
        """
        check_input_batch(batch, self.preprocessing.input_size, self._backend.max_batch)
        with self._lock:
            maps, scores = self._backend.run(batch)
        check_network_outputs(maps, scores, len(batch), self.preprocessing.input_size)
        return maps, scores

    def close(self) -> None:
        """Free the backend (its session, engine and device buffers); later calls raise BackendError.
        Closing twice is fine."""
        with self._lock:
            self._backend.close()
            self.closed = True

    def __enter__(self) -> Detector:
        """The detector itself, closed when the block ends.

        Raises:
            BackendError: it was closed already.
        """
        if self.closed:
            raise BackendError("this Detector was closed; create a new one")
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_input_batch(batch: np.ndarray, input_size: tuple[int, int], max_batch: int) -> None:
    """Raises ConfigError unless `batch` is preprocessed images as run_tensors takes them: float32
    (N, 3, H, W) at the model's input size, 1 <= N <= max_batch."""
    height, width = input_size
    if (not isinstance(batch, np.ndarray) or batch.dtype != np.float32 or batch.ndim != 4
            or batch.shape[1:] != (3, height, width) or not 0 < len(batch) <= max_batch):
        got = f"{batch.dtype} {batch.shape}" if isinstance(batch, np.ndarray) else type(batch).__name__
        raise ConfigError(f"expected float32 images (N, 3, {height}, {width}) with 1 <= N <= {max_batch}, got {got}")


def check_network_outputs(maps: np.ndarray, scores: np.ndarray, count: int, input_size: tuple[int, int], *,
                          where: str = "", error: type[BackendError] = BackendError) -> None:
    """Refuse a network's answer unless it is maps (count, H, W) and raw scores (count,), all finite.

    The one check for every place a network runs (Detector on its backends, RemoteDetector on a Triton
    server): thresholds compare with `>`, so a NaN score would otherwise pass every part.

    Args:
        where: what answered, as a message prefix ("http://host:8000, model m: "); empty in-process.
        error: the type to raise: BackendError, or a subclass such as RemoteError.

    Raises:
        BackendError (or `error`): the shapes do not fit the batch, or a value is NaN or infinite.
    """
    height, width = input_size
    if maps.shape != (count, height, width) or scores.shape != (count,):
        raise error(f"{where}the network returned maps {maps.shape} and scores {scores.shape} for a batch of "
                    f"{count} images of {height}x{width}; the model does not fit this runtime")
    if not (np.isfinite(scores).all() and np.isfinite(maps).all()):
        raise error(f"{where}the network produced NaN or infinite values; check the model with `stmae-edge verify`")


def balanced_chunks(count: int, batch_size: int) -> list[tuple[int, int]]:
    """As few batches as batch_size allows, of nearly equal size: 38 items at 32 are 19 + 19, not
    32 + 6, because a small last batch costs nearly as much as a full one."""
    calls = -(-count // batch_size)
    size = -(-count // calls) if calls else 0
    return [(start, min(start + size, count)) for start in range(0, count, size or 1)]


def decode_batch(items: list, offset: int, preprocessing: Preprocessing, sizes_accepted: TrainedSizes | None = None,
                 errors: dict | None = None, gray: list | None = None) -> tuple[np.ndarray, list, list[str]]:
    """Decode and check `items` (paths or arrays; item i is image offset + i of the call) and preprocess
    them: (batch (N, 3, H, W) float32, their (height, width), their sources for the Detections). With
    `gray`, the sources of the gray images among them are put there (preprocessing.looks_gray).

    Raises:
        InvalidImageError: naming the file, or the image's index in the call; also an image far from
            `sizes_accepted`, where given. With `errors`, instead put there under offset + i, and
            the image left out of the batch.
    """
    height, width = preprocessing.input_size
    batch = np.empty((len(items), 3, height, width), np.float32)
    sizes, sources = [], []
    for i, item in enumerate(items):
        is_path = isinstance(item, (str, os.PathLike))
        try:
            image = load_image(item, preprocessing.max_pixels, sizes_accepted)
            preprocessing.tensor(image, out=batch[len(sizes)])
        except InvalidImageError as exc:
            named = InvalidImageError(name_the_image(item, offset + i, exc))
            if errors is None:
                raise named from None
            errors[offset + i] = named
            continue
        sizes.append(image.shape[:2])
        sources.append(str(item) if is_path else f"array[{offset + i}]")
        if gray is not None and looks_gray(image, GRAY_CHECK_PIXELS):
            gray.append(sources[-1])
    return batch[:len(sizes)], sizes, sources


MAX_THREADS = 1024


def trained_on_colour(metadata: ModelMetadata) -> bool:
    """Whether the model reads colour and every good image it was trained on was colour, so that a gray
    frame looks like none of them (a mono camera where a colour one was). One gray training image makes
    gray frames familiar; models from before the record say nothing of it: False."""
    training = metadata.training
    good = training.get("train_images", 0) + training.get("holdout_images", 0)
    return metadata.preprocessing.color == "rgb" and good > 0 and training.get("colour_images", 0) >= good


def accepted_sizes(metadata, check_size: bool) -> TrainedSizes | None:
    """What `predict` holds images to: the training images' sizes, unless the caller opted out or the
    model predates the record (then said once, in the log)."""
    if check_size and metadata.trained_sizes is None:
        # a warning: the check that refuses a frame from a wrongly set camera is off for this model
        logger.warning("the model records no training image sizes (made before stmae-edge recorded them): images "
                       "of any size are scored; train it again to have them checked")
    return metadata.trained_sizes if check_size else None


def _check_arguments(model_path, backend, batch_size, min_region_area, cuda_graph, threads, bit_depth) -> None:
    """Every argument of the right type and range before anything is opened."""
    if not isinstance(model_path, (str, os.PathLike)):
        raise ConfigError(f"model_path must be a path to an .onnx, .plan or .pt file, not {type(model_path).__name__}")
    if not isinstance(backend, str):
        raise ConfigError(f"backend must be a name ({', '.join(BACKENDS)}), not {backend!r}")
    for name, value, low, high in (("batch_size", batch_size, 1, MAX_BATCH), ("threads", threads, 0, MAX_THREADS),
                                   ("min_region_area", min_region_area, 0, None)):
        if not is_whole(value) or value < low or (high is not None and value > high):
            raise ConfigError(f"{name} {value!r} must be a whole number, at least {low}"
                              + (f" and at most {high}" if high is not None else ""))
    if not isinstance(cuda_graph, bool):
        raise ConfigError(f"cuda_graph {cuda_graph!r} must be True or False")
    if bit_depth is not None:
        check_bit_depth(bit_depth)


def _check_timings(timings) -> None:
    """Before any work: a wrong `timings` found after inference would throw the call's results away."""
    if timings is not None and not isinstance(timings, dict):
        raise ConfigError(f"timings must be a dict (seconds are added to it per stage), not {type(timings).__name__}")


def _add_timings(timings: dict | None, spent: dict, stages: tuple[str, ...]) -> None:
    """Accumulate one call's seconds for `stages` into a caller's dict."""
    if timings is not None:
        for stage in stages:
            timings[stage] = timings.get(stage, 0.0) + spent[stage]

"""Line-scan inspection: an endless strip of rows in, defects in strip coordinates out.

    inspector = StreamingInspector(detector, overlap=32)
    for block in camera:                    # (rows, width[, channels]) uint8/uint16, any number of rows
        for defect in inspector.push(block):
            handle(defect)                  # defect.row is the absolute strip row, defect.col the column
    for defect in inspector.flush():        # end of the strip: the defects of the remaining rows
        handle(defect)

Tiles are cut at the model's native input size, with no resizing, so the scale the model sees on the
line is the scale it was trained at (`train --crop`). They cover the width and run along the strip
with `overlap` pixels shared between neighbours. Their maps are blended with weights that fall off
towards each tile's edges, into one continuous strip map. Rows become final once no later tile can
cover them. Defects are connected components of the final map above the pixel threshold, tracked
across bands, so a defect that spans tile or block borders is reported once. Memory is bounded by a
few tile heights of rows, whatever the strip's length.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from ..checks import is_whole
from ..errors import ConfigError, InvalidImageError
from ..preprocessing import check_within_bit_depth, mirror_pad
from ..scoring import normalize
from .detector import ImageScorer
from .postprocess import resolve_thresholds

logger = logging.getLogger(__name__)
# A tile this many times smaller or larger than every training image, on a side, is at another scale
SCALE_WARNING_FACTOR = 1.5
_warned_of_scale: set[tuple[str, int, int]] = set()  # (model hash, tile size): said once per process


@dataclass(frozen=True)
class StripDefect:
    """One defect of a strip, in strip coordinates: rows counted from the strip's first row, columns from
    its left edge. to_dict() gives the peak as "peak": [row, col] and by name ("peak_row", "peak_col"):
    row first, unlike an image Region's [x, y]."""

    row: int  # top row of the bounding box, counted from the strip's first row
    col: int  # left column
    height: int
    width: int
    area: int  # pixels above the pixel threshold
    peak_score: float  # raw units, as the thresholds
    peak_normalized: float  # z-score against good parts
    peak_row: int
    peak_col: int
    tiles: tuple[tuple[int, int], ...]  # (tile row, tile column) of every tile whose area overlaps the box
    continues: bool = False  # cut at max_defect_rows: the rest follows as further defects

    def to_dict(self) -> dict:
        return {"row": self.row, "col": self.col, "height": self.height, "width": self.width, "area": self.area,
                "peak_score": self.peak_score, "peak_normalized": self.peak_normalized,
                "peak": [self.peak_row, self.peak_col], "peak_row": self.peak_row, "peak_col": self.peak_col,
                "tiles": [list(t) for t in self.tiles],
                "continues": self.continues}


def edge_ramp(length: int, overlap: int) -> np.ndarray:
    """1 in the middle, falling linearly towards both ends over `overlap` pixels, never 0."""
    if overlap <= 0:
        return np.ones(length, np.float32)
    i = np.arange(length, dtype=np.float32) + 0.5
    return np.minimum(1.0, np.minimum(i, length - i) / overlap).astype(np.float32)


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Starts of tiles covering [0, length): every `stride`, the last one flush with the end."""
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def warn_if_trained_at_another_scale(detector: ImageScorer, tile_height: int, tile_width: int) -> None:
    """Tiles are cut from the strip at native scale; a model trained on whole images shrunk to its input
    (train without --crop) saw its features at another scale, and its maps on tiles mean less. Said once
    per model and process (an inspector is made per strip): the inspector runs either way."""
    sizes = detector.metadata.trained_sizes
    key = (detector.metadata.model_hash, tile_height, tile_width)
    if sizes is None or key in _warned_of_scale:
        return
    far = SCALE_WARNING_FACTOR
    if (sizes.height[0] / far <= tile_height <= sizes.height[1] * far
            and sizes.width[0] / far <= tile_width <= sizes.width[1] * far):
        return
    _warned_of_scale.add(key)
    logger.warning("line-scan: tiles are %dx%d pixels of the strip at its own scale, but this model was trained "
                   "on images %s, each brought to %dx%d; train with --crop %d on images at the strip's scale",
                   tile_width, tile_height, sizes.describe(), tile_width, tile_height, max(tile_height, tile_width))


class StreamingInspector:
    """One strip's rows in, its defects out (the module docstring shows the loop). One strip per
    inspector, fed from one thread: after flush() make a new one for the next strip. The pixel threshold
    can be set until the first push; from then on it is the strip's."""

    def __init__(self, detector: ImageScorer, overlap: int = 32, width: int | None = None,
                 pixel_threshold: float | None = None, max_defect_rows: int | None = None,
                 on_rows: Callable[[int, np.ndarray], None] | None = None):
        """Start an empty strip; the first push that succeeds fixes its pixel format and, unless `width`
        gives it now, its width.

        Args:
            detector: the model, whose input size is the tile size; its thresholds are the defaults.
            overlap: pixels shared by neighbouring tiles, 0 to half the tile.
            width: the strip's width in pixels, at least one tile (default: the first block's).
            pixel_threshold: raw map units (default: the detector's pixel threshold, as it is when the
                strip starts).
            max_defect_rows: a defect taller than this is reported in parts, each but the last marked
                `continues` (default: 8 tile heights); bounds memory whatever the defect.
            on_rows: called with (first strip row, final strip map rows) as rows become final, once
                push or flush has stored everything; if it raises, the exception leaves that call and
                the call's defects, and the rows not yet shown, come with the next push or flush.

        Raises:
            ConfigError: not a Detector (or RemoteDetector); overlap, width, max_defect_rows or
                pixel_threshold out of range or of the wrong type.
        """
        if not isinstance(detector, ImageScorer):
            raise ConfigError(f"detector must be a stmae_edge Detector or RemoteDetector, not {type(detector).__name__}")
        self.detector = detector
        self.tile_height, self.tile_width = detector.preprocessing.input_size
        warn_if_trained_at_another_scale(detector, self.tile_height, self.tile_width)
        half = min(self.tile_height, self.tile_width) // 2
        if not is_whole(overlap) or not 0 <= overlap <= half:
            raise ConfigError(f"overlap {overlap!r} must be a whole number of pixels within 0..{half} "
                              f"(half the model's {self.tile_width}x{self.tile_height} tile)")
        max_defect_rows = 8 * self.tile_height if max_defect_rows is None else max_defect_rows
        if not is_whole(max_defect_rows) or max_defect_rows < 1:
            raise ConfigError(f"max_defect_rows {max_defect_rows!r} must be a whole number of rows, at least 1")
        if width is not None and (not is_whole(width) or width < self.tile_width):
            raise ConfigError(f"width {width!r} must be a whole number of pixels, at least the model's "
                              f"{self.tile_width}-pixel tile")
        self._resolved(pixel_threshold)  # a bad value is refused here, where it was given
        self._given_pixel_threshold = pixel_threshold  # None: the detector's, as it is when the strip starts
        self.overlap = int(overlap)
        self.stride = self.tile_height - self.overlap
        self.max_defect_rows = int(max_defect_rows)
        if on_rows is not None and not callable(on_rows):  # else every push would fail, after scoring
            raise ConfigError(f"on_rows must be a function of (first row, rows) or None, not {type(on_rows).__name__}")
        self.on_rows = on_rows  # called with (first row, final strip map rows) as rows become final
        self._unshown: list[tuple[int, np.ndarray]] = []  # final rows for on_rows, shown after each call
        self._undelivered: list[StripDefect] = []  # found, not yet returned: on_rows raised, or an interruption
        self.width = width
        self._channels: int | None = None
        self._dtype = None
        self._columns: list[int] = []  # left edges of the tiles across the strip, set with its width
        self._weight = np.outer(edge_ramp(self.tile_height, self.overlap), edge_ramp(self.tile_width, self.overlap))
        self._rows = np.empty((0, 0), np.uint8)  # buffered image rows, starting at strip row _rows_start
        self._rows_start = 0
        self._next_tile_row = 0  # strip row where the next tile row starts; rows above it are final
        # (index, first row, end row) of recent tile rows: the rows each one actually contributed to
        self._tile_rows: collections.deque = collections.deque(maxlen=self.max_defect_rows // self.stride + 4)
        self._tile_row_count = 0
        self._acc = self._acc_weight = None  # blended map under construction, from strip row _next_tile_row
        self._regions: StripRegions | None = None  # created with the strip's width, at the first block
        self.rows_pushed = 0
        self.rows_final = 0
        self.tiles = 0
        self.seconds = {"total": 0.0, "preprocess": 0.0, "infer": 0.0}
        self._flushed = False

    def _resolved(self, pixel_threshold: float | None) -> float:
        detector = self.detector
        return resolve_thresholds(detector.thresholds, detector.score_stats, pixel=pixel_threshold,
                                  map_stats=detector.map_stats).pixel

    @property
    def pixel_threshold(self) -> float:
        """Raw map units: the defects are the map's connected regions above it. Unless one was given,
        the detector's pixel threshold, followed until the strip starts (a change to
        `detector.thresholds` before the first push counts) and fixed from then on."""
        if self._regions is not None:
            return self._regions.threshold
        return self._resolved(self._given_pixel_threshold)

    @pixel_threshold.setter
    def pixel_threshold(self, value: float) -> None:
        if self.rows_pushed or self._regions is not None:  # defects already tracked at the old one
            raise ConfigError("the pixel threshold is fixed once the strip has started (its defects are tracked "
                              "across tiles at one threshold): flush() and make a new StreamingInspector")
        self._resolved(value)
        self._given_pixel_threshold = value

    @property
    def pixel_threshold_rule(self) -> str:
        """Where pixel_threshold comes from, in words, for a record of the run."""
        if self._regions is not None:
            return self._regions_rule
        if self._given_pixel_threshold is not None:
            return "given for this strip"
        return f"the model's ({self.detector.thresholds.rule})"

    # -- input -----------------------------------------------------------------------------------
    def _check_block(self, block: np.ndarray) -> np.ndarray:
        """Refuse a bad block before anything about the strip is fixed or changed."""
        if not isinstance(block, np.ndarray) or block.ndim not in (2, 3):
            raise InvalidImageError(f"a block must be a numpy array (rows, width[, channels]), not "
                                    f"{getattr(block, 'shape', type(block).__name__)}")
        if block.ndim == 3 and block.shape[2] == 1:
            block = block[:, :, 0]
        channels = 1 if block.ndim == 2 else block.shape[2]
        if channels not in (1, 3):
            raise InvalidImageError(f"a block has {channels} channels; line-scan takes 1 (gray) or 3 (BGR)")
        if block.dtype not in (np.uint8, np.uint16):
            raise InvalidImageError(f"block pixels are {block.dtype}; line-scan takes uint8 or uint16")
        width = block.shape[1]
        if width < self.tile_width:
            raise InvalidImageError(f"a block is {width} pixels wide, narrower than the model's "
                                    f"{self.tile_width}-pixel tile")
        if self.width is not None and width != self.width:
            raise InvalidImageError(f"a block is {width} pixels wide; this strip is {self.width}")
        if self._channels is not None and (channels != self._channels or block.dtype != self._dtype):
            raise InvalidImageError(f"a block is {channels}-channel {block.dtype}; this strip is "
                                    f"{self._channels}-channel {self._dtype}")
        try:  # here, not when its rows are scored: that can be a later push, which would then fail for good
            check_within_bit_depth(block, self.detector.preprocessing.bit_depth)
        except InvalidImageError as exc:
            raise InvalidImageError(f"the block of strip rows {self.rows_pushed}..{self.rows_pushed + block.shape[0]}: "
                                    f"{exc}") from None
        return block

    def _tile_columns(self, width: int) -> list[int]:
        """Left edges of the tiles across a strip `width` pixels wide."""
        return tile_starts(width, self.tile_width, self.tile_width - self.overlap)

    def _fix_format(self, block: np.ndarray, columns: list[int]) -> None:
        """The first block, once scored, fixes the strip's width, channels and pixel type."""
        self.width, self._channels, self._dtype = block.shape[1], 1 if block.ndim == 2 else block.shape[2], block.dtype
        self._columns = columns
        self._regions_rule = self.pixel_threshold_rule  # both fixed from here on
        self._regions = StripRegions(self.width, self.pixel_threshold, self.detector.map_stats, self.max_defect_rows)

    def push(self, block: np.ndarray) -> list[StripDefect]:
        """Add rows at the bottom of the strip; returns the defects completed by them.

        Every tile row the new rows complete is scored in one batched call before anything changes,
        so a push that fails (bad block, backend error) leaves the inspector as it was: the first
        block fixes the strip's width and format only once it is scored. A push interrupted after
        that (KeyboardInterrupt) keeps the defects of the tile rows it finished for the next call,
        and flush scores the rows it left; the tile row it was in may be left incomplete: for exact
        results after an interruption, flush and start a new strip.

        Args:
            block: (rows, width) or (rows, width, 1 or 3) uint8 or uint16, any number of rows, of the
                strip's width and format.

        Raises:
            ConfigError: the strip was flushed.
            InvalidImageError: the block is not such an array, is narrower than a tile, differs from
                the strip's width or format, or holds uint16 pixels beyond the detector's bit_depth.
            BackendError: the backend failed, or the network produced NaN or infinite values.
        """
        if self._flushed:
            raise ConfigError("this strip was flushed; start a new StreamingInspector for the next strip")
        block = self._check_block(block)
        started = time.perf_counter()
        first = self._channels is None
        columns = self._tile_columns(block.shape[1]) if first else self._columns
        rows = np.concatenate([self._rows, block]) if self._rows.shape[0] else block.copy()
        pushed = self.rows_pushed + block.shape[0]
        tops = list(range(self._next_tile_row, pushed - self.tile_height + 1, self.stride))
        maps = self._score(rows, tops, columns)
        if first:  # only now: a first block that failed must not fix the strip's format
            self._fix_format(block, columns)
        self._rows, self.rows_pushed = rows, pushed
        for top, row_maps in zip(tops, maps, strict=True):
            # kept as each tile row is blended: an interruption between tile rows (KeyboardInterrupt)
            # loses none of them; the next call returns them, and scores the rows not blended again
            self._undelivered += self._blend(top, row_maps, final_row=top + self.stride)
        self.seconds["total"] += time.perf_counter() - started
        return self._deliver()

    def flush(self) -> list[StripDefect]:
        """End of the strip: score the rows not yet covered, close every open defect. Once flushed, the
        inspector takes no more rows; a second flush returns nothing.

        Returns:
            The defects still open at the end of the strip, and any that an interrupted call left
            undelivered: handle them as push's.

        Raises:
            InvalidImageError: the model refuses pixels of the last rows, which no push has scored
                yet (uint16 beyond the detector's bit_depth).
            BackendError: the backend failed, or the network produced NaN or infinite values.
        """
        if self._flushed or self.rows_pushed == 0:
            self._flushed = True
            return self._deliver()
        started = time.perf_counter()
        # tile rows a push completed but did not blend, having been interrupted
        pending = list(range(self._next_tile_row, self.rows_pushed - self.tile_height + 1, self.stride))
        for top, row_maps in zip(pending, self._score(self._rows, pending), strict=True):
            self._undelivered += self._blend(top, row_maps, final_row=top + self.stride)
        if self._tile_rows and self._tile_rows[-1][2] >= self.rows_pushed:
            self._undelivered += self._finalize(self.rows_pushed)  # the last tile row already reaches the end
        else:
            # a strip shorter than one tile is mirrored to one
            self._rows = mirror_pad(self._rows, self.tile_height, self.width)
            top = max(0, self.rows_pushed - self.tile_height)  # the last tile row, flush with the end
            self._undelivered += self._blend(top, self._score(self._rows, [top])[0], final_row=self.rows_pushed)
        self._undelivered += self._with_tiles(self._regions.close())
        self._flushed = True
        self.seconds["total"] += time.perf_counter() - started
        return self._deliver()

    def _deliver(self) -> list[StripDefect]:
        """The defects to return, after on_rows has seen the rows made final. Called when every row and
        defect is stored: the host's callback failing then loses nothing; its defects are kept for
        the next call, so a display hook that raises cannot hide a defect."""
        defects, self._undelivered = self._undelivered, []
        while self._unshown and self.on_rows is not None:
            first, final = self._unshown.pop(0)
            try:
                self.on_rows(first, final)
            except BaseException:
                self._undelivered = defects
                raise
        self._unshown.clear()
        return defects

    # -- tiles and blending ------------------------------------------------------------------------
    def _score(self, rows: np.ndarray, tops: list[int], columns: list[int] | None = None) -> list[np.ndarray]:
        """Maps of the tile rows starting at `tops`, scored in one batched call: one array per row.
        `columns`: the tiles' left edges, where the strip's are not fixed yet (its first block)."""
        if not tops:
            return []
        columns = self._columns if columns is None else columns
        tiles = []
        for top in tops:
            offset = top - self._rows_start
            tiles += [rows[offset:offset + self.tile_height, x:x + self.tile_width] for x in columns]
        maps, _ = self.detector.raw_maps(tiles, timings=self.seconds)
        per_row = len(columns)
        return [maps[i * per_row:(i + 1) * per_row] for i in range(len(tops))]

    def _blend(self, top: int, maps: np.ndarray, final_row: int) -> list[StripDefect]:
        """Add one tile row's maps to the strip map; rows before `final_row` become final."""
        self.tiles += len(maps)
        span = top + self.tile_height - self._next_tile_row  # rows from the accumulator's start
        if self._acc is None:
            self._acc = np.zeros((0, self.width), np.float32)
            self._acc_weight = np.zeros((0, self.width), np.float32)
        if self._acc.shape[0] < span:
            grow = span - self._acc.shape[0]
            self._acc = np.concatenate([self._acc, np.zeros((grow, self.width), np.float32)])
            self._acc_weight = np.concatenate([self._acc_weight, np.zeros((grow, self.width), np.float32)])
        skip = max(0, self._next_tile_row - top)  # rows of this tile that are already final (last row only)
        self._tile_rows.append((self._tile_row_count, top + skip, top + self.tile_height))
        self._tile_row_count += 1
        rows = slice(top + skip - self._next_tile_row, span)
        for x, tile_map in zip(self._columns, maps, strict=True):
            self._acc[rows, x:x + self.tile_width] += tile_map[skip:] * self._weight[skip:]
            self._acc_weight[rows, x:x + self.tile_width] += self._weight[skip:]
        return self._finalize(final_row)

    def _finalize(self, final_row: int) -> list[StripDefect]:
        """Rows up to `final_row` are covered by every tile that will ever cover them: emit them."""
        done = final_row - self._next_tile_row
        final = self._acc[:done] / self._acc_weight[:done]
        first = self._next_tile_row
        self._acc, self._acc_weight = self._acc[done:], self._acc_weight[done:]
        self._next_tile_row = final_row
        self.rows_final = final_row
        # Keep one tile height of image rows above the next tile row, for a last tile flush with the end.
        keep_from = max(0, final_row - self.tile_height)
        self._rows = self._rows[keep_from - self._rows_start:]
        self._rows_start = keep_from
        if self.on_rows is not None:
            self._unshown.append((first, final))
        return self._with_tiles(self._regions.add(first, final))

    def _with_tiles(self, defects: list[StripDefect]) -> list[StripDefect]:
        """Each defect with the tiles whose maps contributed to its box. Done here, not by a callback
        held in StripRegions: that would be a reference cycle, and an inspector with its row buffers
        would then wait for the cyclic garbage collector instead of being freed with its last reference."""
        return [dataclasses.replace(d, tiles=tuple(
            (i, j) for i, first, end in self._tile_rows if first < d.row + d.height and end > d.row
            for j, x in enumerate(self._columns) if x < d.col + d.width and x + self.tile_width > d.col))
            for d in defects]


class StripRegions:
    """Connected components of a map that arrives in bands of final rows, each reported once.

    Components that touch the newest row may continue into the next band, so their rows are kept
    (pending) and labelled again with it; reported components are masked out of what is kept. A
    component taller than `max_rows` is reported in parts, each but the last marked `continues`,
    which bounds memory whatever the defect."""

    def __init__(self, width: int, threshold: float, stats, max_rows: int):
        self.width, self.threshold, self.stats, self.max_rows = width, threshold, stats, max_rows
        self.pending = np.empty((0, width), np.float32)  # final map rows still holding open components
        self.pending_start = 0

    def add(self, first: int, band: np.ndarray) -> list[StripDefect]:
        """Rows first.. of the map, final; returns the components that they complete."""
        if self.pending.shape[0] == 0:
            self.pending_start = first
            stack = band
        else:
            stack = np.concatenate([self.pending, band])
        above = stack > self.threshold
        if not above.any():
            self.pending = np.empty((0, self.width), np.float32)
            return []
        if stack is band:
            stack = band.copy()  # reported pixels get masked below; the caller's rows stay as they were
        count, labels, boxes, _ = cv2.connectedComponentsWithStats(above.astype(np.uint8), connectivity=8)
        bottom = stack.shape[0]
        defects, open_top = [], bottom
        for label in range(1, count):
            x, y, w, h, _ = (int(v) for v in boxes[label])
            touches_bottom = y + h == bottom
            if touches_bottom and h <= self.max_rows:  # may go on in the next band: keep its rows
                open_top = min(open_top, y)
                continue
            # Complete, or longer than max_rows: then reported in parts, this one marked `continues`.
            defects.append(self._defect(stack, labels, label, boxes[label], continues=touches_bottom))
            window = stack[y:y + h, x:x + w]
            window[labels[y:y + h, x:x + w] == label] = -np.inf  # reported: never again
        self.pending = stack[open_top:].copy() if open_top < bottom else np.empty((0, self.width), np.float32)
        self.pending_start += open_top
        return defects

    def close(self) -> list[StripDefect]:
        """The end of the map: every component still open."""
        stack, self.pending = self.pending, np.empty((0, self.width), np.float32)
        if stack.shape[0] == 0:
            return []
        count, labels, boxes, _ = cv2.connectedComponentsWithStats((stack > self.threshold).astype(np.uint8),
                                                                   connectivity=8)
        return [self._defect(stack, labels, label, boxes[label]) for label in range(1, count)]

    def _defect(self, stack: np.ndarray, labels: np.ndarray, label: int, box, continues: bool = False) -> StripDefect:
        x, y, width, height, area = (int(v) for v in box)
        window = np.where(labels[y:y + height, x:x + width] == label, stack[y:y + height, x:x + width], -np.inf)
        py, px = np.unravel_index(int(np.argmax(window)), window.shape)
        peak = float(window[py, px])
        top = self.pending_start + y
        return StripDefect(top, x, height, width, area, peak, float(normalize(peak, self.stats)),
                           top + int(py), x + int(px), (), continues)


def replay(inspector: StreamingInspector, source, block_rows: int = 256,
           on_defect: Callable[[StripDefect], None] | None = None,
           on_block: Callable[[int, int], None] | None = None) -> dict:
    """Feed a recorded strip through `inspector` as a camera would: a tall image cut into blocks of
    `block_rows`, or a folder of consecutive block images (in name order, each pushed as it is).
    Returns the defects and the inspector's throughput; file decoding is not counted.
    `on_block(done, total)` is called after each block (a progress bar's hook).

    Raises:
        ConfigError: block_rows is not a whole number >= 1, or the inspector was flushed.
        InvalidImageError: the strip image or a block image cannot be read (naming the file), a block
            is refused by push, or the folder has no images.
        BackendError: the backend failed, or the network produced NaN or infinite values.
    """
    from pathlib import Path

    from ..data import images_in, not_read_in
    from ..preprocessing import load_image

    source = Path(source)
    if not is_whole(block_rows) or block_rows < 1:
        raise ConfigError(f"--block-rows {block_rows!r} must be a whole number, at least 1")
    if source.is_dir():
        files = images_in(source)
        if not files:
            raise InvalidImageError(f"{source}: no block images in this folder")
        if left_out := not_read_in(source):  # a missing block moves every later defect's rows
            logger.warning("%s: not read: %s; the strip is the %d blocks directly in it, in name order", source,
                           left_out, len(files))
        blocks, total = ((path, load_image(path)) for path in files), len(files)
    else:
        strip = load_image(source)
        blocks = ((source, strip[i:i + block_rows]) for i in range(0, strip.shape[0], block_rows))
        total = -(-strip.shape[0] // block_rows)
    defects: list[StripDefect] = []
    for done, (path, block) in enumerate(blocks, 1):
        try:
            found = inspector.push(block)
        except InvalidImageError as exc:  # the file that holds the block, as every other image error names it
            raise InvalidImageError(f"{path}: {exc}") from None
        defects += found
        for defect in found if on_defect else ():
            on_defect(defect)
        if on_block:
            on_block(done, total)
    found = inspector.flush()
    defects += found
    for defect in found if on_defect else ():
        on_defect(defect)
    seconds = inspector.seconds["total"]
    rows = inspector.rows_pushed
    return {"rows": rows, "width": inspector.width, "tiles": inspector.tiles, "overlap": inspector.overlap,
            "pixel_threshold": inspector.pixel_threshold, "pixel_threshold_rule": inspector.pixel_threshold_rule,
            "seconds": seconds,
            "rows_per_s": rows / seconds if seconds else 0.0,
            "megapixels_per_s": rows * inspector.width / seconds / 1e6 if seconds else 0.0,
            "defects": [d.to_dict() for d in defects]}

"""From the network's maps and scores to decisions: maps at each image's own size, normalised scores,
pass/fail against the thresholds, and defect regions (connected components of the thresholded map).

A failed image always says where to look. With a score head the image decision is not the map's: the
head can fail a part whose map stays under the pixel threshold everywhere (measured on magnetic_tile:
11 to 14% of the failed defective tiles). Such an image gets the one region around its map's highest
point, above the highest point of a typical good part (the good maps' maxima's mean), marked
`above_pixel_threshold=False` (drawn in another colour). Failed defective tiles with a region on the
defect: 74 -> 82% on the validation half, 79 -> 88% held out (benchmarks/regions_magnetic_tile.py).

All values stay in the model's raw score units (those of `Thresholds` and `ScoreStats`), with the
z-score against good parts alongside, so a threshold read in the metadata means the same thing here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from ..scoring import ScoreStats, Thresholds, check_thresholds, fails, normalize


class AssignableThresholds:
    """The `thresholds` attribute of Detector and RemoteDetector: the raw-score thresholds used when a
    call does not override them (the model's, or the server's, by default); assigning anything but a
    Thresholds raises ConfigError at once, not at the next image."""

    _thresholds: Thresholds

    @property
    def thresholds(self) -> Thresholds:
        return self._thresholds

    @thresholds.setter
    def thresholds(self, value: Thresholds) -> None:
        self._thresholds = check_thresholds(value)


@dataclass(frozen=True)
class Region:
    """One defect region in image pixel coordinates (x: column, y: row, from the image's top left).

    Attributes:
        x, y, width, height: the bounding box; `box` gives the four together.
        area: image pixels above the pixel threshold (counted at the model's resolution, scaled).
        peak_score: the highest raw map value inside the region, in the thresholds' units.
        peak_normalized: the same as a z-score against good parts' map maxima (Detector.map_stats).
        peak_x, peak_y: where that value is. to_dict() gives them as "peak": [x, y] and by name.
        above_pixel_threshold: False for the one region a failed image with nothing over the pixel
            threshold gets: where its map is highest.
    """

    x: int  # left column of the bounding box
    y: int  # top row
    width: int
    height: int
    area: int  # image pixels above the pixel threshold (counted at the model's resolution, scaled)
    peak_score: float  # highest raw map value inside the region
    peak_normalized: float  # the same as a z-score against good parts' map maxima (metadata region_stats)
    peak_x: int
    peak_y: int
    # False: a failed image's map has nothing over the pixel threshold; this is where it is highest.
    above_pixel_threshold: bool = True

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.width, self.height

    def to_dict(self) -> dict:
        """JSON-able: the box as [x, y, width, height] and the peak as [x, y], in image pixels."""
        return {"box": list(self.box), "area": self.area, "peak_score": self.peak_score,
                "peak_normalized": self.peak_normalized, "peak": [self.peak_x, self.peak_y],
                "peak_x": self.peak_x, "peak_y": self.peak_y, "above_pixel_threshold": self.above_pixel_threshold}


@dataclass(frozen=True)
class Detection:
    """The result for one image. Compared and hashed by everything but its map.

    Attributes:
        source: the file's path, or "array[i]" for the i-th array of a call.
        image_size: (height, width) of the input image.
        score: the raw image score (the maximum of the model's map, or of its score head's), in the
            thresholds' units.
        normalized_score: the same as a z-score against the good images' scores stored with the model
            (Detector.score_stats): 3.0 means three standard deviations above their mean.
        is_anomalous: score > image_threshold (`passed` is its opposite).
        image_threshold, pixel_threshold: the raw thresholds this result was decided with.
        regions: the regions over the pixel threshold, highest peak first; a failed image with none
            gets one, where its map is highest (Region.above_pixel_threshold False).
        model_map: float32 in raw map units at the model's resolution, covering the image's extent.
        anomaly_map: (height, width) float32 in raw map units, the image's own size, bilinearly
            enlarged from model_map when first read (16 MB for a 4-megapixel frame: made only for a
            caller that reads it, such as the overlay).
    """

    source: str  # the path, or "array[i]" for the i-th array of a call
    image_size: tuple[int, int]  # (height, width) of the input image
    score: float  # raw image score: the maximum of the model's map, or of its score head's
    normalized_score: float  # z-score against the good images' scores stored with the model (score_stats)
    is_anomalous: bool  # score > image threshold
    image_threshold: float
    pixel_threshold: float
    regions: tuple[Region, ...]  # over the pixel threshold; a failed image with none: where its map is highest
    # float32, raw units, at the model's resolution over the image's extent; left out of ==, which an array breaks
    model_map: np.ndarray = field(repr=False, compare=False)

    @property
    def anomaly_map(self) -> np.ndarray:
        """(height, width) float32, raw map units, the image's own size: model_map enlarged bilinearly,
        once, when first read. (Not functools.cached_property: before Python 3.12 it holds one lock for
        every instance, and threads reading different Detections' maps would take turns.)"""
        made = self.__dict__.get("_anomaly_map")
        if made is None:
            height, width = self.image_size
            made = self.model_map if self.model_map.shape == (height, width) else cv2.resize(
                self.model_map, (width, height), interpolation=cv2.INTER_LINEAR)
            object.__setattr__(self, "_anomaly_map", made)  # two threads at once make the same map: either stays
        return made

    @property
    def passed(self) -> bool:
        return not self.is_anomalous

    def to_dict(self) -> dict:
        """JSON-able summary (the map itself is left out: write it as an image or .npy). The verdict as
        `decision` ("pass" or "fail", for people) and `is_anomalous`, the attribute's and the server's name."""
        return {"source": self.source, "image_size": list(self.image_size), "score": self.score,
                "normalized_score": self.normalized_score, "decision": "fail" if self.is_anomalous else "pass",
                "is_anomalous": self.is_anomalous,
                "image_threshold": self.image_threshold, "pixel_threshold": self.pixel_threshold,
                "regions": [r.to_dict() for r in self.regions]}


def resolve_thresholds(default: Thresholds, stats: ScoreStats, image: float | None = None,
                       pixel: float | None = None, sigma: float | None = None,
                       map_stats: ScoreStats | None = None, scored: str = "held-out") -> Thresholds:
    """Per-call overrides: raw values win; `sigma` sets both to mean + sigma * std (the pixel threshold
    on `map_stats`, the good maps' maxima, where they differ from the scores'; `scored`: how the good
    scores were scored, for the rule's words); else the default.

    Raises:
        ConfigError: a threshold that is not a finite number, or sigma below 0.
    """
    base = Thresholds.from_stats(stats, sigma, map_stats, scored) if sigma is not None else default
    if image is None and pixel is None:
        return base
    chosen = Thresholds(image=base.image if image is None else image, pixel=base.pixel if pixel is None else pixel,
                        rule="")  # checked here: a bad value is refused before the rule quotes it
    # The rule says where each came from, so that a results.json can be audited later
    source = f"sigma {sigma:g} ({base.rule})" if sigma is not None else f"the default ({base.rule})"
    parts = [f"image: given for this call ({chosen.image:g})" if image is not None else f"image: {source}",
             f"pixel: given for this call ({chosen.pixel:g})" if pixel is not None else f"pixel: {source}"]
    return replace(chosen, rule="; ".join(parts))


def find_regions(model_map: np.ndarray, threshold: float, stats: ScoreStats, image_size: tuple[int, int],
                 min_area: int = 1) -> tuple[Region, ...]:
    """Connected components (8-connected) of the model's map > threshold, highest peak first, in the
    image's pixel coordinates.

    They are found at the model's resolution, where an image score that is the map's maximum is
    measured, so such an image is over equal thresholds exactly when it has a region; boxes are then scaled out to cover the same
    area of the image, areas are scaled, and peaks sit at the centre of their model pixel."""
    above = model_map > threshold
    rows, cols = np.flatnonzero(above.any(axis=1)), np.flatnonzero(above.any(axis=0))
    if rows.size == 0:  # the usual case on a line: a good part, nothing to label
        return ()
    # Label only the bounding box of what is above the threshold: same components, fewer pixels.
    top, left = int(rows[0]), int(cols[0])
    crop = np.ascontiguousarray(above[top:rows[-1] + 1, left:cols[-1] + 1], dtype=np.uint8)
    values = model_map[top:rows[-1] + 1, left:cols[-1] + 1]
    count, labels, boxes, _ = cv2.connectedComponentsWithStats(crop, connectivity=8)
    height, width = image_size
    scale_y, scale_x = height / model_map.shape[0], width / model_map.shape[1]
    regions = []
    for label in range(1, count):
        x, y, w, h, pixels = (int(v) for v in boxes[label])
        # In an image smaller than the model's input a region can cover less than one image pixel; it
        # still counts as one, so that a map over the pixel threshold always gives a region.
        area = max(1, int(round(pixels * scale_x * scale_y)))
        if area < min_area:
            continue
        window = np.where(labels[y:y + h, x:x + w] == label, values[y:y + h, x:x + w], -np.inf)
        py, px = np.unravel_index(int(np.argmax(window)), window.shape)
        peak = float(window[py, px])
        x0, y0 = int(np.floor((left + x) * scale_x)), int(np.floor((top + y) * scale_y))
        x1 = min(width, int(np.ceil((left + x + w) * scale_x)))
        y1 = min(height, int(np.ceil((top + y + h) * scale_y)))
        regions.append(Region(x0, y0, x1 - x0, y1 - y0, area, peak, float(normalize(peak, stats)),
                              min(width - 1, int((left + x + px + 0.5) * scale_x)),
                              min(height - 1, int((top + y + py + 0.5) * scale_y))))
    return tuple(sorted(regions, key=lambda r: -r.peak_score))


def image_regions(model_map: np.ndarray, thresholds: Thresholds, failed: bool, stats: ScoreStats,
                  image_size: tuple[int, int], min_area: int = 1) -> tuple[Region, ...]:
    """The regions over the pixel threshold; on a failed image with none, the one region around the
    map's highest point above `stats.mean` (the good maps' typical maximum), if the map reaches it."""
    regions = find_regions(model_map, thresholds.pixel, stats, image_size, min_area)
    if regions or not failed:
        return regions
    return tuple(replace(r, above_pixel_threshold=False)
                 for r in find_regions(model_map, stats.mean, stats, image_size, min_area)[:1])


def postprocess(maps: np.ndarray, scores: np.ndarray, sizes: list[tuple[int, int]], sources: list[str],
                thresholds: Thresholds, stats: ScoreStats, min_region_area: int = 1,
                map_stats: ScoreStats | None = None) -> list[Detection]:
    """Network outputs for a batch (maps (N, h, w) at the model's input size, scores (N,)) -> Detections.
    Scores are normalised on `stats`, region peaks on `map_stats` (default: the same)."""
    detections = []
    z_scores = normalize(scores, stats)
    for i, (height, width) in enumerate(sizes):
        # a copy: a view would keep the whole batch's maps alive for as long as one Detection is kept
        model_map = np.array(maps[i], dtype=np.float32)
        score = float(scores[i])
        failed = bool(fails(score, thresholds.image))
        detections.append(Detection(
            source=sources[i], image_size=(height, width), score=score, normalized_score=float(z_scores[i]),
            is_anomalous=failed, image_threshold=thresholds.image, pixel_threshold=thresholds.pixel,
            regions=image_regions(model_map, thresholds, failed, map_stats or stats, (height, width), min_region_area),
            model_map=model_map))
    return detections

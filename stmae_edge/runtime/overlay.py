"""Heatmap overlays for people: the anomaly map over the image, defect boxes and the decision."""

from __future__ import annotations

import functools

import cv2
import numpy as np

from ..preprocessing import check_within_bit_depth, to_float, to_rgb_float
from ..scoring import ScoreStats
from .postprocess import Detection

FAIL_COLOR, PASS_COLOR = (40, 40, 230), (60, 180, 60)  # BGR
LOOK_COLOR = (0, 165, 255)  # a failed image's highest region, under the pixel threshold


def display_image(image: np.ndarray, bit_depth: int = 16) -> np.ndarray:
    """A decoded image (any dtype and channel count the runtime accepts) as BGR uint8, for people."""
    if image.dtype == np.uint16:  # each value through a table: the float round trip's bytes, 7x faster at 4 MP
        check_within_bit_depth(image, bit_depth)
        image = display_bytes(bit_depth)[image]  # a new array
        if image.ndim == 3 and image.shape[2] >= 3:
            return np.ascontiguousarray(image[:, :, :3])
    if image.dtype == np.uint8:  # already display bytes: the float round trip gives them back exactly, 30x slower
        if image.ndim == 2 or image.shape[2] == 1:
            return cv2.cvtColor(np.ascontiguousarray(image.reshape(image.shape[:2])), cv2.COLOR_GRAY2BGR)
        return image[:, :, :3].copy()  # BGR, or BGRA without its alpha; a copy: the caller may draw on it
    return np.ascontiguousarray(np.rint(to_rgb_float(image, bit_depth)[:, :, ::-1] * 255).clip(0, 255).astype(np.uint8))


@functools.lru_cache(maxsize=8)
def display_bytes(bit_depth: int) -> np.ndarray:
    """The display byte of every uint16 value at `bit_depth` significant bits, as the float path computes
    it: rounded, not cut, so that a 16-bit frame of 8-bit content (x * 257) shows its own bytes, not one
    less (values above the bit depth are refused before the table is read)."""
    table = np.full(1 << 16, 255, np.uint8)
    top = (1 << bit_depth) - 1
    table[:top + 1] = np.rint(to_float(np.arange(top + 1, dtype=np.uint16), bit_depth) * 255).clip(0, 255)
    table.flags.writeable = False  # shared by every overlay of the process
    return table


def render_overlay(image: np.ndarray, detection: Detection, stats: ScoreStats, alpha: float = 0.45,
                   bit_depth: int = 16) -> np.ndarray:
    """A decoded image (any dtype and channel count the runtime accepts) -> BGR uint8 overlay.

    `stats` are the map's (Detector.map_stats). The colour scale runs from the good parts' mean (blue) to
    as far above the pixel threshold as the threshold is above the mean (red), so the threshold sits at
    mid-scale (green-yellow)."""
    base = display_image(image, bit_depth)
    low = stats.mean
    high = max(2 * detection.pixel_threshold - stats.mean, low + 1e-6)
    level = np.subtract(detection.anomaly_map, low, dtype=np.float32)  # one full-size buffer, worked in place
    level /= high - low
    np.clip(level, 0, 1, out=level)
    level *= 255
    heat = cv2.applyColorMap(level.astype(np.uint8), cv2.COLORMAP_JET)
    out = cv2.addWeighted(np.ascontiguousarray(base), 1 - alpha, heat, alpha, 0)
    thickness = max(1, round(max(out.shape[:2]) / 300))
    for region in detection.regions:
        cv2.rectangle(out, (region.x, region.y), (region.x + region.width - 1, region.y + region.height - 1),
                      FAIL_COLOR if region.above_pixel_threshold else LOOK_COLOR, thickness)
    color = FAIL_COLOR if detection.is_anomalous else PASS_COLOR
    label = verdict_label(detection)
    scale = max(0.4, max(out.shape[:2]) / 800)
    cv2.putText(out, label, (4, int(22 * scale) + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2)
    cv2.putText(out, label, (4, int(22 * scale) + 2), cv2.FONT_HERSHEY_SIMPLEX, scale, color, thickness)
    return out


def verdict_label(detection: Detection) -> str:
    """The overlay's words: the verdict, and the score against the threshold it was judged by (a z-score
    alone does not say which side it is on where the threshold was chosen by another rule)."""
    if detection.is_anomalous:
        return f"FAIL {detection.score:.6g} > {detection.image_threshold:.6g}"
    return f"PASS {detection.score:.6g} <= {detection.image_threshold:.6g}"

"""Evaluation metrics in the MVTec AD style: image AUROC, pixel AUROC, AUPRO, F1 at a threshold.

numpy, and OpenCV's connected components for AUPRO's regions: what the runtime installs, so that an
exported graph is evaluated without torch or scipy (the tests check the regions against scipy's).

Conventions
- Labels and masks: nonzero / True = anomalous. Scores and maps: higher = more anomalous.
- A metric that is undefined for the data (one class only, no ground-truth region, ...) is NaN from the
  metric functions and None in :func:`summarize` (so its result passes ``json.dumps(..., allow_nan=False)``).
- Maps are used in their own floating dtype (float32 stays float32: 40M pixels are 160 MB, not 320 MB).
  NaN in scores or maps is an error (ValueError): it has no place in a ranking.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import cv2
import numpy as np

from .operating_point import Z_95, OperatingPoint, evaluate_threshold

__all__ = ["image_auroc", "image_auroc_interval", "image_auroc_by_type", "image_auroc_interval_by_type",
           "interval_or_none", "pixel_auroc", "pixel_auroc_against", "aupro", "pro_curve", "roc_curve",
           "f1_at_threshold", "summarize", "metric_or_none", "percent_text", "interval_text"]

_NAN = float("nan")
# Thresholds processed per block when building the PRO curve: bounds the memory of the exact curve.
_CHUNK = 1 << 20


# ----------------------------------------------------------------------------------------------------
# input handling


def _scores_1d(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1) != 0
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) must have the same length")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return y, s


def _pixels(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) bool masks and floating maps, without a copy where the input already fits."""
    m = np.asarray(maps)
    if m.dtype not in (np.float32, np.float64):
        m = m.astype(np.float32 if m.dtype.itemsize <= 2 else np.float64)
    g = np.asarray(masks)
    if g.dtype != np.bool_:
        g = g > 0
    if m.ndim == 2:
        m = m[None]
    if g.ndim == 2:
        g = g[None]
    if m.ndim != 3 or g.shape != m.shape:
        raise ValueError(f"masks {g.shape} and maps {m.shape} must both have shape (N, H, W)")
    if np.isnan(m).any():
        raise ValueError("anomaly maps contain NaN")
    return g, m


# ----------------------------------------------------------------------------------------------------
# image level


def image_auroc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """ROC AUC of image scores (labels: 1 = anomalous). NaN when only one class is present."""
    y, s = _scores_1d(labels, scores)
    if y.all() or not y.any():
        return _NAN
    return _auc_from_classes(s[y].copy(), s[~y].copy())  # the pixel AUROC's one definition, ties counted half


def image_auroc_interval(labels: Sequence[int], scores: Sequence[float], z: float = Z_95) -> tuple[float, float] | None:
    """95% confidence interval of the image AUROC (DeLong's variance, on the logit scale so that it stays
    inside 0..1), for images drawn independently: several photographs of one part are not, and then the
    true spread is wider. None where it cannot be estimated: fewer than two images of a class, the
    classes perfectly separated (AUROC 0 or 1), or every score tied (DeLong's variance is then 0 whatever
    the count)."""
    y, s = _scores_1d(labels, scores)
    pos, neg = s[y], s[~y]
    m, n = pos.size, neg.size
    if m < 2 or n < 2:
        return None
    neg_sorted, pos_sorted = np.sort(neg), np.sort(pos)
    # each defective image's share of good images it outranks, each good image's share of defective
    # images that outrank it (ties half): DeLong's structural components; their means are the AUROC
    per_defect = (np.searchsorted(neg_sorted, pos, "left") + np.searchsorted(neg_sorted, pos, "right")) / (2.0 * n)
    per_good = (2 * m - np.searchsorted(pos_sorted, neg, "right") - np.searchsorted(pos_sorted, neg, "left")) / (2.0 * m)
    auc = float(per_defect.mean())
    variance = per_defect.var(ddof=1) / m + per_good.var(ddof=1) / n
    if not 0.0 < auc < 1.0 or variance <= 0.0:
        return None
    centre, half = math.log(auc / (1.0 - auc)), z * math.sqrt(variance) / (auc * (1.0 - auc))
    return 1.0 / (1.0 + math.exp(half - centre)), 1.0 / (1.0 + math.exp(-centre - half))


def f1_at_threshold(labels: Sequence[int], scores: Sequence[float], threshold: float) -> dict[str, float | None]:
    """Precision, recall and F1 of the decision ``score > threshold``. Precision is None where no image
    is flagged and recall None where there is no defective image (0/0: undefined, as `threshold` and
    `report` say "n/a"); F1 is 0.0 where either is 0 or undefined."""
    y, s = _scores_1d(labels, scores)
    return _precision_recall_f1(evaluate_threshold(threshold, s[~y], s[y], rule=""))


def _precision_recall_f1(point: OperatingPoint) -> dict[str, float | None]:
    precision, recall = metric_or_none(point.precision), metric_or_none(point.recall)
    p, r = precision or 0.0, recall or 0.0
    f1 = 2.0 * p * r / (p + r) if p + r else 0.0
    return {"precision": precision, "recall": recall, "f1": float(f1)}


# ----------------------------------------------------------------------------------------------------
# pixel level


def _auc_from_classes(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney AUC = P(pos > neg) + P(pos == neg) / 2, exact, by sorting (ties handled).

    Equal to sklearn's roc_auc_score on the same data, ~20x faster on 40M pixels (sklearn does a stable
    argsort of float64 copies; this sorts each class in its own dtype and binary-searches sorted keys).
    """
    neg.sort()
    pos.sort()
    return _auc_of_sorted(pos, neg)


def _auc_of_sorted(pos: np.ndarray, neg: np.ndarray) -> float:
    """:func:`_auc_from_classes` of two classes already sorted ascending."""
    below = np.searchsorted(neg, pos, side="left").sum(dtype=np.int64)
    below_or_tied = np.searchsorted(neg, pos, side="right").sum(dtype=np.int64)
    return float((int(below) + int(below_or_tied)) / (2.0 * pos.size * neg.size))


def pixel_auroc(masks: Any, maps: Any) -> float:
    """ROC AUC over all pixels of all images (masks (N,H,W) bool/0-1, maps (N,H,W) float).

    NaN when there is no anomalous or no normal pixel.
    """
    g, m = _pixels(masks, maps)
    pos = m[g]  # copies (boolean indexing), sorted in place below
    if pos.size == 0 or pos.size == g.size:
        return _NAN
    neg = m[~g]
    return _auc_from_classes(pos, neg)


def pixel_auroc_against(masks: Any, maps: Any, defect_types: Sequence[str]) -> dict[str, dict[str, float]]:
    """Where the pooled pixel AUROC is lost: for each defect type, the AUROC of its anomalous pixels
    against the normal pixels of each group of images (``result[type][group]``; groups are the values
    of ``defect_types``, "good" and the defect types alike, so a type is also measured against the
    normal pixels around its own defects).

    The pooled :func:`pixel_auroc` is their average weighted by pixel counts (each entry by the type's
    anomalous pixels times the group's normal pixels). Against "good" alone a type can score high while
    the normal pixels of other defective images outrank its defects: a detector that finds whole
    defective parts unusual, not only their defects, loses pooled pixel AUROC there. NaN where a type
    has no anomalous pixel or a group no normal pixel.
    """
    g, m = _pixels(masks, maps)
    types = np.asarray([str(t) for t in defect_types])
    if types.shape != (g.shape[0],):
        raise ValueError(f"defect_types ({types.size}) and masks/maps ({g.shape[0]} images) must match")
    groups = sorted(set(types.tolist()))
    normal = {}
    for group in groups:
        this = types == group
        normal[group] = np.sort(m[this][~g[this]])
    out: dict[str, dict[str, float]] = {}
    for name in groups:
        if name == "good":
            continue
        this = types == name
        anomalous = np.sort(m[this][g[this]])
        out[name] = {group: (_auc_of_sorted(anomalous, neg) if anomalous.size and neg.size else _NAN)
                     for group, neg in normal.items()}
    return out


def _region_weights(g: np.ndarray) -> tuple[np.ndarray, int]:
    """For each anomalous pixel (in the C order of ``maps[masks]``): 1 / size of its region.

    Regions are the 8-connected components of each image's mask, labelled image by image.
    Returns the weights and the number of regions.
    """
    parts = []
    n_regions = 0
    for image_mask in g:
        if not image_mask.any():
            continue
        count, lab = cv2.connectedComponents(image_mask.astype(np.uint8), connectivity=8)
        n = count - 1  # label 0 is the background
        ids = lab[image_mask]  # 1..n, C order: matches maps[i][mask[i]] and so maps[masks]
        sizes = np.bincount(ids, minlength=n + 1).astype(np.float64)
        parts.append(1.0 / sizes[ids])
        n_regions += n
    if not parts:
        return np.zeros(0), 0
    return np.concatenate(parts), n_regions


def _pro_table(pos: np.ndarray, weights: np.ndarray, n_regions: int) -> tuple[np.ndarray, np.ndarray]:
    """Anomalous scores sorted ascending, and pro_ge[i] = the sum of the region weights of pos[i:]:
    PRO(t) = pro_ge[searchsorted(pos, t, "left")] for score >= t, "right" for score > t."""
    order = np.argsort(pos)
    pro_ge = np.zeros(pos.size + 1, dtype=np.float64)
    pro_ge[:-1] = np.cumsum((weights[order] / n_regions)[::-1])[::-1]
    return pos[order], pro_ge


def pro_curve(masks: Any, maps: Any, max_fpr: float = 0.3, points: int = 200,
              threshold: float | None = None) -> dict[str, Any]:
    """The per-region-overlap curve for plots: `points` thresholds evenly spaced in FPR from 0 to
    ``max_fpr`` (decision: score > t), and, given `threshold`, its own (FPR, PRO) point. The area is
    :func:`aupro`'s job; this is what a person looks at. Empty when there is no region."""
    g, m = _pixels(masks, maps)
    weights, n_regions = _region_weights(g)
    neg = np.sort(m[~g])
    if n_regions == 0 or neg.size == 0:
        return {"fpr": [], "pro": [], "point": None}
    pos, pro_ge = _pro_table(m[g], weights, n_regions)

    def at(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        fpr = (neg.size - np.searchsorted(neg, t, side="right")) / neg.size
        return fpr, pro_ge[np.searchsorted(pos, t, side="right")]

    ranks = np.clip(np.round(neg.size * (1 - np.linspace(0, max_fpr, points))).astype(np.int64) - 1, 0, neg.size - 1)
    fpr, pro = at(neg[ranks])
    point = None
    if threshold is not None:
        f, p = at(np.array([threshold], dtype=neg.dtype))
        point = (float(f[0]), float(p[0]))
    return {"fpr": fpr.tolist(), "pro": pro.tolist(), "point": point}


def roc_curve(labels: Sequence[int], scores: Sequence[float]) -> dict[str, list]:
    """Image-level ROC points (FPR, TPR) over every distinct score, highest first, from (0, 0)."""
    y, s = _scores_1d(labels, scores)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct score
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    n_pos, n_neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    return {"fpr": np.r_[0.0, fps / n_neg].tolist(), "tpr": np.r_[0.0, tps / n_pos].tolist()}


def aupro(masks: Any, maps: Any, max_fpr: float = 0.3, num_thresholds: int | None = None) -> float:
    """Normalised area under the per-region-overlap curve up to ``max_fpr`` (MVTec AD definition).

    Regions are the 8-connected components of each ground-truth mask. For a threshold t,
    PRO(t) = mean over all regions of the fraction of the region's pixels with score >= t, and
    FPR(t) = fraction of all normal pixels (all images) with score >= t. PRO is integrated over FPR with
    the trapezoid rule from 0 to exactly ``max_fpr`` (PRO at ``max_fpr`` is interpolated linearly
    between its two neighbouring curve points), then divided by ``max_fpr``: a perfect detector gives 1.

    Threshold set:
    - ``num_thresholds=None`` (default): exact. Every distinct normal-pixel score down to the one at
      which FPR first reaches ``max_fpr`` is a threshold; for each one the curve gets the point just
      above it and the point at it, so ties are segments of the exact curve and the result equals a
      loop over every distinct score of the data (thresholds that are anomalous scores only move PRO at
      constant FPR, which adds no area). Cost: a partition and a sort of the normal scores plus
      binary searches; ~1-2 s for 600 maps of 256x256.
    - ``num_thresholds=K``: K thresholds at evenly spaced quantiles of the normal-pixel scores, i.e.
      FPR steps of ``max_fpr / (K - 1)`` (plus the point just above the highest normal score, so the
      PRO at FPR 0 is exact). Each point is on the exact curve; the trapezoids between them differ from
      the exact area by at most ``max_fpr / (K - 1) / 2`` after normalisation.

    PRO per threshold is computed without a loop over regions: each anomalous pixel carries the weight
    1 / (number of regions * size of its region), and PRO(t) is the sum of the weights of the pixels
    with score >= t (a binary search in the sorted anomalous scores and a cumulative sum).

    NaN when there is no anomalous region or no normal pixel.
    """
    if not 0.0 < float(max_fpr) <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    if num_thresholds is not None and int(num_thresholds) < 2:
        raise ValueError(f"num_thresholds must be None (exact) or >= 2, got {num_thresholds}")
    max_fpr = float(max_fpr)
    g, m = _pixels(masks, maps)
    weights, n_regions = _region_weights(g)
    n_pos = weights.size
    n_neg = g.size - n_pos
    if n_regions == 0 or n_neg == 0:
        return _NAN

    # Only thresholds >= s_k matter, s_k = k-th highest normal score with k = ceil(max_fpr * n_neg):
    # FPR(s_k) >= max_fpr, and every higher threshold has FPR < max_fpr.
    neg = m[~g]
    k = min(max(int(math.ceil(max_fpr * n_neg)), 1), n_neg)
    neg.partition(n_neg - k)  # in place: neg is already a copy
    s_k = neg[n_neg - k]
    neg = neg[neg >= s_k]
    neg.sort()  # ascending; neg[-k] == s_k

    pos = m[g]
    keep = pos >= s_k
    pos, pro_ge = _pro_table(pos[keep], weights[keep], n_regions)
    del weights, keep

    if num_thresholds is None:
        first = np.empty(neg.size, dtype=bool)  # distinct values of the sorted normal scores
        first[0] = True
        np.not_equal(neg[1:], neg[:-1], out=first[1:])
        thresholds = neg[first][::-1]  # descending
        del first
    else:
        ranks = np.unique(np.round(np.linspace(0, k - 1, int(num_thresholds))).astype(np.int64))
        thresholds = np.unique(neg[neg.size - 1 - ranks])[::-1]  # descending, ends with s_k

    area = 0.0
    x0, y0 = 0.0, 0.0  # the curve starts at (FPR 0, PRO 0): threshold above every score
    for start in range(0, thresholds.size, _CHUNK):
        t = thresholds[start : start + _CHUNK]
        n = t.size
        x = np.empty(2 * n + 1)
        y = np.empty(2 * n + 1)
        x[0], y[0] = x0, y0
        # Point just above t (score > t), then the point at t (score >= t).
        x[1::2] = (neg.size - np.searchsorted(neg, t, side="right")) / n_neg
        x[2::2] = (neg.size - np.searchsorted(neg, t, side="left")) / n_neg
        y[1::2] = pro_ge[np.searchsorted(pos, t, side="right")]
        y[2::2] = pro_ge[np.searchsorted(pos, t, side="left")]
        j = int(np.searchsorted(x, max_fpr, side="left"))  # first point with FPR >= max_fpr
        if j <= 2 * n:
            # j >= 1 since x[0] < max_fpr (x[0] is 0 or a FPR of a threshold above s_k).
            frac = (max_fpr - x[j - 1]) / (x[j] - x[j - 1])
            y_end = y[j - 1] + frac * (y[j] - y[j - 1])
            x = np.append(x[:j], max_fpr)
            y = np.append(y[:j], y_end)
            area += float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)
            return float(min(area / max_fpr, 1.0))
        area += float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2.0)
        x0, y0 = float(x[-1]), float(y[-1])
    raise AssertionError("PRO curve did not reach max_fpr")  # unreachable: s_k is a threshold


# ----------------------------------------------------------------------------------------------------
# summary


def metric_or_none(value: float | None) -> float | None:
    """A metric as a JSON value: None where it is undefined (NaN) or was not computed."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def percent_text(value: float | None, width: int = 0) -> str:
    """A rate in [0, 1] as percent with one decimal ("97.8"), or "n/a" where undefined; right-aligned to width."""
    text = "n/a" if metric_or_none(value) is None else f"{100 * float(value):.1f}"
    return f"{text:>{width}s}"


def interval_text(bounds: Sequence[float] | None) -> str:
    """A 95% interval of rates as percent ("96.4 to 98.9"), or "n/a" where it was not estimated."""
    return "n/a" if bounds is None else f"{percent_text(bounds[0])} to {percent_text(bounds[1])}"


def _each_type_with_good(labels: Sequence[int], scores: Sequence[float],
                         defect_types: Sequence[str]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(type, labels, scores) of each defect type's images with all "good" images, types in name order."""
    y, s = _scores_1d(labels, scores)
    types = np.asarray([str(t) for t in defect_types])
    if types.shape != y.shape:
        raise ValueError(f"defect_types ({types.size}) and labels ({y.size}) must have the same length")
    good = types == "good"
    for name in sorted(set(types.tolist()) - {"good"}):
        chosen = (types == name) | good
        yield name, y[chosen], s[chosen]


def image_auroc_by_type(labels: Sequence[int], scores: Sequence[float],
                        defect_types: Sequence[str]) -> dict[str, float | None]:
    """Image AUROC of each defect type's images against all "good" images (None where undefined)."""
    return {name: metric_or_none(image_auroc(y, s)) for name, y, s in _each_type_with_good(labels, scores, defect_types)}


def image_auroc_interval_by_type(labels: Sequence[int], scores: Sequence[float],
                                 defect_types: Sequence[str]) -> dict[str, list[float] | None]:
    """:func:`image_auroc_interval` of each defect type's images against all "good" images, as [low, high]."""
    return {name: interval_or_none(y, s) for name, y, s in _each_type_with_good(labels, scores, defect_types)}


def interval_or_none(labels: Sequence[int], scores: Sequence[float]) -> list[float] | None:
    """:func:`image_auroc_interval` as a JSON value: [low, high], or None."""
    interval = image_auroc_interval(labels, scores)
    return None if interval is None else [float(interval[0]), float(interval[1])]


def summarize(
    labels: Sequence[int],
    scores: Sequence[float],
    masks: Any,
    maps: Any,
    defect_types: Sequence[str],
    threshold: float | None,
) -> dict[str, Any]:
    """All metrics of an evaluation run as plain Python values (JSON-serialisable, no NaN).

    Overall: image_auroc and image_auroc_interval ([low, high], :func:`image_auroc_interval`),
    pixel_auroc, aupro, f1, precision, recall and false_reject_rate (the share of good images failed;
    all at ``score > threshold``), threshold, n_images, n_anomalous.
    ``per_defect_type``: for each defect type other than "good", image_auroc and its interval (that
    type's images against all "good" images), pixel_auroc and aupro (that type's images plus the good images),
    pixel_auroc_against (its anomalous pixels against the normal pixels of each group of images,
    :func:`pixel_auroc_against`) and n_images (of that type).

    ``masks`` (or ``maps``) None: the pixel metrics are None. ``threshold`` None: f1/precision/recall/
    false_reject_rate are None. Undefined metrics (e.g. no good image) are None.
    """
    y, s = _scores_1d(labels, scores)
    types = np.asarray([str(t) for t in defect_types])
    if types.shape != y.shape:
        raise ValueError(f"defect_types ({types.size}) and labels ({y.size}) must have the same length")
    has_pixels = masks is not None and maps is not None
    if has_pixels:
        g, m = _pixels(masks, maps)
        if g.shape[0] != y.size:
            raise ValueError(f"masks/maps have {g.shape[0]} images, labels {y.size}")

    out: dict[str, Any] = {"image_auroc": metric_or_none(image_auroc(y, s)),
                           "image_auroc_interval": interval_or_none(y, s)}
    out["pixel_auroc"] = metric_or_none(pixel_auroc(g, m)) if has_pixels else None
    out["aupro"] = metric_or_none(aupro(g, m)) if has_pixels else None
    if threshold is None:
        out.update(f1=None, precision=None, recall=None, false_reject_rate=None, threshold=None)
    else:
        point = evaluate_threshold(threshold, s[~y], s[y], rule="")
        prf = _precision_recall_f1(point)
        out.update(f1=prf["f1"], precision=prf["precision"], recall=prf["recall"],
                   false_reject_rate=metric_or_none(point.false_reject_rate), threshold=float(threshold))
    out["n_images"] = int(y.size)
    out["n_anomalous"] = int(np.count_nonzero(y))

    good = types == "good"
    against = pixel_auroc_against(g, m, types) if has_pixels else {}
    per_type: dict[str, dict[str, Any]] = {}
    intervals = image_auroc_interval_by_type(y, s, types)
    for name, auroc in image_auroc_by_type(y, s, types).items():
        this = types == name
        sel = np.flatnonzero(this | good)
        entry: dict[str, Any] = {"image_auroc": auroc, "image_auroc_interval": intervals[name]}
        if has_pixels:
            entry["pixel_auroc"] = metric_or_none(pixel_auroc(g[sel], m[sel]))
            entry["aupro"] = metric_or_none(aupro(g[sel], m[sel]))
            entry["pixel_auroc_against"] = {k: metric_or_none(v) for k, v in against[name].items()}
        else:
            entry["pixel_auroc"] = None
            entry["aupro"] = None
            entry["pixel_auroc_against"] = None
        entry["n_images"] = int(np.count_nonzero(this))
        per_type[name] = entry
    out["per_defect_type"] = per_type
    return out

"""Metrics against hand-computed cases and a slow, obviously-correct AUPRO reference."""

import json
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from stmae_edge.evaluation.metrics import (
    aupro,
    f1_at_threshold,
    image_auroc,
    image_auroc_by_type,
    image_auroc_interval,
    interval_text,
    metric_or_none,
    percent_text,
    pixel_auroc,
    pixel_auroc_against,
    summarize,
)

# ---------------------------------------------------------------------------------------------------
# image AUROC / F1


def test_image_auroc_hand_computed():
    # pairs (pos, neg): 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3/4
    assert image_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_image_auroc_one_class_is_nan():
    assert math.isnan(image_auroc([0, 0, 0], [0.1, 0.2, 0.3]))
    assert math.isnan(image_auroc([1, 1], [0.1, 0.2]))
    assert math.isnan(image_auroc([], []))


def test_f1_at_threshold_hand_computed():
    scores = [0.2, 0.6, 0.7, 0.9, 0.5, 0.8]
    labels = [0, 1, 0, 1, 1, 0]
    # score > 0.5: predicted [0,1,1,1,0,1] -> tp=2 (0.6, 0.9), fp=2 (0.7, 0.8), fn=1 (0.5 is not > 0.5)
    r = f1_at_threshold(labels, scores, 0.5)
    assert r["precision"] == pytest.approx(0.5)
    assert r["recall"] == pytest.approx(2 / 3)
    assert r["f1"] == pytest.approx(4 / 7)


def test_zero_over_zero_is_undefined_not_zero_and_f1_is_zero():
    """evaluate printed precision 0.0 where nothing was flagged (threshold and report said n/a): 0.0
    reads as "every flagged part was good"."""
    r = f1_at_threshold([1, 0], [0.1, 0.2], 0.9)  # nothing predicted anomalous
    assert r == {"precision": None, "recall": 0.0, "f1": 0.0}
    r = f1_at_threshold([0, 0], [0.1, 0.2], 0.0)  # no anomalous image at all: everything flagged is good
    assert r == {"precision": 0.0, "recall": None, "f1": 0.0}


# ---------------------------------------------------------------------------------------------------
# pixel AUROC


def _blob_case():
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 2:4, 2:5] = True
    masks[1, 5:7, 1:3] = True
    return masks


def test_pixel_auroc_perfect_and_inverted():
    masks = _blob_case()
    assert pixel_auroc(masks, masks.astype(np.float32)) == 1.0
    assert pixel_auroc(masks, 1.0 - masks.astype(np.float32)) == 0.0
    assert pixel_auroc(masks, np.full(masks.shape, 0.3, np.float32)) == 0.5  # all tied
    assert pixel_auroc(masks.astype(np.uint8) * 255, masks.astype(np.float64)) == 1.0  # 0/255 masks


def test_pixel_auroc_hand_computed():
    masks = np.array([[[1, 1, 0, 0, 0]]], dtype=bool)
    maps = np.array([[[0.8, 0.3, 0.1, 0.5, 0.9]]], dtype=np.float32)
    # 0.8 beats 0.1 and 0.5; 0.3 beats 0.1 -> 3 of 6 pairs
    assert pixel_auroc(masks, maps) == pytest.approx(0.5)
    maps = np.array([[[0.5, 0.3, 0.1, 0.5, 0.9]]], dtype=np.float32)
    # 0.5: beats 0.1, ties 0.5 (half) -> 1.5; 0.3 beats 0.1 -> 1 ; total 2.5 / 6
    assert pixel_auroc(masks, maps) == pytest.approx(2.5 / 6)


def test_image_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 500)
    scores = rng.integers(0, 12, 500).astype(np.float32)  # many ties
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_pixel_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    masks = rng.random((5, 20, 20)) < 0.1
    maps = (np.round(rng.random((5, 20, 20)) * 10) / 10 + masks * 0.2).astype(np.float32)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)


def test_pixel_auroc_nan_when_one_class():
    maps = np.random.default_rng(0).random((2, 4, 4))
    assert math.isnan(pixel_auroc(np.zeros((2, 4, 4), bool), maps))
    assert math.isnan(pixel_auroc(np.ones((2, 4, 4), bool), maps))


def test_nan_in_maps_is_an_error():
    maps = np.zeros((1, 4, 4))
    maps[0, 1, 1] = np.nan
    with pytest.raises(ValueError):
        pixel_auroc(np.eye(4, dtype=bool)[None], maps)


# ---------------------------------------------------------------------------------------------------
# AUPRO: hand-built cases


def _negatives_image(n=100):
    """One image of n normal pixels with distinct scores 0, 1/n, ..., (n-1)/n."""
    return np.arange(n, dtype=np.float64).reshape(1, 10, n // 10) / n


def test_aupro_perfect_is_one():
    masks = _blob_case()
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0)


def test_aupro_full_and_half_detected_regions():
    # Region A (4 px) fully above every normal score; region B (2 px) half above, half below every normal
    # score. PRO = (1 + 0.5) / 2 = 0.75 at every FPR in (0, 1) -> AUPRO 0.75.
    neg = _negatives_image()
    masks = np.zeros((2, 10, 10), bool)
    maps = np.concatenate([neg, np.zeros((1, 10, 10))])
    masks[1, 1:3, 1:3] = True
    maps[1, 1:3, 1:3] = 2.0
    masks[1, 6, 6:8] = True
    maps[1, 6, 6], maps[1, 6, 7] = 2.0, -1.0
    maps[1][~masks[1]] = 0.05  # normal pixels of image 1 join the negatives (below the top 30%)
    assert aupro(masks, maps) == pytest.approx(0.75)
    assert aupro(masks, maps, num_thresholds=50) == pytest.approx(0.75)


def test_aupro_detection_only_above_max_fpr_is_zero():
    neg = _negatives_image()
    masks = np.zeros((2, 10, 10), bool)
    maps = np.concatenate([neg, np.zeros((1, 10, 10))])
    masks[1, 4:6, 4:6] = True
    maps[1][masks[1]] = 0.2  # reached only when FPR = 80 / 196 normal px (image 1's are at 0.0) > 0.3
    assert aupro(masks, maps) == pytest.approx(0.0, abs=1e-12)
    assert aupro(masks, maps, max_fpr=1.0) > 0.3  # but the curve does rise later


def test_aupro_regions_weigh_equally_not_by_pixel_count():
    neg = _negatives_image()
    masks = np.zeros((2, 20, 20), bool)
    maps = np.zeros((2, 20, 20))
    maps[0, :10, :10] = neg[0]
    masks[1, 0:10, 0:10] = True  # 100 px, detected
    maps[1, 0:10, 0:10] = 2.0
    masks[1, 15, 15] = True  # 1 px, missed
    maps[1, 15, 15] = -1.0
    result = aupro(masks, maps)
    assert result == pytest.approx(0.5)  # pixel-weighted would be 100/101 = 0.99


def test_aupro_eight_connectivity():
    # A diagonal pair (detected) and a separate single pixel (missed).
    # 8-connected: 2 regions -> PRO (1 + 0) / 2 = 0.5 ; 4-connected would give 3 regions -> 2/3.
    neg = _negatives_image()
    masks = np.zeros((2, 10, 10), bool)
    maps = np.concatenate([neg, np.zeros((1, 10, 10))])
    masks[1, 2, 2] = masks[1, 3, 3] = True
    maps[1, 2, 2] = maps[1, 3, 3] = 2.0
    masks[1, 7, 7] = True
    maps[1, 7, 7] = -1.0
    assert aupro(masks, maps) == pytest.approx(0.5)


def test_aupro_regions_do_not_span_images():
    # Same location in two images: 3 px detected in image 1, 1 px missed in image 2.
    # Per-image regions: (1 + 0) / 2 = 0.5 ; one region across images would give 3/4.
    neg = _negatives_image()
    masks = np.zeros((3, 10, 10), bool)
    maps = np.concatenate([neg, np.zeros((2, 10, 10))])
    masks[1, 5, 4:7] = True
    maps[1, 5, 4:7] = 2.0
    masks[2, 5, 5] = True
    maps[2, 5, 5] = -1.0
    assert aupro(masks, maps) == pytest.approx(0.5)


def test_aupro_step_inside_the_range():
    # 10 normal scores 0.0 .. 0.9; a 1-px region at 0.85 is detected once FPR reaches 0.1 (t = 0.9 has
    # FPR 0.1, PRO 0; t = 0.85 has FPR 0.1, PRO 1): area = (0.3 - 0.1) * 1 -> 0.2 / 0.3.
    masks = np.zeros((1, 1, 11), bool)
    maps = np.zeros((1, 1, 11))
    maps[0, 0, :10] = np.arange(10) / 10
    masks[0, 0, 10] = True
    maps[0, 0, 10] = 0.85
    assert aupro(masks, maps) == pytest.approx(2 / 3)


def test_aupro_ties_and_interpolation_at_max_fpr():
    # Normal: 4 px at 0.5, 6 px at 0.0 ; one 1-px region at 0.5 (tied with the 4).
    # The curve runs straight from (0, 0) to (FPR 0.4, PRO 1): PRO(0.3) = 0.75 by interpolation,
    # area = 0.3 * 0.75 / 2 = 0.1125 -> 0.375.
    masks = np.zeros((1, 1, 11), bool)
    maps = np.zeros((1, 1, 11))
    maps[0, 0, :4] = 0.5
    masks[0, 0, 10] = True
    maps[0, 0, 10] = 0.5
    assert aupro(masks, maps) == pytest.approx(0.375)
    assert aupro(masks, maps, num_thresholds=10) == pytest.approx(0.375)


def test_aupro_nan_without_regions_or_negatives():
    maps = np.random.default_rng(0).random((2, 5, 5))
    assert math.isnan(aupro(np.zeros((2, 5, 5), bool), maps))
    assert math.isnan(aupro(np.ones((2, 5, 5), bool), maps))


# ---------------------------------------------------------------------------------------------------
# AUPRO against a slow reference


def _aupro_reference(masks, maps, max_fpr=0.3):
    """Loop over every distinct score as a threshold; PRO and FPR straight from the definition."""
    masks = masks.astype(bool)
    regions = []
    for i in range(masks.shape[0]):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [maps[i][lab == r] for r in range(1, n + 1)]
    neg = maps[~masks]
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(np.mean(neg >= t))
        pros.append(np.mean([np.mean(r >= t) for r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    area = 0.0
    for i in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[i - 1], fprs[i], pros[i - 1], pros[i]
        if x1 >= max_fpr:
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0) if x1 > x0 else y1
            area += (max_fpr - x0) * (y0 + y1) / 2
            break
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


def _random_case(seed, n=4, size=24, quantize=None):
    rng = np.random.default_rng(seed)
    masks = ndimage.gaussian_filter(rng.random((n, size, size)), (0, 2, 2)) > 0.56
    maps = rng.random((n, size, size)) + 0.4 * ndimage.gaussian_filter(masks.astype(float), (0, 1, 1))
    if quantize:
        maps = np.round(maps * quantize) / quantize  # many ties
    return masks, maps


@pytest.mark.parametrize("seed,quantize", [(0, None), (1, None), (2, 20), (3, 5)])
@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
def test_aupro_matches_reference(seed, quantize, max_fpr):
    masks, maps = _random_case(seed, quantize=quantize)
    assert masks.any() and (~masks).any()
    expected = _aupro_reference(masks, maps, max_fpr)
    assert 0.05 < expected < 0.999
    assert aupro(masks, maps, max_fpr=max_fpr) == pytest.approx(expected, abs=1e-9)
    assert aupro(masks, maps.astype(np.float32), max_fpr=max_fpr) == pytest.approx(expected, abs=1e-3)
    assert aupro(masks, maps, max_fpr=max_fpr, num_thresholds=1000) == pytest.approx(expected, abs=1e-3)


# ---------------------------------------------------------------------------------------------------
# summarize


def _summary_case():
    types = ["good", "good", "good", "scratch", "scratch", "dent", "dent"]
    labels = [0, 0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.2, 0.3, 0.8, 0.9, 0.05, 0.15]
    masks = np.zeros((7, 4, 4), bool)
    maps = np.zeros((7, 4, 4), np.float32)
    maps[:3] = 0.5  # good images: 48 normal px at 0.5
    masks[3:5, 1, 1:3] = True  # scratch: 2 px per image, found (1.0), background 0.0
    maps[3:5][masks[3:5]] = 1.0
    masks[5:7, 2, 1:3] = True  # dent: 2 px per image, missed (0.0), background 0.9
    maps[5:7] = 0.9
    maps[5:7][masks[5:7]] = 0.0
    return labels, scores, masks, maps, types


def test_summarize_overall_and_per_type():
    labels, scores, masks, maps, types = _summary_case()
    s = summarize(labels, scores, masks, maps, types, threshold=0.5)
    # image: scratch beats all 3 good (6 pairs), dent 0.15 beats 0.1 (1 pair): 7 / 12
    assert s["image_auroc"] == pytest.approx(7 / 12)
    # pixel: 104 normal px (48 @0.5, 28 @0.0, 28 @0.9); 4 pos @1.0 beat all, 4 pos @0.0 tie 28:
    # (4*104 + 0.5*4*28) / (8*104)
    assert s["pixel_auroc"] == pytest.approx((4 * 104 + 0.5 * 4 * 28) / (8 * 104))
    assert s["aupro"] == pytest.approx(0.5)  # 2 regions found at every FPR, 2 never
    assert s["precision"] == 1.0 and s["recall"] == 0.5 and s["f1"] == pytest.approx(2 / 3)
    assert s["threshold"] == 0.5 and s["n_images"] == 7 and s["n_anomalous"] == 4
    assert s["false_reject_rate"] == 0.0  # good scores 0.1, 0.2, 0.3
    assert summarize(labels, scores, None, None, types, threshold=0.25)["false_reject_rate"] == pytest.approx(1 / 3)
    assert summarize(labels, scores, None, None, types, threshold=None)["false_reject_rate"] is None
    per = s["per_defect_type"]
    assert set(per) == {"scratch", "dent"}
    assert per["scratch"] == {"image_auroc": 1.0, "pixel_auroc": 1.0, "aupro": pytest.approx(1.0), "n_images": 2,
                              "pixel_auroc_against": {"dent": 1.0, "good": 1.0, "scratch": 1.0},
                              "image_auroc_interval": None}  # perfectly separated: no spread to estimate
    # dent's defects (0.0) lose to every normal pixel but scratch's background (0.0, ties)
    assert per["dent"]["pixel_auroc_against"] == {"dent": 0.0, "good": 0.0, "scratch": 0.5}
    assert per["dent"]["image_auroc"] == pytest.approx(1 / 6)
    assert per["dent"]["pixel_auroc"] == 0.0 and per["dent"]["aupro"] == pytest.approx(0.0)
    assert per["dent"]["n_images"] == 2
    json.dumps(s, allow_nan=False)
    for v in [s["image_auroc"], s["aupro"], s["f1"], per["dent"]["aupro"]]:
        assert type(v) is float
    assert type(s["n_images"]) is int and type(per["dent"]["n_images"]) is int


def test_summarize_without_masks():
    labels, scores, _, _, types = _summary_case()
    s = summarize(labels, scores, None, None, types, threshold=0.5)
    assert s["pixel_auroc"] is None and s["aupro"] is None
    assert s["image_auroc"] == pytest.approx(7 / 12)
    for entry in s["per_defect_type"].values():
        assert entry["pixel_auroc"] is None and entry["aupro"] is None and entry["pixel_auroc_against"] is None
    json.dumps(s, allow_nan=False)


def test_summarize_undefined_metric_is_none():
    s = summarize([1, 1], [0.3, 0.7], None, None, ["crack", "crack"], threshold=0.5)
    assert s["image_auroc"] is None and s["per_defect_type"]["crack"]["image_auroc"] is None
    json.dumps(s, allow_nan=False)


def test_image_auroc_by_type_is_each_type_against_every_good_image():
    labels, scores, _, _, types = _summary_case()
    assert image_auroc_by_type(labels, scores, types) == {"dent": pytest.approx(1 / 6), "scratch": 1.0}
    assert image_auroc_by_type([1, 1], [0.3, 0.7], ["crack", "crack"]) == {"crack": None}


def test_undefined_metrics_read_as_none_and_n_a():
    assert metric_or_none(float("nan")) is None and metric_or_none(None) is None and metric_or_none(0.25) == 0.25
    assert percent_text(0.9784) == "97.8" and percent_text(None) == "n/a" and percent_text(float("nan"), 5) == "  n/a"
    assert percent_text(1.0, 5) == "100.0" and percent_text(0.5, 5) == " 50.0"


@pytest.mark.parametrize("seed", [0, 1])
def test_pixel_auroc_against_decomposes_the_pooled_auroc(seed):
    """Each entry is the AUROC of one type's anomalous pixels against one group's normal pixels, and the
    pooled pixel AUROC is their average weighted by those pixel counts."""
    masks, maps = _random_case(seed, n=6)
    masks[:2] = False  # two good images
    types = ["good", "good", "crack", "crack", "dent", "dent"]
    table = pixel_auroc_against(masks, maps.astype(np.float32), types)
    assert set(table) == {"crack", "dent"} and all(set(row) == {"good", "crack", "dent"} for row in table.values())
    t = np.array(types)
    total = weight = 0.0
    for name, row in table.items():
        pos = maps[t == name][masks[t == name]]
        for group, value in row.items():
            neg = maps[t == group][~masks[t == group]]
            expected = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()
            assert value == pytest.approx(expected, abs=1e-6)
            total += value * pos.size * neg.size
            weight += pos.size * neg.size
    assert total / weight == pytest.approx(pixel_auroc(masks, maps), abs=1e-6)
    with pytest.raises(ValueError, match="defect_types"):
        pixel_auroc_against(masks, maps, types[:-1])


def test_pixel_auroc_against_is_nan_without_pixels():
    masks = np.zeros((2, 4, 4), bool)
    masks[1, 0, 0] = True
    maps = np.zeros((2, 4, 4))
    table = pixel_auroc_against(masks, maps, ["crack", "dent"])  # no good image; crack has no defect pixel
    assert table["dent"] == {"crack": 0.5, "dent": 0.5} and all(math.isnan(v) for v in table["crack"].values())


def test_image_auroc_interval_is_delong_s_and_covers_the_true_auroc():
    """evaluate printed an AUROC without its spread, so a user could not tell a model better by a point
    from the draw of its test images (the benchmarks saw 97.1 to 98.0 from one model over draws)."""
    rng = np.random.default_rng(7)
    labels = np.r_[np.zeros(40, int), np.ones(25, int)]
    scores = np.round(np.r_[rng.normal(0, 1, 40), rng.normal(1, 1, 25)], 1)  # ties, counted half
    # DeLong from the pairs themselves: each pair's order, 1, 1/2 or 0
    pos, neg = scores[labels == 1], scores[labels == 0]
    pairs = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    auc = pairs.mean()
    variance = pairs.mean(1).var(ddof=1) / pos.size + pairs.mean(0).var(ddof=1) / neg.size
    se = math.sqrt(variance) / (auc * (1 - auc))
    logit = math.log(auc / (1 - auc))
    expected = [1 / (1 + math.exp(-(logit + k * 1.959963984540054 * se))) for k in (-1, 1)]
    assert image_auroc_interval(labels, scores) == pytest.approx(expected, rel=1e-12)
    assert expected[0] < image_auroc(labels, scores) < expected[1]

    # About 95 of 100 intervals hold the true AUROC, Phi(1 / sqrt 2) for these two normals
    true_auroc = 0.5 * (1 + math.erf(0.5))
    held = 0
    for _ in range(400):
        draw = np.r_[rng.normal(0, 1, 40), rng.normal(1, 1, 25)]
        low, high = image_auroc_interval(labels, draw)
        held += low <= true_auroc <= high
    assert 0.92 <= held / 400 <= 0.98

    # None where it cannot be estimated: perfect separation, or a class of one image
    assert image_auroc_interval([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) is None
    assert image_auroc_interval([0, 0, 1], [0.1, 0.9, 0.5]) is None
    summary = summarize([0, 0, 0, 1, 1, 1], [0.1, 0.5, 0.3, 0.4, 0.9, 0.8], None, None,
                        ["good"] * 3 + ["crack"] * 3, None)
    assert summary["image_auroc_interval"] == pytest.approx(list(image_auroc_interval([0, 0, 0, 1, 1, 1],
                                                                 [0.1, 0.5, 0.3, 0.4, 0.9, 0.8])))
    assert summary["per_defect_type"]["crack"]["image_auroc_interval"] == summary["image_auroc_interval"]
    json.dumps(summary, allow_nan=False)
    # as evaluate prints it, beside each row's AUROC
    from stmae_edge.evaluation.evaluate import format_report

    assert interval_text([0.96412, 0.98951]) == "96.4 to 99.0" and interval_text(None) == "n/a"
    table = format_report(summary).splitlines()
    assert "95% interval" in table[0]
    assert table[1].split()[:5] == ["all", "88.9", *interval_text(summary["image_auroc_interval"]).split()]

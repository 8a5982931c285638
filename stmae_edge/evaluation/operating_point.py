"""Choosing the operating point: the image threshold that meets a target on labelled validation data,
and what it costs there, with confidence intervals that say how few images the figures rest on.

    scores of good and defective validation images
        --max-false-reject R   lowest threshold that rejects at most R of the good images
        --min-recall R         highest threshold that still catches at least R of the defective ones
        --sigma S              mean + S x std of the model's good scores (the training rule)
    -> OperatingPoint: threshold, false-reject rate, escape rate, precision, recall, each with a 95%
       Wilson interval, and the counts behind them
    held-out good images' scores at training -> holdout_check: how far they carry train's threshold

An image fails when its score is above the threshold (scoring.Thresholds). Every threshold between
two neighbouring observed scores classifies the validation set alike; the one chosen is the midpoint
of the last such gap that meets the target, so that an image on the boundary does not flip for a
rounding difference between backends. It is a float32 value, as the maps it is compared with, so
the image score and the map agree on it. Where the score is the map's maximum, the pixel threshold
is set equal to the image threshold, which keeps the rule that an image fails exactly when it has a
defect region. A model with a score head (its own statistics for the map, metadata `map_stats`) gets
its pixel threshold by the same target applied to the maps' maxima (`threshold` in cli.py).

numpy only: the runtime and the CLI use it without torch.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import numpy as np

from ..checks import is_finite_number
from ..errors import ConfigError
from ..scoring import ScoreStats, Thresholds, fails

logger = logging.getLogger(__name__)

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion; (0, 1) when there is nothing to count."""
    if total == 0:
        return 0.0, 1.0
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    # exactly 0 and 1 at the ends, where rounding would leave 2.8e-17 and 0.9999999999999999
    return (0.0 if successes == 0 else max(0.0, centre - half)), (1.0 if successes == total else min(1.0, centre + half))


# Above this 95% upper bound on the false-reject rate, `train` advises on its threshold (with none of
# them above it, 72 held-out images or fewer already allow more than 5%).
WIDE_FALSE_REJECT_BOUND = 0.05


TRAIN_REMEDY = "train --holdout, --holdout-dir"
CROSS_FITTED_REMEDY = "add them to train/good"  # every good image is scored already


def holdout_check(above: int, held_out: int, unit: str = "images", remedy: str | None = None,
                  scored: str = "held-out") -> str:
    """One line for `train` and `demo`: how many held-out good images (or crops: `unit`; `scored` says
    how they were scored: "cross-fitted" where every good image was, by a head not fitted on it) its
    threshold fails, and how high a false-reject rate that many cannot rule out (the upper end of a 95%
    Wilson interval), with what to do where that is above WIDE_FALSE_REJECT_BOUND: hold out more images
    (`remedy`: the options of the command that trained; by default train's, for `scored`) or choose the
    threshold on labelled images."""
    if remedy is None:
        remedy = TRAIN_REMEDY if scored == "held-out" else CROSS_FITTED_REMEDY
    upper = wilson_interval(above, held_out)[1]
    line = (f"{above} of {held_out} {scored} good {unit} above the threshold; on {unit} like them the "
            f"false-reject rate may be up to {100 * upper:.1f}% (95% upper bound)")
    if upper > WIDE_FALSE_REJECT_BOUND:
        more = "hold out more" if scored == "held-out" else "train on more"
        line += (f": more than {100 * WIDE_FALSE_REJECT_BOUND:.0f}%; {more} good images to narrow it "
                 f"({remedy}) or choose the threshold on labelled images (stmae-edge threshold)")
    return line


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    rule: str  # how it was chosen, in words; goes into the model's thresholds
    goods: int
    defects: int
    false_rejects: int  # good images above the threshold
    escapes: int  # defective images at or below it

    @property
    def false_reject_rate(self) -> float:
        return self.false_rejects / self.goods if self.goods else math.nan

    @property
    def escape_rate(self) -> float:
        return self.escapes / self.defects if self.defects else math.nan

    @property
    def recall(self) -> float:
        return 1 - self.escape_rate

    @property
    def precision(self) -> float:
        caught = self.defects - self.escapes
        flagged = caught + self.false_rejects
        return caught / flagged if flagged else math.nan

    def intervals(self) -> dict[str, tuple[float, float]]:
        caught = self.defects - self.escapes
        return {"false_reject_rate": wilson_interval(self.false_rejects, self.goods),
                "escape_rate": wilson_interval(self.escapes, self.defects),
                "precision": wilson_interval(caught, caught + self.false_rejects),
                "recall": wilson_interval(caught, self.defects)}

    def thresholds(self, pixel: float | None = None) -> Thresholds:
        """This threshold for images, and for pixels `pixel` (default: the same)."""
        return Thresholds(image=self.threshold, pixel=self.threshold if pixel is None else pixel, rule=self.rule)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(false_reject_rate=self.false_reject_rate, escape_rate=self.escape_rate, precision=self.precision,
                 recall=self.recall, intervals_95={k: list(v) for k, v in self.intervals().items()})
        return d

    def describe(self) -> str:
        """Lines for people: the figures, their intervals and the counts they rest on."""
        ci = self.intervals()
        caught = self.defects - self.escapes

        def pct(name: str, value: float) -> str:
            low, high = ci[name]
            return "n/a" if math.isnan(value) else f"{100 * value:.1f}% (95% CI {100 * low:.1f} to {100 * high:.1f})"

        return "\n".join([
            f"threshold {self.threshold:.6g} ({self.rule})",
            f"false rejects  {pct('false_reject_rate', self.false_reject_rate)}: "
            f"{self.false_rejects} of {self.goods} good images",
            f"escapes        {pct('escape_rate', self.escape_rate)}: {self.escapes} of {self.defects} defective images",
            f"precision      {pct('precision', self.precision)}: {caught} of {caught + self.false_rejects} failed "
            "images defective",
            f"recall         {pct('recall', self.recall)}: {caught} of {self.defects} defective images failed",
        ])


def between(low: float | None, high: float | None) -> float:
    """A float32 threshold t with low <= t < high (either side may be open: None), in the middle of the
    gap where float32 allows: every score in [low, high) is classified the same by it."""
    if low is None and high is None:
        raise ConfigError("a threshold needs at least one bound: --max-false-reject or --min-recall")
    if high is None:
        return float(np.float32(low))
    high32 = np.float32(high)
    if low is None:  # nothing observed below: a margin of 1% of the score's size, at least one float32 step
        t = np.float32(high - max(abs(high), 1.0) * 0.01)
    else:
        t = np.float32((low + high) / 2)
        if t < np.float32(low):
            t = np.float32(low)
    if t >= high32:
        t = np.nextafter(high32, np.float32(-np.inf))
    return float(t)


def evaluate_threshold(threshold: float, good: np.ndarray, defective: np.ndarray, rule: str) -> OperatingPoint:
    good, defective = np.asarray(good, np.float64), np.asarray(defective, np.float64)
    return OperatingPoint(float(threshold), rule, int(good.size), int(defective.size),
                          int(fails(good, threshold).sum()), int((~fails(defective, threshold)).sum()))


def check_target(max_false_reject: float | None = None, min_recall: float | None = None,
                 sigma: float | None = None) -> None:
    """Exactly one target, in range; checked before any image is scored.

    Raises:
        ConfigError: none or several targets, or one out of range.
    """
    given = [v for v in (max_false_reject, min_recall, sigma) if v is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one target: --max-false-reject, --min-recall or --sigma")
    if max_false_reject is not None and (not is_finite_number(max_false_reject) or not 0 <= max_false_reject < 1):
        raise ConfigError(f"--max-false-reject {max_false_reject!r} must be a fraction in [0, 1), e.g. 0.01")
    if min_recall is not None and (not is_finite_number(min_recall) or not 0 < min_recall <= 1):
        raise ConfigError(f"--min-recall {min_recall!r} must be a fraction in (0, 1], e.g. 0.95")
    if sigma is not None and (not is_finite_number(sigma) or sigma < 0):
        raise ConfigError(f"--sigma {sigma!r} must be a finite number >= 0")


def check_support(max_false_reject: float | None, min_recall: float | None, goods: int, defects: int,
                  data: str = "the validation set") -> None:
    """Whether the data can measure the target at all; checked before any image is scored.

    Raises:
        ConfigError: no good images for a false-reject target, no defective ones for a recall target.
    """
    if max_false_reject is not None and goods == 0:
        raise ConfigError(f"{data} has no good images: a false-reject rate cannot be measured on it")
    if min_recall is not None and defects == 0:
        raise ConfigError(f"{data} has no defective images: recall cannot be measured on it")
    if min_recall is not None and goods == 0:
        logger.warning("%s has no good images (test/good): a threshold for recall alone may fail every good "
                       "part, and its false-reject rate is not measured; add good test images", data)


def choose(good: np.ndarray, defective: np.ndarray, *, max_false_reject: float | None = None,
           min_recall: float | None = None, sigma: float | None = None, stats: ScoreStats | None = None,
           data: str = "the validation set", scored: str = "held-out") -> OperatingPoint:
    """The operating point for exactly one target.

    Args:
        good, defective: image scores of the validation set's good and defective images.
        max_false_reject: lowest threshold whose false-reject rate on `good` is at most this (0 <= R < 1).
        min_recall: highest threshold whose recall on `defective` is at least this (0 < R <= 1).
        sigma: mean + sigma x std of `stats` (the model's good scores, `scored` as
            scoring.threshold_scoring says: "held-out" or "cross-fitted").
        data: named in the rule.

    Raises:
        ConfigError: not exactly one target, a target out of range, or data that cannot support it
            (no good images for a false-reject target, no defective ones for a recall target).
    """
    check_target(max_false_reject, min_recall, sigma)
    check_support(max_false_reject, min_recall, len(good), len(defective), data)
    good = np.sort(np.asarray(good, np.float64))[::-1]  # descending
    defective = np.sort(np.asarray(defective, np.float64))[::-1]
    observed = np.concatenate([good, defective])
    if not (np.isfinite(good).all() and np.isfinite(defective).all()):
        raise ConfigError("scores must be finite; check the model with `stmae-edge verify`")
    counts = f"{good.size} good, {defective.size} defective images of {data}"
    if max_false_reject is not None:
        allowed = min(int(math.floor(max_false_reject * good.size + 1e-9)), good.size - 1)  # goods allowed above it
        low = good[allowed]  # the (allowed + 1)-th highest good score: a threshold at or above it rejects `allowed`
        higher = observed[observed > low]
        threshold = between(low, higher.min() if higher.size else None)
        rule = f"false rejects <= {100 * max_false_reject:g}% on {counts}"
    elif min_recall is not None:
        needed = max(1, int(math.ceil(min_recall * defective.size - 1e-9)))  # defective images above it
        lowest_caught = defective[needed - 1]
        lower = observed[observed < lowest_caught]
        # Below the lowest defect that must be caught, above the highest observed score under it.
        threshold = between(lower.max() if lower.size else None, lowest_caught)
        rule = f"recall >= {100 * min_recall:g}% on {counts}"
    else:
        if stats is None:
            raise ConfigError("--sigma needs the model's score statistics")
        chosen = Thresholds.from_stats(stats, sigma, scored=scored)
        threshold, rule = chosen.image, chosen.rule
    return evaluate_threshold(float(threshold), good, defective, rule)

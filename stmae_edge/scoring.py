"""Score statistics, normalisation and thresholds: one definition for training, evaluation and runtime.

numpy only. Raw scores are the model's image scores: the maximum of its anomaly map, or of its own
score head's map (models/stmae.py). They are normalised against the held-out good images (with a
cross-fitted score head, every good image, each held out of the head that scored it) as a z-score:
"how many standard deviations above a good part". The default threshold is the same rule in raw
units, mean + k * std, so an engineer can read it, move it, and see what it means.

Maps are read against the maxima of the held-out good maps (`map_stats`). Where the score is the
map's maximum the two statistics are the same, and a model keeps only `score_stats`.
"""

from __future__ import annotations

import unicodedata
from dataclasses import asdict, dataclass

import numpy as np

from .checks import is_finite_number, is_whole
from .errors import ConfigError

DEFAULT_SIGMA = 3.0
MAX_RULE_CHARS = 500  # a threshold rule's words, as kept from a file
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class ScoreStats:
    """Statistics of raw image scores on held-out good images (cross-fitted: every good image's score
    from a head fitted without it; training.train.fit_score_head_cross_fitted)."""

    count: int
    mean: float
    std: float
    min: float
    max: float
    p50: float
    p95: float
    p99: float

    def __post_init__(self) -> None:
        if not is_whole(self.count) or self.count < 1:
            raise ConfigError(f"score statistics count {self.count!r} must be a positive whole number")
        for name in ("mean", "std", "min", "max", "p50", "p95", "p99"):
            if not is_finite_number(getattr(self, name)):
                raise ConfigError(f"score statistic {name} {getattr(self, name)!r} must be a finite number")
        if self.std <= 0:
            raise ConfigError(f"score statistics std {self.std!r} must be positive: scores are divided by it")

    @classmethod
    def from_scores(cls, scores: np.ndarray) -> ScoreStats:
        s = np.asarray(scores, dtype=np.float64).ravel()
        if s.size < 2 or not np.isfinite(s).all():
            raise ConfigError(f"score statistics need at least 2 finite scores, got {s.size}")
        q50, q95, q99 = np.percentile(s, [50, 95, 99])
        # A floor on std keeps normalisation finite for a degenerate, perfectly constant score set.
        std = max(float(s.std(ddof=1)), 1e-12)
        return cls(int(s.size), float(s.mean()), std, float(s.min()), float(s.max()),
                   float(q50), float(q95), float(q99))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ScoreStats:
        return cls(int(d["count"]), *(float(d[k]) for k in ("mean", "std", "min", "max", "p50", "p95", "p99")))


def check_threshold(name: str, value) -> None:
    """A raw threshold a user gives (`name`: image or pixel), before any work that takes it.

    Raises:
        ConfigError: not a finite number within float32's range.
    """
    # the scores and maps are float32: a threshold beyond its range cannot be compared with them
    # without numpy warning of an overflow in the host program
    if not is_finite_number(value) or abs(value) > FLOAT32_MAX:
        raise ConfigError(f"{name} threshold {value!r} must be a finite number within float32's range "
                          "(raw score units)")


def check_sigma(sigma) -> None:
    """A sigma rule's number of standard deviations, before any work that takes it.

    Raises:
        ConfigError: not a finite number >= 0.
    """
    if not is_finite_number(sigma) or sigma < 0:
        # below the good images' mean a threshold fails most good parts: never what is meant
        raise ConfigError(f"sigma {sigma!r} must be a finite number >= 0 (standard deviations above the "
                          "good images' mean score)")


@dataclass(frozen=True)
class Thresholds:
    """Raw-score thresholds. `image` decides pass/fail; `pixel` outlines defect regions in the map.

    Where the score is the map's maximum they are equal by default, so that an image fails exactly when
    it has a defect region; with a score head each is set on its own statistics by the same rule.
    """

    image: float
    pixel: float
    rule: str = "set by hand"  # how they were chosen, for people reading the metadata

    def __post_init__(self) -> None:
        for name in ("image", "pixel"):
            value = getattr(self, name)
            check_threshold(name, value)
            # a numpy scalar (a threshold computed on float32 scores) as Python's float: it must reach
            # results, JSON and the model's metadata like any other
            object.__setattr__(self, name, float(value))
        # The rule is printed to terminals and reports: a file's control characters (escape sequences
        # that rewrite a terminal) become spaces, and a page of text its first MAX_RULE_CHARS.
        rule = "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in str(self.rule)[:MAX_RULE_CHARS])
        object.__setattr__(self, "rule", rule)

    @classmethod
    def from_stats(cls, stats: ScoreStats, sigma: float = DEFAULT_SIGMA,
                   map_stats: ScoreStats | None = None, scored: str = "held-out") -> Thresholds:
        """mean + sigma * std of the good scores; the pixel threshold by the same rule on `map_stats`
        (the good maps' maxima) where the model has them, else equal to the image threshold.

        Args:
            scored: how the good scores were scored, for the rule's words: "held-out" or "cross-fitted"
                (threshold_scoring, below, reads it from a model's training record).

        Raises:
            ConfigError: sigma is not a finite number >= 0.
        """
        check_sigma(sigma)
        t = stats.mean + sigma * stats.std
        rule = f"mean + {sigma:g} * std of {scored} good image scores"
        if map_stats is None or map_stats == stats:
            return cls(image=t, pixel=t, rule=rule)
        # cross-fitting re-scores images through the head only: the maps' statistics stay the held-out images'
        maps_of = "their maps' maxima" if scored == "held-out" else "held-out good images' maps' maxima"
        return cls(image=t, pixel=map_stats.mean + sigma * map_stats.std, rule=f"{rule} (pixel: of {maps_of})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Thresholds:
        """Thresholds from their JSON object (to_dict's), as a file or a server hands it over.

        Raises:
            ConfigError: not an object, 'image' or 'pixel' missing, not a number (a quoted "2.5" is a
                hand edit gone wrong, not a threshold), or not finite within float32.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"thresholds are a {type(d).__name__}, not an object with 'image' and 'pixel'")
        for name in ("image", "pixel"):
            if name not in d:
                raise ConfigError(f"the {name} threshold is missing")
            if isinstance(d[name], bool) or not isinstance(d[name], (int, float)):
                raise ConfigError(f"the {name} threshold is a {type(d[name]).__name__}, not a number")
        return cls(d["image"], d["pixel"], str(d.get("rule", "")))


def check_thresholds(value: object) -> Thresholds:
    """`value`, if it is a Thresholds: what a detector's assignable `thresholds` accepts.

    Raises:
        ConfigError: anything else (a dict, a number), which would fail only at the next image.
    """
    if not isinstance(value, Thresholds):
        raise ConfigError(f"thresholds must be a stmae_edge.scoring.Thresholds, not {type(value).__name__}")
    return value


def fails(scores: np.ndarray | float, threshold: float) -> np.ndarray:
    """The decision, in one place: a part fails when its raw score is strictly above the threshold (a
    score equal to it passes)."""
    return np.asarray(scores) > threshold


def threshold_scoring(training: dict) -> str:
    """How the good scores behind a model's image threshold were scored, from its training record:
    "cross-fitted" (every good image, by a score head fitted without it) or "held-out"."""
    return "cross-fitted" if "score_head" in training else "held-out"


def map_maxima(maps: np.ndarray) -> np.ndarray:
    """(N, ...) maps -> (N,) float64 maxima: what `map_stats` are computed from."""
    maps = np.asarray(maps)
    return maps.reshape(len(maps), -1).max(axis=1).astype(np.float64)


def normalize(raw: np.ndarray | float, stats: ScoreStats) -> np.ndarray:
    """Raw scores or maps -> z-scores against the good images (0 = a typical good part)."""
    return (np.asarray(raw, dtype=np.float32) - np.float32(stats.mean)) / np.float32(stats.std)


def denormalize(z: np.ndarray | float, stats: ScoreStats) -> np.ndarray:
    """z-scores -> raw scores; lets a user give a threshold as 'k sigma'."""
    return np.asarray(z, dtype=np.float32) * np.float32(stats.std) + np.float32(stats.mean)

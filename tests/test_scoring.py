"""Score statistics, thresholds, normalisation and the metadata schema."""

from __future__ import annotations

import numpy as np
import pytest

from stmae_edge.errors import CheckpointError, ConfigError
from stmae_edge.metadata import SCHEMA_VERSION, ModelMetadata
from stmae_edge.preprocessing import Preprocessing
from stmae_edge.scoring import ScoreStats, Thresholds, denormalize, fails, normalize, threshold_scoring


def test_stats_threshold_and_normalisation_by_hand():
    stats = ScoreStats.from_scores([1.0, 2.0, 3.0, 4.0, 5.0])
    assert stats.mean == 3.0 and stats.std == pytest.approx(np.sqrt(2.5))  # sample std
    assert (stats.min, stats.max, stats.p50) == (1.0, 5.0, 3.0)
    t = Thresholds.from_stats(stats, sigma=2)
    assert t.image == t.pixel == pytest.approx(3 + 2 * np.sqrt(2.5))
    assert "2 * std" in t.rule
    assert normalize(t.image, stats) == pytest.approx(2.0)
    np.testing.assert_allclose(denormalize(normalize([0.5, 7.0], stats), stats), [0.5, 7.0], rtol=1e-6)
    with pytest.raises(ConfigError):
        ScoreStats.from_scores([1.0])


def test_a_score_head_gives_the_pixel_threshold_its_own_statistics():
    scores, maxima = ScoreStats.from_scores([1.0, 2.0, 3.0]), ScoreStats.from_scores([10.0, 20.0, 60.0])
    t = Thresholds.from_stats(scores, sigma=1, map_stats=maxima)
    assert t.image == pytest.approx(2.0 + 1.0) and t.pixel == pytest.approx(30.0 + maxima.std)
    assert "maps' maxima" in t.rule
    same = Thresholds.from_stats(scores, sigma=1, map_stats=scores)  # the score is the map's maximum
    assert same.image == same.pixel and "maxima" not in same.rule
    md = _metadata()
    assert md.map_stats is None and md.region_stats == md.score_stats and "map_stats" not in md.to_dict()
    assert md.to_dict()["schema_version"] == 1  # readable by older runtimes
    md.map_stats = maxima
    assert md.to_dict()["schema_version"] == 2  # refused by them
    gray = ModelMetadata(**{**md.__dict__, "preprocessing": Preprocessing(color="gray")})
    assert gray.to_dict()["schema_version"] == SCHEMA_VERSION == 3  # a runtime that would read colour refuses it
    assert ModelMetadata.from_json(gray.to_json()).preprocessing.color == "gray"
    again = ModelMetadata.from_json(md.to_json())
    assert again.map_stats == maxima == again.region_stats and again.to_dict() == md.to_dict()
    with pytest.raises(CheckpointError, match="malformed"):
        ModelMetadata.from_dict({**md.to_dict(), "map_stats": {"count": 3}})


def test_sigma_below_zero_is_refused_and_the_rule_says_how_the_good_scores_were_scored():
    scores, maxima = ScoreStats.from_scores([1.0, 2.0, 3.0]), ScoreStats.from_scores([10.0, 20.0, 60.0])
    for sigma in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=">= 0"):
            Thresholds.from_stats(scores, sigma)
    assert Thresholds.from_stats(scores, 0).image == pytest.approx(2.0)
    held_out = Thresholds.from_stats(scores, 3, maxima)
    assert held_out.rule == "mean + 3 * std of held-out good image scores (pixel: of their maps' maxima)"
    crossed = Thresholds.from_stats(scores, 3, maxima, scored="cross-fitted")
    # cross-fitting re-scores the images only: the maps' statistics are still the held-out images'
    assert crossed.rule == ("mean + 3 * std of cross-fitted good image scores "
                            "(pixel: of held-out good images' maps' maxima)")
    assert (crossed.image, crossed.pixel) == (held_out.image, held_out.pixel)
    assert threshold_scoring({"score_head": "fitted on all ..."}) == "cross-fitted"
    assert threshold_scoring({}) == "held-out"


def test_a_score_equal_to_the_threshold_passes():
    assert fails([0.5, 1.0, 1.5], 1.0).tolist() == [False, False, True]
    assert not fails(1.0, 1.0) and fails(1.0 + 1e-9, 1.0)


def _metadata() -> ModelMetadata:
    stats = ScoreStats.from_scores([1.0, 2.0, 4.0])
    return ModelMetadata("stmae", {"grid": 32}, Preprocessing(), stats, Thresholds.from_stats(stats), "ab" * 32)


def test_metadata_json_round_trip():
    md = _metadata()
    again = ModelMetadata.from_json(md.to_json())
    assert again.to_dict() == md.to_dict()


def test_metadata_from_another_schema_or_version_is_refused():
    d = _metadata().to_dict()
    with pytest.raises(CheckpointError, match="version"):
        ModelMetadata.from_dict({**d, "schema_version": SCHEMA_VERSION + 1})
    with pytest.raises(CheckpointError, match="not a stmae-edge model"):
        ModelMetadata.from_dict({**d, "schema": "other"})
    with pytest.raises(CheckpointError, match="malformed"):
        ModelMetadata.from_dict({k: v for k, v in d.items() if k != "thresholds"})


def test_thresholds_computed_with_numpy_are_plain_floats(tmp_path):
    """A threshold computed on float32 scores is a numpy scalar: it used to be kept as one, and broke
    the JSON of results and of the model's metadata later."""
    import json

    t = Thresholds(image=np.float32(18.5), pixel=np.float64(15.25), rule="by hand")
    assert type(t.image) is float and type(t.pixel) is float and (t.image, t.pixel) == (18.5, 15.25)
    assert json.loads(json.dumps(t.to_dict()))["image"] == 18.5
    with pytest.raises(ConfigError, match="finite number"):
        Thresholds(image=np.float32("nan"), pixel=1.0)


def test_thresholds_beyond_float32s_range_are_refused():
    """Scores and maps are float32: comparing them with 1e39 made numpy warn of an overflow in the
    host program (an error where warnings are errors), with a threshold that was accepted as finite."""
    import warnings

    for value in (1e39, -1e39):
        with pytest.raises(ConfigError, match="within float32's range"):
            Thresholds(image=value, pixel=1.0)
        with pytest.raises(ConfigError, match="within float32's range"):
            Thresholds(image=1.0, pixel=value)
    with pytest.raises(ConfigError, match="within float32's range"):
        Thresholds.from_stats(ScoreStats.from_scores([1.0, 2.0, 4.0]), sigma=1e300)
    largest = Thresholds(image=3e38, pixel=-3e38)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not fails(np.float32([1.0]), largest.image).any()


@pytest.mark.parametrize("document,why", [
    ([1.0, 2.0], "thresholds are a list, not an object"),
    ({"image": 1.0}, "the pixel threshold is missing"),
    ({"image": "2.5", "pixel": 1.0}, "the image threshold is a str, not a number"),
    ({"image": float("inf"), "pixel": 1.0}, "finite"),
])
def test_thresholds_from_a_document_raise_one_typed_error_for_every_fault(document, why):
    """A host program reading thresholds it keeps itself catches ConfigError (a StmaeError), not
    KeyError or TypeError from inside the package."""
    with pytest.raises(ConfigError, match=why):
        Thresholds.from_dict(document)

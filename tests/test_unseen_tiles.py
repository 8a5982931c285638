"""benchmarks/unseen_tiles.py's regrouping of magnetic_tile by physical tile: every exposure of a tile
lands on one side, so the good test images show tiles that no training image shows."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

_saved = list(sys.path)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from threshold_new_parts import hold_out_parts  # noqa: E402
from unseen_tiles import given_split_overlap, regroup, tile_groups  # noqa: E402

sys.path[:] = _saved


def _dataset(root: Path, tiles: int = 10, exposures: int = 6) -> Path:
    """Tiles numbered thousands apart, each photographed `exposures` times within ~100 numbers; every
    fifth good image (sorted by name) in test/good, as magnetic_tile's folder was made."""
    names = sorted(f"exp{e + 1}_num_{1000 * t + 20 * e + 7}.jpg" for t in range(tiles) for e in range(exposures))
    for i, name in enumerate(names):
        folder = root / ("test" if i % 5 == 0 else "train") / "good"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    for folder in (root / "test" / "crack", root / "ground_truth" / "crack"):
        folder.mkdir(parents=True)
    (root / "test" / "crack" / "exp1_num_99000.jpg").write_bytes(b"")
    (root / "ground_truth" / "crack" / "exp1_num_99000_mask.png").write_bytes(b"")
    return root


def _tile(name: str) -> int:
    return int(name.split("_num_")[1].split(".")[0]) // 1000


def test_tile_groups_follow_the_numbers_not_the_exposures():
    paths = [Path(n) for n in ("exp1_num_100.jpg", "exp2_num_130.jpg", "exp1_num_5000.jpg",
                               "exp6_num_300.jpg", "exp2_num_5100.jpg")]
    groups = tile_groups(paths)
    assert groups[0] == groups[1] == groups[3] != groups[2] == groups[4]


def test_the_given_split_shows_test_tiles_in_training_and_the_regrouped_one_does_not(tmp_path):
    root = _dataset(tmp_path / "given")
    overlap, good = given_split_overlap(root)
    assert (overlap, good) == (12, 12)  # every good test image is another exposure of a training tile
    counts = regroup(root, tmp_path / "regrouped", fraction=0.2, seed=0)
    out = tmp_path / "regrouped"
    test_tiles = {_tile(p.name) for p in (out / "test" / "good").iterdir()}
    train_tiles = {_tile(p.name) for p in (out / "train" / "good").iterdir()}
    assert test_tiles and train_tiles and not test_tiles & train_tiles
    assert counts == {"tiles": 10, "held_tiles": 2, "test_good": 12, "train_good": 48}
    assert len(list((out / "test" / "good").iterdir())) == 12  # all six exposures of each held-out tile
    assert [p.name for p in (out / "test" / "crack").iterdir()] == ["exp1_num_99000.jpg"]
    assert (out / "ground_truth" / "crack" / "exp1_num_99000_mask.png").exists()
    assert given_split_overlap(out) == (0, 12)


def test_the_held_out_tiles_follow_the_seed(tmp_path):
    root = _dataset(tmp_path / "given")
    held = []
    for seed in (0, 1, 0):
        regroup(root, tmp_path / "r", fraction=0.2, seed=seed)
        held.append(sorted(p.name for p in (tmp_path / "r" / "test" / "good").iterdir()))
    assert held[0] == held[2] != held[1]
    assert np.unique([_tile(n) for n in held[0]]).size == 2


def test_magnetic_tile_given_split_shares_its_good_tiles(magnetic_tile):
    overlap, good = given_split_overlap(magnetic_tile)
    assert good == 190 and overlap >= 180


def test_the_threshold_benchmark_holds_out_whole_training_tiles(tmp_path):
    root = _dataset(tmp_path / "given")
    regroup(root, tmp_path / "regrouped", fraction=0.2, seed=0)
    holdout = hold_out_parts(tmp_path / "regrouped", tmp_path / "parts", fraction=0.25, seed=0)
    held = {_tile(p.name) for p in holdout.iterdir()}
    training = {_tile(p.name) for p in (tmp_path / "parts" / "data" / "train" / "good").iterdir()}
    test = {_tile(p.name) for p in (tmp_path / "regrouped" / "test" / "good").iterdir()}
    assert held and training and not held & training and not (held | training) & test
    assert len(list(holdout.iterdir())) == 6 * len(held)  # every exposure of each held-out tile
    assert {p.name for p in (tmp_path / "parts" / "data" / "test" / "good").iterdir()} == \
        {p.name for p in (tmp_path / "regrouped" / "test" / "good").iterdir()}
    first = sorted(p.name for p in holdout.iterdir())
    hold_out_parts(tmp_path / "regrouped", tmp_path / "parts", fraction=0.25, seed=1)  # a second run replaces it
    again = {_tile(p.name) for p in holdout.iterdir()}
    assert sorted(p.name for p in holdout.iterdir()) != first and len(again) * 6 == len(list(holdout.iterdir()))
    assert not again & {_tile(p.name) for p in (tmp_path / "parts" / "data" / "train" / "good").iterdir()}

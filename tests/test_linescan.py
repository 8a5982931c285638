"""Line-scan: a tiny model trained on native-scale crops, run over synthetic strips in real ONNX Runtime."""

from __future__ import annotations

import json
import tracemalloc
from dataclasses import replace

import cv2
import numpy as np
import pytest
from conftest import texture
from test_cli import run

from stmae_edge.errors import BackendError, ConfigError, InvalidImageError
from stmae_edge.runtime import Detector
from stmae_edge.runtime.linescan import StreamingInspector, StripRegions, edge_ramp
from stmae_edge.scoring import ScoreStats, Thresholds

OVERLAP = 16  # tiles of 64: stride 48


@pytest.fixture(scope="module")
def linescan_model(synthetic_dataset, tmp_path_factory):
    from stmae_edge.engines.export import export_onnx
    from stmae_edge.models.stmae import preset
    from stmae_edge.training.train import TrainConfig, train

    folder = tmp_path_factory.mktemp("linescan")
    # The sharp map alone: these tests place a defect's region to a few pixels across tile seams. The
    # wide Gaussian (over 11 of tiny's 16 cells) widens a strong small defect's region towards its
    # window, 2 to 13 pixels past these bounds: a property of the map, not of the stitching. Nor is the
    # map lowered by its mean: each tile by its own, which would move neighbouring tiles' maps apart.
    metadata = train(synthetic_dataset, folder / "m.pt", replace(preset("tiny"), wide_window=0, level_fraction=0.0),
                     TrainConfig(epochs=4, batch_size=8, crop=64), backbone_weights="random")
    assert metadata.preprocessing.input_size == (64, 64) and metadata.training["crop"] == 64
    path, _ = export_onnx(folder / "m.pt", folder / "m.onnx")
    return path


@pytest.fixture(scope="module")
def detector(linescan_model):
    return Detector(linescan_model)


def make_strip(seed: int, rows: int, width: int) -> np.ndarray:
    """Good web with the texture of the training images."""
    return texture(np.random.default_rng(seed), rows, width).astype(np.uint8)


def inspect(detector, strip, block_heights, threshold=None, keep_map=True):
    bands = []
    inspector = StreamingInspector(detector, overlap=OVERLAP, pixel_threshold=threshold,
                                   on_rows=(lambda first, rows: bands.append((first, rows.copy()))) if keep_map else None)
    defects, start = [], 0
    for height in block_heights:
        defects += inspector.push(strip[start:start + height])
        start += height
    assert start == strip.shape[0]
    defects += inspector.flush()
    strip_map = None
    if keep_map:
        assert [first for first, _ in bands] == list(np.cumsum([0] + [b.shape[0] for _, b in bands[:-1]]))
        strip_map = np.concatenate([b for _, b in bands])
    return defects, strip_map, inspector


def strong_threshold(detector) -> float:
    stats = detector.map_stats  # a pixel threshold: on the map's scale
    return stats.mean + 10 * stats.std


def test_a_defect_across_tile_seams_and_a_block_border_is_found_once_where_it_is(detector):
    strip = make_strip(1, 400, 200)
    strip[100:116, 100:116] = 250  # rows 96..112 and columns 96..112 are tile overlaps; blocks of 37 end at 111
    defects, _, _ = inspect(detector, strip, [37] * 10 + [30], threshold=strong_threshold(detector))
    hits = [d for d in defects if d.row < 116 and d.row + d.height > 100 and d.col < 116 and d.col + d.width > 100]
    assert len(hits) == 1, defects
    d = hits[0]
    assert 88 <= d.row <= 100 and 116 <= d.row + d.height <= 128, d  # the square, widened by the map's smoothing
    assert 88 <= d.col <= 100 and 116 <= d.col + d.width <= 128, d
    assert 100 <= d.peak_row < 116 and 100 <= d.peak_col < 116
    # tile rows start at 0, 48, 96, ...; tile columns at 0, 48, 96, 136: exactly those under the box
    expected = {(i, j) for i, y in enumerate(range(0, 337, 48)) for j, x in enumerate((0, 48, 96, 136))
                if y < d.row + d.height and y + 64 > d.row and x < d.col + d.width and x + 64 > d.col}
    assert set(d.tiles) == expected and len(d.tiles) == len(expected) >= 4
    assert len(defects) == 1, defects  # nothing else on a good web at this threshold


def test_the_stitched_map_equals_scoring_the_strip_in_one_piece(detector):
    strip = make_strip(2, 300, 200)
    strip[200:210, 20:60] = 10
    _, streamed, _ = inspect(detector, strip, [300])
    # The reference: every tile of the whole strip scored in one call, blended with the same weights.
    # Rows a regular tile row finalised are not revised by the last tile, flush with the end.
    tile, stride = 64, 64 - OVERLAP
    rows = list(range(0, 300 - tile + 1, stride))
    cols = list(range(0, 200 - tile + 1, stride)) + [200 - tile]
    final_before_last = rows[-1] + stride
    rows_all = rows + [300 - tile]
    maps, _ = detector.raw_maps([strip[y:y + tile, x:x + tile] for y in rows_all for x in cols])
    weight = np.outer(edge_ramp(tile, OVERLAP), edge_ramp(tile, OVERLAP))
    total, weights = np.zeros((300, 200)), np.zeros((300, 200))
    for k, (y, x) in enumerate((y, x) for y in rows_all for x in cols):
        mask = np.ones((tile, tile), bool)
        if y not in rows:
            mask[: max(0, final_before_last - y)] = False
        total[y:y + tile, x:x + tile] += np.where(mask, maps[k] * weight, 0)
        weights[y:y + tile, x:x + tile] += np.where(mask, weight, 0)
    reference = total / weights
    assert streamed.shape == (300, 200)
    np.testing.assert_allclose(streamed, reference, rtol=0, atol=1e-4 * np.abs(reference).max())


def test_random_block_heights_give_identical_output(detector):
    strip = make_strip(3, 500, 200)
    strip[130:140, 150:190] = 255
    strip[300:340, 10:14] = 0
    threshold = strong_threshold(detector)
    reference, reference_map, _ = inspect(detector, strip, [500], threshold)
    assert len(reference) >= 2
    # the defects are exactly the connected components of the whole strip map above the threshold
    count, _, boxes, _ = cv2.connectedComponentsWithStats((reference_map > threshold).astype(np.uint8), connectivity=8)
    assert sorted((d.col, d.row, d.width, d.height, d.area) for d in reference) == \
        sorted(tuple(int(v) for v in boxes[k]) for k in range(1, count))
    rng = np.random.default_rng(0)
    for _ in range(3):
        cuts = np.sort(rng.choice(np.arange(1, 500), size=rng.integers(5, 40), replace=False))
        heights = np.diff(np.concatenate([[0], cuts, [500]])).tolist()
        defects, strip_map, _ = inspect(detector, strip, heights, threshold)
        assert defects == reference, heights
        np.testing.assert_array_equal(strip_map, reference_map)


def test_memory_stays_bounded_over_a_long_strip(detector):
    """Measured with tracemalloc (numpy's buffers report to it): the peak over a strip four times as
    long is the same, and the row buffers never exceed a few tile heights."""
    def peak(blocks: int) -> tuple[int, int]:
        inspector = StreamingInspector(detector, overlap=OVERLAP)
        largest_buffer = 0
        tracemalloc.start()
        for i in range(blocks):
            inspector.push(make_strip(100 + i % 7, 64, 200))
            largest_buffer = max(largest_buffer, inspector._rows.shape[0] + inspector._regions.pending.shape[0])
        inspector.flush()
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top, largest_buffer

    peak(5)  # warm-up: ONNX Runtime's and numpy's one-off allocations
    short, short_rows = peak(40)
    long, long_rows = peak(160)
    assert long <= short * 1.10 + 256 * 1024, (short, long)
    assert long_rows <= 3 * 64 + 64 and long_rows == short_rows


def test_strip_input_checks_and_short_strips(detector):
    inspector = StreamingInspector(detector, overlap=OVERLAP)
    with pytest.raises(InvalidImageError, match="narrower than"):
        inspector.push(np.zeros((10, 50), np.uint8))  # refused without fixing the strip's width
    inspector.push(np.zeros((10, 100), np.uint8))
    for bad, fragment in ((np.zeros((10, 120), np.uint8), "120 pixels wide"),
                          (np.zeros((10, 100, 3), np.uint8), "3-channel"),
                          (np.zeros((10, 100), np.uint16), "uint16"),
                          (np.zeros((10, 100), np.float32), "float32"),
                          (np.zeros((10, 100, 2), np.uint8), "2 channels"),
                          ([[1, 2]], "numpy array")):
        with pytest.raises(InvalidImageError, match=fragment):
            inspector.push(bad)
    inspector.push(np.full((20, 100), 128, np.uint8))  # still usable after each refusal
    inspector.flush()  # 30 rows: fewer than one tile, mirrored up to one
    assert inspector.rows_final == 30 and inspector.tiles == 2
    with pytest.raises(ConfigError, match="flushed"):
        inspector.push(np.zeros((10, 100), np.uint8))
    for kwargs, fragment in (({"overlap": 40}, "overlap"), ({"overlap": 8.0}, "overlap"),
                             ({"max_defect_rows": -5}, "max_defect_rows"), ({"width": 30}, "width")):
        with pytest.raises(ConfigError, match=fragment):
            StreamingInspector(detector, **kwargs)
    with pytest.raises(ConfigError, match="must be a stmae_edge Detector .* not NoneType"):
        StreamingInspector(None)  # was an AttributeError
    colour = StreamingInspector(detector, overlap=0)
    colour.push((make_strip(4, 128, 128)[:, :, None] * np.uint16(257)).repeat(3, axis=2))
    colour.flush()
    assert colour.rows_final == 128 and colour.tiles == 4


def test_linescan_command_replays_an_image_or_a_folder_of_blocks(linescan_model, tmp_path):
    strip = make_strip(5, 300, 200)
    strip[150:166, 90:106] = 250
    cv2.imwrite(str(tmp_path / "strip.png"), strip)
    blocks = tmp_path / "blocks"
    blocks.mkdir()
    for i, start in enumerate(range(0, 300, 70)):
        cv2.imwrite(str(blocks / f"{i:04d}.png"), strip[start:start + 70])
    reports = []
    for source in (tmp_path / "strip.png", blocks):
        r = run("linescan", str(linescan_model), str(source), "--block-rows", "45", "--overlap", str(OVERLAP),
                "--pixel-threshold", str(strong_threshold(Detector(linescan_model))), "--json")
        assert r.returncode == 0, r.stderr
        blocks_pushed = 7 if source.is_file() else 5  # 300 rows by 45, or the 5 block files
        assert "line-scan (" in r.stderr and f"): {blocks_pushed}/{blocks_pushed} in " in r.stderr, r.stderr
        reports.append(json.loads(r.stdout))
    for report in reports:
        assert report["rows"] == 300 and report["width"] == 200 and report["rows_per_s"] > 0
        assert report["megapixels_per_s"] == pytest.approx(report["rows_per_s"] * 200 / 1e6)
        assert len(report["defects"]) == 1 and 140 <= report["defects"][0]["row"] <= 150
        # what the run was judged by, for a record of it
        assert report["overlap"] == OVERLAP and report["pixel_threshold_rule"] == "given for this strip"
        assert report["pixel_threshold"] == pytest.approx(strong_threshold(Detector(linescan_model)))
    assert reports[0]["defects"] == reports[1]["defects"]
    r = run("linescan", str(linescan_model), str(tmp_path / "strip.png"))
    assert r.returncode == 0 and "rows/s" in r.stdout and "defect at row" in r.stdout
    assert f"pixel threshold {Detector(linescan_model).thresholds.pixel:.6g} (the model's (" in r.stdout
    (blocks / "0002b.webp").write_bytes(b"RIFF")  # a block in a format not read: the strip would close up without it
    r = run("linescan", str(linescan_model), str(blocks))
    assert r.returncode == 0 and f"{blocks}: not read: " in r.stderr and "0002b.webp" in r.stderr, r.stderr
    (blocks / "0002b.webp").unlink()
    cv2.imwrite(str(blocks / "0005.png"), strip[:70, :150])  # a block cut narrower: the file is named
    r = run("linescan", str(linescan_model), str(blocks))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == (
        f"error: {blocks / '0005.png'}: a block is 150 pixels wide; this strip is 200"), r.stderr


def test_components_across_bands_are_reported_once_and_long_ones_in_parts():
    stats = ScoreStats(10, 0.0, 1.0, -1.0, 1.0, 0.0, 1.5, 2.0)
    strip_map = np.zeros((120, 40), np.float32)
    strip_map[5:100, 3] = 5.0  # a long scratch along the web, open through many bands
    strip_map[30:34, 20:25] = 7.0  # a short blob beside it, closed while the scratch is still open
    strip_map[60:75, 30:32] = 6.0  # crosses the band border at 70
    strip_map[119, 10] = 4.0  # touches the last row: closed only by close()

    def run_bands(max_rows: int) -> list:
        regions = StripRegions(40, 2.0, stats, max_rows)
        found = []
        for first in range(0, 120, 10):
            found += regions.add(first, strip_map[first:first + 10])
        return found + regions.close()

    found = run_bands(max_rows=1000)
    boxes = sorted((d.row, d.col, d.height, d.width, d.area, d.continues) for d in found)
    assert boxes == [(5, 3, 95, 1, 95, False), (30, 20, 4, 5, 20, False), (60, 30, 15, 2, 30, False),
                     (119, 10, 1, 1, 1, False)]
    blob = next(d for d in found if d.col == 20)
    assert (blob.peak_score, blob.peak_normalized) == (7.0, 7.0)
    split = run_bands(max_rows=30)
    parts = sorted((d.row, d.height, d.continues) for d in split if d.col == 3)
    assert parts[0][2] and not parts[-1][2] and sum(h for _, h, _ in parts) == 95
    assert all(b[0] + b[1] == a[0] for b, a in zip(parts, parts[1:], strict=False))  # the parts tile the scratch
    # while the scratch is being split, the other components are still reported whole, once
    assert sorted((d.row, d.col, d.height, d.width, d.continues) for d in split if d.col != 3) == \
        [(30, 20, 4, 5, False), (60, 30, 15, 2, False), (119, 10, 1, 1, False)]


def test_random_crops_are_seeded_native_scale_and_mirror_small_images(tmp_path, capsys):
    from stmae_edge.data import random_crops

    big = np.random.default_rng(0).integers(0, 256, (90, 120), np.uint8)
    small = np.random.default_rng(1).integers(0, 256, (40, 100), np.uint8)
    cv2.imwrite(str(tmp_path / "big.png"), big)
    cv2.imwrite(str(tmp_path / "small.png"), small)
    paths = [tmp_path / "big.png", tmp_path / "small.png"]
    crops = random_crops(paths, 64, 3, seed=5)
    assert len(crops) == 6 and all(c.shape == (64, 64) for c in crops)
    assert "cutting crops: 2/2 in " in capsys.readouterr().err  # decoding long strips shows
    assert all(any(np.array_equal(c, big[y:y + 64, x:x + 64]) for y in range(27) for x in range(57))
               for c in crops[:3])  # exact windows of the image: nothing resized
    # 40 rows tall, mirrored to 64: the top 40 rows of every crop are a window of the image itself
    assert all(any(np.array_equal(c[:40], small[:, x:x + 64]) for x in range(37)) for c in crops[3:])
    assert all(np.array_equal(a, b) for a, b in zip(crops, random_crops(paths, 64, 3, seed=5), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(crops, random_crops(paths, 64, 3, seed=6), strict=True))


def test_train_crop_from_the_command_line(synthetic_dataset, tmp_path):
    model = tmp_path / "crop.pt"
    r = run("train", str(synthetic_dataset), "--out", str(model), "--preset", "tiny", "--epochs", "1",
            "--crop", "48", "--crops-per-image", "2", "--backbone-weights", "random", "--score-folds", "3")
    assert r.returncode == 0, r.stderr
    assert "warning: --score-folds 3 was not used: the score head is cross-fitted only where" in r.stderr  # not silently
    info = json.loads(run("info", str(model)).stdout)
    assert info["preprocessing"]["input_size"] == [48, 48] and info["config"]["input_size"] == 48
    assert info["training"]["crop"] == 48 and info["training"]["train_config"]["crops_per_image"] == 2
    crops = info["score_stats"]["count"]  # two crops of each held-out image
    assert crops == 2 * info["training"]["holdout_images"]
    assert f"of {crops} held-out good crops above the threshold; on crops like them" in r.stdout


def test_a_failed_push_leaves_the_inspector_as_it_was(linescan_model):
    detector = Detector(linescan_model)
    inspector = StreamingInspector(detector, overlap=OVERLAP)
    inspector.push(make_strip(6, 40, 100))
    detector.close()  # the backend now fails every call
    with pytest.raises(BackendError, match="closed"):
        inspector.push(make_strip(7, 100, 100))
    assert inspector.rows_pushed == 40 and inspector._rows.shape[0] == 40 and inspector.tiles == 0


def test_a_bad_block_mid_strip_is_refused_and_the_strip_goes_on_unchanged(detector):
    strip = make_strip(8, 300, 200)
    strip[150:160, 60:120] = 250
    reference, reference_map, _ = inspect(detector, strip, [100, 100, 100], threshold=strong_threshold(detector))
    bands = []
    inspector = StreamingInspector(detector, overlap=OVERLAP, pixel_threshold=strong_threshold(detector),
                                   on_rows=lambda first, rows: bands.append(rows.copy()))
    defects = inspector.push(strip[:100])
    middle = strip[100:200]
    for bad, fragment in ((middle[:, :150], "150 pixels wide; this strip is 200"),
                          (middle.astype(np.uint16), "1-channel uint16; this strip is 1-channel uint8"),
                          (middle.astype(np.float32), "float32"),
                          (np.dstack([middle] * 3), "3-channel uint8; this strip is 1-channel")):
        with pytest.raises(InvalidImageError, match=fragment):
            inspector.push(bad)
    defects += inspector.push(middle) + inspector.push(strip[200:]) + inspector.flush()
    assert defects == reference and np.array_equal(np.concatenate(bands), reference_map)


@pytest.mark.parametrize("failing_call", [1, 2, 3, 4])
def test_an_on_rows_callback_that_raises_loses_no_defect_and_no_row(detector, failing_call):
    """A host's display hook that fails once: its exception leaves that push (or the flush), and the
    defects and final rows of that call come with the next one."""
    strip = make_strip(8, 300, 200)
    strip[150:160, 60:120] = 250
    threshold = strong_threshold(detector)
    reference_bands = []
    inspector = StreamingInspector(detector, overlap=OVERLAP, pixel_threshold=threshold,
                                   on_rows=lambda first, rows: reference_bands.append((first, rows.copy())))
    reference = inspector.push(strip[:100]) + inspector.push(strip[100:200]) + inspector.push(strip[200:])
    reference += inspector.flush()
    assert reference and len(reference_bands) >= 4  # the check can fail: a defect to lose, a band per call
    bands, calls = [], []

    def on_rows(first, rows):
        calls.append(first)
        if len(calls) == failing_call:
            raise RuntimeError("display queue full")
        bands.append((first, rows.copy()))

    inspector = StreamingInspector(detector, overlap=OVERLAP, pixel_threshold=threshold, on_rows=on_rows)
    defects, raised = [], 0
    for call in (lambda: inspector.push(strip[:100]), lambda: inspector.push(strip[100:200]),
                 lambda: inspector.push(strip[200:]), inspector.flush, inspector.flush):
        try:
            defects += call()
        except RuntimeError:
            raised += 1
    assert raised == 1 and defects == reference
    expected = [band for i, band in enumerate(reference_bands) if i != failing_call - 1]  # all but the failed one
    assert [first for first, _ in bands] == [first for first, _ in expected]
    assert all(np.array_equal(rows, want) for (_, rows), (_, want) in zip(bands, expected, strict=True))


@pytest.mark.parametrize("interrupted_row", [2, 3, 4])
def test_a_push_interrupted_between_tile_rows_loses_no_defect(detector, interrupted_row):
    """The defects of the tile rows blended before an interruption (KeyboardInterrupt in the host) were
    held in a local list and lost with it; now the next call returns them, and blends the rest."""
    strip = make_strip(8, 300, 200)
    strip[40:50, 60:120] = 250  # a defect completed by an early tile row of the one block
    threshold = strong_threshold(detector)
    reference, _, _ = inspect(detector, strip, [300], threshold=threshold, keep_map=False)
    assert reference  # the check can fail: a defect to lose
    inspector = StreamingInspector(detector, overlap=OVERLAP, pixel_threshold=threshold)
    blend, calls = inspector._blend, []

    def interrupted(*args, **kwargs):  # the host's Ctrl-C, between two tile rows
        calls.append(1)
        if len(calls) == interrupted_row:
            raise KeyboardInterrupt
        return blend(*args, **kwargs)

    inspector._blend = interrupted
    with pytest.raises(KeyboardInterrupt):
        inspector.push(strip)
    assert inspector.flush() == reference


def test_a_short_block_beyond_the_bit_depth_is_refused_at_its_own_push(linescan_model):
    """Its rows are not scored yet (fewer than a tile): refused later, they would fail every push after."""
    detector = Detector(linescan_model, bit_depth=10)
    strip = make_strip(9, 130, 100).astype(np.uint16) * 4  # 10-bit values
    inspector = StreamingInspector(detector, overlap=OVERLAP)
    defects = inspector.push(strip[:20])
    with pytest.raises(InvalidImageError, match=r"strip rows 20\.\.30: uint16 pixels up to 4000 exceed the 10-bit"):
        inspector.push(np.full((10, 100), 4000, np.uint16))
    defects += inspector.push(strip[20:70]) + inspector.push(strip[70:]) + inspector.flush()
    reference, _, _ = inspect(detector, strip, [20, 50, 60], keep_map=False)
    assert defects == reference and inspector.rows_pushed == 130


def test_a_first_block_that_fails_in_scoring_does_not_fix_the_strip(linescan_model):
    detector = Detector(linescan_model, bit_depth=10)  # a Mono10 camera: uint16 above 1023 is refused
    inspector = StreamingInspector(detector, overlap=OVERLAP)
    wrong = np.full((80, 150, 3), 4000, np.uint16)  # a whole tile row: scored, and refused, in this push
    with pytest.raises(InvalidImageError, match="exceed the 10-bit range"):
        inspector.push(wrong)
    assert inspector.width is None and inspector.rows_pushed == 0 and inspector.tiles == 0
    # the inspector is as it was made: a first block of another width and format starts the strip
    strip = make_strip(9, 130, 100)
    defects = inspector.push(strip[:70]) + inspector.push(strip[70:]) + inspector.flush()
    reference, _, fresh = inspect(detector, strip, [70, 60], keep_map=False)
    assert inspector.width == 100 and inspector.rows_final == 130 and inspector.tiles == fresh.tiles
    assert defects == reference


def test_the_pixel_threshold_can_be_set_until_the_strip_starts_and_is_fixed_after(detector):
    """Set after the first push, it used to be stored and ignored: the strip's defects are tracked at one
    threshold, so a change mid-strip is refused, saying what to do; before the first push it counts."""
    strip = make_strip(1, 200, 200)
    strip[100:116, 100:116] = 250
    inspector = StreamingInspector(detector, overlap=OVERLAP)
    inspector.pixel_threshold = strong_threshold(detector)  # before the strip starts: taken
    found = inspector.push(strip) + inspector.flush()
    assert len(found) == 1 and inspector.pixel_threshold == strong_threshold(detector)
    inspector = StreamingInspector(detector, overlap=OVERLAP, pixel_threshold=strong_threshold(detector))
    inspector.push(strip[:50])
    with pytest.raises(ConfigError, match="fixed once the strip has started"):
        inspector.pixel_threshold = 1e9
    assert inspector.pixel_threshold == strong_threshold(detector)
    assert len(inspector.push(strip[50:]) + inspector.flush()) == 1
    with pytest.raises(ConfigError, match="finite number"):
        StreamingInspector(detector, overlap=OVERLAP).pixel_threshold = float("nan")
    # None given: the detector's, as it is when the strip starts (a change made before then counts)
    inspector = StreamingInspector(detector, overlap=OVERLAP)
    kept = detector.thresholds
    try:
        detector.thresholds = Thresholds(image=kept.image, pixel=strong_threshold(detector), rule="line 3")
        assert inspector.pixel_threshold == strong_threshold(detector)
        assert len(inspector.push(strip) + inspector.flush()) == 1
        detector.thresholds = kept  # after the start: the strip's stays
        assert inspector.pixel_threshold == strong_threshold(detector)
        assert inspector.pixel_threshold_rule == "the model's (line 3)"
    finally:
        detector.thresholds = kept
    defect = found[0].to_dict()  # row first in a strip, named too
    assert defect["peak"] == [defect["peak_row"], defect["peak_col"]] == [found[0].peak_row, found[0].peak_col]


def test_a_model_trained_on_whole_images_shrunk_to_its_input_is_warned_of_once(linescan_model, caplog):
    """Tiles are cut at native scale: a model that learnt from 600-pixel images brought to 64 sees the
    strip four times larger than it learnt, and ran without a word. Said once, when the inspector opens.
    (The trained sizes are set on the opened detector: training such a model here would cost minutes.)"""
    from stmae_edge.preprocessing import TrainedSizes

    with Detector(linescan_model) as detector, caplog.at_level("WARNING", logger="stmae_edge.runtime.linescan"):
        inspector = StreamingInspector(detector, overlap=OVERLAP)  # trained on 64-pixel crops: its scale
        assert caplog.records == []
        detector.metadata = replace(detector.metadata, trained_sizes=TrainedSizes((600, 600), (580, 620), (0.97, 1.03)),
                                    model_hash="shrunk " + detector.metadata.model_hash)
        for strip in range(3):  # an inspector per strip: said for the first only, not once a strip
            inspector = StreamingInspector(detector, overlap=OVERLAP)
            inspector.push(make_strip(8 + strip, 100, 100))
            inspector.flush()
    assert len(caplog.records) == 1
    assert ("tiles are 64x64 pixels of the strip at its own scale, but this model was trained on images 580 to 620 "
            "wide, 600 high" in caplog.text and "train with --crop 64" in caplog.text)

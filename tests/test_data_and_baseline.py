"""Dataset layout, masks, the ELPV demo view, and the Gaussian baseline."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import pytest
import torch
from synthetic_data import make_synthetic_dataset

from stmae_edge import data
from stmae_edge.errors import DatasetError
from stmae_edge.training.baseline import GaussianBaseline, PatchCoreBaseline, greedy_coreset


def test_mvtec_layout(synthetic_dataset):
    assert len(data.train_images(synthetic_dataset)) == 24
    samples = data.eval_samples(synthetic_dataset)
    assert {s.defect_type for s in samples} == {"good", "scratch"}
    assert data.has_masks(samples)
    bad = next(s for s in samples if s.label == 1)
    mask = data.load_mask(bad, (32, 32))
    assert mask.dtype == bool and 0 < mask.sum() < mask.size
    good = next(s for s in samples if s.label == 0)
    assert not data.load_mask(good, (32, 32)).any()


def test_masks_named_like_their_images(tmp_path, caplog):
    """Masks named <image>_mask.png (MVTec AD) or after the image itself, any suffix the reader takes; a
    defective image without one is named in a warning, since pixel metrics are then left out."""
    import cv2

    for folder in ("test/good", "test/dent", "ground_truth/dent"):
        (tmp_path / folder).mkdir(parents=True)
    image = np.zeros((8, 8), np.uint8)
    cv2.imwrite(str(tmp_path / "test/good/g.png"), image)
    for name in ("a", "b", "c", "d"):
        cv2.imwrite(str(tmp_path / "test/dent" / f"{name}.bmp"), image)
    mask = image.copy()
    mask[2:4, 2:4] = 255
    cv2.imwrite(str(tmp_path / "ground_truth/dent/a_mask.png"), mask)
    cv2.imwrite(str(tmp_path / "ground_truth/dent/b.png"), mask)
    cv2.imwrite(str(tmp_path / "ground_truth/dent/c.bmp"), mask)
    with caplog.at_level("WARNING", logger="stmae_edge.data"):
        samples = {s.path.stem: s for s in data.eval_samples(tmp_path)}
    assert samples["a"].mask_path.name == "a_mask.png" and samples["b"].mask_path.name == "b.png"
    assert samples["c"].mask_path.name == "c.bmp" and samples["d"].mask_path is None
    assert data.load_mask(samples["c"], (8, 8)).sum() == 4
    assert not data.has_masks(list(samples.values()))
    assert "1 of 4 defective test images have no mask" in caplog.text and "d.bmp" in caplog.text
    cv2.imwrite(str(tmp_path / "ground_truth/dent/d_mask.png"), mask)
    caplog.clear()
    with caplog.at_level("WARNING", logger="stmae_edge.data"):
        samples = data.eval_samples(tmp_path)
        assert data.has_masks(samples)
        assert data.load_masks(samples, (8, 8)).sum() == 4 * 4  # every mask as large as its image: no warning
    assert not caplog.text
    cv2.imwrite(str(tmp_path / "ground_truth/dent/b.png"), cv2.resize(mask, (5, 8)))  # another image's mask?
    with caplog.at_level("WARNING", logger="stmae_edge.data"):
        masks = data.load_masks(samples, (8, 8))
    assert masks.shape == (5, 8, 8) and "1 of 4 masks differ in size from their images" in caplog.text
    assert "b.png is 5x8, its image 8x8" in caplog.text


def test_layout_errors(tmp_path):
    with pytest.raises(DatasetError, match="train/good"):
        data.train_images(tmp_path)
    (tmp_path / "test" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="both good and defective"):
        data.eval_samples(tmp_path)


def test_elpv_demo_view_is_disjoint(tmp_path):
    pytest.importorskip("elpv_dataset", reason="the demo extra (elpv-dataset) is not installed")
    from stmae_edge.demo import prepare_elpv

    root = prepare_elpv(tmp_path / "elpv", max_train=20, max_defective=10)
    train = {p.name for p in data.train_images(root)}
    samples = data.eval_samples(root)
    test = {s.path.name for s in samples}
    assert len(train) == 20 and not train & test
    assert sum(s.label for s in samples) == 10 and not data.has_masks(samples)

    # Capped, the training cells are a random draw from all training cells, as the test cells are: the
    # names follow the modules the cells were cut from, and the first names would be a few modules.
    every = sorted(p.name for p in data.train_images(prepare_elpv(tmp_path / "all", max_defective=10)))
    ranks = sorted(every.index(name) for name in train)
    assert ranks != list(range(20)) and ranks[-1] > len(every) // 2 and ranks[0] < len(every) // 2


def test_the_demo_replaces_only_a_view_it_made(tmp_path):
    pytest.importorskip("elpv_dataset", reason="the demo extra (elpv-dataset) is not installed")
    from stmae_edge.demo import VIEW_MARKER, prepare_elpv
    from stmae_edge.errors import OutputError

    root = prepare_elpv(tmp_path / "view", max_train=8, max_defective=4)
    assert prepare_elpv(root, max_train=6, max_defective=4) == root  # its own view: rebuilt
    assert len(data.train_images(root)) == 6
    (root / VIEW_MARKER).unlink()  # a view from before the mark: still only links into the package
    assert len(data.train_images(prepare_elpv(root, max_train=8, max_defective=4))) == 8
    mine = tmp_path / "mine"
    (mine / "train" / "good").mkdir(parents=True)
    (mine / "train" / "good" / "part.png").write_bytes(b"the user's own image")
    with pytest.raises(OutputError, match="not a dataset view the demo made"):
        prepare_elpv(mine)
    assert (mine / "train" / "good" / "part.png").read_bytes() == b"the user's own image"
    # a file of the user's beside the view's train/ and test/ (results saved there): rebuilt around it
    (root / "my_results.txt").write_text("kept")
    assert len(data.train_images(prepare_elpv(root, max_train=5, max_defective=4))) == 5
    assert (root / "my_results.txt").read_text() == "kept"


def test_gaussian_baseline_finds_the_outlier_position():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(64, 4, 8, 8, generator=g)
    baseline = GaussianBaseline(smoothing_sigma=0.5).fit(train)
    test = torch.randn(2, 4, 8, 8, generator=g)
    test[1, :, 5, 2] += 6.0
    maps, scores = baseline.score(test, (8, 8))
    assert scores[1] > scores[0] + 1
    assert np.unravel_index(maps[1, 0].argmax().item(), (8, 8)) == (5, 2)


def test_recorded_train_images_and_image_folders(synthetic_dataset, tmp_path):
    training = {"data_dir": str(synthetic_dataset)}
    sample = data.recorded_train_images(training, 8)
    assert sample == data.recorded_train_images(training, 8)  # seeded
    assert len(sample) == 8 and set(sample) <= set(data.train_images(synthetic_dataset))
    assert sample != data.train_images(synthetic_dataset)[:8]  # a sample, not just the first files
    with pytest.raises(DatasetError, match="records no training folder"):
        data.recorded_train_images({}, 8)
    assert data.images_in(synthetic_dataset / "test" / "good") == sorted((synthetic_dataset / "test" / "good").iterdir())
    with pytest.raises(DatasetError, match="not a folder of images"):
        data.images_in(tmp_path / "absent")


def test_greedy_coreset_picks_the_farthest_points_first():
    # Two tight clusters and one far point: k-center picks one row of each before any second of a cluster.
    gen = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(50, 4, generator=gen) * 0.01, torch.randn(50, 4, generator=gen) * 0.01 + 5,
                        torch.full((1, 4), -20.0)])
    picked = greedy_coreset(points, 3, projection_dim=4)
    assert len(set(picked.tolist())) == 3
    assert {0 if i < 50 else 1 if i < 100 else 2 for i in picked.tolist()} == {0, 1, 2}
    assert torch.equal(picked, greedy_coreset(points, 3, projection_dim=4))  # seeded
    with pytest.raises(ValueError):
        greedy_coreset(points, 0)


def test_patchcore_baseline_finds_the_outlier_patch():
    gen = torch.Generator().manual_seed(1)
    good = torch.randn(20, 8, 8, 8, generator=gen) * 0.1
    baseline = PatchCoreBaseline(coreset_ratio=0.25).fit(good)
    assert baseline.bank.shape == (round(20 * 64 * 0.25), 8)
    test = torch.randn(2, 8, 8, 8, generator=gen) * 0.1
    test[1, :, 5, 2] += 3.0
    maps, scores = baseline.score(test, (32, 32))
    assert maps.shape == (2, 1, 32, 32) and scores[1] > 3 * scores[0]
    peak = int(maps[1, 0].argmax())
    assert abs(peak // 32 - 5 * 4 - 2) <= 4 and abs(peak % 32 - 2 * 4 - 2) <= 4  # at grid cell (5, 2)


# --- datasets as users' own folders come ------------------------------------------------------------
def test_a_test_good_folder_in_any_case_holds_good_images(tmp_path):
    root = make_synthetic_dataset(tmp_path / "d", n_train=4, n_good=3, n_bad=3, size=32)
    (root / "test" / "good").rename(root / "test" / "Good")
    samples = data.eval_samples(root)
    assert sorted(s.defect_type for s in samples) == ["good"] * 3 + ["scratch"] * 3
    assert sum(s.label for s in samples) == 3


def test_masks_with_alpha_jpeg_noise_or_upper_case_suffixes_read_as_drawn(tmp_path):
    root = make_synthetic_dataset(tmp_path / "d", n_train=4, n_good=2, n_bad=3, size=64)
    truth = {s.path.name: data.fit_mask(s, (64, 64))[0] for s in data.eval_samples(root) if s.label}
    masks = sorted((root / "ground_truth" / "scratch").glob("*_mask.png"))
    gray = cv2.imread(str(masks[0]), cv2.IMREAD_UNCHANGED)
    # an editor's RGBA export: opaque everywhere (alpha 255), the mask in the colour channels
    cv2.imwrite(str(masks[0]), cv2.merge([gray, gray, gray, np.full_like(gray, 255)]))
    # 001's mask replaced by a JPEG of 000's, with compression noise around the region
    masks[1].unlink()
    cv2.imwrite(str(masks[1].with_suffix(".jpg")), gray, [cv2.IMWRITE_JPEG_QUALITY, 60])
    noisy = cv2.imread(str(masks[1].with_suffix(".jpg")), 0)
    assert ((noisy > 0) & (noisy < 128)).any()  # the noise the reading must leave out
    # an upper-case suffix
    masks[2].rename(masks[2].with_suffix(".PNG"))
    samples = {s.path.name: s for s in data.eval_samples(root) if s.label}
    assert samples["002.png"].mask_path.name == "002_mask.PNG"
    read = {name: data.fit_mask(s, (64, 64))[0] for name, s in samples.items()}
    assert np.array_equal(read["000.png"], truth["000.png"])  # not the whole image
    assert np.array_equal(read["001.png"], truth["000.png"])  # the JPEG of 000's mask, its noise left out
    assert np.array_equal(read["002.png"], truth["002.png"])


def test_hidden_files_and_subfolders_of_train_good(tmp_path, caplog):
    root = make_synthetic_dataset(tmp_path / "d", n_train=5, n_good=2, n_bad=2, size=32)
    good = root / "train" / "good"
    (good / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata beside a copied file
    (root / "test" / "scratch" / "._001.png").write_bytes(b"\x00\x05\x16\x07")
    (good / "cam2").mkdir()
    cv2.imwrite(str(good / "cam2" / "a.png"), np.zeros((32, 32), np.uint8))
    with caplog.at_level("WARNING"):
        assert len(data.train_images(root)) == 5
    assert "good: not read: 1 image in its subfolders; training uses the 5 images directly in it" in caplog.text
    assert all(not s.path.name.startswith(".") for s in data.eval_samples(root))
    with pytest.raises(DatasetError, match="give the dataset's folder, .*, not train/good itself"):
        data.train_images(good)
    for extra in sorted(good.glob("00[1-4].png")):
        extra.unlink()
    with pytest.raises(DatasetError, match=r"good: 1 image \(not read: 1 image in its subfolders\); training needs"):
        data.train_images(root)


def test_copies_in_train_good_crops_that_repeat_and_far_test_sizes_are_said(tmp_path, caplog):
    from stmae_edge.data import survey
    from stmae_edge.evaluation.validation import warn_about_sizes
    from stmae_edge.models.stmae import preset
    from stmae_edge.preprocessing import TrainedSizes
    from stmae_edge.training.image_set import warn_about_copies
    from stmae_edge.training.train import TrainConfig, train

    root = make_synthetic_dataset(tmp_path / "d", n_train=6, n_good=2, n_bad=2, size=48)
    good = sorted((root / "train" / "good").glob("*.png"))
    (root / "train" / "good" / "000_copy.bmp").write_bytes(good[0].read_bytes())  # same bytes, other name
    (root / "train" / "good" / "link.png").symlink_to(good[1])
    cv2.imwrite(str(root / "train" / "good" / "reencoded.bmp"), cv2.imread(str(good[2]), cv2.IMREAD_UNCHANGED))
    with caplog.at_level("WARNING"):
        warn_about_copies(survey(data.train_images(root), "good images"))
    assert "train/good holds 3 copies of other images in it, the same pixels (first: 000.png = 000_copy.bmp)" \
        in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        warn_about_sizes(TrainedSizes((48, 48), (48, 48), (1.0, 1.0)), data.eval_samples(root))
        assert not caplog.text
        warn_about_sizes(TrainedSizes((400, 400), (400, 400), (1.0, 1.0)), data.eval_samples(root))
    assert "4 of 4 test images are far from the sizes this model was trained on" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        train(root, tmp_path / "m.pt", preset("tiny"), TrainConfig(epochs=1, batch_size=8, max_steps=1, crop=64),
              backbone_weights="random")
    assert "9 of 9 good images are no larger than --crop 64 on a side: their crops repeat" in caplog.text


def test_16_bit_images_of_a_12_bit_camera_are_said_to_want_bit_depth_12(tmp_path, caplog):
    from stmae_edge.training.image_set import hint_bit_depth

    rng = np.random.default_rng(0)
    paths = []
    for i, top in enumerate((4095, 3000, 4000)):
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), rng.integers(0, top + 1, (16, 16)).astype(np.uint16))
        paths.append(path)
    with caplog.at_level("WARNING"):
        hint_bit_depth(paths)
    assert "16-bit files whose pixels stop at 40" in caplog.text
    assert "if the camera gives 12 bits (Mono12), train with --bit-depth 12" \
        in caplog.text
    caplog.clear()
    cv2.imwrite(str(paths[0]), np.full((16, 16), 60000, np.uint16))  # full range: nothing to say
    with caplog.at_level("WARNING"):
        hint_bit_depth(paths)
    assert not caplog.text


def test_folders_in_another_case_files_not_read_and_masks_that_mislead_are_said(tmp_path, caplog):
    """Train/Good and Ground_Truth were not found (a ground_truth in another case left the pixel metrics
    out without a word); .webp files and subfolders' images were passed over silently; an inverted or
    an empty mask changed the pixel metrics without a word."""
    root = make_synthetic_dataset(tmp_path / "d", n_train=6, n_good=2, n_bad=3, size=48)
    (root / "train" / "good").rename(root / "train" / "Good")
    (root / "train").rename(root / "Train")
    (root / "ground_truth").rename(root / "Ground_Truth")
    (root / "Train" / "Good" / "frame.webp").write_bytes(b"RIFF")
    (root / "Train" / "Good" / "day2").mkdir()
    cv2.imwrite(str(root / "Train" / "Good" / "day2" / "a.png"), np.zeros((48, 48), np.uint8))
    (root / "test" / "scratch" / "batch2").mkdir()
    cv2.imwrite(str(root / "test" / "scratch" / "batch2" / "b.png"), np.zeros((48, 48), np.uint8))
    masks = sorted((root / "Ground_Truth" / "scratch").glob("*.png"))
    cv2.imwrite(str(masks[0]), 255 - cv2.imread(str(masks[0]), cv2.IMREAD_GRAYSCALE))  # inverted
    cv2.imwrite(str(masks[1]), np.zeros((48, 48), np.uint8))  # marks nothing
    with caplog.at_level("WARNING"):
        assert len(data.train_images(root)) == 6
        samples = data.eval_samples(root)
        assert data.has_masks(samples)  # Ground_Truth found
        data.load_masks(samples, (48, 48))
    assert ("Good: not read: 1 file in another format or linking to nothing (first: frame.webp; images are read from "
            ".bmp, .jfif, .jpe, .jpeg, .jpg, .png, .tif, .tiff files) and 1 image in its subfolders; training uses "
            "the 6 images directly in it") in caplog.text
    assert "scratch: not scored: 1 image in its subfolders" in caplog.text
    assert f"1 masks of defective images mark no defect pixel (first: {masks[1]})" in caplog.text
    assert f"1 masks mark more than 90% of their image as defect (first: {masks[0]}" in caplog.text


def test_a_stray_size_an_enlarged_image_and_a_squashed_strip_are_said(tmp_path, caplog):
    """One thumbnail or strip among the parts widened the sizes the runtime accepts to almost anything,
    and images far below the input, or strips squashed into it, were resized without a word."""
    from stmae_edge.training.image_set import warn_about_sizes

    sizes = {tmp_path / f"{i}.png": (48 + i, 50) for i in range(8)}
    sizes[tmp_path / "thumb.png"] = (12, 10)
    sizes[tmp_path / "strip.png"] = (6, 300)
    with caplog.at_level("WARNING"):
        warn_about_sizes(sizes, 64, keep_aspect=False)
    assert ("2 of 10 good images have a size that hardly any other has (first: strip.png, 300x6): the runtime "
            "accepts sizes near any training image, so they widen what it takes to 10 to 300 wide, 6 to 55 high"
            in caplog.text)
    # stretched, the strip's 6 rows are enlarged too
    assert "2 of 10 good images are enlarged more than 2x to the model's 64-pixel input (first: strip.png, 300x6)" \
        in caplog.text
    assert "1 of 10 good images are squashed more than 4x into the square input (first: strip.png, 300x6)" \
        in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        warn_about_sizes({p: size for p, size in sizes.items() if p.stem.isdigit()}, 64, keep_aspect=False)
    assert not caplog.text


def test_a_mask_is_found_whether_its_name_is_written_composed_or_decomposed(tmp_path):
    """An image named "défaut.png" (é as one character) and its mask written by macOS (e and an accent):
    the mask was "not found", though the warning printed a name that looked identical."""
    import unicodedata

    root = make_synthetic_dataset(tmp_path / "d", n_train=4, n_good=1, n_bad=1, size=32)
    image = root / "test" / "scratch" / "000.png"
    image.rename(image.with_name(unicodedata.normalize("NFC", "défaut.png")))
    mask = root / "ground_truth" / "scratch" / "000_mask.png"
    mask.rename(mask.with_name(unicodedata.normalize("NFD", "défaut_mask.png")))
    samples = data.eval_samples(root)
    assert data.has_masks(samples) and [s.mask_path.name for s in samples if s.mask_path] == [
        unicodedata.normalize("NFD", "défaut_mask.png")]


def test_a_thin_defect_that_vanishes_in_the_fitted_mask_is_not_called_an_empty_mask(tmp_path, caplog):
    """The 'marks no defect pixel' warning looked at the mask fitted to the input, where a scratch of a
    pixel or two may vanish; it is about the mask file's own pixels."""
    root = make_synthetic_dataset(tmp_path / "d", n_train=4, n_good=1, n_bad=1, size=32)
    mask = np.zeros((400, 400), np.uint8)
    mask[101, 50:350] = 255  # a scratch one pixel wide
    cv2.imwrite(str(root / "ground_truth" / "scratch" / "000_mask.png"), mask)
    cv2.imwrite(str(root / "test" / "scratch" / "000.png"), np.zeros((400, 400), np.uint8))
    with caplog.at_level("WARNING"):
        fitted = data.load_masks(data.eval_samples(root), (32, 32))
    assert not fitted.any()  # gone at the input's resolution
    assert "mark no defect pixel" not in caplog.text
    # ... but said: its defect now counts as normal pixels (2 of magnetic_tile's 392 masks at 256 x 256)
    assert ("1 masks lose every defect pixel when brought to the maps' 32x32 (first: "
            f"{root / 'ground_truth' / 'scratch' / '000_mask.png'})") in caplog.text


def test_images_loose_in_test_and_a_type_folder_without_images_are_said(tmp_path, caplog):
    """An image put in test/ itself was left out of every figure, and an empty type folder vanished from
    the per-type table, both without a word."""
    root = make_synthetic_dataset(tmp_path / "d", n_train=4, n_good=2, n_bad=2, size=32)
    shutil.copy(root / "test" / "good" / "000.png", root / "test" / "loose.png")
    (root / "test" / "crack").mkdir()
    with caplog.at_level("WARNING"):
        assert len(data.eval_samples(root)) == 4
    assert "test: 1 image directly in it (first: loose.png) not scored: test images go in test/good" in caplog.text
    assert f"{root / 'test' / 'crack'}: no images; its type is left out of the figures" in caplog.text


def test_skipping_unreadable_images_still_needs_four_readable_ones(tmp_path):
    from stmae_edge.training.image_set import good_images
    from stmae_edge.training.train import TrainConfig

    root = make_synthetic_dataset(tmp_path / "d", n_train=5, n_good=1, n_bad=1, size=32)
    paths = data.train_images(root)
    for broken in paths[:2]:
        broken.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="3 of the 5 good images in train/good can be read; training needs at "
                                           "least 4"):
        good_images(paths, TrainConfig(skip_unreadable=True))


def test_a_stretched_image_is_enlarged_by_its_shorter_side(tmp_path, caplog):
    """150 x 60 stretched to 256 x 256 is enlarged 4.3x in height: neither warning fired."""
    from stmae_edge.training.image_set import warn_about_sizes

    sizes = {tmp_path / f"{i}.png": (60, 150) for i in range(8)}
    with caplog.at_level("WARNING"):
        warn_about_sizes(sizes, 256, keep_aspect=False)
    assert "8 of 8 good images are enlarged more than 2x to the model's 256-pixel input" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        warn_about_sizes(sizes, 256, keep_aspect=True)  # fitted inside: 256 / 150, under 2x
    assert "enlarged" not in caplog.text


def test_a_defect_types_mask_folder_is_found_whether_written_composed_or_decomposed(tmp_path):
    """test/rayé written here (é one character) and ground_truth/rayé written on a Mac (e and an
    accent): the type's masks were all lost, with a warning whose two names looked identical."""
    import unicodedata

    root = make_synthetic_dataset(tmp_path / "d", n_train=4, n_good=1, n_bad=2, size=32)
    (root / "test" / "scratch").rename(root / "test" / unicodedata.normalize("NFC", "rayé"))
    (root / "ground_truth" / "scratch").rename(root / "ground_truth" / unicodedata.normalize("NFD", "rayé"))
    samples = data.eval_samples(root)
    assert data.has_masks(samples) and sum(s.mask_path is not None for s in samples) == 2


def test_a_folder_in_another_case_is_named_as_the_disk_spells_it(tmp_path):
    """On a case-insensitive disk (macOS's) root/"train" exists under any spelling, so the name asked
    for was returned and messages showed it, not the folder's own; the listing gives the disk's."""
    (tmp_path / "Train").mkdir()
    (tmp_path / "train_notes").mkdir()
    assert data.child_folder(tmp_path, "train") == tmp_path / "Train"
    assert data.child_folder(tmp_path, "test") == tmp_path / "test"  # none: the name asked for
    if not (tmp_path / "TRAIN").exists():  # a case-sensitive disk with both: the exact one
        (tmp_path / "train").mkdir()
        assert data.child_folder(tmp_path, "train") == tmp_path / "train"


def test_a_folder_that_can_be_entered_but_not_listed_is_taken_by_the_name_given(tmp_path, monkeypatch):
    """A dataset folder of mode 711 (shared machines): its train/ can be opened, not found by listing,
    which raised PermissionError, a traceback (root lists anything, so the refusal is emulated)."""
    from pathlib import Path

    (tmp_path / "train").mkdir()
    real_iterdir = Path.iterdir

    def refused(self):
        if self == tmp_path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", refused)
    assert data.child_folder(tmp_path, "train") == tmp_path / "train"


def test_masks_whose_names_differ_only_where_case_folding_would_merge_them_are_told_apart(tmp_path):
    """"Maße" and "Masse" are two names on every disk; case folding made them one, and one image took
    the other's mask."""
    root = make_synthetic_dataset(tmp_path / "d", n_train=4, n_good=1, n_bad=2, size=32)
    images = sorted((root / "test" / "scratch").glob("*.png"))
    masks = sorted((root / "ground_truth" / "scratch").glob("*.png"))
    for image, mask, stem in zip(images, masks, ("Maße", "Masse"), strict=True):
        image.rename(image.with_name(f"{stem}.png"))
        mask.rename(mask.with_name(f"{stem}_mask.png"))
    found = {s.path.stem: s.mask_path.name for s in data.eval_samples(root) if s.mask_path}
    assert found == {"Maße": "Maße_mask.png", "Masse": "Masse_mask.png"}

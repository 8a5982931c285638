"""The one preprocessing definition: formats, channels, normalisation, and typed errors."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from stmae_edge.errors import ConfigError, InvalidImageError
from stmae_edge.preprocessing import Preprocessing, load_image

PRE = Preprocessing(input_size=(32, 48), mean=(0.5, 0.4, 0.3), std=(0.5, 0.25, 0.2))


def test_gray_8_and_16_bit_and_float_agree():
    gray8 = np.random.default_rng(0).integers(0, 256, (40, 60), dtype=np.uint8)
    gray16 = gray8.astype(np.uint16) * 257  # the same intensities on 16 bits
    out8, out16 = PRE(gray8), PRE(gray16)
    assert out8.shape == (1, 3, 32, 48) and out8.dtype == np.float32
    np.testing.assert_allclose(out8, out16, atol=1e-5)
    np.testing.assert_allclose(out8, PRE(gray8.astype(np.float32) / 255), atol=1e-5)
    # Gray is replicated: after undoing each channel's normalisation, all three are equal.
    raw = out8[0] * np.array(PRE.std)[:, None, None] + np.array(PRE.mean)[:, None, None]
    np.testing.assert_allclose(raw[0], raw[1], atol=1e-5)


def test_normalisation_value_and_bgr_to_rgb():
    bgr = np.zeros((32, 48, 3), np.uint8)
    bgr[..., 0] = 255  # pure blue in OpenCV order
    out = PRE(bgr)[0]
    # RGB order: R = 0, G = 0, B = 1 -> (x - mean) / std
    np.testing.assert_allclose(out[:, 0, 0], [(0 - 0.5) / 0.5, (0 - 0.4) / 0.25, (1 - 0.3) / 0.2], atol=1e-6)
    bgra = np.dstack([bgr, np.full((32, 48), 7, np.uint8)])
    np.testing.assert_array_equal(PRE(bgra), PRE(bgr))


def test_files_and_arrays_give_the_same_tensor(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), image)
    np.testing.assert_array_equal(PRE(tmp_path / "a.png"), PRE(image))
    batch = PRE([tmp_path / "a.png", image])
    assert batch.shape == (2, 3, 32, 48)


@pytest.mark.parametrize("bad,fragment", [
    (np.zeros((0, 10), np.uint8), "expected an image"),
    (np.zeros((10, 10, 2), np.uint8), "2 channels; use 1 \\(gray\\), 3 \\(BGR\\) or 4 \\(BGRA\\)$"),
    # a stack of gray frames: how to give it as a batch
    (np.zeros((5, 10, 10), np.uint8), "10 channels.*for a batch of 5 gray frames give a list, or an array \\(N, H, W, 1\\)"),
    (np.zeros((10,), np.uint8), "expected an image"),
    (np.full((10, 10), np.nan, np.float32), "NaN"),
    (np.zeros((10, 10), np.int64), "pixel type"),
])
def test_bad_arrays_raise_typed_errors(bad, fragment):
    with pytest.raises(InvalidImageError, match=fragment):
        PRE(bad)


def test_bad_files_raise_typed_errors(tmp_path):
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), np.zeros((20, 20), np.uint8))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:30])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"\xff\xd8 not really a jpeg")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for path in (truncated, garbage, empty, tmp_path / "absent.png"):
        with pytest.raises(InvalidImageError):
            load_image(path)


def test_oversized_images_are_refused():
    with pytest.raises(InvalidImageError, match="exceeds the limit"):
        load_image(np.zeros((100, 100), np.uint8), max_pixels=5000)


def test_round_trip_and_validation():
    assert Preprocessing.from_dict(PRE.to_dict()) == PRE
    with pytest.raises(ConfigError):
        Preprocessing(std=(1.0, 0.0, 1.0))
    with pytest.raises(ConfigError):
        Preprocessing(resize="cubic-ish")


def test_a_small_file_declaring_a_huge_image_is_refused_before_decoding(tmp_path):
    ok, png = cv2.imencode(".png", np.zeros((8, 8), np.uint8))
    data = bytearray(png.tobytes())
    data[16:24] = (100_000).to_bytes(4, "big") * 2  # IHDR width and height; the CRC no longer matters
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bytes(data))
    with pytest.raises(InvalidImageError, match="100000x100000 pixels exceeds"):
        load_image(bomb)


def test_10_and_12_bit_pixels_scale_by_their_own_range():
    from dataclasses import replace

    gray8 = np.random.default_rng(0).integers(0, 256, (40, 60), dtype=np.uint8)
    for bits in (10, 12):
        top = (1 << bits) - 1
        frame = np.round(gray8.astype(np.float64) * top / 255).astype(np.uint16)
        camera = replace(PRE, bit_depth=bits)
        np.testing.assert_allclose(camera(frame), PRE(gray8), atol=3e-3)
        assert np.abs(PRE(frame) - PRE(gray8)).max() > 1.0  # as full-range 16-bit: nearly black
        with pytest.raises(InvalidImageError, match=f"exceed the {bits}-bit range 0..{top}"):
            camera(np.full((8, 8), top + 1, np.uint16))
        assert camera(np.full((8, 8), 200, np.uint8)).tolist() == PRE(np.full((8, 8), 200, np.uint8)).tolist()
        stored = camera.to_dict()
        assert stored["bit_depth"] == bits and Preprocessing.from_dict(stored) == camera
    # Full range is the default and is not written: digests of models made before the setting stay valid.
    assert "bit_depth" not in PRE.to_dict() and Preprocessing.from_dict(PRE.to_dict()).bit_depth == 16
    for bad in (8, 17, "12", 12.0):
        with pytest.raises(ConfigError, match="bit depth"):
            Preprocessing(bit_depth=bad)


KEEP = Preprocessing(input_size=(64, 64), keep_aspect=True)


def test_keep_aspect_fits_the_image_centred_and_mirrors_the_rest():
    wide = np.random.default_rng(2).integers(0, 256, (50, 200), dtype=np.uint8)
    assert KEEP.content_box(50, 200) == (24, 0, 16, 64) and KEEP.content_box(64, 64) == (0, 0, 64, 64)
    assert KEEP.content_box(200, 50) == (0, 24, 64, 16)
    assert Preprocessing(input_size=(64, 64)).content_box(50, 200) == (0, 0, 64, 64)
    x = KEEP(wide)[0, 0]
    inside = cv2.resize(wide.astype(np.float32) / 255, (64, 16), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(x[24:40], (inside - 0.5) / 0.5, atol=1e-5)
    np.testing.assert_allclose(x[23], x[25], atol=1e-6)  # mirrored about the first row, not a copy of it
    np.testing.assert_allclose(x[40], x[38], atol=1e-6)
    square = np.random.default_rng(4).integers(0, 256, (300, 300), dtype=np.uint8)
    np.testing.assert_array_equal(KEEP(square), Preprocessing(input_size=(64, 64))(square))  # a no-op on square images
    # thinner than its margins (a 1-pixel line, a 3-pixel strip): still the full input, no error
    assert KEEP(np.full((1, 300), 9, np.uint8)).shape == (1, 3, 64, 64)
    assert np.isfinite(KEEP(np.arange(3 * 400, dtype=np.uint8).reshape(3, 400))).all()


def test_keep_aspect_maps_come_back_laid_out_over_the_image_as_when_stretched():
    """A letterboxed input brought back to the image frame is the stretched input: the two functions
    agree on where the image lies, for wide, tall and square images."""
    stretch = Preprocessing(input_size=(64, 64))
    rng = np.random.default_rng(3)
    for height, width in ((60, 240), (240, 60), (64, 64), (90, 70)):
        ramp = np.add.outer(np.linspace(0, 1, height), np.linspace(0, 0.5, width)).astype(np.float32) / 1.5
        ramp += rng.normal(0, 0.002, ramp.shape).astype(np.float32)
        back = KEEP.to_image_frame(KEEP(ramp)[:, 0], [(height, width)])[0]
        np.testing.assert_allclose(back, stretch(ramp)[0, 0], atol=0.05)
    maps = rng.random((2, 64, 64)).astype(np.float32)
    assert stretch.to_image_frame(maps, [(60, 240), (1, 1)]) is maps  # without keep_aspect: untouched


def test_keep_aspect_travels_in_the_metadata_and_leaves_earlier_digests_alone():
    assert "keep_aspect" not in Preprocessing().to_dict()  # models made before it keep their digest
    assert Preprocessing.from_dict(KEEP.to_dict()) == KEEP
    with pytest.raises(ConfigError, match="keep_aspect"):
        Preprocessing.from_dict({**KEEP.to_dict(), "keep_aspect": "yes"})


def test_training_keeps_the_aspect_only_where_the_images_shapes_differ(tmp_path):
    from stmae_edge.training.image_set import choose_keep_aspect
    from stmae_edge.training.train import TrainConfig

    def files(shapes, folder):
        (tmp_path / folder).mkdir()
        for i, (h, w) in enumerate(shapes):
            cv2.imwrite(str(tmp_path / folder / f"{i}.png"), np.full((h, w), 100, np.uint8))
        return sorted((tmp_path / folder).iterdir())

    alike = files([(60, 80)] * 3 + [(120, 160)], "alike")  # one shape at two scales
    varied = files([(60, 80), (80, 60), (50, 150)], "varied")
    keep, why = choose_keep_aspect(TrainConfig(), varied)
    assert keep and "0.75 to 3.00" in why
    assert not choose_keep_aspect(TrainConfig(), alike)[0]
    assert choose_keep_aspect(TrainConfig(aspect="keep"), alike)[0]
    assert not choose_keep_aspect(TrainConfig(aspect="stretch"), varied)[0]
    assert not choose_keep_aspect(TrainConfig(crop=32), varied)[0]  # square crops, never resized
    with pytest.raises(ConfigError, match="aspect 'square'"):
        TrainConfig(aspect="square")
    (tmp_path / "varied" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(InvalidImageError, match="0.png"):
        choose_keep_aspect(TrainConfig(), varied)


def test_an_image_the_preprocessing_refuses_is_named(tmp_path):
    """A uint16 frame above the bit depth is read and then refused: the error names the file (or the
    image's place in the call), so that one bad image among thousands is found at once."""
    good, bad = tmp_path / "good.png", tmp_path / "frame_17.png"
    cv2.imwrite(str(good), np.full((32, 32), 100, np.uint16))
    cv2.imwrite(str(bad), np.full((32, 32), 65000, np.uint16))
    preprocessing = Preprocessing(input_size=(32, 32), bit_depth=12)
    with pytest.raises(InvalidImageError, match=f"^{bad}: uint16 pixels up to 65000 exceed the 12-bit range"):
        preprocessing([good, bad])
    arrays = [load_image(good), load_image(bad)]
    with pytest.raises(InvalidImageError, match="^image 1: uint16"):
        preprocessing(arrays)
    with pytest.raises(InvalidImageError, match=f"^{bad}: uint16"):  # decoded by the caller, named by it
        preprocessing(arrays, sources=[good, bad])

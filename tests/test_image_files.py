"""Image files as an integrator's camera and disks deliver them (issue 11): the pixel cap holds for every
format and wherever the size sits in the file, also when the host imported cv2 first; a decoder error
is a typed error; a file rewritten while it is read never escapes as anything but InvalidImageError."""

from __future__ import annotations

import subprocess
import sys
import threading

import cv2
import numpy as np
import pytest

from stmae_edge.errors import InvalidImageError
from stmae_edge.image_header import declared_size
from stmae_edge.preprocessing import decode, load_image


def _encode(ext: str, image: np.ndarray, params=()) -> bytes:
    ok, buf = cv2.imencode(ext, image, list(params))
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize("ext, dtype, channels", [
    (ext, np.uint8, channels) for ext in (".png", ".jpg", ".bmp", ".tif") for channels in (1, 3)
] + [(".png", np.uint16, 1), (".tif", np.uint16, 3)])  # JPEG and BMP hold 8-bit pixels only
def test_declared_size_of_every_accepted_format(ext, dtype, channels):
    shape = (30, 50) if channels == 1 else (30, 50, channels)
    data = _encode(ext, np.zeros(shape, dtype))
    assert declared_size(data)[1:] == (50, 30)


def test_big_endian_and_bigtiff_headers():
    # Classic big-endian TIFF: one directory with ImageWidth (SHORT) and ImageLength (LONG).
    entries = [(256, 3, 1, (77).to_bytes(2, "big") + b"\0\0"), (257, 4, 1, (33).to_bytes(4, "big"))]
    ifd = len(entries).to_bytes(2, "big") + b"".join(
        t.to_bytes(2, "big") + k.to_bytes(2, "big") + n.to_bytes(4, "big") + v for t, k, n, v in entries)
    assert declared_size(b"MM\x00*" + (8).to_bytes(4, "big") + ifd + b"\0\0\0\0") == ("TIFF", 77, 33)
    # BigTIFF, little-endian: 8-byte offsets and counts, 20-byte entries, a LONG8 width.
    entries = [(256, 16, 1, (70000).to_bytes(8, "little")), (257, 3, 1, (9).to_bytes(8, "little"))]
    ifd = len(entries).to_bytes(8, "little") + b"".join(
        t.to_bytes(2, "little") + k.to_bytes(2, "little") + n.to_bytes(8, "little") + v for t, k, n, v in entries)
    header = b"II+\x00" + (8).to_bytes(2, "little") + b"\0\0" + (16).to_bytes(8, "little")
    assert declared_size(header + ifd) == ("TIFF", 70000, 9)


def _classic_tiff(entries: list[tuple[int, int, int, bytes]], tail: bytes = b"") -> bytes:
    """A little-endian classic TIFF of one directory of (tag, type, count, 4-byte value) entries, `tail` after it."""
    ifd = len(entries).to_bytes(2, "little") + b"".join(
        t.to_bytes(2, "little") + k.to_bytes(2, "little") + n.to_bytes(4, "little") + v for t, k, n, v in entries)
    return b"II*\x00" + (8).to_bytes(4, "little") + ifd + b"\0\0\0\0" + tail


def test_a_tiff_whose_decoded_samples_would_take_gigabytes_is_refused_within_the_pixel_cap():
    """8000 x 8000 is within the 64M-pixel cap; four 64-bit samples a pixel are 2 GB once decoded."""
    size = [(256, 4, 1, (8000).to_bytes(4, "little")), (257, 4, 1, (8000).to_bytes(4, "little"))]
    four = (277, 3, 1, (4).to_bytes(2, "little") + b"\0\0")
    # four BitsPerSample values take 8 bytes: they sit after the directory (2 + 4 * 12 + 4 bytes from its start)
    bits_at = (8 + 2 + 4 * 12 + 4).to_bytes(4, "little")
    crafted = _classic_tiff([*size, (258, 3, 4, bits_at), four], (64).to_bytes(2, "little") * 4)
    with pytest.raises(InvalidImageError, match="8000x8000 pixels of 4 64-bit samples, 2,048,000,000 bytes once decoded"):
        declared_size(crafted)
    eight_bit = _classic_tiff([*size, (258, 3, 4, bits_at), four], (8).to_bytes(2, "little") * 4)
    assert declared_size(eight_bit) == ("TIFF", 8000, 8000)  # 256 MB: as a 16-bit colour PNG of that size may take
    # a real 32-bit float TIFF, its BitsPerSample inline, is read as before
    assert declared_size(_encode(".tif", np.zeros((30, 50), np.float32)))[1:] == (50, 30)


@pytest.fixture(scope="module")
def oversized(tmp_path_factory) -> dict:
    """Small files that declare 12000 x 12000 pixels (144 M, over the 64 M cap) where a 64 KB prefix
    does not show it: a deflate TIFF, and a JPEG with 128 KB of APP segments before its frame header."""
    folder = tmp_path_factory.mktemp("oversized")
    tiff = _encode(".tif", np.zeros((12000, 12000), np.uint8), (cv2.IMWRITE_TIFF_COMPRESSION, 8))
    jpeg = bytearray(_encode(".jpg", np.zeros((16, 16), np.uint8)))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 9] = (12000).to_bytes(2, "big") * 2
    padding = (b"\xff\xef" + (65535).to_bytes(2, "big") + bytes(65533)) * 2
    jpeg = bytes(jpeg[:2]) + padding + bytes(jpeg[2:])
    files = {"tiff": folder / "huge.tif", "jpeg": folder / "huge.jpg"}
    files["tiff"].write_bytes(tiff)
    files["jpeg"].write_bytes(jpeg)
    assert len(tiff) < 1_000_000 and len(jpeg) > 2 * 65536
    return files


@pytest.mark.parametrize("kind", ["tiff", "jpeg"])
def test_an_oversized_image_is_refused_whatever_its_format(oversized, kind):
    with pytest.raises(InvalidImageError, match="12000x12000 pixels exceeds the limit"):
        load_image(oversized[kind])


def test_the_cap_holds_when_the_host_imported_cv2_first(oversized):
    code = ("import cv2, sys\n"  # before the package: OpenCV's own cap is then not in force
            "from stmae_edge.errors import InvalidImageError\n"
            "from stmae_edge.preprocessing import load_image\n"
            "for path in sys.argv[1:]:\n"
            "    try:\n"
            "        load_image(path)\n"
            "    except InvalidImageError as exc:\n"
            "        print('refused', exc)\n")
    r = subprocess.run([sys.executable, "-c", code, str(oversized["tiff"]), str(oversized["jpeg"])],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("refused") == 2 and r.stdout.count("exceeds the limit") == 2


def test_a_decoder_exception_becomes_a_typed_error(tmp_path):
    # 32 M pixels is under the cap, but OpenCV asserts that no side exceeds 2^20 and raises cv2.error.
    bmp = bytearray(_encode(".bmp", np.zeros((8, 16), np.uint8)))
    bmp[22:26] = (2_000_000).to_bytes(4, "little")
    path = tmp_path / "tall.bmp"
    path.write_bytes(bytes(bmp))
    with pytest.raises(InvalidImageError, match="tall.bmp: BMP data cannot be decoded"):
        load_image(path)


def test_unsupported_formats_are_refused_by_content_not_suffix(tmp_path):
    for name, data in {"anim.png": b"GIF89a" + bytes(64), "photo.jpg": b"RIFF\0\0\0\0WEBPVP8 " + bytes(64)}.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(InvalidImageError, match="not a PNG, JPEG, BMP or TIFF"):
            load_image(tmp_path / name)


def test_a_file_rewritten_while_it_is_read_gives_only_typed_errors(tmp_path):
    """A camera's hot folder: the writer truncates and rewrites the file while the runtime reads it."""
    rng = np.random.default_rng(0)
    versions = [_encode(ext, rng.integers(0, 256, (96, 128), dtype=np.uint8)) for ext in (".png", ".jpg", ".tif", ".bmp")]
    path = tmp_path / "frame.png"
    path.write_bytes(versions[0])
    stop = threading.Event()

    def writer():
        k = 0
        while not stop.is_set():
            data = versions[k % len(versions)]
            with open(path, "wb") as f:
                for start in range(0, len(data), 4096):
                    f.write(data[start:start + 4096])
                    f.flush()
            k += 1

    thread = threading.Thread(target=writer)
    thread.start()
    outcomes = {"read": 0, "refused": 0}
    try:
        for _ in range(300):
            try:
                image = load_image(path)
                assert image.shape == (96, 128)
                outcomes["read"] += 1
            except InvalidImageError:
                outcomes["refused"] += 1
    finally:
        stop.set()
        thread.join()
    assert sum(outcomes.values()) == 300  # every read ended in an image or a typed error, never another exception
    # What the race can hand the reader, deterministically: every version cut at 80 lengths, the last
    # bytes among them, and the start of one version over the rest of another (a rewrite caught midway)
    for data in versions:
        cuts = sorted({*range(0, len(data), max(1, len(data) // 64)), *range(max(0, len(data) - 16), len(data))})
        for cut in cuts:
            for name, content in (("cut", data[:cut]), ("mixed", data[:cut] + versions[0][cut:])):
                path.write_bytes(content)
                try:
                    image = load_image(path)
                except InvalidImageError:
                    continue
                assert image.shape == (96, 128), (name, cut, len(data))


def test_commands_over_a_folder_holding_an_oversized_image(oversized, tiny_export, synthetic_dataset, tmp_path):
    """predict scores the rest and reports it; bench and linescan stop with one line, no traceback."""
    import shutil

    from test_cli import _assert_one_line_error, run

    folder = tmp_path / "in"
    shutil.copytree(synthetic_dataset / "test" / "good", folder)
    shutil.copy(oversized["tiff"], folder / "zz_huge.tif")
    r = run("predict", str(tiny_export[1]), str(folder), "--out", str(tmp_path / "out"), "--no-overlays")
    assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr
    summary = __import__("json").loads((tmp_path / "out" / "results.json").read_text())
    assert len(summary["results"]) == 6 and summary["unreadable"] == 1
    assert "exceeds the limit" in summary["errors"][0]["error"]
    _assert_one_line_error(run("bench", "--engine", str(tiny_export[1]), "--images", str(folder), "--batch", "1",
                               "--iterations", "1"), "exceeds the limit")
    _assert_one_line_error(run("linescan", str(tiny_export[1]), str(oversized["tiff"])), "exceeds the limit")


def test_headers_that_would_mislead_the_decoder_or_take_seconds_are_refused():
    # A TIFF that names its width twice: libtiff takes one, a reader taking the other would pass the cap.
    entries = [(256, 4, 1, 30000), (257, 4, 1, 30000), (256, 4, 1, 1), (257, 4, 1, 1)]
    ifd = len(entries).to_bytes(2, "little") + b"".join(
        t.to_bytes(2, "little") + k.to_bytes(2, "little") + n.to_bytes(4, "little") + v.to_bytes(4, "little")
        for t, k, n, v in entries)
    with pytest.raises(InvalidImageError, match="tag 256 twice"):
        declared_size(b"II*\x00" + (8).to_bytes(4, "little") + ifd + bytes(4))
    # A PNG of a million empty chunks: walking them would take seconds.
    png = _encode(".png", np.zeros((4, 4), np.uint8))
    chunk = (0).to_bytes(4, "big") + b"tEXt" + bytes(4)
    bloated = png[:33] + chunk * 200_000 + png[33:]
    import time

    started = time.perf_counter()
    with pytest.raises(InvalidImageError, match="more than 100,000 chunks"):
        declared_size(bloated)
    assert time.perf_counter() - started < 1.0


def test_a_jpeg_of_more_scans_than_an_image_needs_is_refused_before_decoding():
    """Each scan of a progressive JPEG is decoded over the whole frame: 5,000 empty scans in 300 KB
    took 23 s to decode. A progressive JPEG has about 10."""
    image = (np.random.default_rng(0).random((64, 64)) * 255).astype(np.uint8)
    progressive = _encode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert declared_size(progressive)[1:] == (64, 64)
    empty_scan = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00"
    bombed = progressive[:-2] + empty_scan * 150 + b"\xff\xd9"
    with pytest.raises(InvalidImageError, match="JPEG with more than 100 scans"):
        declared_size(bombed)
    # what follows the end of the image (a phone's motion-photo video, a camera trailer) is not counted
    trailer = np.random.default_rng(1).integers(0, 256, 8 << 20, np.uint8).tobytes()
    assert trailer.count(b"\xff\xda") > 100  # the check can fail: a plain count would refuse it
    for jpeg in (progressive, _encode(".jpg", image)):
        assert declared_size(jpeg + trailer)[1:] == (64, 64)
        assert decode(np.frombuffer(jpeg + trailer, np.uint8), "with a trailer").shape == (64, 64)


def with_exif_orientation(jpeg: bytes, orientation: int, byte_order: str = "little") -> bytes:
    """A JPEG with an APP1 EXIF segment whose first directory holds one Orientation entry."""
    order = "II" if byte_order == "little" else "MM"
    ifd = (1).to_bytes(2, byte_order) + (0x0112).to_bytes(2, byte_order) + (3).to_bytes(2, byte_order) \
        + (1).to_bytes(4, byte_order) + orientation.to_bytes(2, byte_order) + b"\0\0" + (0).to_bytes(4, byte_order)
    tiff = order.encode() + (42).to_bytes(2, byte_order) + (8).to_bytes(4, byte_order) + ifd
    payload = b"Exif\0\0" + tiff
    return jpeg[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + jpeg[2:]


# What EXIF orientation means for the display (the standard's words), written with numpy alone
EXPECTED = {1: lambda a: a, 2: np.fliplr, 3: lambda a: np.rot90(a, 2), 4: np.flipud,
            5: lambda a: np.rot90(np.fliplr(a), 1), 6: lambda a: np.rot90(a, -1),
            7: lambda a: np.rot90(np.fliplr(a), -1), 8: lambda a: np.rot90(a, 1)}


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("byte_order", ["little", "big"])
def test_a_jpeg_is_read_as_its_exif_orientation_shows_it(tmp_path, orientation, byte_order):
    from stmae_edge.preprocessing import declared_image_size

    image = np.zeros((40, 64, 3), np.uint8)
    image[:10, :20] = (0, 0, 255)  # a red block top left: every turn and mirror moves it
    ok, encoded = cv2.imencode(".jpg", image)
    plain = tmp_path / "plain.jpg"
    plain.write_bytes(encoded.tobytes())
    turned = tmp_path / "turned.jpg"
    turned.write_bytes(with_exif_orientation(encoded.tobytes(), orientation, byte_order))
    expected = np.ascontiguousarray(EXPECTED[orientation](load_image(plain)))
    assert np.array_equal(load_image(turned), expected)
    assert declared_image_size(turned) == expected.shape[:2]  # the header's size, turned alike


def tiff_with_orientation(image: np.ndarray, orientation: int, byte_order: str = "little") -> bytes:
    """An uncompressed 8-bit gray classic TIFF of `image` whose directory holds an Orientation tag."""
    height, width = image.shape
    entries = [(256, 3, width), (257, 3, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, None),
               (274, 3, orientation), (277, 3, 1), (278, 3, height), (279, 4, height * width)]
    data_at = 8 + 2 + 12 * len(entries) + 4
    ifd = len(entries).to_bytes(2, byte_order)
    for tag, kind, value in entries:
        value = data_at if value is None else value
        field = value.to_bytes(2, byte_order) + b"\0\0" if kind == 3 else value.to_bytes(4, byte_order)
        ifd += tag.to_bytes(2, byte_order) + kind.to_bytes(2, byte_order) + (1).to_bytes(4, byte_order) + field
    head = (b"II" if byte_order == "little" else b"MM") + (42).to_bytes(2, byte_order) + (8).to_bytes(4, byte_order)
    return head + ifd + (0).to_bytes(4, byte_order) + image.tobytes()


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("byte_order", ["little", "big"])
def test_a_tiff_is_read_and_sized_as_its_orientation_tag_shows_it(tmp_path, orientation, byte_order):
    """OpenCV turns a TIFF's pixels by its Orientation tag; the size read from its header (what `predict`
    checks and `train` records) was the stored one, so an upright portrait TIFF was refused as far from
    its own training images."""
    from stmae_edge.preprocessing import declared_image_size

    image = np.zeros((40, 64), np.uint8)
    image[:10, :20] = 255  # a block top left: every turn and mirror moves it
    turned = tmp_path / "turned.tif"
    turned.write_bytes(tiff_with_orientation(image, orientation, byte_order))
    expected = np.ascontiguousarray(EXPECTED[orientation](image))
    assert np.array_equal(load_image(turned), expected)
    assert declared_image_size(turned) == expected.shape[:2]


def test_a_malformed_exif_block_leaves_the_image_as_stored(tmp_path):
    from stmae_edge.image_header import jpeg_orientation

    ok, encoded = cv2.imencode(".jpg", np.full((8, 12), 90, np.uint8))
    jpeg = with_exif_orientation(encoded.tobytes(), 6)
    assert jpeg_orientation(jpeg) == 6
    cut = jpeg[:30]  # the EXIF block runs past the end of what is there
    broken = jpeg[:20] + b"\xff" * 10 + jpeg[30:]
    for data in (cut, broken, with_exif_orientation(encoded.tobytes(), 0), with_exif_orientation(encoded.tobytes(), 99)):
        assert jpeg_orientation(data) == 1


def test_a_git_lfs_pointer_says_to_fetch_the_images(tmp_path):
    """A dataset cloned without git-lfs holds 130-byte text files under image names: "starts with 76657273"
    told a user nothing."""
    pointer = tmp_path / "000.png"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 12345\n")
    with pytest.raises(InvalidImageError, match=r"000.png: a Git LFS pointer, not the image: fetch the images with "
                                                r"`git lfs pull`"):
        load_image(pointer)


def test_training_says_how_many_good_images_their_files_turn(tmp_path, caplog):
    """A phone's JPEGs are read turned by their EXIF tag, as viewers show them; a camera's frames handed
    over as arrays carry none, and the model then sees them another way round, without a word."""
    from stmae_edge.data import survey
    from stmae_edge.training.image_set import good_images
    from stmae_edge.training.loop import TrainConfig

    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        ok, encoded = cv2.imencode(".jpg", rng.integers(0, 256, (40, 64), np.uint8))
        path = tmp_path / f"{i}.jpg"
        path.write_bytes(with_exif_orientation(encoded.tobytes(), 6 if i < 2 else 1))
        paths.append(path)
    tiff = tmp_path / "6.tif"
    tiff.write_bytes(tiff_with_orientation(np.zeros((40, 64), np.uint8), 3))
    assert survey([*paths, tiff], "good images", progress=False).turned == (paths[0], paths[1], tiff)
    with caplog.at_level("WARNING", logger="stmae_edge.training.image_set"):
        good_images(paths, TrainConfig())
    assert "2 of the good images are turned or mirrored by their files' orientation tags (EXIF; first: 0.jpg)" \
        in caplog.text


def chained_tiff(pages: list[tuple[np.ndarray, int]], loop: bool = False) -> bytes:
    """A classic little-endian TIFF of uncompressed 8-bit gray directories, chained in order, each with its
    NewSubfileType (1: a reduced-resolution copy of the page before); `loop`: the last points to the first."""
    out, offsets = bytearray(b"II*\0" + (8).to_bytes(4, "little")), []
    for n, (image, subfile_type) in enumerate(pages):
        height, width = image.shape
        entries = [(254, 4, subfile_type), (256, 3, width), (257, 3, height), (258, 3, 8), (259, 3, 1),
                   (262, 3, 1), (273, 4, None), (277, 3, 1), (278, 3, height), (279, 4, height * width)]
        at = len(out)
        offsets.append(at)
        data_at = at + 2 + 12 * len(entries) + 4
        out += len(entries).to_bytes(2, "little")
        for tag, kind, value in entries:
            value = data_at if value is None else value
            field = value.to_bytes(2, "little") + b"\0\0" if kind == 3 else value.to_bytes(4, "little")
            out += tag.to_bytes(2, "little") + kind.to_bytes(2, "little") + (1).to_bytes(4, "little") + field
        following = data_at + image.size if n + 1 < len(pages) else (8 if loop else 0)
        out += following.to_bytes(4, "little") + image.tobytes()
    return bytes(out)


def test_a_tiff_of_several_pages_is_refused_and_one_with_a_thumbnail_is_read(tmp_path):
    """OpenCV decodes a TIFF's first page only: a multi-page file (an exposure series, a stack) was scored on
    that page alone, the rest of the part passing uninspected without a word."""
    from stmae_edge.image_header import tiff_pages

    page, thumbnail = np.full((40, 64), 7, np.uint8), np.full((10, 16), 9, np.uint8)
    pages = tmp_path / "series.tif"
    assert cv2.imwritemulti(str(pages), [page, page + 1, page + 2])  # as OpenCV (libtiff) writes them
    with pytest.raises(InvalidImageError, match=r"series.tif: a TIFF of 3 pages, of which only the first would be "
                                                r"scored; save each page as an image file of its own$"):
        load_image(pages)
    # a reduced-resolution copy (a thumbnail, a pyramid level) is not a page: the file is one image
    with_thumbnail = tmp_path / "thumb.tif"
    with_thumbnail.write_bytes(chained_tiff([(page, 0), (thumbnail, 1)]))
    assert np.array_equal(load_image(with_thumbnail), page)
    assert tiff_pages(chained_tiff([(page, 0), (page, 2), (thumbnail, 1)])) == 2  # bit 2: a page of a series
    assert tiff_pages(chained_tiff([(page, 0), (page, 0)], loop=True)) == 2  # a chain looping back: once round
    ok, single = cv2.imencode(".tif", page)
    assert ok and tiff_pages(single.tobytes()) == 1
    assert tiff_pages(chained_tiff([(page, 0), (page, 0)])[:-page.size - 30]) == 1  # cut short: as OpenCV reads it

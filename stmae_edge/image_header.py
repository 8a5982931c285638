"""The size an image file declares, read from its header before anything is decoded.

    file bytes -> format (PNG, JPEG, BMP, TIFF: what data.IMAGE_SUFFIXES lists) -> (width, height)
    JPEG bytes -> its EXIF orientation (1..8), how a viewer turns the stored pixels to show them
    TIFF bytes -> its Orientation tag (1..8), by which OpenCV turns the pixels it decodes
    TIFF bytes -> how many pages it holds (OpenCV decodes the first only)

Only formats whose header is read here get decoded at all, so the pixel cap holds for every file the
package opens: a 0.5 MB file that declares 12000 x 12000 pixels is refused before OpenCV allocates
them, whatever the format and wherever in the file the size sits (a JPEG may carry megabytes of APP
segments before its frame header; a TIFF puts its directory anywhere). OpenCV's own cap
(OPENCV_IO_MAX_IMAGE_PIXELS) is not used: it is read when cv2 is first imported, which the host
program may have done before importing this package, and it is the whole process's, not ours to set.

numpy-free and OpenCV-free on purpose: the fuzz harness drives it with arbitrary bytes.
"""

from __future__ import annotations

from .errors import InvalidImageError

FORMATS = ("PNG", "JPEG", "BMP", "TIFF")

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_SOS = 0xDA
MAX_JPEG_SCANS = 100  # a progressive JPEG has about 10
_TIFF_WIDTH, _TIFF_LENGTH, _TIFF_BITS, _TIFF_SAMPLES = 256, 257, 258, 277
_TIFF_SIZE_TAGS = (_TIFF_WIDTH, _TIFF_LENGTH, _TIFF_BITS, _TIFF_SAMPLES)
# What a decoded image may take: 64M pixels (preprocessing.MAX_IMAGE_PIXELS) of four 16-bit samples.
MAX_DECODED_BYTES = 512 * 1024 * 1024
_TIFF_SHORT, _TIFF_LONG, _TIFF_LONG8 = 3, 4, 16
_TIFF_MAX_ENTRIES = 4096  # a real first directory has a few dozen
_PNG_MAX_CHUNKS = 100_000  # 256 MB in 8 KB IDAT chunks is 32,000


def declared_size(data: bytes | memoryview) -> tuple[str, int, int]:
    """(format, width, height) that the file's header declares.

    Raises:
        InvalidImageError: not one of FORMATS, or a header that declares no usable size (truncated,
            malformed, zero width or height). The message does not name the file; callers add that.
    """
    head = bytes(data[:16])
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG", *_png_size(data)
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG", *_jpeg_size(data)
    if head[:2] == b"BM":
        return "BMP", *_bmp_size(data)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF", *_tiff_size(data)
    if bytes(data[:64]).startswith(b"version https://git-lfs"):  # a clone made without git-lfs, or before `git lfs pull`
        raise InvalidImageError("a Git LFS pointer, not the image: fetch the images with `git lfs pull`")
    raise InvalidImageError(f"not a PNG, JPEG, BMP or TIFF file (starts with {head[:8].hex()}); "
                            "save the image in one of those formats")


def _checked(width: int, height: int, fmt: str) -> tuple[int, int]:
    if width <= 0 or height <= 0:
        raise InvalidImageError(f"{fmt} header declares {width}x{height} pixels; the file is corrupt")
    return width, height


def _png_size(data) -> tuple[int, int]:
    """IHDR's size, after checking that every chunk fits inside the file: OpenCV spends seconds on a
    100-byte PNG whose chunk claims 4 GB (found by the fuzzer)."""
    if len(data) < 24 or bytes(data[12:16]) != b"IHDR":
        raise InvalidImageError("PNG without an IHDR header; the file is corrupt or truncated")
    at, chunks = 8, 0
    while at + 8 <= len(data):
        chunks += 1
        if chunks > _PNG_MAX_CHUNKS:  # real files have a few thousand at most; walking millions takes seconds
            raise InvalidImageError(f"PNG with more than {_PNG_MAX_CHUNKS:,} chunks; the file is corrupt or hostile")
        length, kind = int.from_bytes(data[at:at + 4], "big"), bytes(data[at + 4:at + 8])
        if at + 12 + length > len(data):
            raise InvalidImageError(f"PNG chunk {kind!r} claims {length:,} bytes, past the end of the file; "
                                    "the file is truncated or corrupt")
        if kind == b"IEND":
            break
        at += 12 + length
    return _checked(int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"), "PNG")


def _jpeg_size(data) -> tuple[int, int]:
    """Walks the marker segments from the start of the file to the first frame header, over the
    whole file: there is no bound on how many APP segments come first."""
    i, end = 2, len(data)
    while i + 4 <= end:
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            i += 2
            continue
        if marker in (_JPEG_SOS, 0xD9):  # image data or its end, and no frame header yet
            break
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if length < 2:
            break
        if marker in _JPEG_SOF:
            if i + 9 > end:
                break
            height, width = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            if _jpeg_scans(data, i + 2 + length) > MAX_JPEG_SCANS:
                raise InvalidImageError(f"JPEG with more than {MAX_JPEG_SCANS} scans, which no image needs; "
                                        "the file is corrupt or crafted")
            return _checked(width, height, "JPEG")
        i += 2 + length
    raise InvalidImageError("JPEG without a readable frame header; the file is corrupt or truncated")


def _jpeg_scans(data, i: int) -> int:
    """The scans from offset `i` (after the frame header) to the end of the image, counted up to one
    past MAX_JPEG_SCANS. Each scan of a progressive JPEG is decoded over the whole frame: thousands of
    empty scans in a 300 KB file cost seconds per image. Bytes after the end of the image (a phone's
    motion-photo video, a camera's trailer) are not the image's and are not read."""
    data = bytes(data)
    scans, end = 0, len(data)
    while i + 4 <= end and scans <= MAX_JPEG_SCANS:
        if data[i] != 0xFF:
            break  # not a marker: corrupt, the decoder says so
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:  # end of image
            break
        if 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if marker != _JPEG_SOS:
            continue
        scans += 1
        while True:  # the entropy-coded data: up to the next FF not followed by 00 (a literal FF) or RSTn
            i = data.find(b"\xff", i)
            if i < 0 or i + 1 >= end:
                return scans
            if data[i + 1] == 0x00 or 0xD0 <= data[i + 1] <= 0xD7:
                i += 2
                continue
            break
    return scans


def _bmp_size(data) -> tuple[int, int]:
    if len(data) < 26:
        raise InvalidImageError("BMP header is truncated")
    header = int.from_bytes(data[14:18], "little")
    if header == 12:  # OS/2 1.x: 16-bit sizes
        return _checked(int.from_bytes(data[18:20], "little"), int.from_bytes(data[20:22], "little"), "BMP")
    width = int.from_bytes(data[18:22], "little", signed=True)
    height = int.from_bytes(data[22:26], "little", signed=True)
    return _checked(width, abs(height), "BMP")  # a negative height means top-down rows


def _tiff_size(data) -> tuple[int, int]:
    """ImageWidth and ImageLength of the first directory (the page OpenCV decodes), classic or BigTIFF."""
    order = "little" if bytes(data[:2]) == b"II" else "big"
    big = int.from_bytes(data[2:4], order) == 43

    def number(at: int, size: int) -> int:
        if at < 0 or at + size > len(data):
            raise InvalidImageError("TIFF directory points past the end of the file; the file is corrupt or truncated")
        return int.from_bytes(data[at:at + size], order)

    offset = number(8, 8) if big else number(4, 4)
    count = number(offset, 8) if big else number(offset, 2)
    if count > _TIFF_MAX_ENTRIES:
        raise InvalidImageError(f"TIFF directory claims {count} entries; the file is corrupt")
    entry_size, first = (20, offset + 8) if big else (12, offset + 2)
    inline = 8 if big else 4  # bytes of value an entry holds itself; longer values sit at an offset
    sizes: dict[int, int] = {}
    for k in range(count):
        at = first + k * entry_size
        tag, kind = number(at, 2), number(at + 2, 2)
        if tag not in _TIFF_SIZE_TAGS:
            continue
        value_at = at + (12 if big else 8)
        width = {_TIFF_SHORT: 2, _TIFF_LONG: 4, _TIFF_LONG8: 8}.get(kind)
        if width is None or (width == 8 and not big):
            raise InvalidImageError(f"TIFF size tag {tag} has type {kind}; the file is corrupt")
        if tag in sizes:  # libtiff would take one and OpenCV allocate for it: which one is not ours to guess
            raise InvalidImageError(f"TIFF directory gives tag {tag} twice; the file is corrupt")
        values = number(at + 4, inline)
        if tag == _TIFF_BITS and values * width > inline:  # one value per sample, the first read: all are equal
            value_at = number(value_at, inline)
        sizes[tag] = number(value_at, width)
    if _TIFF_WIDTH not in sizes or _TIFF_LENGTH not in sizes:
        raise InvalidImageError("TIFF without an image width and length; the file is corrupt")
    width, height = _checked(sizes[_TIFF_WIDTH], sizes[_TIFF_LENGTH], "TIFF")
    # The pixel cap alone lets 64M pixels of four 64-bit samples through: 2 GiB once OpenCV decodes them.
    samples, bits = sizes.get(_TIFF_SAMPLES, 1), sizes.get(_TIFF_BITS, 1)
    decoded = width * height * samples * -(-bits // 8)
    if decoded > MAX_DECODED_BYTES:
        raise InvalidImageError(f"TIFF declares {width}x{height} pixels of {samples} {bits}-bit samples, "
                                f"{decoded:,} bytes once decoded, above the {MAX_DECODED_BYTES:,} allowed; "
                                "save it with fewer channels or bits (8- or 16-bit gray or colour)")
    return width, height


_EXIF_ORIENTATION = 0x0112
_TIFF_SUBFILE_TYPE, _TIFF_REDUCED_IMAGE = 254, 1
MAX_TIFF_PAGES_COUNTED = 1000


def tiff_pages(data: bytes | memoryview) -> int:
    """How many pages a TIFF holds, up to MAX_TIFF_PAGES_COUNTED: its directories but those that only
    repeat a page at a reduced resolution (a thumbnail, a pyramid level). 1 for a file whose chain of
    directories cannot be followed: the first page is all OpenCV reads anyway. Never raises."""
    try:
        order = {b"II": "little", b"MM": "big"}[bytes(data[:2])]
        big = int.from_bytes(data[2:4], order) == 43
        word, entry_size, count_size = (8, 20, 8) if big else (4, 12, 2)

        def number(at: int, size: int) -> int:
            if at < 0 or at + size > len(data):
                raise ValueError("outside the file")
            return int.from_bytes(data[at:at + size], order)

        pages, seen = 0, set()
        directory = number(8 if big else 4, word)
        while directory and directory not in seen and len(seen) < MAX_TIFF_PAGES_COUNTED:
            seen.add(directory)  # a chain that loops back is counted once round
            count = min(number(directory, count_size), _TIFF_MAX_ENTRIES)
            first = directory + count_size
            subfile_type = 0
            for k in range(count):
                at = first + k * entry_size
                if number(at, 2) == _TIFF_SUBFILE_TYPE:
                    subfile_type = number(at + (12 if big else 8), 4)
                    break
            pages += not subfile_type & _TIFF_REDUCED_IMAGE
            directory = number(first + count * entry_size, word)
        return max(pages, 1)
    except (KeyError, IndexError, ValueError):
        return 1


def jpeg_orientation(data: bytes | memoryview) -> int:
    """The EXIF Orientation of a JPEG (1: as stored; 2..8: mirrored and/or turned, as viewers and
    annotation tools show it), from its APP1 segment before the image data; 1 where there is none or
    it cannot be read. Never raises: a malformed EXIF block is a camera's quirk, not a corrupt image."""
    try:
        i, end = 2, len(data)
        while i + 4 <= end and data[i] == 0xFF:
            marker = data[i + 1]
            if marker == 0xFF or 0xD0 <= marker <= 0xD8 or marker == 0x01:
                i += 1 if marker == 0xFF else 2
                continue
            if marker in (_JPEG_SOS, 0xD9):
                break
            length = int.from_bytes(data[i + 2:i + 4], "big")
            if length < 2:
                break
            if marker == 0xE1 and bytes(data[i + 4:i + 10]) == b"Exif\x00\x00":
                return _tiff_orientation(data, i + 10, min(i + 2 + length, end))
            i += 2 + length
    except (IndexError, ValueError):
        pass
    return 1


def tiff_orientation(data: bytes | memoryview) -> int:
    """The Orientation tag of a classic TIFF's first directory (1..8), or 1. OpenCV turns a TIFF's pixels
    by it when decoding (unlike a JPEG's EXIF), so only the size it shows needs it. Never raises."""
    try:
        if int.from_bytes(data[2:4], "little" if bytes(data[:2]) == b"II" else "big") != 42:
            return 1  # BigTIFF: its directories are laid out otherwise; such files are rarely turned
        return _tiff_orientation(data, 0, len(data))
    except (IndexError, ValueError):
        return 1


def _tiff_orientation(data, start: int, end: int) -> int:
    """Tag 0x0112 of the first directory of the TIFF structure at data[start:end] (EXIF's), or 1."""
    order = {b"II": "little", b"MM": "big"}.get(bytes(data[start:start + 2]))
    if order is None or end - start < 8:
        return 1

    def number(at: int, size: int) -> int:
        if at < start or at + size > end:
            raise ValueError("outside the EXIF block")
        return int.from_bytes(data[at:at + size], order)

    directory = start + number(start + 4, 4)
    for k in range(min(number(directory, 2), _TIFF_MAX_ENTRIES)):
        at = directory + 2 + 12 * k
        if number(at, 2) == _EXIF_ORIENTATION and number(at + 2, 2) == _TIFF_SHORT:
            value = number(at + 8, 2)
            return value if 1 <= value <= 8 else 1
    return 1

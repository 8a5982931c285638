"""Checks on PyTorch weight files a user hands in, before and after torch.load(weights_only=True).

    file --check_archive--> torch.load(weights_only=True) --> {name: tensor} --check_weights--> caller

weights_only stops code from running, not memory from running out: a zip entry compressed a
thousandfold, or a tensor viewed far beyond its storage, turns a small file into gigabytes. These
checks bound what a file can make to what it holds. Used by the model checkpoint (checkpoint.py)
and by the backbones' ImageNet weight files (models/backbones.py).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

# The dtypes stmae-edge's models and torchvision's backbones have; anything else (quantized, complex,
# ...) is not one of those files.
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.uint8,
                 torch.bool)
MAX_ARCHIVE_ENTRIES = 100_000  # torch.save writes one entry per storage plus a few: a model has hundreds


def check_archive(path: Path, error: type[Exception]) -> None:
    """A zip file (every file torch.save has written since PyTorch 1.6) whose entries are stored, not
    compressed, and no larger than the file: torch.save never compresses, and a compressed entry is
    how a few kilobytes expand to gigabytes in torch.load. Files in the legacy (pre-zip) format, as
    torchvision's vgg19 file is, pass unchecked here: torch.load reserves what their storages declare,
    which fails or is checked against the bytes there before any page is used (a terabyte claimed by a
    small file costs no memory: tests/test_backbones.py), and check_weights bounds what they hold.

    Raises:
        error: naming the entry that is compressed or larger than the file.
    """
    if not zipfile.is_zipfile(path):
        return
    file_size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise error(f"{path}: a damaged zip archive ({exc}); copy the file again") from None
    if len(entries) > MAX_ARCHIVE_ENTRIES:
        raise error(f"{path}: {len(entries):,} entries in its archive, more than any weights file has; "
                    "the file is corrupt or crafted")
    for entry in entries:
        if entry.compress_type != zipfile.ZIP_STORED:
            raise error(f"{path}: entry {entry.filename!r} is compressed, which torch.save never does; "
                        "the file was repacked or crafted: save it again with torch.save")
        if entry.file_size > file_size:
            raise error(f"{path}: entry {entry.filename!r} claims {entry.file_size:,} bytes in a "
                        f"{file_size:,}-byte file; the file is corrupt or crafted")


def check_weights(state: dict, path: Path, error: type[Exception]) -> None:
    """Plain dense tensors under string names, each holding its own bytes, no more in all than the
    file: a 4 KB file can otherwise hold a tensor expanded to 256 GB, which a digest or a copy would read.

    Raises:
        error: naming the first weight that is not such a tensor.
    """
    total = 0
    for name, tensor in state.items():
        if not isinstance(name, str):
            raise error(f"{path}: a weight named {name!r}, not by a string; the file is corrupt")
        if not isinstance(tensor, torch.Tensor):
            raise error(f"{path}: weight {name!r} is not a tensor; the file is corrupt")
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.dtype not in WEIGHT_DTYPES:
            raise error(f"{path}: weight {name!r} is a {tensor.layout} {tensor.dtype} tensor, which no "
                        "stmae-edge or torchvision weights file holds; the file is corrupt or not one of those")
        size = tensor.numel() * tensor.element_size()
        stored = tensor.untyped_storage().nbytes()
        if size > stored:
            raise error(f"{path}: weight {name!r} claims {size:,} bytes from {stored:,} of storage (an "
                        "expanded view); the file is corrupt or crafted")
        total += size
    file_size = path.stat().st_size
    if total > file_size:
        raise error(f"{path}: its weights claim {total:,} bytes, more than the {file_size:,}-byte file holds "
                    "(shared storage); the file is corrupt or crafted")

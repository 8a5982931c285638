"""Output files: checked before long work starts, so a bad --out fails in a second, not after training,
and never one that would replace an input of the same command."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterable, Iterator

from .errors import OutputError


def same_file(a: Path | str, b: Path | str) -> bool:
    """Whether two paths name one file (through links and relative parts), existing or not."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def check_writable(path: Path | str, inputs: Iterable[Path | str] = ()) -> Path:
    """Fail before long work, not after it, when the output cannot be written or is one of `inputs`.

    Raises:
        OutputError: the folder cannot be created or written, the path is a folder, or it names an input.
    """
    path = Path(path)
    for source in inputs:
        if same_file(path, source):
            raise OutputError(f"{path} is an input of this command and would be replaced; choose another --out")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(path.name + ".partial")
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}; choose another --out") from exc
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name with --out")
    return path


@contextlib.contextmanager
def written_atomically(path: Path | str) -> Iterator[Path]:
    """A temporary name beside `path` to write to; renamed over `path` when the block succeeds, removed
    when it fails or is interrupted. A reader, or a later command, never finds a half-written file under
    the real name, and a file that was there stays whole until the new one replaces it.

    Raises:
        OutputError: the rename fails (an OSError inside the block propagates as it is).
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield partial
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}; nothing was replaced") from exc
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_bytes_atomically(path: Path | str, data: bytes) -> None:
    """`data` as the whole of `path`, or nothing (written_atomically)."""
    with written_atomically(path) as partial:
        partial.write_bytes(data)


def check_output_folder(out: Path | str, inputs: Iterable[Path | str]) -> Path:
    """An output folder that holds none of the inputs: what a command writes there can neither replace
    an input nor be taken for one by the next run over the input folder.

    Raises:
        OutputError: `out` is the folder of one of the inputs, or cannot be created.
    """
    out = Path(out)
    for source in inputs:
        if same_file(Path(source).parent, out):
            raise OutputError(f"--out {out} is the folder of the input {source}: outputs would sit among (and "
                              "could replace) the inputs; choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out}: {exc.strerror or exc}; choose another --out") from exc
    return out

"""Checks of values that come from users and files, shared by every reader: numbers of the right kind
and range, and JSON documents of bounded size and depth (model metadata, engine sidecars).

A bool is never a number here, and NaN never in range: a setting read from a file or a call must mean
what it says, or be refused with a typed error.
"""

from __future__ import annotations

import json
import math
from numbers import Integral, Real
from pathlib import Path

from .errors import ModelFileMissingError, StmaeError, first_line

MAX_DOCUMENT_BYTES = 1 << 20  # a model's metadata is a few KB; a megabyte means a broken or hostile file
MAX_DOCUMENT_DEPTH = 32  # ours nest 4 deep


def is_file(path: Path, error: type[StmaeError]) -> bool:
    """Path.is_file, with the OS's refusals (no permission on a folder of the path, a name too long)
    raised as `error`, naming the file: Path.is_file raises them (it answers False only for a missing
    file, a NUL byte, a loop of links).

    Raises:
        `error`: the file's folder cannot be searched, or the name is longer than the system takes.
    """
    try:
        return path.is_file()
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or first_line(exc)})") from exc


# What a TensorRT plan file is called: one definition for every reader of model files
PLAN_SUFFIXES = (".plan", ".engine")


def require_model_file(path: Path | str) -> Path:
    """`path`, checked to be a file before any work (or output folder) is started for it.

    Raises:
        ModelFileMissingError: no such file (or a folder), or its folder cannot be searched.
    """
    path = Path(path)
    if not is_file(path, ModelFileMissingError):
        if path.is_dir():
            raise ModelFileMissingError(f"{path} is a folder; give the model file in it (.onnx, .plan or .pt)")
        raise ModelFileMissingError(f"{path}: no such model file")
    return path


def is_whole(value) -> bool:
    """An integer, Python's or numpy's, and not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_finite_number(value) -> bool:
    """A finite real number that a float holds, Python's or numpy's, and not a bool."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer beyond any float
        return False


def parse_document(text: str | bytes, what: str, error: type[StmaeError]) -> dict:
    """A JSON object of bounded size and nesting, or `error` saying what is wrong with it."""
    if len(text) > MAX_DOCUMENT_BYTES:
        raise error(f"{what} is {len(text):,} bytes, more than the {MAX_DOCUMENT_BYTES:,} a model's needs; "
                    "the file is corrupt or not from stmae-edge")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = first_line(exc, 120)
        raise error(f"{what} is not valid JSON ({reason})") from None
    if not isinstance(value, dict):
        raise error(f"{what} is a JSON {type(value).__name__}, not an object; the file is corrupt")
    if depth(value) > MAX_DOCUMENT_DEPTH:
        raise error(f"{what} nests deeper than {MAX_DOCUMENT_DEPTH} levels; the file is corrupt or not from stmae-edge")
    return value


def check_document(value, what: str, error: type[StmaeError]) -> dict:
    """A document read by another reader than JSON (a checkpoint's metadata): held to the same bounds
    as parse_document, and to JSON's own types."""
    if not isinstance(value, dict):
        raise error(f"{what} is a {type(value).__name__}, not a mapping; the file is corrupt")
    if depth(value) > MAX_DOCUMENT_DEPTH:
        raise error(f"{what} nests deeper than {MAX_DOCUMENT_DEPTH} levels; the file is corrupt or not from stmae-edge")
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError) as exc:  # a tensor or another object where JSON's types belong
        raise error(f"{what} holds a value JSON cannot ({first_line(exc, 120)}); the file is corrupt") from None
    return parse_document(text, what, error)


def depth(value) -> int:
    """Nesting depth of a JSON value, without recursion (stops counting past the limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list, tuple)):
            deepest = max(deepest, level)
            if level > MAX_DOCUMENT_DEPTH:
                break
            stack += [(child, level + 1) for child in (node.values() if isinstance(node, dict) else node)]
    return deepest

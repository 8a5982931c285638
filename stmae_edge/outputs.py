"""Output files: checked before long work starts, so a bad --out fails in a second, not after training."""

from __future__ import annotations

from pathlib import Path

from .errors import OutputError


def check_writable(path: Path | str) -> Path:
    """Fail before long work, not after it, when the output cannot be written."""
    path = Path(path)
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

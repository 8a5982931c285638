"""Progress bars for long work (feature extraction, training, evaluation, export, engine builds), on stderr.

A program that calls the library and wants its stderr to itself turns them off for a block:
`with progress_shown(False): train(...)`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .errors import ConfigError, StmaeError

_console = Console(stderr=True)
LOG_EVERY_S = 30.0


_shown: ContextVar[bool] = ContextVar("stmae_edge_progress_shown", default=True)


@contextmanager
def progress_shown(shown: bool) -> Iterator[None]:
    """Progress bars (and their lines on a pipe) shown or not, within the block, in this thread.

    Raises:
        ConfigError: `shown` is not True or False (the string "false" would have turned them on).
    """
    if not isinstance(shown, bool):
        raise ConfigError(f"progress_shown takes True or False, not {shown!r}")
    token = _shown.set(shown)
    try:
        yield
    finally:
        _shown.reset(token)


@contextmanager
def progress_bar(description: str, total: int) -> Iterator:
    """Yields advance(n=1, status="", total=None): `status` shows e.g. the running loss or the step under
    way; `total` replaces the count of steps where the work learns it as it goes (a TensorRT build)."""
    if not _shown.get():
        yield lambda n=1, status="", total=None: None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    # On a pipe (CI logs, nohup) a live bar prints nothing useful: print a plain line instead, every
    # LOG_EVERY_S seconds while the work goes on and once at the end.
    live = _console.is_terminal
    with Progress(*columns, console=_console, disable=not live) as progress:
        task = progress.add_task(description, total=total, status="")
        last_line = [time.monotonic()]

        def line(end: str = "") -> None:
            done = progress.tasks[0]
            print(f"{description}: {int(done.completed)}/{int(done.total or 0)} in {done.elapsed or 0:.1f}s "
                  f"{done.fields['status']}{end}", file=sys.stderr, flush=True)

        def advance(n: int = 1, status: str = "", total: int | None = None) -> None:
            progress.update(task, advance=n, status=status, **({"total": total} if total is not None else {}))
            if not live and time.monotonic() - last_line[0] >= LOG_EVERY_S:
                last_line[0] = time.monotonic()
                line()

        try:
            yield advance
        except BaseException as exc:
            if isinstance(exc, StmaeError) and not progress.tasks[0].completed:
                # refused before any step (a bad option, the wrong file): the error is the one line said,
                # with no empty bar above it
                progress.update(task, visible=False)
            elif not live:  # a log then says how far the work got (a live bar shows it already)
                line(" (stopped)")
            raise
        if not live:
            line()

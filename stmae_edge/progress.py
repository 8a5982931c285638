"""Progress bars for long work (feature extraction, training, evaluation), on stderr."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_console = Console(stderr=True)


@contextmanager
def progress_bar(description: str, total: int) -> Iterator:
    """Yields advance(n=1, **fields); `status` shows e.g. the running loss."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"))
    # On a pipe (CI logs) a live bar would print nothing useful until the end: print one line instead.
    live = _console.is_terminal
    with Progress(*columns, console=_console, disable=not live) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: int = 1, status: str = "") -> None:
            progress.update(task, advance=n, status=status)

        yield advance
        if not live:
            done = progress.tasks[0]
            print(f"{description}: {int(done.completed)}/{total} in {done.elapsed or 0:.1f}s {done.fields['status']}",
                  file=sys.stderr)

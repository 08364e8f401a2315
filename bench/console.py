"""Terminal output: rich progress bars on stderr, result tables on stdout."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

err = Console(stderr=True)
# rich assumes 80 columns when stdout is not a terminal; tables in logs and CI read better wider
out = Console() if sys.stdout.isatty() else Console(width=160)


@contextmanager
def progress(description: str, total: int):
    """A progress bar; yields ``update(n=1, **fields)``. Quiet when BENCH_QUIET is set or stderr isn't a tty."""
    if os.environ.get("BENCH_QUIET") or not sys.stderr.isatty():
        yield lambda n=1, **fields: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(description, total=total, info="")

        def update(n: int = 1, **fields) -> None:
            info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            bar.update(task, advance=n, info=info)

        yield update


def info(message: str) -> None:
    if not os.environ.get("BENCH_QUIET"):
        err.print(message, highlight=False)

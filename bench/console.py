"""Terminal output: rich progress bars on stderr, result tables on stdout."""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

err = Console(stderr=True)
# rich assumes 80 columns when stdout is not a terminal; tables in logs and CI read better wider
out = Console() if sys.stdout.isatty() else Console(width=160)


#: a log line (stderr not a terminal) at least this often, and at every tenth of the total
LOG_EVERY_S = 30.0


def _ignore(n: int = 1, **fields) -> None:
    """The update of a progress that shows nothing."""


@contextmanager
def no_progress(description: str, total: int):
    """A progress that shows nothing: ``TrainContext``'s outside the CLI, tests, library use."""
    yield _ignore


@contextmanager
def progress(description: str, total: int):
    """Progress on stderr; yields ``update(n=1, **fields)``. A rich bar on a terminal; otherwise (CI, nohup,
    a pipe) a line every `LOG_EVERY_S` seconds and at each tenth of ``total``: the task, the step, the rate
    and the ETA. Silent when BENCH_QUIET is set."""
    if os.environ.get("BENCH_QUIET"):
        yield _ignore
        return
    if not sys.stderr.isatty() or os.environ.get("BENCH_PROGRESS") == "lines":  # lines: models side by side
        yield LogProgress(description, total).update
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(description, total=total, info="")

        def update(n: int = 1, **fields) -> None:
            bar.update(task, advance=n, info=_fields(fields))

        yield update


def _fields(fields: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class LogProgress:
    """Progress as plain lines, for logs: ``train jem: 120/1100 (10%) 4.2/s elapsed 29s ETA 3m53s loss=0.71``."""

    def __init__(self, description: str, total: int, every_s: float = LOG_EVERY_S, clock=time.monotonic):
        self.description, self.total, self.every_s, self.clock = description, max(int(total), 0), every_s, clock
        self.done = 0
        self.start = self.last = clock()
        self.next_tenth = 1

    def update(self, n: int = 1, **fields) -> None:
        self.done += n
        now = self.clock()
        tenth = self.total > 0 and self.done * 10 >= self.next_tenth * self.total
        if not tenth and now - self.last < self.every_s:
            return
        if self.total > 0:
            self.next_tenth = self.done * 10 // self.total + 1
        self.last = now
        err.print(self.line(now, fields), highlight=False, soft_wrap=True)

    def line(self, now: float, fields: dict) -> str:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else float("nan")
        head = f"{self.description}: {self.done}/{self.total}" if self.total else f"{self.description}: {self.done}"
        if self.total:
            head += f" ({100 * self.done // self.total}%)"
        eta = (f" ETA {duration((self.total - self.done) / rate)}" if self.total and rate == rate and rate > 0
               and self.done < self.total else "")
        extra = _fields(fields)
        return f"{head} {rate:.3g}/s elapsed {duration(elapsed)}{eta}" + (f" {extra}" if extra else "")


def info(message: str) -> None:
    if not os.environ.get("BENCH_QUIET"):
        err.print(message, highlight=False)

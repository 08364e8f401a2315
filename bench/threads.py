"""How many CPU threads a model's training and evaluation use (``threads=``; recorded in ``env``).

PyTorch's intra-op pool uses every core, and its threads meet at a barrier after each parallel region. On
a CPU that other processes keep busy, a thread that the scheduler has parked holds the others at that
barrier, so the run slows by far more than its fair share: 5x with two busy processes on two cores, where
one thread took 2.3x (docs/performance.md has the measurements).

``threads=auto`` (the default) therefore counts the *other* runnable processes just before each model
starts and gives it the cores they leave free (at least one): all of them on an idle machine, one when
the cores are taken. The count stays fixed for the model, so its record names the one thread count its
numbers were computed with (``env.num_threads``; float sums can differ in the last bits between thread
counts). ``threads=N`` fixes it, e.g. to reproduce a record bit for bit; ``threads=all`` takes every thread
regardless of load (PyTorch's own default). ``OMP_NUM_THREADS`` caps what auto and all may take, and
``$BENCH_THREADS`` sets the default for runs that do not say.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from bench.errors import UserError

SAMPLES = 5  # reads of the run queue, SAMPLE_GAP_S apart: a busy process is runnable in every one
SAMPLE_GAP_S = 0.02


def cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _procs_running() -> int | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("procs_running "):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _own_running() -> int:
    """This process's threads that are runnable now (this one, reading, included)."""
    n = 0
    for stat in Path("/proc/self/task").glob("*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if text[text.rindex(")") + 2:].startswith("R"):
            n += 1
    return max(n, 1)


def other_runnable(samples: int = SAMPLES, gap_s: float = SAMPLE_GAP_S) -> float | None:
    """The median number of runnable threads of other processes (Linux); None where it cannot be read."""
    seen = []
    for i in range(samples):
        total = _procs_running()
        if total is None:
            return None
        seen.append(max(0, total - _own_running()))
        if i + 1 < samples:
            time.sleep(gap_s)
    seen.sort()
    return float(seen[len(seen) // 2])


#: the threads PyTorch was started with: OMP_NUM_THREADS if set, else the cores
_START_THREADS = torch.get_num_threads()


def available() -> int:
    return max(1, min(cores(), _START_THREADS))


def setting(value: str | int | None) -> str | int:
    """``threads=`` as given, else $BENCH_THREADS, else auto."""
    return value if value is not None else os.environ.get("BENCH_THREADS") or "auto"


def positive_count(value: str | int) -> int | None:
    """``value`` as a positive integer written plainly (``2``, ``"2"``; not ``"1.5"``, ``"0"``), else None."""
    try:
        n = int(value)
    except (TypeError, ValueError):
        return None
    return n if n >= 1 and str(n) == str(value).strip() else None


def parse(value: str | int | None) -> int | None:
    """A thread setting: None for auto, else a positive count (``all``: every available thread)."""
    if value is None or value == "auto":
        return None
    if value == "all":
        return available()
    n = positive_count(value)
    if n is None:
        raise UserError(f"threads={value} is not a thread count; use threads=auto, threads=all or a positive "
                        "integer like threads=1")
    return n


def choose(value: str | int | None) -> tuple[int, str]:
    """(threads, why) for the next model."""
    value = setting(value)
    fixed = parse(value)
    if fixed is not None:
        return fixed, f"threads={value}"
    n = available()
    others = other_runnable()
    if others is None:
        return n, f"auto: all {n} cores (the run queue cannot be read here)"
    free = max(1, min(n, n - int(round(others))))
    return free, f"auto: {free} of {n} cores ({others:g} other runnable)"


@contextmanager
def using(device: torch.device, value: str | int | None) -> Iterator[dict]:
    """Run a model on the chosen number of CPU threads; yields what to record in ``env``."""
    if device.type != "cpu":
        yield {}
        return
    n, why = choose(value)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield {"num_threads": n, "thread_policy": why}
    finally:
        torch.set_num_threads(before)

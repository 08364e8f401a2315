"""glibc malloc for bench's runs: freed memory is kept for reuse rather than handed back to the kernel.

torch takes its CPU tensors from malloc. By default glibc serves a large request with a fresh ``mmap`` (above
a threshold that adapts, up to 32 MiB) and trims freed memory at the top of the heap, so the activations of
every SGLD step (8 MiB each for WRN-10-2 on 64 images of 3×32×32) come back from the kernel as new pages, each
page-faulted and zeroed again. With both settings below a freed block is simply reused: the same numbers,
and JEM's SGLD step at one thread went from about 300 to 250 ms on this project's 2-core AMD EPYC
(docs/performance.md). Intel's PyTorch CPU tuning guide gets the same effect by preloading jemalloc or
tcmalloc. The cost: a process keeps its peak heap; a worker that runs one model after another hands it back
between models (`release_free_memory`).

``bench.runner.run`` (every `bench run`, sweep job and torchrun rank) and the model workers apply it.
``BENCH_MALLOC=default`` leaves malloc as it is (``reuse``, or unset, applies it). Elsewhere than glibc
(macOS, musl), or with jemalloc/tcmalloc preloaded, nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import sys

from bench.errors import UserError

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2); larger requests are still mmapped
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: never trim
APPLIED = "glibc: freed memory reused (mmap threshold 32 MiB, no trimming)"

_state: str | None = None
_libc = None


def _glibc():
    """This process's C library if it is glibc with mallopt, else None."""
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols: no ldconfig lookup
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def keep_freed_memory() -> str:
    """Apply the settings once per process; returns what this process's malloc does (the record's env)."""
    global _state, _libc
    if _state is not None:
        return _state
    choice = os.environ.get("BENCH_MALLOC", "")
    preloaded = [lib for lib in ("jemalloc", "tcmalloc", "mimalloc") if lib in os.environ.get("LD_PRELOAD", "")]
    if choice not in ("", "reuse", "default"):
        raise UserError(f"BENCH_MALLOC={choice!r} is not a setting: use 'default' (glibc's own malloc) or 'reuse' "
                        "(freed memory kept for reuse, bench's default)")
    if choice == "default":
        _state = "default (BENCH_MALLOC=default)"
    elif preloaded:
        _state = f"{preloaded[0]} (LD_PRELOAD)"
    elif not sys.platform.startswith("linux") or (libc := _glibc()) is None:
        _state = "default (not glibc)"
    elif all(libc.mallopt(k, v) == 1 for k, v in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                  (M_TRIM_THRESHOLD, TRIM_THRESHOLD))):
        _state, _libc = APPLIED, libc
    else:
        _state = "default (glibc refused mallopt)"
    return _state


def release_free_memory() -> None:
    """Hand the heap's free memory back to the kernel (``malloc_trim``), where the settings kept it: between
    the models a worker process runs, so a worker never holds one model's peak heap through the next."""
    if _libc is not None and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


def malloc_state() -> str:
    """What this process's malloc does, without changing it (the record's ``env.malloc``)."""
    return _state or "default (bench's runner not used)"

"""glibc malloc for bench's processes: freed memory is kept for reuse rather than handed back to the kernel.

torch takes its CPU tensors from malloc. By default glibc serves a large request with a fresh ``mmap`` (above
a threshold that adapts, up to 32 MiB) and trims freed memory at the top of the heap, so the activations of
every SGLD step (8 MiB each for WRN-10-2 on 64 images of 3×32×32) come back from the kernel as new pages, each
page-faulted and zeroed again. With both settings below a freed block is simply reused: the same numbers,
and JEM's SGLD step at one thread went from about 300 to 250 ms on this project's 2-core AMD EPYC
(docs/performance.md). Intel's PyTorch CPU tuning guide gets the same effect by preloading jemalloc or
tcmalloc. The cost: a process keeps its peak heap until it exits (bench's processes exit after a run).

``BENCH_MALLOC=default`` leaves malloc as it is. Elsewhere than glibc (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: glibc's largest mmap threshold on 64-bit (HEAP_MAX_SIZE / 2); larger requests are still mmapped
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: never trim

_state: str | None = None


def keep_freed_memory() -> str:
    """Apply the settings once per process; returns what this process's malloc does (for the record's env)."""
    global _state
    if _state is not None:
        return _state
    if os.environ.get("BENCH_MALLOC", "") == "default":
        _state = "default (BENCH_MALLOC=default)"
    elif not sys.platform.startswith("linux"):
        _state = "default (not glibc)"
    else:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            glibc = hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")
        except OSError:
            glibc = False
        if not glibc:
            _state = "default (not glibc)"
        elif all(libc.mallopt(k, v) == 1 for k, v in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                      (M_TRIM_THRESHOLD, TRIM_THRESHOLD))):
            _state = "glibc: freed memory reused (mmap threshold 32 MiB, no trimming)"
        else:
            _state = "default (glibc refused mallopt)"
    return _state


def malloc_state() -> str:
    """What this process's malloc does, without changing it (the record's ``env.malloc``)."""
    return _state or "default (bench's CLI not used)"

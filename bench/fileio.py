"""Files written atomically (a temporary file, then a rename or link) and the leftovers of writers that died.

A temporary file is named ``<final name>.<host>-<pid>.tmp`` (``host``: a short hash of the host name), so a
later run can tell a dead writer's leftover (kill -9, a lost node) from a live writer's file: it removes a
temporary file when its writer was on this host, is no longer running, and the file has not been touched for
`DEAD_GRACE_S`; or when nobody has touched it for `ABANDONED_S`, whatever the host (a writer holds its
temporary file for seconds). Names from before this scheme (``.tmp<pid>``, ``.<pid>.tmp``) are judged by their
pid as if written on this host.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.errors import UserError

HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
DEAD_GRACE_S = 60.0  # a dead pid could be another pid namespace's live writer (containers): not within a minute
ABANDONED_S = 24 * 3600.0
_OURS = re.compile(r"\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.tmp$")
_LEGACY = re.compile(r"(\.tmp(?P<pid>\d+)|\.(?P<pid2>\d+)\.tmp)$")


def tmp_path(final: Path, hidden: bool = False, pid: int | None = None) -> Path:
    """The temporary file to write ``final`` through (hidden: a leading dot, so record readers skip it)."""
    return final.with_name(f"{'.' if hidden else ''}{final.name}.{HOST}-{os.getpid() if pid is None else pid}.tmp")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's live process, or not a pid we can judge: keep its file
    return True


def is_stale(path: Path, now: float | None = None) -> bool:
    try:
        age = (time.time() if now is None else now) - path.lstat().st_mtime
    except OSError:
        return False
    m = _OURS.search(path.name)
    if m:
        dead_here = m["host"] == HOST and not _running(int(m["pid"]))
    elif (m := _LEGACY.search(path.name)):  # no host in the name: its pid is judged here, as bench used to be local
        dead_here = not _running(int(m["pid"] or m["pid2"]))
    else:
        return False
    return (dead_here and age > DEAD_GRACE_S) or age > ABANDONED_S


def clean_stale(directory: Path, finals: tuple[str, ...]) -> list[Path]:
    """Remove the stale temporary files directly inside ``directory`` whose final name ends with one of
    ``finals`` (e.g. ".json"), so that nothing else a user keeps there is touched; returns what was removed."""
    removed = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _OURS.search(p.name) or _LEGACY.search(p.name)
        if m and p.name[: m.start()].endswith(finals) and p.is_file() and not p.is_symlink() and is_stale(p):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass  # another run cleaned it first, or it is not ours to remove
    return removed


def probe_writable(directory: Path, what: str, fix: str) -> None:
    """Create ``directory`` if needed and prove a file can be created and removed there (``os.access`` says yes
    to root on read-only and virtual file systems such as /sys); else a one-line `UserError`."""
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{what} is not a directory; {fix}")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".bench-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"{what} is not writable ({e.strerror or type(e).__name__}); {fix}") from None


# --- the one atomic write -------------------------------------------------------------------------------
def atomic_write(path: Path, write: Callable[[Path], None], *, hidden: bool = False, exclusive: bool = False) -> None:
    """``write(tmp)`` into this process's temporary file beside ``path`` (see `tmp_path`), fsync it, then put it
    in place: renamed over ``path``, or with ``exclusive`` hard-linked so that an existing file is never
    replaced (FileExistsError). Whatever fails, no temporary file is left behind, and ``path`` is either the
    old file or the whole new one."""
    tmp = tmp_path(path, hidden=hidden)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)
        else:
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def one_at_a_time(path: Path) -> Iterator[None]:
    """Hold an exclusive lock named after ``path`` (``.<name>.lock`` beside it) while the block makes ``path``:
    processes that would make the same file (the model jobs of one run, a sweep's jobs) wait for the first
    and then find it made, instead of all computing it at once. Where the lock cannot be taken (a filesystem
    without ``flock``, a read-only place) the block runs unlocked: the write stays atomic either way."""
    lock = path.with_name(f".{path.name}.lock")
    try:
        import fcntl

        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing releases the lock


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` (whose directory must exist: a mistyped --out creates nothing) all at once.
    A failure (a full disk, a read-only place) leaves neither a partial file nor the temporary one, and is a
    one-line `UserError`."""
    p = Path(path)
    try:
        atomic_write(p, lambda tmp: tmp.write_text(text))
    except OSError as e:
        raise UserError(f"cannot write {p}: {e.strerror or e}") from None
    return p


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_hashed(path: Path, write: Callable[[Path], None]) -> str:
    """`atomic_write`, returning the sha256 of what this call wrote (hashed before it is put in place, so
    never that of a concurrent writer's file at ``path``)."""
    digest: dict[str, str] = {}

    def write_and_hash(tmp: Path) -> None:
        write(tmp)
        digest["sha256"] = sha256_file(tmp)

    atomic_write(path, write_and_hash)
    return digest["sha256"]


def write_with_sidecar(path: Path, write: Callable[[Path], None]) -> str:
    """Atomically write a cache file and then its ``.sha256`` sidecar (which readers check it against); the
    file's sha256. Parallel jobs may write the same file at once: each through its own temporary name."""
    digest = atomic_write_hashed(path, write)
    atomic_write(path.with_suffix(".sha256"), lambda tmp: tmp.write_text(digest + "\n"))
    return digest

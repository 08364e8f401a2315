"""Result records on disk: the protocol fingerprint, provenance, and atomic IO of `Record`s
(bench/results/record.py holds the type and its JSON; docs/record.schema.json the schema).

One JSON file per run, never overwritten: written to a temporary file in the same directory, then
hard-linked to its final name (which fails rather than replace an existing file).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import re
import secrets
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from bench.allocator import malloc_state
from bench.errors import UserError, WriteFailure
from bench.fileio import atomic_write
from bench.numerics import cuda_fp32_modes
from bench.results.record import MalformedRecord, Record


def new_run_id() -> str:
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(protocol: dict[str, Any]) -> str:
    """sha256 over everything in the protocol that changes a number (the fingerprint field excluded)."""
    payload = {k: v for k, v in protocol.items() if k != "fingerprint"}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


@lru_cache(maxsize=4)
def git_info(root: Path | None = None) -> dict[str, Any]:
    """The commit and dirty flag of bench's source checkout (or ``root``), read without writing to it: a plain
    ``git status`` refreshes the index under ``.git/index.lock``; ``--no-optional-locks`` never does."""
    root = root or Path(__file__).resolve().parent.parent
    git = ["git", "--no-optional-locks"]
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, env=env,
                                timeout=10).stdout.strip()
        status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], cwd=root, env=env,
                                capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit or None, "git_dirty": bool(status.strip()) if commit else None}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def package_version(pkg: str) -> str | None:
    """The installed distribution's version, None when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def env_info(device: torch.device) -> dict[str, Any]:
    return {
        **git_info(),
        "bench": package_version("bench"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": package_version("torchvision"),
        "torch_fidelity": package_version("torch-fidelity"),
        "numpy": package_version("numpy"),
        "scikit_learn": package_version("scikit-learn"),
        "device": device.type,
        "device_name": device_name(device),
        "num_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "malloc": malloc_state(),
        **({"cuda_fp32": cuda_fp32_modes()} if device.type == "cuda" else {}),
    }


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:60] or "x"  # no "..", no hidden name


def record_filename(record: Record) -> str:
    parts = (slug(record.suite), slug(record.model), slug(record.data))
    return f"{'_'.join(parts)}_s{record.seed}_{slug(record.run_id)}.json"


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def write_record(record: Record, out_dir: Path) -> Path:
    """Atomically write ``record`` into ``out_dir``; never replaces an existing file.

    A write that fails (a full disk, a lost mount) leaves nothing behind, neither the record nor its hidden
    temporary file, and raises `WriteFailure` naming the model and the reason."""
    final = out_dir / record_filename(record)
    text = json.dumps(record.to_json(), indent=2, sort_keys=False, allow_nan=False) + "\n"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(final, lambda tmp: _write_text(tmp, text), hidden=True, exclusive=True)
    except FileExistsError:
        raise  # the same record twice: a caller's bug, never an overwrite
    except OSError as e:
        raise WriteFailure(f"cannot write the record of model '{record.model}' into {out_dir}: "
                           f"{e.strerror or e}; free space or choose another out=DIR and re-run that model") from None
    return final


#: a record file larger than this is not a record (they are a few kB; a huge file is a mistake or an attack)
MAX_RECORD_BYTES = 32 << 20


def record_files(root: Path) -> list[Path]:
    """The record files under the directory ``root``, recursively: every regular ``*.json`` file except
    hidden ones and those inside hidden directories (``.multirun/`` holds a sweep's Hydra and launcher
    outputs). A FIFO, socket or device named ``*.json`` is not a record (reading a FIFO would hang)."""
    return sorted(f for f in root.rglob("*.json")
                  if not any(p.startswith(".") for p in f.relative_to(root).parts) and f.is_file())


def load_records(path: str | Path, side: str = "results", *, required: bool = True) -> list[Record]:
    """Every record under ``path`` (a directory, searched recursively, or one record file), each knowing its
    file (`Record.path`). A missing, unreadable or empty place is a `UserError` when ``required``, else [];
    a malformed record always is one, naming the file and what is wrong."""
    root = Path(path)
    if not root.exists():
        if not required:
            return []
        raise UserError(f"{side} {root} does not exist; run 'bench run out={root}' first or give the right path")
    if root.is_dir():
        if not os.access(root, os.R_OK | os.X_OK):
            raise UserError(f"cannot read {side} directory {root} (permission denied); fix its permissions")
        try:
            files = record_files(root)
        except OSError as e:
            raise UserError(f"cannot read {side} directory {root} ({e.strerror or e})") from None
    elif root.is_file():
        files = [root]
    else:
        raise UserError(f"{side} {root} is not a regular file or a directory; give a record file or a directory")
    if not files:
        if not required:
            return []
        raise UserError(f"no records (*.json) under {side} {root}; run 'bench run out={root}' first")
    return [read_record(f) for f in files]


def read_record(path: Path) -> Record:
    """The record in the file ``path`` (of any readable schema version), remembering the file; a file that
    is not one is a `UserError` naming it."""
    try:
        if Path(path).stat().st_size > MAX_RECORD_BYTES:
            raise UserError(f"{path} is {Path(path).stat().st_size >> 20} MiB, too large to be a record; "
                            "move it out of the results directory")
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read record {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"record {path} is not valid JSON (line {e.lineno}: {e.msg}); "
                        "delete or regenerate it") from None
    except RecursionError:
        raise UserError(f"record {path} is nested too deeply to be a record; delete or regenerate it") from None
    try:
        return Record.from_json(obj, path=Path(path))
    except MalformedRecord as e:
        raise UserError(f"record {path}: {e}; delete or regenerate it") from None


def latest_per_run(records: list[Record]) -> tuple[list[Record], int]:
    """One record per (suite, model, data, scale, seed): the latest by finish time (then run id); and how
    many older re-runs were left out. For ``--latest``: re-running a model adds a record, never replaces one."""
    best: dict[tuple, Record] = {}
    for r in records:
        key = (r.suite, r.model, r.data, r.scale, r.seed)
        if key not in best or (r.finished_at or "", r.run_id) > (best[key].finished_at or "", best[key].run_id):
            best[key] = r
    kept = sorted(best.values(), key=lambda r: str(r.path) if r.path is not None else r.run_id)
    return kept, len(records) - len(kept)

"""Result records: the schema (DESIGN.md), the protocol fingerprint, provenance, and atomic IO.

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

from bench.errors import UserError, WriteFailure
from bench.fileio import tmp_path

SCHEMA_VERSION = 1


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


def env_info(device: torch.device) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str | None:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    return {
        **git_info(),
        "bench": ver("bench"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": ver("torchvision"),
        "torch_fidelity": ver("torch-fidelity"),
        "numpy": ver("numpy"),
        "scikit_learn": ver("scikit-learn"),
        "device": device.type,
        "device_name": device_name(device),
        "num_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:60] or "x"


def record_filename(record: dict[str, Any]) -> str:
    return f"{record['suite']}_{slug(record['model'])}_{slug(record['data'])}_s{record['seed']}_{record['run_id']}.json"


def write_record(record: dict[str, Any], out_dir: Path) -> Path:
    """Atomically write ``record`` into ``out_dir``; never replaces an existing file.

    A write that fails (a full disk, a lost mount) leaves nothing behind, neither the record nor its hidden
    temporary file, and raises `WriteFailure` naming the model and the reason."""
    final = out_dir / record_filename(record)
    text = json.dumps(record, indent=2, sort_keys=False, allow_nan=False) + "\n"
    tmp = tmp_path(final, hidden=True)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
    except FileExistsError:
        raise  # the same record twice: a caller's bug, never an overwrite
    except OSError as e:
        raise WriteFailure(f"cannot write the record of model '{record.get('model')}' into {out_dir}: "
                           f"{e.strerror or e}; free space or choose another out=DIR and re-run that model") from None
    return final


def record_files(root: Path) -> list[Path]:
    """The record files under the directory ``root``, recursively: every ``*.json`` except hidden ones and
    those inside hidden directories (``.multirun/`` holds a sweep's Hydra and launcher outputs)."""
    return sorted(f for f in root.rglob("*.json") if not any(p.startswith(".") for p in f.relative_to(root).parts))


def read_records(files: list[Path]) -> list[dict[str, Any]]:
    """`read_record` of each file, remembering where each came from under ``_path``."""
    return [{**read_record(f), "_path": str(f)} for f in files]


def read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read record {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"record {path} is not valid JSON (line {e.lineno}: {e.msg}); "
                        "delete or regenerate it") from None
    if not isinstance(record, dict) or record.get("schema_version") != SCHEMA_VERSION:
        got = record.get("schema_version") if isinstance(record, dict) else None
        raise UserError(f"record {path} has schema_version {got!r}; this bench reads version {SCHEMA_VERSION}")
    return record

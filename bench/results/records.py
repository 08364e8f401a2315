"""Result records: the schema (docs/record.schema.json), the protocol fingerprint, provenance, and atomic IO.

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
from bench.fileio import atomic_write

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
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")[:60] or "x"  # no "..", no hidden name


def record_filename(record: dict[str, Any]) -> str:
    parts = (slug(str(record["suite"])), slug(str(record["model"])), slug(str(record["data"])))
    return f"{'_'.join(parts)}_s{record['seed']}_{slug(str(record['run_id']))}.json"


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def write_record(record: dict[str, Any], out_dir: Path) -> Path:
    """Atomically write ``record`` into ``out_dir``; never replaces an existing file.

    A write that fails (a full disk, a lost mount) leaves nothing behind, neither the record nor its hidden
    temporary file, and raises `WriteFailure` naming the model and the reason."""
    final = out_dir / record_filename(record)
    text = json.dumps(record, indent=2, sort_keys=False, allow_nan=False) + "\n"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(final, lambda tmp: _write_text(tmp, text), hidden=True, exclusive=True)
    except FileExistsError:
        raise  # the same record twice: a caller's bug, never an overwrite
    except OSError as e:
        raise WriteFailure(f"cannot write the record of model '{record.get('model')}' into {out_dir}: "
                           f"{e.strerror or e}; free space or choose another out=DIR and re-run that model") from None
    return final


#: a record file larger than this is not a record (they are a few kB; a huge file is a mistake or an attack)
MAX_RECORD_BYTES = 32 << 20
#: |int| beyond this cannot be a metric value or a seed as float64 and JSON readers elsewhere hold them
MAX_SAFE_INT = 2**53


def record_files(root: Path) -> list[Path]:
    """The record files under the directory ``root``, recursively: every regular ``*.json`` file except
    hidden ones and those inside hidden directories (``.multirun/`` holds a sweep's Hydra and launcher
    outputs). A FIFO, socket or device named ``*.json`` is not a record (reading a FIFO would hang)."""
    return sorted(f for f in root.rglob("*.json")
                  if not any(p.startswith(".") for p in f.relative_to(root).parts) and f.is_file())


def load_records(path: str | Path, side: str = "results", *, required: bool = True) -> list[dict[str, Any]]:
    """Every record under ``path`` (a directory, searched recursively, or one record file), each with its
    file in ``_path``. A missing, unreadable or empty place is a `UserError` when ``required``, else [];
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
    return read_records(files)


def read_records(files: list[Path]) -> list[dict[str, Any]]:
    """`read_record` of each file, remembering where each came from under ``_path``."""
    return [{**read_record(f), "_path": str(f)} for f in files]


def read_record(path: Path) -> dict[str, Any]:
    try:
        if Path(path).stat().st_size > MAX_RECORD_BYTES:
            raise UserError(f"{path} is {Path(path).stat().st_size >> 20} MiB, too large to be a record; "
                            "move it out of the results directory")
        record = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read record {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"record {path} is not valid JSON (line {e.lineno}: {e.msg}); "
                        "delete or regenerate it") from None
    except RecursionError:
        raise UserError(f"record {path} is nested too deeply to be a record; delete or regenerate it") from None
    if not isinstance(record, dict) or record.get("schema_version") != SCHEMA_VERSION:
        got = record.get("schema_version") if isinstance(record, dict) else None
        raise UserError(f"record {path} has schema_version {got!r}; this bench reads version {SCHEMA_VERSION}")
    problem = record_problem(record)
    if problem:
        raise UserError(f"record {path} is malformed: {problem}; delete or regenerate it")
    return record


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and (isinstance(v, float) or abs(v) <= MAX_SAFE_INT)


def record_problem(r: dict[str, Any]) -> str | None:
    """What makes ``r`` not a well-formed record (the fields the tables, report and gate read), or None.
    Non-finite metric values pass here: the gate counts them as regressions and the tables mark them."""
    for key in ("run_id", "suite", "model", "data", "scale", "status"):
        if not isinstance(r.get(key), str) or not r[key]:
            return f"'{key}' must be a non-empty string, got {json.dumps(r.get(key))[:40]}"
    if r["status"] not in ("ok", "failed"):
        return f"'status' must be ok or failed, got {r['status']!r}"
    seed = r.get("seed")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63):
        return f"'seed' must be an integer in [0, 2^63), got {json.dumps(seed)[:40]}"
    for key in ("protocol", "metrics"):
        if not isinstance(r.get(key), dict):
            return f"'{key}' must be an object, got {json.dumps(r.get(key))[:40]}"
    if not isinstance(r["protocol"].get("fingerprint"), str):
        return "'protocol.fingerprint' is missing"
    for key in ("env", "skipped", "model_config", "draws"):
        if key in r and r[key] is not None and not isinstance(r[key], dict):
            return f"'{key}' must be an object"
    if r["status"] == "failed" and not isinstance(r.get("reason"), str):
        return "a failed record needs its 'reason' (a string)"
    for name, m in r["metrics"].items():
        if not isinstance(m, dict) or not _is_number(m.get("value")):
            got = m.get("value") if isinstance(m, dict) else m
            return f"metric '{name}' must have a numeric 'value', got {json.dumps(got)[:40]}"
        if not isinstance(m.get("higher_is_better"), bool):
            return f"metric '{name}' lacks its direction ('higher_is_better')"
        for stat in ("stderr", "std"):
            if m.get(stat) is not None and not _is_number(m[stat]):
                return f"metric '{name}' has a non-numeric '{stat}'"
    return None


def latest_per_run(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """One record per (suite, model, data, scale, seed): the latest by finish time (then run id); and how
    many older re-runs were left out. For ``--latest``: re-running a model adds a record, never replaces one."""
    best: dict[tuple, dict[str, Any]] = {}
    for r in records:
        key = (r["suite"], r["model"], r["data"], r["scale"], r["seed"])
        order = (str(r.get("finished_at") or ""), r["run_id"])
        if key not in best or order > (str(best[key].get("finished_at") or ""), best[key]["run_id"]):
            best[key] = r
    kept = sorted(best.values(), key=lambda r: r["_path"] if "_path" in r else r["run_id"])
    return kept, len(records) - len(kept)

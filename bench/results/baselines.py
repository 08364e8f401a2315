"""Approved baseline records for the gate: ``baselines/<suite>/<data>/<model>_<scale>_s<seed>.json``.

The file name is stable, so an update is a change git tracks (the previous record stays in history).
Replacing a baseline whose protocol fingerprint differs needs ``--force``: a new protocol is a new
baseline, never a silent overwrite.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench.errors import UserError
from bench.fileio import atomic_write_text
from bench.results.gate import group
from bench.results.record import Record
from bench.results.records import latest_per_run, load_records, slug


def baseline_path(root: Path, r: Record) -> Path:
    """Where a record is approved: every part slugged, so no field of a record can leave ``root``."""
    target = root / slug(r.suite) / slug(r.data) / f"{slug(r.model)}_{slug(r.scale)}_s{r.seed}.json"
    if not target.resolve().is_relative_to(root.resolve()):  # belt and braces: slug() already forbids / and ..
        raise UserError(f"{r.label} would be approved outside {root}; it is not a bench record")
    return target


def _approvable(r: Record) -> None:
    bad = [m for m, v in r.metrics.items() if not math.isfinite(v.value)]
    if bad:
        raise UserError(f"{r.label}: metric '{bad[0]}' is {r.metrics[bad[0]].value}; a non-finite value "
                        "cannot be approved as a baseline; fix the model and re-run it")


def update_baselines(results: str, dest: str = "baselines", force: bool = False, latest: bool = False) -> list[str]:
    """Approve the successful records under ``results`` into ``dest``; they are written in the current schema
    version (an approved version-1 record becomes version 2, with the same protocol and fingerprint)."""
    records = [r for r in load_records(results, "results") if r.ok]
    if latest:
        records, _ = latest_per_run(records)
    if not records:
        raise UserError(f"no successful records under {results}; nothing to approve")
    group(records, "results")  # refuses two runs of the same key and seed
    root = Path(dest)
    plans = []
    for r in records:
        _approvable(r)
        target = baseline_path(root, r)
        action = "added"
        if target.exists():
            old = load_records(target, "baseline")[0]
            if old.fingerprint != r.fingerprint and not force:
                raise UserError(f"{target} was measured under another protocol; pass --force to replace it "
                                "(the old record stays in git history)")
            action = "updated"
        plans.append((r, target, action))
    lines = []
    for r, target, action in plans:
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, json.dumps(r.to_json(), indent=2, allow_nan=False) + "\n")
        lines.append(f"{action}: {target}")
    return lines

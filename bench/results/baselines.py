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
from bench.results.records import latest_per_run, load_records, slug


def baseline_path(root: Path, r: dict) -> Path:
    """Where a record is approved: every part slugged, so no field of a record can leave ``root``."""
    target = root / slug(r["suite"]) / slug(r["data"]) / f"{slug(r['model'])}_{slug(r['scale'])}_s{int(r['seed'])}.json"
    if not target.resolve().is_relative_to(root.resolve()):  # belt and braces: slug() already forbids / and ..
        raise UserError(f"record {r.get('_path')} would be approved outside {root}; it is not a bench record")
    return target


def _approvable(r: dict) -> None:
    bad = [m for m, v in r["metrics"].items() if not math.isfinite(v["value"])]
    if bad:
        raise UserError(f"{r['_path']}: metric '{bad[0]}' is {r['metrics'][bad[0]]['value']}; a non-finite value "
                        "cannot be approved as a baseline; fix the model and re-run it")


def update_baselines(results: str, dest: str = "baselines", force: bool = False, latest: bool = False) -> list[str]:
    records = [r for r in load_records(results, "results") if r["status"] == "ok"]
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
            if old["protocol"]["fingerprint"] != r["protocol"]["fingerprint"] and not force:
                raise UserError(f"{target} was measured under another protocol; pass --force to replace it "
                                "(the old record stays in git history)")
            action = "updated"
        plans.append((r, target, action))
    lines = []
    for r, target, action in plans:
        clean = {k: v for k, v in r.items() if not k.startswith("_")}
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(target, json.dumps(clean, indent=2, allow_nan=False) + "\n")
        lines.append(f"{action}: {target}")
    return lines

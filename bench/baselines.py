"""Approved baseline records for the gate: ``baselines/<suite>/<data>/<model>_<scale>_s<seed>.json``.

The file name is stable, so an update is a change git tracks (the previous record stays in history).
Replacing a baseline whose protocol fingerprint differs needs ``--force``: a new protocol is a new
baseline, never a silent overwrite.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from bench.errors import UserError
from bench.gate import group, load_records
from bench.records import slug


def baseline_path(root: Path, r: dict) -> Path:
    return root / r["suite"] / slug(r["data"]) / f"{slug(r['model'])}_{r['scale']}_s{r['seed']}.json"


def update_baselines(results: str, dest: str = "baselines", force: bool = False) -> list[str]:
    records = [r for r in load_records(results, "results") if r["status"] == "ok"]
    if not records:
        raise UserError(f"no successful records under {results}; nothing to approve")
    group(records, "results")  # refuses two runs of the same key and seed
    root = Path(dest)
    plans = []
    for r in records:
        target = baseline_path(root, r)
        action = "added"
        if target.exists():
            old = json.loads(target.read_text())
            if old.get("protocol", {}).get("fingerprint") != r["protocol"]["fingerprint"] and not force:
                raise UserError(f"{target} was measured under another protocol; pass --force to replace it "
                                "(the old record stays in git history)")
            action = "updated"
        plans.append((r, target, action))
    lines = []
    for r, target, action in plans:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean = {k: v for k, v in r.items() if not k.startswith("_")}
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(clean, indent=2) + "\n")
        tmp.replace(target)
        lines.append(f"{action}: {target}")
    return lines

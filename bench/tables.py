"""Tables built from records: one pandas DataFrame, rendered by rich in the terminal."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from rich.table import Table

from bench.console import out
from bench.errors import UserError
from bench.metrics import METRICS
from bench.records import read_record


def format_value(m: dict | None) -> str:
    if m is None:
        return "N/A"
    v = m["value"]
    s = f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"
    spread = m.get("stderr") if m.get("stderr") is not None else m.get("std")
    if spread is not None:
        s += f" ± {spread:.2f}" if abs(spread) >= 0.01 or spread == 0 else f" ± {spread:.1e}"
    return s


def records_frame(records: list[dict]) -> pd.DataFrame:
    """One row per record; metric cells are formatted strings, N/A with its reason in `notes`."""
    keys: list[str] = []
    for r in records:
        for k in list(r.get("metrics", {})) + list(r.get("skipped", {})):
            if k not in keys:
                keys.append(k)
    rows = []
    for r in records:
        row = {"suite": r["suite"], "model": r["model"], "data": r["data"], "scale": r["scale"], "seed": r["seed"],
               "status": r["status"]}
        for k in keys:
            row[k] = format_value(r["metrics"].get(k)) if r["status"] == "ok" else "failed"
        notes = [f"{k}: {why}" for k, why in r.get("skipped", {}).items()]
        if r["status"] == "failed":
            notes = [r.get("reason", "")]
        row["train s"] = (r.get("train") or {}).get("seconds")
        row["notes"] = "; ".join(notes)
        rows.append(row)
    return pd.DataFrame(rows, columns=["suite", "model", "data", "scale", "seed", "status", *keys, "train s", "notes"])


def _header(key: str) -> str:
    if key in METRICS:
        m = METRICS.get(key)
        return f"{m.title} {m.arrow}" + (f" ({m.unit})" if m.unit else "")
    return key


def render(df: pd.DataFrame, title: str) -> Table:
    table = Table(title=title)
    for col in df.columns:
        table.add_column(_header(col), overflow="fold")
    for _, row in df.iterrows():
        table.add_row(*["" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v) for v in row])
    return table


def print_run_table(records: list[dict]) -> None:
    if not records:
        return
    r0 = records[0]
    df = records_frame(records).drop(columns=["suite", "data", "scale", "seed"])
    title = f"{r0['suite']} · data={r0['data']} · scale={r0['scale']} · seed={r0['seed']}"
    ext = next((r["protocol"]["feature_extractor"]["name"] for r in records
                if "feature_extractor" in (r.get("protocol") or {})), None)
    if ext:
        title += f" · extractor={ext}"
    print_with_notes(df, title)


def print_with_notes(df: pd.DataFrame, title: str) -> None:
    """The table, then its notes (N/A reasons, failures) as numbered lines so the table stays narrow."""
    notes = []
    marks = []
    for text in df["notes"]:
        if text:
            notes.append(text)
            marks.append(f"[{len(notes)}]")
        else:
            marks.append("")
    df = df.drop(columns=["notes"]).assign(notes=marks)
    out.print(render(df, title))
    for i, text in enumerate(notes, 1):
        out.print(f"  [{i}] {text}", highlight=False, markup=False)


def print_results_dir(path: str) -> None:
    root = Path(path)
    if not root.exists():
        raise UserError(f"results directory {root} does not exist; run 'bench run' first or give the right path")
    files = sorted(root.rglob("*.json")) if root.is_dir() else [root]
    if not files:
        raise UserError(f"no records (*.json) under {root}; run 'bench run out={root}' first")
    records = [read_record(f) for f in files]
    df = records_frame(records)
    for (suite, data), group in df.groupby(["suite", "data"], sort=True):
        print_with_notes(group.drop(columns=["suite", "data"]), f"{suite} · data={data}")

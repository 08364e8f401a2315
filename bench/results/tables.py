"""Tables built from records: one pandas DataFrame per table, rendered by rich in the terminal, or as
Markdown, LaTeX (booktabs), CSV or HTML (`render_views`).

A `TableView` holds the display strings (the last column, ``notes``, has each row's note in full), the
cells to set in bold (the best per column, in the metric's direction) and the lines that go above and
below. Every format is rendered from that one DataFrame: rich, Markdown, LaTeX and HTML turn the notes
column into marks [1], [2]... with numbered notes under the table; CSV keeps the notes in their column.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from bench.console import out
from bench.errors import UserError
from bench.features import describe_extractor
from bench.metrics import METRICS
from bench.results.record import MetricEntry, Record


def format_value(m: MetricEntry | None) -> str:
    if m is None:
        return "N/A"
    v = m.value
    s = f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"
    spread = m.spread
    if spread is not None:
        s += f" ± {spread:.2f}" if abs(spread) >= 0.01 or spread == 0 else f" ± {spread:.1e}"
    # a bound (the VAE's IWAE-k bits/dim: the true value is at most this) or an estimate (the RBM's AIS
    # log Z) is never shown as if it were exact
    if m.extra.get("bound"):
        s = "≤ " + s
    elif m.extra.get("estimate"):
        s = "≈ " + s
    # an attack whose convergence audit did not level off (robust_refined): the number may still fall
    if m.extra.get("levelled_off") is False:
        s += " (not converged)"
    # AutoAttack beside PGD on the very same images (the suite's own PGD figure may cover more images)
    if isinstance(m.extra.get("pgd_same_images"), int | float):
        s += f" (PGD same images {m.extra['pgd_same_images']:.2f})"
    return s


def records_frame(records: list[Record], *, note_items: bool = False) -> pd.DataFrame:
    """One row per record; metric cells are formatted strings, N/A with its reason in `notes` (one string,
    or with ``note_items`` the list of "key: reason" items, which the terminal numbers once each)."""
    keys: list[str] = []
    for r in records:
        for k in list(r.metrics) + list(r.skipped):
            if k not in keys:
                keys.append(k)
    rows = []
    for r in records:
        smoke = r.smoke
        scale = f"{r.scale} (smoke: {smoke['steps']} steps)" if smoke else r.scale
        row = {"suite": r.suite, "model": r.model, "data": r.data, "scale": scale, "seed": r.seed,
               "status": r.status}
        for k in keys:
            row[k] = format_value(r.metrics.get(k)) if r.ok else "failed"
        notes = [f"{k}: {why}" for k, why in r.skipped.items()]
        if not r.ok:
            notes = [r.reason or ""]
        row["train s"] = (r.train or {}).get("seconds")
        # a smoke's note stands apart (its own footnote), after the N/A reasons
        extra = [smoke_note(smoke)] if smoke else []
        row["notes"] = notes + extra if note_items else NOTE_SEP.join(x for x in ["; ".join(notes), *extra] if x)
        rows.append(row)
    return pd.DataFrame(rows, columns=["suite", "model", "data", "scale", "seed", "status", *keys, "train s", "notes"])


def smoke_note(smoke: dict) -> str:
    """What a smoke record is, for its row's note: never a reproduction."""
    cuts = [f"{k} {v['smoke']} (paper: {v['paper']})" for k, v in smoke.get("shrunk", {}).items()]
    d = smoke.get("data", {})
    cuts.append(f"{d.get('n_train')} train / {d.get('n_test')} test images")
    if smoke.get("n_samples") is not None:
        cuts.append(f"{smoke['n_samples']} samples")
    return (f"smoke: the paper recipe for {smoke['steps']} training step(s), with {', '.join(cuts)}; "
            "a check that it runs, never a reproduction")


def expanded_prefixes(keys: list[str]) -> list[str]:
    """Keys that only name a skipped prefix (ood.max_softmax) which other records expand
    (ood.max_softmax.uniform.auroc): they need no column of their own; the notes give the reason."""
    return [k for k in keys if any(o.startswith(k + ".") for o in keys)]


@dataclass
class TerminalTables:
    """What a run prints: the main table (a row per record), one small table per group of a wide metric's
    headline values (OOD: a row per model, a column per set, per score), and lines on what was left out."""

    main: pd.DataFrame
    groups: list[tuple[str, pd.DataFrame]]
    lines: list[str]


def terminal_tables(records: list[Record]) -> TerminalTables:
    """`records_frame` for a terminal. Past WIDE metric columns (OOD: score × set × statistic), a metric
    with a ``headline`` leaves the main table and is laid out as its paper does: for each group (OOD score,
    robustness norm) a row per model and a column per set or eps, of the headline statistic only."""
    df = records_frame(records, note_items=True)
    fixed = ("suite", "model", "data", "scale", "seed", "status", "train s", "notes")
    keys = [c for c in df.columns if c not in fixed]
    valued = [k for k in keys if any(k in r.metrics for r in records)]
    covered = [k for k in expanded_prefixes(keys) if k not in valued]
    if len(keys) - len(covered) <= WIDE:
        return TerminalTables(df.drop(columns=covered), [], [])
    cells: dict[tuple[str, str, str], dict[str, None]] = {}  # (metric, group, statistic) -> columns
    for k in valued:
        parts = k.split(".")
        m = METRICS.get(parts[0]) if parts[0] in METRICS else None
        if m is not None and len(parts) >= 4 and parts[-1] in m.headline:
            # <metric>.<group>.<column: may hold dots, an eps or a file name>.<statistic>
            cells.setdefault((m.key, parts[1], parts[-1]), {})[".".join(parts[2:-1])] = None
    if not cells:
        return TerminalTables(df.drop(columns=covered), [], [])
    wide = {m for m, _, _ in cells}
    groups = []
    for (mkey, group, stat), columns in cells.items():
        m = METRICS.get(mkey)
        rows = []
        for r in records:
            if not r.ok or not any(f"{mkey}.{group}.{c}.{stat}" in r.metrics for c in columns):
                continue
            rows.append({"model": r.model, "seed": r.seed,
                         **{c: format_value(r.metrics.get(f"{mkey}.{group}.{c}.{stat}")) for c in columns}})
        unit = f" ({m.unit})" if m.unit else ""
        title = f"{m.title} {m.arrow} · {group} · {stat}{unit} by {m.headline_axis or 'column'}"
        groups.append((title, pd.DataFrame(rows, columns=["model", "seed", *columns])))
    headline_keys = {f"{m}.{g}.{c}.{s}" for (m, g, s), cols in cells.items() for c in cols}
    hidden = sorted({k.rsplit(".", 1)[-1] for k in valued if k.split(".", 1)[0] in wide and k not in headline_keys})
    lines = [f"the records also hold {', '.join(hidden)} of each; bench table OUT shows every value"] if hidden else []
    main = df.drop(columns=[k for k in keys if k in covered or k.split(".", 1)[0] in wide])
    return TerminalTables(main, groups, lines)


def _header(key: str) -> str:
    if key in METRICS:
        m = METRICS.get(key)
        return f"{m.title} {m.arrow}" + (f" ({m.unit})" if m.unit else "")
    return key


def _column_label(key: str) -> str:
    """A terminal column's label: a metric's title, or for one of its keyed values (throughput.bs64.
    samples_per_s) the title and the rest of the key in words."""
    head, _, rest = key.partition(".")
    if key not in METRICS and rest and head in METRICS:
        return f"{METRICS.get(head).title} {rest.replace('.', ' ')}"
    return _header(key)


def render(df: pd.DataFrame, title: str) -> Table:
    table = Table(title=title)
    for col in df.columns:
        table.add_column(_column_label(col), overflow="fold")
    for _, row in df.iterrows():
        table.add_row(*["" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v) for v in row])
    return table


def print_run_table(records: list[Record]) -> None:
    if not records:
        return
    r0 = records[0]
    title = f"{r0.suite} · data={r0.data} · scale={r0.scale} · seed={r0.seed}"
    ext = next((r.protocol["feature_extractor"] for r in records if "feature_extractor" in r.protocol), None)
    if ext:
        title += f" · extractor={describe_extractor(ext)}"
    print_terminal_tables(terminal_tables(records), title, drop=("suite", "data", "scale", "seed"))


def print_terminal_tables(t: TerminalTables, title: str, drop: tuple[str, ...]) -> None:
    print_with_notes(t.main.drop(columns=list(drop)), title)
    one_seed = "seed" in drop
    for sub, df in t.groups:
        out.print(render(df.drop(columns=["seed"]) if one_seed else df, sub))
    for line in t.lines:
        out.print(f"  {line}", highlight=False, markup=False)


def print_with_notes(df: pd.DataFrame, title: str) -> None:
    """The table, then its notes (N/A reasons, failures) as numbered lines so the table stays narrow; a
    reason shared by several rows (a real OOD set that is absent, say) is numbered once."""
    numbers: dict[str, int] = {}  # note text -> its number, in order of first appearance
    marks = []
    for cell in df["notes"]:
        items = cell if isinstance(cell, list) else ([cell] if cell else [])
        ids = [numbers.setdefault(item, len(numbers) + 1) for item in items]
        marks.append(f"[{','.join(map(str, ids))}]" if ids else "")
    notes = list(numbers)
    df = df.drop(columns=["notes"]).assign(notes=marks)
    out.print(render(df, title))
    for i, text in enumerate(notes, 1):
        out.print(f"  [{i}] {text}", highlight=False, markup=False)


# --- one table, many formats --------------------------------------------------------------------
FORMATS = ("rich", "markdown", "latex", "csv", "html")
NOTES = "notes"
#: separates a row's notes in its ``notes`` cell: each becomes its own numbered footnote
NOTE_SEP = "\n"


@dataclass
class TableView:
    """A table as display strings; ``frame``'s last column is ``notes`` (a row's note in full, or "")."""

    title: str
    frame: pd.DataFrame
    #: cells set in bold (LaTeX, HTML, rich): the best value of each column; same shape as ``frame``
    best: pd.DataFrame | None = None
    #: lines above the table (citation, declared protocol) and below it (legend), before the row notes
    preamble: list[str] = field(default_factory=list)
    legend: list[str] = field(default_factory=list)
    #: leading columns for CSV when several tables share one file, e.g. {"suite": "hybrid", "data": "digits"}
    keys: dict[str, str] = field(default_factory=dict)

    def footnoted(self) -> tuple[pd.DataFrame, list[str]]:
        """The frame with each row's notes (`NOTE_SEP` between them) replaced by their marks [1], [2,3]...,
        and the notes in that order (a note that several rows share is numbered once)."""
        col = _notes_column(self.frame)
        notes: list[str] = []
        marks = []
        for text in self.frame[col]:
            items = [t for t in (text or "").split(NOTE_SEP) if t]
            notes += [t for t in dict.fromkeys(items) if t not in notes]
            marks.append(f"[{','.join(str(notes.index(t) + 1) for t in items)}]" if items else "")
        df = self.frame.copy()
        df[col] = marks
        return df, notes

    def best_mask(self) -> np.ndarray:
        return np.zeros(self.frame.shape, bool) if self.best is None else self.best.to_numpy(bool)

    def has_index(self) -> bool:
        return not isinstance(self.frame.index, pd.RangeIndex)


def _notes_column(df: pd.DataFrame):
    return next(c for c in df.columns if (c[0] if isinstance(c, tuple) else c) == NOTES)


def flat(df: pd.DataFrame, sep: str = " ") -> pd.DataFrame:
    """Index levels become ordinary columns and multi-level headers are joined with ``sep``."""
    out = df.reset_index() if not isinstance(df.index, pd.RangeIndex) else df.reset_index(drop=True)
    if isinstance(out.columns, pd.MultiIndex):
        out.columns = [sep.join(str(p) for p in c if str(p)) for c in out.columns]
    return out


def _flat_mask(view: TableView) -> np.ndarray:
    mask = view.best_mask()
    if view.has_index():  # the index levels come first and are never bold
        mask = np.hstack([np.zeros((len(mask), view.frame.index.nlevels), bool), mask])
    return mask


TRIPLE = ("published", "reproduced", "Δ")


def _rich_columns(view: TableView) -> tuple[list[str], list[list[Text]], list[str]]:
    """Headers and cells for the terminal. A (metric, published/reproduced/Δ) triple shares one column,
    "published → reproduced (Δ ...)", so that a published table fits a terminal's width."""
    df, notes = view.footnoted()
    mask = _flat_mask(view)
    flat_df = flat(df, sep="\n")
    n_index = view.frame.index.nlevels if view.has_index() else 0
    keys = [None] * n_index + list(df.columns)
    headers, spans = [], []  # spans: the flat column positions that make one terminal column
    j = 0
    while j < len(keys):
        k = keys[j]
        if isinstance(k, tuple) and k[1:] == (TRIPLE[0],) and tuple(c[1] if isinstance(c, tuple) else None
                                                                    for c in keys[j:j + 3]) == TRIPLE:
            headers.append(f"{k[0]}\npublished →\nreproduced (Δ)")
            spans.append([j, j + 1, j + 2])
            j += 3
        else:
            headers.append(str(flat_df.columns[j]))
            spans.append([j])
            j += 1
    rows = []
    for i in range(len(flat_df)):
        row = []
        for span in spans:
            vals = [_cell(flat_df.iat[i, c]) for c in span]
            styles = ["bold" if mask[i, c] else "" for c in span]
            if len(span) == 1:
                row.append(Text(vals[0], style=styles[0]))
            elif vals[1] in ("—", "N/A"):
                row.append(Text.assemble((vals[0], styles[0]), f" → {vals[1]}"))
            else:
                row.append(Text.assemble((vals[0], styles[0]), " → ", (vals[1], styles[1]), f" (Δ {vals[2]})"))
        rows.append(row)
    return headers, rows, notes


def _rich(view: TableView, console: Console) -> None:
    headers, rows, notes = _rich_columns(view)
    table = Table(title=view.title)
    for j, header in enumerate(headers):
        longest = max((len(r[j]) for r in rows), default=0)
        # short cells (numbers) stay on one line; names, runs and notes wrap to make room
        table.add_column(header, no_wrap=longest <= 12, overflow="fold", min_width=min(longest, 12) or None)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in view.preamble:
        console.print(f"  {line}", highlight=False, markup=False, style="dim")
    for line in view.legend:
        console.print(f"  {line}", highlight=False, markup=False)
    for i, text in enumerate(notes, 1):
        console.print(f"  [{i}] {text}", highlight=False, markup=False)


def _cell(v) -> str:
    return "" if v is None or (isinstance(v, float) and pd.isna(v)) else str(v)


_MD_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\n": " ", "\r": " "})


def md_escape(text) -> str:
    """Text from records (model, data and set names, failure reasons) made inert in Markdown: GitHub renders
    raw HTML in a comment, so ``<script>`` or ``<img onerror=…>`` must arrive as text."""
    return str(text).translate(_MD_ESCAPES)


def markdown_table(df: pd.DataFrame) -> str:
    """A pipe table whose cells are escaped: HTML made inert, and a | (which would end the cell) escaped."""
    cells = df.map(lambda v: md_escape(_cell(v)).replace("|", "\\|"))
    cells.columns = [md_escape(c).replace("|", "\\|") for c in cells.columns]
    return cells.to_markdown(index=False, disable_numparse=True)  # "9.50" stays 9.50, not 9.5


def _markdown(view: TableView) -> str:
    df, notes = view.footnoted()
    parts = [f"### {md_escape(view.title)}", *map(md_escape, view.preamble)]
    parts.append(markdown_table(flat(df)))
    parts += map(md_escape, view.legend)
    parts += [f"[{i}] {md_escape(text)}" for i, text in enumerate(notes, 1)]
    return "\n\n".join(parts) + "\n"


# pandas escapes LaTeX's special characters; these are the Unicode symbols pdflatex does not know
_TEX_SYMBOLS = {"±": r"$\pm$", "Δ": r"$\Delta$", "↑": r"$\uparrow$", "↓": r"$\downarrow$", "—": "---",
                "†": r"$\dagger$", "−": "-", "…": r"\ldots{}", "·": r"$\cdot$", "×": r"$\times$",
                "‖": r"$\|$", "≠": r"$\neq$", "|": r"\textbar{}", "<": r"\textless{}", ">": r"\textgreater{}"}
_TEX_ESCAPES = str.maketrans({"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                              "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                              "\\": r"\textbackslash{}"})


def _tex_symbols(text: str) -> str:
    for u, tex in _TEX_SYMBOLS.items():
        text = text.replace(u, tex)
    return text


def tex(text: str) -> str:
    """Prose (captions, notes) for LaTeX; cells go through pandas' own escaping."""
    return _tex_symbols(str(text).translate(_TEX_ESCAPES))


def _latex(view: TableView) -> str:
    df, notes = view.footnoted()
    mask = view.best_mask()
    st = df.style.apply(lambda _: np.where(mask, "textbf:--rwrap;", ""), axis=None)
    st = st.format(lambda v: _tex_symbols(_cell(v)), escape="latex")
    st = st.format_index(lambda v: _tex_symbols(_cell(v)), escape="latex", axis=0)
    st = st.format_index(lambda v: _tex_symbols(_cell(v)), escape="latex", axis=1)
    if not view.has_index():
        st = st.hide(axis="index")
    body = st.to_latex(hrules=True, caption=tex(view.title), multicol_align="c", multirow_align="t",
                       position="htbp", position_float="centering")
    lines = [*view.preamble, *view.legend, *(f"[{i}] {t}" for i, t in enumerate(notes, 1))]
    if lines:
        below = "\\par\\smallskip\n{\\footnotesize\\raggedright\n" + "\\par\n".join(tex(x) for x in lines) + "\\par}\n"
        body = body.replace("\\end{table}", below + "\\end{table}")
    return body


def _html(view: TableView) -> str:
    df, notes = view.footnoted()
    mask = view.best_mask()
    st = df.style.apply(lambda _: np.where(mask, "font-weight: bold;", ""), axis=None)
    st = st.format(_cell, escape="html").format_index(_cell, escape="html", axis=0)
    st = st.format_index(_cell, escape="html", axis=1)
    if not view.has_index():
        st = st.hide(axis="index")
    st = st.set_table_attributes('class="bench-table"')
    parts = ['<section class="bench-table-view">', f'<h3 class="table-title">{html.escape(view.title)}</h3>']
    parts += [f'<p class="preamble">{html.escape(line)}</p>' for line in view.preamble]
    parts.append(f'<div class="table-scroll">{st.to_html()}</div>')
    parts += [f'<p class="legend">{html.escape(line)}</p>' for line in view.legend]
    if notes:
        items = "".join(f"<li>[{i}] {html.escape(t)}</li>" for i, t in enumerate(notes, 1))
        parts.append(f'<ul class="notes">{items}</ul>')
    parts.append("</section>")
    return "\n".join(parts) + "\n"


def _csv(views: list[TableView]) -> str:
    """One CSV for all the views; with several, their ``keys`` lead each row (CSV has no room for titles)."""
    frames = []
    for v in views:
        df = flat(v.frame)
        df[NOTES] = df[NOTES].map(lambda t: "; ".join((t or "").split(NOTE_SEP)))  # one line per row
        if len(views) > 1:
            for i, (k, val) in enumerate(v.keys.items()):
                df.insert(i, k, val)
        frames.append(df)
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    return buf.getvalue()


def render_views(views: list[TableView], fmt: str, width: int | None = None) -> str:
    """The views as text in ``fmt`` (one of FORMATS); rich output is plain text without colour codes."""
    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}'; valid choices: {', '.join(FORMATS)}")
    if fmt == "csv":
        return _csv(views)
    if fmt == "rich":
        console = Console(file=io.StringIO(), width=width or 160, record=True, color_system=None)
        for v in views:
            _rich(v, console)
        return console.export_text()
    one = {"markdown": _markdown, "latex": _latex, "html": _html}[fmt]
    return "\n".join(one(v) for v in views)


def print_views(views: list[TableView]) -> None:
    """rich tables on the terminal (colour and width as the terminal allows)."""
    for v in views:
        _rich(v, out)


# --- the ad hoc table: every record, grouped by suite and data ----------------------------------
def best_in_columns(values: pd.DataFrame, higher: dict) -> pd.DataFrame:
    """True where a cell holds the best number of its column (ties included), in the column's direction
    (``higher[col]``: True, False, or None for a column that is never bold). Columns with fewer than two
    numbers have no best."""
    mask = pd.DataFrame(False, index=values.index, columns=values.columns)
    for col in values.columns:
        if higher.get(col) is None:
            continue
        v = pd.to_numeric(values[col], errors="coerce")
        if v.notna().sum() < 2:
            continue
        mask[col] = v == (v.max() if higher[col] else v.min())
    return mask


WIDE = 12  # more metrics than this (OOD: score × set × statistic) and a table turns: a row per metric


def _value(r: Record, key: str) -> float | None:
    m = r.metrics.get(key) if r.ok else None
    return m.value if m is not None else None


def _metric_rows(recs: list[Record], keys: list[str], higher: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A row per metric and a column per record, for groups with many metrics."""
    labels = [f"{r.model} · {r.scale} · s{r.seed}" for r in recs]
    labels = [f"{lab} · {r.run_id}" if labels.count(lab) > 1 else lab for lab, r in zip(labels, recs)]
    rows, values = [], []
    for k in keys:
        row = {lab: (format_value(r.metrics.get(k)) if r.ok else "failed") for lab, r in zip(labels, recs)}
        why = [f"{r.model}: {reason}" for r in recs if r.ok and k not in r.metrics
               for pre, reason in r.skipped.items() if k == pre or k.startswith(pre + ".")]
        row[NOTES] = "; ".join(why)
        rows.append(row)
        values.append({lab: _value(r, k) for lab, r in zip(labels, recs)})
    index = pd.Index([_header(k) for k in keys], name="metric")
    df = pd.DataFrame(rows, columns=[*labels, NOTES], index=index)
    vals = pd.DataFrame(values, columns=labels, index=index)
    best = best_in_columns(vals.T, {i: higher[k] for i, k in zip(index, keys)}).T
    return df, best.reindex(columns=df.columns, fill_value=False)


def results_views(records: list[Record]) -> list[TableView]:
    """The ad hoc tables: one per (suite, data), one row per record, metric columns of that group only
    (or, past WIDE metrics, one row per metric and a column per record)."""
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        groups.setdefault((r.suite, r.data), []).append(r)
    views = []
    for (suite, data), recs in sorted(groups.items()):
        recs = sorted(recs, key=lambda r: (r.model, r.scale, r.seed, r.run_id))
        df = records_frame(recs).drop(columns=["suite", "data"])
        keys = [c for c in df.columns if c not in ("model", "scale", "seed", "status", "train s", NOTES)]
        covered = expanded_prefixes(keys)
        df, keys = df.drop(columns=covered), [k for k in keys if k not in covered]
        higher = {k: next((r.metrics[k].higher_is_better for r in recs if k in r.metrics), None) for k in keys}
        title = f"{suite} · data={data}"
        if len(keys) > WIDE:
            df, best = _metric_rows(recs, keys, higher)
            views.append(TableView(title, df, best, keys={"suite": suite, "data": data}))
            continue
        values = pd.DataFrame([{k: _value(r, k) for k in keys} for r in recs], columns=keys)
        best = best_in_columns(values, higher).reindex(columns=df.columns, fill_value=False)
        df = df.rename(columns={k: _header(k) for k in keys})
        best.columns = df.columns
        views.append(TableView(title, df, best, keys={"suite": suite, "data": data}))
    return views

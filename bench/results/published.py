"""Published tables beside reproduced records: ``bench table cifar10|calibration|ood``.

Each table is a file in ``bench/published_tables/`` (package data, read with `importlib.resources`): the
paper's numbers (``rows``), its citation and protocol notes, and a ``reproduce`` block that says which records
reproduce it and what they must match:

    reproduce:
      suite: hybrid                     # records of this suite
      data: {name: cifar10, shape: [3, 32, 32], n_classes: 10}
      expect:                           # metric (or "*" for all) -> {dotted path in the record: the paper's value}
        "*": {data: cifar10, scale: paper}
        fid: {protocol.feature_extractor.kind: inception, protocol.samples.n: 50000, protocol.reference.split: train}

A record is a candidate when its data is ``data.name``, or an ``imagefolder:``/``npz:`` copy whose recorded
image shape and class count are the dataset's (e.g. the lossy CIFAR-10 JPEGs). Candidates are grouped by
model and protocol fingerprint, so the mean ± std over seeds never mixes protocols, and every group is a
row under its published system. A reproduced cell whose record differs from ``expect`` is still shown, but
marked † and its row's note names each difference: it is never silently compared with the paper.

Each row also carries the record's declared deviations from the system's reference (``model_config.
deviations``) as its own footnote. A paper-scale smoke (``smoke=N``) is never a candidate: it is no
reproduction. A system without a reproduction still gets the deviations its paper recipe declares, read
from a paper-scale record of it (a smoke's own cuts left out), and the preamble counts the smokes left out.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from bench.errors import UnknownNameError, UserError
from bench.features import describe_extractor
from bench.metrics import METRICS
from bench.results.record import Record
from bench.results.tables import NOTE_SEP, NOTES, TableView, best_in_columns

#: the published tables, shipped inside the package (pyproject.toml's package-data)
PUBLISHED_DIR = files("bench") / "published_tables"
TABLES = {
    "cifar10": "jem_table1_cifar10.yaml",
    "calibration": "jem_calibration_cifar100.yaml",
    "ood": "jem_ood_cifar10.yaml",
}
SCALE_ORDER = {"paper": 0, "small": 1, "tiny": 2}
#: how a checked record path reads in a note
LABELS = {
    "data": "data",
    "scale": "scale",
    "protocol.classifier.split": "classifier split",
    "protocol.data.n_test": "test images",
    "protocol.feature_extractor.kind": "feature extractor",
    "protocol.feature_extractor.isc_kind": "feature extractor",  # IS's (Inception without its classifier: domain)
    "protocol.samples.n": "samples",
    "protocol.reference.split": "reference split",
    "protocol.calibration.bins": "ECE bins",
    "protocol.ood.positive": "positive class",
}
DAGGER = "†"
MISSING = "—"
NA = "N/A"


@dataclass(frozen=True)
class Column:
    """A published quantity: ``label`` heads three columns (published, reproduced, Δ)."""

    label: str
    higher_is_better: bool
    decimals: int  # of reproduced values and Δ
    #: published values with this many decimals (the paper's AUROCs: 0.70); None: as written in the file
    published_decimals: int | None = None


@dataclass(frozen=True)
class PubCell:
    key: str  # the record's metric key, e.g. "fid" or "ood.log_px.svhn.auroc"
    value: Any  # the published number, or None where the paper has N/A
    verified: bool = True


@dataclass(frozen=True)
class PubRow:
    index: tuple[str, ...]
    model: str
    cells: dict[str, PubCell]  # column label -> cell


@dataclass(frozen=True)
class Published:
    name: str
    path: Any  # the file: a Path, or an importlib.resources Traversable (both have .name)
    spec: dict
    title: str
    index_names: tuple[str, ...]
    columns: list[Column]
    rows: list[PubRow]


def _metric_column(key: str, label: str | None = None, decimals: int = 2) -> Column:
    m = METRICS.get(key)
    unit = f" {m.unit}" if m.unit else ""
    return Column(f"{label or m.title}{unit} {m.arrow}", m.higher_is_better, decimals)


def _table1(spec: dict) -> tuple[tuple[str, ...], list[Column], list[PubRow]]:
    keys = ("accuracy", "is", "fid")
    cols = [_metric_column(k) for k in keys]
    rows = [PubRow((r["class"], r["system"], r["model"]), r["model"],
                   {c.label: PubCell(k, r.get(k)) for c, k in zip(cols, keys)}) for r in spec["rows"]]
    return ("Class", "Model", "bench model"), cols, rows


def _calibration(spec: dict) -> tuple[tuple[str, ...], list[Column], list[PubRow]]:
    bins = spec.get("protocol", {}).get("ece_bins")
    col = _metric_column("ece", f"ECE ({bins} bins)" if bins else None)
    rows = [PubRow((r["system"], r["model"]), r["model"], {col.label: PubCell("ece", r.get("ece"))})
            for r in spec["rows"]]
    return ("Model", "bench model"), [col], rows


OOD_SCORES = {"log_px": "log p(x)", "max_softmax": "max p(y|x)", "grad_norm": "approx. mass"}
OOD_SETS = {"svhn": "SVHN", "interp": "Interp", "cifar100": "CIFAR-100", "celeba": "CelebA"}


def _ood(spec: dict) -> tuple[tuple[str, ...], list[Column], list[PubRow]]:
    sets = spec.get("protocol", {}).get("sets") or list(OOD_SETS)
    cols = {s: Column(f"{OOD_SETS.get(s, s)} AUROC ↑", True, 2, published_decimals=2) for s in sets}
    verified_file = spec.get("verified", True)
    rows = []
    for r in spec["rows"]:
        ok = bool(r.get("verified", verified_file))
        cells = {c.label: PubCell(f"ood.{r['score']}.{s}.auroc", r.get(s), ok) for s, c in cols.items()}
        rows.append(PubRow((OOD_SCORES.get(r["score"], r["score"]), r["system"], r["model"]), r["model"], cells))
    return ("Score", "Model", "bench model"), list(cols.values()), rows


LAYOUTS: dict[str, Callable[[dict], tuple[tuple[str, ...], list[Column], list[PubRow]]]] = {
    "cifar10": _table1, "calibration": _calibration, "ood": _ood,
}


def load_published(name: str, directory: Any = PUBLISHED_DIR) -> Published:
    """The published table ``name`` from ``directory`` (a Path or a Traversable; default: the package's)."""
    if name not in TABLES:
        raise UnknownNameError("table", name, list(TABLES))
    path = directory / TABLES[name]
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read published table {path} ({e.strerror}); restore it from git") from None
    except yaml.YAMLError as e:
        raise UserError(f"published table {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict) or "rows" not in spec or "reproduce" not in spec:
        raise UserError(f"published table {path} lacks 'rows' or 'reproduce'; restore it from git")
    index_names, columns, rows = LAYOUTS[name](spec)
    c = spec.get("citation", {})
    title = f"{c.get('where', name)} · arXiv:{c.get('arxiv', '?')}"
    return Published(name, path, spec, title, index_names, columns, rows)


# --- matching records ---------------------------------------------------------------------------
def lookup(record: Record, path: str) -> Any:
    v = record.lookup(path)
    return record.lookup(FALLBACK[path]) if v is None and path in FALLBACK else v


#: a path that records of one extractor do not write: IS's extractor is the FID one unless named apart
FALLBACK = {"protocol.feature_extractor.isc_kind": "protocol.feature_extractor.kind",
            "protocol.feature_extractor.isc_name": "protocol.feature_extractor.name"}


def is_candidate(record: Record, data: dict, smoke: bool = False) -> bool:
    """A record of the dataset itself, or of a generic copy (imagefolder:, npz:) with its shape and classes;
    never a smoke (``smoke=True``: only a smoke)."""
    if not record.ok or bool(record.smoke) != smoke:
        return False
    if record.data == data["name"]:
        return True
    if not record.data.startswith(("imagefolder:", "npz:")):
        return False
    d = record.protocol.get("data")
    d = d if isinstance(d, dict) else {}
    return list(d.get("shape") or []) == list(data["shape"]) and d.get("n_classes") == data["n_classes"]


def _expected(expect: dict, key: str) -> dict:
    base = key.split(".")[0]
    return {**expect.get("*", {}), **expect.get(base, {}), **expect.get(key, {})}


def _shown(record: Record, path: str, value: Any) -> str:
    if value is None:
        return "not recorded"
    if path == "data" and lookup(record, "protocol.data.lossy"):
        return f"{value} (lossy JPEG)"
    if path == "protocol.feature_extractor.kind":
        return f"{value} {lookup(record, 'protocol.feature_extractor.name') or ''}".strip()
    if path == "protocol.feature_extractor.isc_kind":
        return f"{value} {lookup(record, 'protocol.feature_extractor.isc_name') or ''}".strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def differences(record: Record, key: str, expect: dict) -> list[tuple[str, str]]:
    """(path, "got (paper: want)") for every expectation of metric ``key`` that ``record`` does not meet."""
    out = []
    for path, want in _expected(expect, key).items():
        got = lookup(record, path)
        if got != want:
            w = f"{want:,}" if isinstance(want, int) and not isinstance(want, bool) else str(want)
            out.append((path, f"{_shown(record, path, got)} (paper: {w})"))
    return out


@dataclass
class Group:
    """Records of one model under one protocol fingerprint: one reproduced row."""

    model: str
    records: list[Record]

    @property
    def first(self) -> Record:
        return self.records[0]

    def values(self, key: str) -> list[float]:
        return [r.metrics[key].value for r in self.records if key in r.metrics]

    def skipped(self, key: str) -> str | None:
        for r in self.records:
            for k, why in r.skipped.items():
                if key == k or key.startswith(k + "."):
                    return why
        return None


def deviation_note(record: Record, drop: tuple[str, ...] = ()) -> str:
    """The record's declared deviations from its reference as one note ("" if none); ``drop``: fields whose
    entries (``field=...``, see `recipe_differences`) are left out."""
    devs = [d for d in (record.model_config or {}).get("deviations") or []
            if not any(d.startswith(f"{f}=") for f in drop)]
    if not devs:
        return ""
    return f"bench's {record.scale} recipe of {record.model} departs from its reference: " + "; ".join(devs)


def paper_recipe_note(records: list[Record], suite: str, data: dict, model: str) -> str:
    """For a system without a reproduction: its paper recipe's deviations, from the newest paper-scale record
    of it (a smoke's, without the smoke's own cuts)."""
    recs = [r for r in records if r.suite == suite and r.model == model and r.scale == "paper"
            and (is_candidate(r, data) or is_candidate(r, data, smoke=True))]
    if not recs:
        return ""
    r = max(recs, key=lambda r: r.run_id)
    return deviation_note(r, tuple((r.smoke or {}).get("shrunk", {})))


def groups_of(records: list[Record], suite: str, data: dict) -> dict[str, list[Group]]:
    by: dict[tuple, list[Record]] = {}
    for r in records:
        if r.suite == suite and is_candidate(r, data):
            by.setdefault((r.model, r.data, r.scale, r.fingerprint), []).append(r)
    out: dict[str, list[Group]] = {}
    for (model, *_), recs in by.items():
        out.setdefault(model, []).append(Group(model, sorted(recs, key=lambda r: (r.seed, r.run_id))))
    return out


def _short_data(spec: str) -> str:
    kind, sep, arg = spec.partition(":")
    if not sep:
        return spec
    parts = Path(arg).parts
    return f"{kind}:{'…/' if len(parts) > 2 else ''}{'/'.join(parts[-2:])}"


def _run_label(g: Group) -> str:
    seeds = sorted({r.seed for r in g.records})
    s = "seed" if len(seeds) == 1 else "seeds"
    return f"{g.first.scale} · {_short_data(g.first.data)} · {s} {','.join(map(str, seeds))}"


def _fmt(v: float, decimals: int) -> str:
    return f"{v:.{decimals}f}"


def _published_text(cell: PubCell, col: Column) -> str:
    if cell.value is None:
        return NA
    text = str(cell.value) if col.published_decimals is None else f"{float(cell.value):.{col.published_decimals}f}"
    return text + ("" if cell.verified else "*")


def build_view(pub: Published, records: list[Record], source: str) -> TableView:
    rp = pub.spec["reproduce"]
    expect = rp.get("expect", {})
    groups = groups_of(records, rp["suite"], rp["data"])
    scols = [(c.label, part) for c in pub.columns for part in ("published", "reproduced", "Δ")]
    columns = pd.MultiIndex.from_tuples([*scols, (NOTES, "")])
    rows, index, numbers = [], [], []
    for prow in pub.rows:
        gs = sorted(groups.get(prow.model, []), key=lambda g: (
            any(differences(g.first, c.key, expect) for c in prow.cells.values()),
            SCALE_ORDER.get(g.first.scale, 9), g.first.data))
        labels = [_run_label(g) for g in gs]
        # two protocols with the same scale, data and seeds (another device, say): the fingerprint tells them apart
        labels = [f"{lab} · {g.first.fingerprint[:8]}" if labels.count(lab) > 1 else lab
                  for lab, g in zip(labels, gs)]
        unreproduced = paper_recipe_note(records, rp["suite"], rp["data"], prow.model) if not gs else ""
        for g, label in zip(gs or [None], labels or [MISSING]):
            row: dict = {}
            num: dict = {}
            diffs: dict[str, list[str]] = {}  # "path: got (paper: want)" -> metric labels it affects
            for col in pub.columns:
                cell = prow.cells[col.label]
                row[(col.label, "published")] = _published_text(cell, col)
                num[(col.label, "published")] = cell.value
                vals = g.values(cell.key) if g else []
                if not vals:
                    why = g.skipped(cell.key) if g else None
                    row[(col.label, "reproduced")] = NA if why else MISSING
                    row[(col.label, "Δ")] = NA if why or cell.value is None else MISSING
                    continue
                mean = statistics.fmean(vals)
                text = _fmt(mean, col.decimals)
                if len(vals) > 1:
                    text += f" ± {_fmt(statistics.stdev(vals), col.decimals)}"
                delta = NA if cell.value is None else f"{mean - float(cell.value):+.{col.decimals}f}"
                flagged = differences(g.first, cell.key, expect)
                for path, what in flagged:
                    diffs.setdefault(f"{LABELS.get(path, path)} {what}", []).append(col.label.split(" ")[0])
                mark = f" {DAGGER}" if flagged else ""
                row[(col.label, "reproduced")] = text + mark
                row[(col.label, "Δ")] = delta + (mark if delta != NA else "")
                num[(col.label, "reproduced")] = mean
            notes = [_note(diffs, len(pub.columns)) if diffs else "", deviation_note(g.first) if g else unreproduced]
            row[(NOTES, "")] = NOTE_SEP.join(n for n in notes if n)
            rows.append(row)
            numbers.append(num)
            index.append((*prow.index, label))
    names = (*pub.index_names, "run")
    frame = pd.DataFrame(rows, columns=columns, index=pd.MultiIndex.from_tuples(index, names=names))
    values = pd.DataFrame(numbers, columns=columns, index=frame.index)
    higher = {(c.label, part): c.higher_is_better for c in pub.columns for part in ("published", "reproduced")}
    best = best_in_columns(values, higher)
    return TableView(pub.title, frame, best, preamble=_preamble(pub, source, records),
                     legend=_legend(pub), keys={"table": pub.name})


def _note(diffs: dict[str, list[str]], n_columns: int) -> str:
    parts = []
    for what, cols in diffs.items():
        parts.append(what if len(cols) == n_columns or n_columns == 1 else f"{what} [{', '.join(cols)}]")
    return "protocol differs from the paper's: " + "; ".join(parts)


def _preamble(pub: Published, source: str, records: list[Record]) -> list[str]:
    spec, rp = pub.spec, pub.spec["reproduce"]
    c = spec.get("citation", {})
    lines = [f"Published: {c.get('paper', '?')} arXiv:{c.get('arxiv', '?')}, {c.get('where', '')}."]
    proto = spec.get("protocol", {})
    if proto:
        lines.append("Declared protocol: " + "; ".join(f"{k}: {v}" for k, v in proto.items()) + ".")
    expect = "; ".join(f"{'every metric' if k == '*' else k}: "
                       + ", ".join(f"{LABELS.get(p, p)}={v}" for p, v in e.items())
                       for k, e in rp.get("expect", {}).items())
    d = rp["data"]
    n = sum(1 for r in records if r.suite == rp["suite"] and is_candidate(r, d))
    extractors = sorted({describe_extractor(fe) for r in records if r.suite == rp["suite"] and is_candidate(r, d)
                         and isinstance(fe := r.protocol.get("feature_extractor"), dict)})
    if extractors:
        lines.append(f"Feature extractors of these records: {'; '.join(extractors)}.")
    smokes = sum(1 for r in records if r.suite == rp["suite"] and is_candidate(r, d, smoke=True))
    lines.append(f"Reproduced: {n} record(s) of suite '{rp['suite']}' under {source} with data={d['name']} or an "
                 f"imagefolder:/npz: copy shaped {'x'.join(map(str, d['shape']))} with {d['n_classes']} classes; "
                 f"mean ± std over seeds of one protocol fingerprint; Δ = reproduced - published. "
                 f"Compared only when the record matches ({expect}).")
    if smokes:
        lines.append(f"Left out: {smokes} paper-scale smoke record(s) (smoke=N: the paper recipe run for a few steps "
                     "to check that it runs); a smoke is never a reproduction.")
    return lines


def _legend(pub: Published) -> list[str]:
    lines = [f"{DAGGER} measured under another protocol than the paper's (the row's note says how): "
             "shown, not comparable", f"{NA}: the paper has no number, or the model lacks the capability; "
             f"{MISSING}: not reproduced yet"]
    if pub.name == "ood":
        lines.append("Scores (higher = more in-distribution): log p(x) (log_px), max p(y|x) (max_softmax), "
                     "approx. mass -||d log p(x)/dx|| (grad_norm); in-distribution CIFAR-10 test images are positive")
    if any(not c.verified for r in pub.rows for c in r.cells.values()):
        lines.append(f"* unverified: transcribed without access to the paper ({pub.path.name} marks it "
                     "verified: false); check against arXiv before citing")
    return lines


def published_view(name: str, records: list[Record], source: str) -> TableView:
    return build_view(load_published(name), records, source)

"""The regression gate: compare candidate records with approved baseline records, per metric, knowing
each metric's direction and the noise of the measurement.

Records are matched by (suite, model, data, scale); any number of seeds per side. For each metric:

    Δ = mean(candidate) − mean(baseline), signed so that "worse" is positive for the metric's direction
    threshold = max(tolerance, t_k(df) · combined standard error)

and the verdict is *regressed* when worse > threshold, *improved* when better > threshold, *unchanged*
otherwise. t_k(df) is the Student-t quantile with the tail probability of a normal deviate k (k = 2 →
one-sided 2.3%) at the Welch–Satterthwaite degrees of freedom of the two sides: with two or three seeds a
side's spread is itself uncertain, and a plain k·se would false-alarm far more often than k promises (a
measured 22% of disjoint 2-seed pairs of jem at k = 2). The combined standard error is √(se_b² + se_c²),
where a side's se is its seed-to-seed standard deviation / √n when it has several seeds, or the record's
own standard error (e.g. accuracy's binomial one) with one seed; with several seeds the records' own
standard error is a floor on the seed-to-seed spread. With neither, the tolerance alone decides and the
report says so.
Records are compared as this bench reads them: a version-1 record is upgraded to version 2 first (its
protocol, and so its fingerprint, is unchanged), so records of either version compare with each other.
Records whose protocol fingerprint, suite version or data differ are *incomparable*
(exit 2), and the report names the fields that differ. A regression (exit 1) is also: a candidate seed
that failed, a NaN or infinite value on either side, a metric (or a whole model) missing on either side.
A metric's direction is its declaration in the metric registry, never what a record says; a record that
disagrees with the registry (written by another bench) is a user error (exit 2).
"""

from __future__ import annotations

import fnmatch
import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.errors import UserError
from bench.metrics.base import metric_of
from bench.results.record import Record
from bench.results.records import latest_per_run

K_DEFAULT = 2.0
EXIT_PASS, EXIT_REGRESSION, EXIT_INCOMPARABLE = 0, 1, 2


@dataclass(frozen=True)
class Tolerance:
    value: float
    relative: bool

    @classmethod
    def parse(cls, text: str) -> Tolerance:
        t = str(text).strip()
        try:
            if t.endswith("%"):
                v = float(t[:-1]) / 100.0
                rel = True
            else:
                v, rel = float(t), False
        except ValueError:
            raise UserError(f"tolerance '{text}' must be a number (absolute) or a percentage like 5%") from None
        if not math.isfinite(v) or v < 0:
            raise UserError(f"tolerance '{text}' must be finite and non-negative")
        return cls(v, rel)

    def absolute(self, baseline: float) -> float:
        return self.value * abs(baseline) if self.relative else self.value

    def __str__(self) -> str:
        return f"{self.value * 100:g}%" if self.relative else f"{self.value:g}"


def parse_tol_overrides(items: list[str]) -> dict[str, Tolerance]:
    out = {}
    for item in items:
        key, sep, val = item.rpartition(":")
        if not sep or not key:
            raise UserError(f"--tol '{item}' must look like METRIC:TOL, e.g. fid:5% or accuracy:0.5")
        out[key] = Tolerance.parse(val)
    return out


def group(records: list[Record], side: str) -> dict[tuple, list[Record]]:
    groups: dict[tuple, list[Record]] = {}
    seen: dict[tuple, str] = {}
    for r in records:
        key = (r.suite, r.model, r.data, r.scale)
        seed_key = (*key, r.seed)
        if seed_key in seen:
            raise UserError(f"{side} has two runs for suite={key[0]} model={key[1]} data={key[2]} scale={key[3]} "
                            f"seed={r.seed} ({seen[seed_key]} and {r.label}); "
                            "pass --latest to use the latest of each, or delete one")
        seen[seed_key] = r.label
        groups.setdefault(key, []).append(r)
    return groups


def diff_paths(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON values differ, with both values, for the report."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k == "fingerprint":
                continue
            out += diff_paths(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    if a != b:
        return [f"{prefix}: {json.dumps(a, default=str)[:60]} vs {json.dumps(b, default=str)[:60]}"]
    return []


def incomparable_reasons(base: list[Record], cand: list[Record]) -> list[str]:
    reasons = []
    ref = base[0]
    for r in base[1:] + cand:
        for fld in ("suite_version", "data"):
            if getattr(r, fld) != getattr(ref, fld):
                reasons.append(f"{fld}: {getattr(ref, fld)!r} vs {getattr(r, fld)!r}")
        if r.fingerprint != ref.fingerprint:
            diffs = diff_paths(ref.protocol, r.protocol)
            reasons.append("protocol differs: " + ("; ".join(diffs[:4]) if diffs else "fingerprint only"))
        if r.suite == "throughput" and r.env.get("device_name") != ref.env.get("device_name"):
            reasons.append(f"throughput on another device: {ref.env.get('device_name')!r} vs "
                           f"{r.env.get('device_name')!r}")
    return sorted(set(reasons))


@dataclass
class Row:
    suite: str
    model: str
    data: str
    scale: str
    metric: str
    verdict: str  # improved | unchanged | regressed | failed | missing | incomparable
    baseline: float | None = None
    baseline_spread: float | None = None
    baseline_n: int = 0
    candidate: float | None = None
    candidate_spread: float | None = None
    candidate_n: int = 0
    delta: float | None = None
    delta_pct: float | None = None
    tolerance: str = ""
    threshold: float | None = None
    higher_is_better: bool | None = None
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    k: float = K_DEFAULT
    #: older re-runs left out by ``--latest``
    dropped_baseline: int = 0
    dropped_candidate: int = 0

    @property
    def exit_code(self) -> int:
        verdicts = {r.verdict for r in self.rows}
        if "incomparable" in verdicts:
            return EXIT_INCOMPARABLE
        if verdicts & {"regressed", "missing", "failed"}:
            return EXIT_REGRESSION
        return EXIT_PASS

    def to_json(self) -> dict:
        return {"k": self.k, "exit_code": self.exit_code, "rows": [asdict(r) for r in self.rows]}


def _side_stats(records: list[Record], metric: str) -> tuple[float, float | None, float | None, float]:
    """(mean, spread to show, standard error of the mean or None, degrees of freedom of that error): n − 1
    when the seeds' own spread decides it; infinite when the records' standard error (a large-sample one,
    e.g. accuracy's binomial over the test split) does."""
    vals = [r.metrics[metric].value for r in records]
    n = len(vals)
    mean = statistics.fmean(vals)
    stderrs = [r.metrics[metric].stderr for r in records]
    rms_se = math.sqrt(statistics.fmean(s * s for s in stderrs)) if all(s is not None for s in stderrs) else None
    if n > 1:
        # the spread of two or three seeds can be near zero by chance; a record's own standard error
        # (e.g. accuracy's binomial one) is a floor on the per-seed spread, so a lucky tie cannot make
        # the gate hypersensitive
        sd = statistics.stdev(vals)
        if rms_se is not None and rms_se >= sd:
            return mean, sd, rms_se / math.sqrt(n), math.inf
        return mean, sd, sd / math.sqrt(n), n - 1
    return mean, rms_se, rms_se, math.inf


def direction(metric: str, records: list[Record]) -> bool:
    """The registry's direction for a recorded metric key; a record that says otherwise is refused."""
    declared = metric_of(metric)
    if declared is None:
        raise UserError(f"metric '{metric}' in {records[0].label} is not a registered metric; "
                        "install the plugin that defines it, or compare without that record")
    hib = declared.higher_is_better_for(metric)
    for r in records:
        if r.metrics[metric].higher_is_better != hib:
            word = "higher" if hib else "lower"
            raise UserError(f"{r.label} says '{metric}' is "
                            f"{'higher' if not hib else 'lower'}-is-better, but bench declares it {word}-is-better; "
                            "re-run it with this bench, or update the baseline with 'bench baseline update'")
    return hib


def default_tolerance(metric: str, suite_tols: dict[str, str], overrides: dict[str, Tolerance]) -> Tolerance:
    for table in (overrides, {k: Tolerance.parse(v) for k, v in suite_tols.items()}):
        if metric in table:
            return table[metric]
        for pattern, tol in table.items():
            if fnmatch.fnmatchcase(metric, pattern):
                return tol
    from bench.metrics import METRICS

    if metric in METRICS:
        return Tolerance.parse(METRICS.get(metric).tolerance)
    return Tolerance(0.0, False)


def welch_df(se_a: float | None, df_a: float, se_b: float | None, df_b: float) -> float:
    """Welch–Satterthwaite degrees of freedom of the difference of two means, from each side's standard
    error and its degrees of freedom (infinite for a large-sample standard error)."""
    terms = [(se ** 2, df) for se, df in ((se_a, df_a), (se_b, df_b)) if se]
    num = sum(v for v, _ in terms) ** 2
    den = sum(v * v / d for v, d in terms if 0 < d < math.inf)
    return num / den if den > 0 else math.inf


def noise_factor(k: float, df: float) -> float:
    """The Student-t quantile at ``df`` with the one-sided tail of a normal deviate ``k``."""
    from scipy import stats

    return float(k) if math.isinf(df) else float(stats.t.ppf(stats.norm.cdf(k), df))


def _finite(records: list[Record], metric: str) -> bool:
    return all(math.isfinite(r.metrics[metric].value) for r in records)


def compare(baseline: list[Record], candidate: list[Record], k: float = K_DEFAULT,
            overrides: dict[str, Tolerance] | None = None, latest: bool = False) -> Report:
    overrides = overrides or {}
    report = Report(k=k)
    if latest:
        (baseline, report.dropped_baseline), (candidate, report.dropped_candidate) = (
            latest_per_run(baseline), latest_per_run(candidate))
    b_groups, c_groups = group(baseline, "baseline"), group(candidate, "candidate")
    for key in sorted(set(b_groups) | set(c_groups)):
        report.rows += _compare_group(key, b_groups.get(key, []), c_groups.get(key, []), k, overrides)
    return report


def _compare_group(key: tuple, base_all: list[Record], cand_all: list[Record], k: float,
                   overrides: dict[str, Tolerance]) -> list[Row]:
    def mk(metric: str, verdict: str, **kw) -> Row:
        return Row(*key, metric, verdict, **kw)

    base = [r for r in base_all if r.ok]
    cand = [r for r in cand_all if r.ok]
    rows: list[Row] = []
    failed = [r for r in cand_all if not r.ok]
    if failed:
        why = "; ".join(f"seed {r.seed}: {(r.reason or '')[:120]}" for r in failed)
        rows.append(mk("*", "failed", note=f"{len(failed)} of {len(cand_all)} candidate seed(s) failed: {why}"))
    if len(base) < len(base_all):
        rows.append(mk("*", "missing", note="a baseline seed failed; approve only successful runs"))
    if not base:
        for m in sorted(set().union(*(r.metrics for r in cand))):
            rows.append(mk(m, "missing", candidate=_side_stats([r for r in cand if m in r.metrics], m)[0],
                           note="no approved baseline; approve it with 'bench baseline update'"))
        return rows
    if not cand:
        if not failed:
            rows.append(mk("*", "missing", note="no candidate record"))
        return rows
    reasons = incomparable_reasons(base, cand)
    if reasons:
        return rows + [mk("*", "incomparable", note="; ".join(reasons))]
    from bench.suites import load_suite

    try:
        suite_tols = load_suite(key[0]).tolerances
    except UserError:
        suite_tols = {}
    for m in sorted(set().union(*(r.metrics for r in base)) | set().union(*(r.metrics for r in cand))):
        rows.append(_compare_metric(mk, m, base, cand, k, default_tolerance(m, suite_tols, overrides)))
    return rows


def _compare_metric(mk, m: str, base: list[Record], cand: list[Record], k: float, tol: Tolerance) -> Row:
    b_has = [r for r in base if m in r.metrics]
    c_has = [r for r in cand if m in r.metrics]
    hib = direction(m, b_has + c_has)
    for side, has, alls in (("candidate", c_has, cand), ("baseline", b_has, base)):
        if len(has) < len(alls):
            missing = sorted(r.seed for r in alls if m not in r.metrics)
            return mk(m, "missing", higher_is_better=hib, note=f"missing from the {side} (seed {missing})")
    if not (_finite(b_has, m) and _finite(c_has, m)):
        side = "candidate" if not _finite(c_has, m) else "baseline"
        return mk(m, "regressed", higher_is_better=hib, note=f"non-finite value (NaN or ±inf) in the {side}")
    bm, bs, bse, bdf = _side_stats(b_has, m)
    cm, cs, cse, cdf = _side_stats(c_has, m)
    bn, cn = len(b_has), len(c_has)
    tol_abs = tol.absolute(bm)
    if bse is None and cse is None:
        combined, note = None, "single seed, no standard error: tolerance only"
    else:
        combined = math.sqrt((bse or 0.0) ** 2 + (cse or 0.0) ** 2)
        factor = noise_factor(k, welch_df(bse, bdf, cse, cdf))
        note = f"noise: {factor:.3g}·se = {factor * combined:.4g}"
    threshold = max(tol_abs, factor * combined) if combined is not None else tol_abs
    delta = cm - bm
    worse = -delta if hib else delta
    verdict = "regressed" if worse > threshold else "improved" if -worse > threshold else "unchanged"
    return mk(m, verdict, baseline=bm, baseline_spread=bs, baseline_n=bn, candidate=cm, candidate_spread=cs,
              candidate_n=cn, delta=delta, delta_pct=(100.0 * delta / abs(bm)) if bm else None,
              tolerance=str(tol), threshold=threshold, higher_is_better=hib, note=note)


VERDICT_MARK = {"improved": "✅ improved", "unchanged": "➖ unchanged", "regressed": "❌ regressed",
                "failed": "❌ failed", "missing": "❌ missing", "incomparable": "⛔ incomparable"}


def _fmt(v: float | None, spread: float | None = None) -> str:
    if v is None:
        return "—"
    s = f"{v:.4g}"
    return s + (f" ± {spread:.2g}" if spread is not None else "")


def report_frame(report: Report):
    import pandas as pd

    rows = []
    for r in report.rows:
        arrow = "" if r.higher_is_better is None else ("↑" if r.higher_is_better else "↓")
        rows.append({
            "suite": r.suite, "model": r.model, "data": r.data, "scale": r.scale,
            "metric": f"{r.metric} {arrow}".strip(),
            "baseline": _fmt(r.baseline, r.baseline_spread) + (f" (n={r.baseline_n})" if r.baseline_n else ""),
            "candidate": _fmt(r.candidate, r.candidate_spread) + (f" (n={r.candidate_n})" if r.candidate_n else ""),
            "Δ": _fmt(r.delta), "Δ%": "—" if r.delta_pct is None else f"{r.delta_pct:+.1f}%",
            "tolerance": r.tolerance or "—", "verdict": VERDICT_MARK[r.verdict], "note": r.note,
        })
    return pd.DataFrame(rows)


def markdown(report: Report) -> str:
    from bench.results.tables import markdown_table

    df = report_frame(report)
    status = {EXIT_PASS: "✅ pass", EXIT_REGRESSION: "❌ regression", EXIT_INCOMPARABLE: "⛔ incomparable inputs"}
    counts = {v: sum(r.verdict == v for r in report.rows) for v in VERDICT_MARK}
    summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
    dropped = report.dropped_baseline + report.dropped_candidate
    if dropped:
        summary += f"; --latest left out {dropped} older re-run(s)"
    head = f"## bench compare: {status[report.exit_code]}\n\n{summary}. Noise factor k = {report.k:g}.\n\n"
    return head + (markdown_table(df) if len(df) else "_no metrics_") + "\n"

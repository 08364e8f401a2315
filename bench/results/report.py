"""``bench report``: one self-contained HTML file for a results directory.

It holds the published tables that the records reproduce (JEM Table 1, calibration, OOD), the deviations
each model's recipe declares from its reference (per model and scale, as its records hold them), then, per
(suite, data), the table of every record and the figures `bench run` saved beside them: sample grids,
reliability diagrams, OOD score histograms, ROC curves and robustness curves. Images are embedded as
base64 ``data:`` URIs and the styles are inline, so the file opens offline, anywhere, on its own.
"""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import jinja2
from markupsafe import Markup

from bench.results.published import SCALE_ORDER, TABLES, groups_of, is_candidate, load_published, published_view
from bench.results.record import Record
from bench.results.records import load_records
from bench.results.tables import render_views, results_views

#: figure kinds in report order: (artifact name prefix, heading); an artifact is ``<record stem>.<name>.png``
KINDS = (
    ("samples", "Sample grids"),
    ("reliability", "Reliability diagrams"),
    ("ood_", "OOD score histograms"),
    ("roc_", "ROC curves"),
    ("robust", "Robustness curves"),
)


@dataclass(frozen=True)
class Figure:
    kind: str
    caption: str
    src: str  # data: URI


def artifacts(record: Record, listing: dict[Path, list[Path]] | None = None) -> list[Path]:
    """The PNGs the runner wrote beside a record read from a file: same stem, then ``.<name>.png``
    (``listing`` caches each directory's PNGs across records)."""
    if record.path is None:
        return []
    path = record.path
    listing = {} if listing is None else listing
    if path.parent not in listing:
        listing[path.parent] = sorted(path.parent.glob("*.png"))
    prefix = path.name[: -len(".json")] + "."
    return [p for p in listing[path.parent] if p.name.startswith(prefix)]


def _kind(name: str) -> str | None:
    return next((heading for prefix, heading in KINDS if name.startswith(prefix)), None)


@dataclass(frozen=True)
class Deviations:
    model: str
    scale: str  # "paper", or "paper (smoke: 2 steps)"
    reference: str
    items: tuple[str, ...]


def deviations(records: list[Record]) -> list[Deviations]:
    """Each model's declared deviations, once per (model, scale, list), from ``model_config.deviations``."""
    out: dict[tuple, Deviations] = {}
    for r in sorted(records, key=lambda r: (r.model, SCALE_ORDER.get(r.scale, 9), bool(r.smoke))):
        mc = r.model_config or {}
        if "deviations" not in mc:
            continue  # written before models declared them
        scale = r.scale + (f" (smoke: {r.smoke['steps']} steps)" if r.smoke else "")
        d = Deviations(r.model, scale, mc.get("reference") or "", tuple(mc["deviations"]))
        out.setdefault((d.model, d.scale, d.items), d)
    return list(out.values())


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def figures(records: list[Record]) -> dict[str, list[Figure]]:
    out: dict[str, list[Figure]] = {heading: [] for _, heading in KINDS}
    listing: dict[Path, list[Path]] = {}
    for r in sorted(records, key=lambda r: (r.model, r.scale, r.seed)):
        for p in artifacts(r, listing):
            prefix = r.path.name[: -len(".json")] + "."
            name = p.name[len(prefix): -len(".png")]
            heading = _kind(name)
            if heading is None:
                continue
            detail = {"samples": "", "reliability": ""}.get(name, name.removeprefix("ood_").removeprefix("roc_"))
            caption = f"{r.model} · seed {r.seed} · scale {r.scale}" + (f" · {detail}" if detail else "")
            out[heading].append(Figure(heading, caption, data_uri(p)))
    return {k: v for k, v in out.items() if v}


TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>bench report: {{ source }}</title>
<style>
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem 2rem; color: #1d1d1f; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; }
h2 { font-size: 1.2rem; border-bottom: 1px solid #ccc; padding-bottom: .2rem; margin-top: 2rem; }
h3 { font-size: 1rem; margin-top: 1.2rem; }
.group h3.table-title { display: none; }  /* the section's heading already names the table */
.meta, .preamble, .legend, .notes, .missing { font-size: .8rem; color: #555; }
.notes { list-style: none; padding-left: 0; }
nav ul { columns: 2; font-size: .85rem; }
.table-scroll { overflow-x: auto; }
table.bench-table { border-collapse: collapse; font-size: .8rem; margin: .5rem 0; }
table.bench-table caption { font-weight: 600; text-align: left; padding: .3rem 0; }
table.bench-table th, table.bench-table td { border-top: 1px solid #ddd; padding: .2rem .5rem; text-align: left;
  white-space: nowrap; }
table.bench-table thead th { border-bottom: 2px solid #888; }
.figures { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: 0; border: 1px solid #e3e3e3; padding: .4rem; background: #fafafa; }
figure img { display: block; max-width: 640px; height: auto; }
figure img.pixels { image-rendering: pixelated; }  /* sample grids: sharp pixels, not blur */
figcaption { font-size: .75rem; color: #444; margin-top: .3rem; }
</style>
</head>
<body>
<h1>bench report</h1>
<p class="meta">{{ n_records }} record(s) under <code>{{ source }}</code> ({{ n_failed }} failed) ·
generated {{ generated }} · git {{ commits }}</p>
<nav><ul>
{% for s in sections %}<li><a href="#{{ s.anchor }}">{{ s.title }}</a></li>
{% endfor %}</ul></nav>
{% if published %}<h2 id="published">Published tables beside reproduced records</h2>
{% for table in published %}{{ table }}{% endfor %}{% endif %}
{% if not_reproduced %}<p class="missing">No records here reproduce: {{ not_reproduced }}.</p>{% endif %}
{% if deviations %}<h2 id="deviations">Deviations from the references</h2>
<p class="meta">What each model's recipe declares it does differently from its reference (its paper and
released code): the paper recipe what it keeps different on purpose, the tiny and small recipes what they cut.</p>
{% for d in deviations %}<h3>{{ d.model }} · {{ d.scale }}</h3>
{% if d.reference %}<p class="meta">reference: {{ d.reference }}</p>{% endif %}
{% if d.items %}<ul class="deviations">{% for item in d.items %}<li>{{ item }}</li>{% endfor %}</ul>
{% else %}<p class="meta">none declared</p>{% endif %}
{% endfor %}{% endif %}
{% for s in groups %}
<section class="group">
<h2 id="{{ s.anchor }}">{{ s.title }}</h2>
{{ s.table }}
{% for heading, figs in s.figures.items() %}
<h3>{{ heading }}</h3>
<div class="figures">
{% for f in figs %}<figure><img src="{{ f.src }}" alt="{{ heading }}: {{ f.caption }}"
{%- if heading == "Sample grids" %} class="pixels"{% endif %}>
<figcaption>{{ f.caption }}</figcaption></figure>
{% endfor %}</div>
{% endfor %}
{% for line in s.remarks %}<p class="missing">{{ line }}</p>{% endfor %}
</section>
{% endfor %}
</body>
</html>
"""


def build_report(results: str) -> str:
    """The report as one HTML string; raises UserError (nothing written) for a missing or bad results dir."""
    records = load_records(results)
    ok = [r for r in records if r.ok]
    published, missing = [], []
    for name in TABLES:
        spec = load_published(name).spec["reproduce"]
        smokes = any(r.suite == spec["suite"] and is_candidate(r, spec["data"], smoke=True) for r in ok)
        if groups_of(ok, spec["suite"], spec["data"]) or smokes:  # smokes: the table names what they left out
            published.append(Markup(render_views([published_view(name, records, results)], "html")))
        else:
            missing.append(f"{name} ({spec['suite']} on {spec['data']['name']})")
    groups = []
    for i, view in enumerate(results_views(records)):
        suite, data = view.keys["suite"], view.keys["data"]
        recs = [r for r in ok if r.suite == suite and r.data == data]
        figs = figures(recs)
        remarks = []
        if "OOD score histograms" in figs and "ROC curves" not in figs:
            remarks.append("No ROC curves: these OOD records were written before bench saved them; re-run the "
                           "ood suite to get them.")
        groups.append({"anchor": f"g{i}", "title": view.title, "table": Markup(render_views([view], "html")),
                       "figures": figs, "remarks": remarks})
    devs = deviations(ok)
    sections = ([{"anchor": "published", "title": "Published tables"}] if published else []) + \
        ([{"anchor": "deviations", "title": "Deviations from the references"}] if devs else []) + groups
    commits = sorted({str(r.env.get("git_commit") or "?")[:10] for r in records})
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(TEMPLATE).render(
        source=results, n_records=len(records), n_failed=len(records) - len(ok),
        generated=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), commits=", ".join(commits),
        sections=sections, published=published, not_reproduced="; ".join(missing), groups=groups, deviations=devs)

"""Tables: JEM Table 1 (and the calibration and OOD tables) beside reproduced records, in every format;
protocol mismatches flagged; bad input one line, exit 2, no file; the CIFAR-10 path end to end."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.cli import main
from bench.results.published import load_published, published_view
from bench.results.record import SCHEMA_VERSION, MetricEntry, Record
from bench.results.records import fingerprint, load_records, write_record
from bench.results.tables import FORMATS, flat, render_views, results_views

# JEM Table 1 as printed (arXiv:1912.03263), typed in independently of bench/published_tables/
TABLE1 = [
    ("Hybrid", "Residual Flow", "resflow", "70.3", "3.6", "46.4"),
    ("Hybrid", "Glow", "glow_hybrid", "67.6", "3.92", "48.9"),
    ("Hybrid", "IGEBM", "igebm", "49.1", "8.3", "37.9"),
    ("Hybrid", "JEM p(x|y) factored", "jem_factored", "30.1", "6.36", "61.8"),
    ("Hybrid", "JEM (Ours)", "jem", "92.9", "8.76", "38.4"),
    ("Disc.", "Wide-Resnet", "wrn", "95.8", "N/A", "N/A"),
    ("Gen.", "SNGAN", "sngan", "N/A", "8.59", "25.5"),
    ("Gen.", "NCSN", "ncsn", "N/A", "8.91", "25.32"),
]

PAPER_PROTOCOL = {
    "suite": "hybrid", "suite_version": "1", "scale": "paper", "metrics": ["accuracy", "is", "fid"],
    "data": {"name": "cifar10", "shape": [3, 32, 32], "n_classes": 10, "n_train": 50000, "n_test": 10000},
    "classifier": {"split": "test"},
    "feature_extractor": {"name": "inception-v3-compat@abc", "kind": "inception"},
    "samples": {"n": 50000}, "reference": {"split": "train", "n": 50000},
}
JPEG = "imagefolder:/data/cifar10-jpeg"
TINY_JPEG_PROTOCOL = {
    **PAPER_PROTOCOL, "scale": "tiny",
    "data": {"name": JPEG, "shape": [3, 32, 32], "n_classes": 10, "n_test": 2000, "lossy": True},
    "feature_extractor": {"name": "imagefolder-net@0123456789ab", "kind": "domain-classifier"},
    "samples": {"n": 200}, "reference": {"split": "test", "n": 2000},
}


def record(model="jem", suite="hybrid", data="cifar10", scale="paper", seed=0, protocol=None, metrics=None,
           skipped=None, status="ok", **extra) -> Record:
    protocol = dict(protocol or PAPER_PROTOCOL)
    protocol["fingerprint"] = fingerprint(protocol)
    entries = {k: {"value": v, "stderr": None, "std": None, "n": 1, "higher_is_better": k not in ("fid", "ece"),
                   "unit": ""} for k, v in (metrics or {}).items()}
    return Record.from_json({
        "schema_version": SCHEMA_VERSION, "run_id": f"r{seed}-{model}-{scale}", "status": status, "suite": suite,
        "suite_version": "1", "model": model, "family": "x", "model_config": {}, "data": data, "scale": scale,
        "seed": seed, "checkpoint": None, "train": {"seconds": 1.0}, "protocol": protocol, "metrics": entries,
        "skipped": skipped or {}, "env": {"git_commit": "abc"}, **extra})


def write_all(d: Path, records: list[Record]) -> Path:
    for r in records:
        write_record(r, d)
    return d


def table(name: str, results: Path | None, fmt: str, capsys) -> str:
    args = ["table", name, "--format", fmt] + (["--results", str(results)] if results else [])
    assert main(args) == 0
    return capsys.readouterr().out


def md_rows(text: str) -> list[dict[str, str]]:
    """The first Markdown table in ``text`` as dicts (cells unescaped)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    split = lambda ln: [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", ln)[1:-1]]  # noqa: E731
    header = split(lines[0])
    return [dict(zip(header, split(ln))) for ln in lines[2:]]


# --- published numbers ---------------------------------------------------------------------------
def test_markdown_reproduces_every_published_table1_number(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no results/ here: the published numbers alone
    rows = md_rows(table("cifar10", None, "markdown", capsys))
    assert [(r["Class"], r["Model"], r["bench model"]) for r in rows] == [t[:3] for t in TABLE1]
    for r, (*_, acc, is_, fid) in zip(rows, TABLE1):
        assert (r["Accuracy % ↑ published"], r["IS ↑ published"], r["FID ↓ published"]) == (acc, is_, fid)
        for col in ("Accuracy % ↑", "IS ↑", "FID ↓"):
            assert r[f"{col} reproduced"] == "—"
            assert r[f"{col} Δ"] == ("N/A" if r[f"{col} published"] == "N/A" else "—")


def test_calibration_and_ood_tables(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cal = md_rows(table("calibration", None, "markdown", capsys))
    assert [(r["Model"], r["bench model"], r["ECE (20 bins) % ↓ published"]) for r in cal] == [
        ("Baseline (Wide-ResNet)", "wrn", "22.32"), ("JEM", "jem", "4.87")]
    text = table("ood", None, "markdown", capsys)
    ood = md_rows(text)
    assert len(ood) == 11 and all(r["SVHN AUROC ↑ published"].endswith("*") for r in ood)  # all unverified
    jem = next(r for r in ood if r["Score"] == "log p(x)" and r["bench model"] == "jem")
    assert jem["SVHN AUROC ↑ published"] == "0.67*"
    assert "* unverified" in text


def test_reproduced_mean_std_and_delta(tmp_path, capsys):
    d = write_all(tmp_path / "res", [
        record(seed=0, metrics={"accuracy": 90.0, "is": 8.0, "fid": 40.0}),
        record(seed=1, metrics={"accuracy": 92.0, "is": 8.5, "fid": 42.0}),
        record(model="wrn", metrics={"accuracy": 96.0}, skipped={"is": "model has no Sampler",
                                                                 "fid": "model has no Sampler"}),
        record(model="jem", data="digits", metrics={"accuracy": 99.0}),  # other data: not a candidate
        record(model="jem", status="failed", seed=5, reason="diverged"),  # failed: ignored
    ])
    df = pd.read_csv(io.StringIO(table("cifar10", d, "csv", capsys)), dtype=str, keep_default_na=False)
    jem = df[df["bench model"] == "jem"].iloc[0]
    assert jem["run"] == "paper · cifar10 · seeds 0,1"
    assert jem["Accuracy % ↑ reproduced"] == "91.00 ± 1.41" and jem["Accuracy % ↑ Δ"] == "-1.90"
    assert jem["IS ↑ reproduced"] == "8.25 ± 0.35" and jem["IS ↑ Δ"] == "-0.51"
    assert jem["FID ↓ reproduced"] == "41.00 ± 1.41" and jem["FID ↓ Δ"] == "+2.60"
    assert jem["notes"] == ""  # the paper's protocol: nothing flagged
    wrn = df[df["bench model"] == "wrn"].iloc[0]
    assert (wrn["Accuracy % ↑ reproduced"], wrn["Accuracy % ↑ Δ"]) == ("96.00", "+0.20")
    assert (wrn["IS ↑ reproduced"], wrn["IS ↑ Δ"]) == ("N/A", "N/A")
    assert (df["bench model"] == "jem").sum() == 1


def test_other_protocols_are_flagged_and_never_averaged_with_the_paper_one(tmp_path, capsys):
    d = write_all(tmp_path / "res", [
        record(seed=0, metrics={"accuracy": 90.0, "is": 8.0, "fid": 40.0}),
        record(data=JPEG, scale="tiny", protocol=TINY_JPEG_PROTOCOL, metrics={"accuracy": 30.0, "is": 2.0,
                                                                             "fid": 200.0}),
        # a paper-scale run on the official files, but a domain extractor: IS/FID flagged, accuracy not
        record(model="igebm", protocol={**PAPER_PROTOCOL, "feature_extractor": {"name": "cifar10-net@ff",
                                                                                "kind": "domain-classifier"}},
               metrics={"accuracy": 50.0, "is": 8.0, "fid": 30.0}),
        record(data="imagefolder:/x/digits", protocol={**TINY_JPEG_PROTOCOL, "data": {"shape": [1, 8, 8],
                                                                                      "n_classes": 10}},
               metrics={"accuracy": 1.0}),  # not CIFAR-10-shaped: not a candidate
    ])
    view = published_view("cifar10", load_records(d), str(d))
    df = flat(view.frame)
    jem = df[df["bench model"] == "jem"]
    assert list(jem["run"]) == ["paper · cifar10 · seed 0", "tiny · imagefolder:…/data/cifar10-jpeg · seed 0"]
    ok, other = jem.iloc[0], jem.iloc[1]
    assert ok["Accuracy % ↑ reproduced"] == "90.00" and ok["notes"] == ""
    assert other["Accuracy % ↑ reproduced"] == "30.00 †" and other["FID ↓ Δ"] == "+161.60 †"
    assert other["Accuracy % ↑ published"] == "92.9"  # the published value stays beside every row
    note = other["notes"]
    for fragment in ("data imagefolder:/data/cifar10-jpeg (lossy JPEG) (paper: cifar10)",
                     "scale tiny (paper: paper)", "test images 2,000 (paper: 10,000) [Accuracy]",
                     "feature extractor domain-classifier imagefolder-net@0123456789ab (paper: inception) [IS, FID]",
                     "samples 200 (paper: 50,000) [IS, FID]", "reference split test (paper: train) [FID]"):
        assert fragment in note, note
    igebm = df[df["bench model"] == "igebm"].iloc[0]
    assert igebm["Accuracy % ↑ reproduced"] == "50.00" and igebm["IS ↑ reproduced"] == "8.00 †"
    assert "feature extractor domain-classifier cifar10-net@ff (paper: inception) [IS, FID]" in igebm["notes"]
    assert len(df) == len(TABLE1) + 1

    text = render_views([view], "markdown")
    assert "[1] protocol differs from the paper's" in text and "† measured under another protocol" in text


# --- formats -------------------------------------------------------------------------------------
@pytest.fixture
def reproduced(tmp_path) -> Path:
    return write_all(tmp_path / "res", [
        record(seed=0, metrics={"accuracy": 90.0, "is": 8.0, "fid": 40.0}),
        record(model="igebm", metrics={"accuracy": 50.0, "is": 9.5, "fid": 30.0}),
        record(data=JPEG, scale="tiny", protocol=TINY_JPEG_PROTOCOL, metrics={"accuracy": 30.0, "is": 2.0,
                                                                             "fid": 200.0}),
    ])


def test_latex_booktabs_and_bold_best(reproduced, tmp_path, capsys):
    text = table("cifar10", reproduced, "latex", capsys)
    for rule in ("\\toprule", "\\midrule", "\\bottomrule"):
        assert text.count(rule) == 1, rule
    # the best published value of each column in its direction (FID: lowest) ...
    for best in ("\\textbf{95.8}", "\\textbf{8.91}", "\\textbf{25.32}"):
        assert best in text
    assert text.count("\\textbf{") == 6
    # ... and of each reproduced column
    assert "\\textbf{90.00}" in text and "\\textbf{9.50}" in text and "\\textbf{30.00}" in text
    assert "\\multicolumn{3}{c}{Accuracy \\% $\\uparrow$}" in text
    assert "$\\dagger$" in text and "p(x\\textbar{}y)" in text  # | is a dash in pdflatex's default font
    assert not re.search(r"[^\x00-\x7f]", text), "pdflatex needs ASCII (symbols are mapped to LaTeX)"
    if shutil.which("pdflatex") is None:
        return  # structure only: no LaTeX here
    doc = tmp_path / "t.tex"
    doc.write_text("\\documentclass{article}\\usepackage{booktabs,multirow}\\usepackage[margin=5mm,landscape]"
                   "{geometry}\\begin{document}\\tiny\n" + text + "\\end{document}\n")
    res = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-2000:]
    assert (tmp_path / "t.pdf").stat().st_size > 0


def test_csv_round_trips_through_pandas(reproduced):
    view = published_view("cifar10", load_records(reproduced), str(reproduced))
    text = render_views([view], "csv")
    back = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(back, flat(view.frame))
    assert "protocol differs" in back["notes"].str.cat()


def test_html_and_rich(reproduced, capsys):
    html = table("cifar10", reproduced, "html", capsys)
    assert html.count("<table") == 1 and "font-weight: bold" in html and "JEM p(x|y) factored" in html
    assert "<script" not in html
    rich = table("cifar10", reproduced, "rich", capsys)
    assert "Table 1" in rich and "92.9" in rich and "[1] protocol differs" in rich


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_of_the_ad_hoc_table(reproduced, fmt, tmp_path, capsys):
    out = tmp_path / f"t.{fmt}"
    assert main(["table", str(reproduced), "--format", fmt, "--out", str(out)]) == 0
    assert capsys.readouterr().out == ""
    text = out.read_text()
    assert "igebm" in text and "9.50" in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("t.")] == [out.name]  # no temp file left
    if fmt == "csv":
        df = pd.read_csv(out)
        assert set(df["data"]) == {"cifar10", JPEG} and len(df) == 3


def test_ad_hoc_groups_keep_their_own_metrics_and_turn_when_wide(tmp_path):
    ood = {f"ood.{s}.{o}.{st}": 0.5 for s in ("log_px", "max_softmax") for o in ("a", "b")
           for st in ("auroc", "aupr_in", "aupr_out", "fpr95")}
    recs = load_records(write_all(tmp_path / "res", [
        record(metrics={"accuracy": 90.0, "is": 8.0, "fid": 40.0}),
        record(suite="ood", metrics=ood, data="digits"),
        record(suite="ood", model="wrn", data="digits", skipped={"ood.log_px": "model has no LogProb or Energy"},
               metrics={k: 0.7 for k in ood if "max_softmax" in k}),
    ]))
    hybrid, wide = results_views(recs)
    assert "ood.log_px.a.auroc" not in hybrid.frame.columns  # the other suite's metrics stay out
    assert wide.frame.index.name == "metric" and len(wide.frame) == 16  # a row per metric
    assert list(wide.frame.columns) == ["jem · paper · s0", "wrn · paper · s0", "notes"]
    row = wide.frame.loc["ood.log_px.a.auroc"]
    assert row["wrn · paper · s0"] == "N/A" and row["notes"] == "wrn: model has no LogProb or Energy"
    assert wide.best.loc["ood.max_softmax.a.auroc", "wrn · paper · s0"]  # 0.7 beats 0.5


# --- bad input: one line, exit 2, no file --------------------------------------------------------
def run_cli(args, capsys) -> tuple[int, str]:
    try:
        rc = main(args)
    except SystemExit as e:  # argparse errors
        rc = e.code
    err = capsys.readouterr().err
    return rc, err


def assert_one_line_error(rc, err, *fragments):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], lines[0]


def _bad_inputs(tmp: Path) -> list[tuple[list[str], list[str]]]:
    empty = tmp / "empty"
    empty.mkdir()
    mixed = write_all(tmp / "mixed", [record(seed=0, metrics={"accuracy": 1.0})])
    newer = {**record(seed=1, metrics={"accuracy": 1.0}).to_json(), "schema_version": SCHEMA_VERSION + 1}
    (mixed / "newer.json").write_text(json.dumps(newer))
    unreadable = tmp / "unreadable"
    (unreadable / "x.json").mkdir(parents=True)  # a directory named like a record is not one
    broken = tmp / "broken"
    broken.mkdir()
    (broken / "r.json").write_text('{"schema_version": 1, "suite":')
    return [
        (["table", str(empty)], ["no records (*.json) under", str(empty)]),
        (["table", "cifar10", "--results", str(empty)], ["no records (*.json) under"]),
        (["table", str(tmp / "nowhere")], ["does not exist"]),
        (["table", "cifar10", "--results", str(tmp / "nowhere")], ["does not exist"]),
        (["table", str(mixed)], [f"schema_version {SCHEMA_VERSION + 1} is not one this bench reads (1 or 2)"]),
        (["table", "cifar10", "--results", str(mixed)], [f"schema_version {SCHEMA_VERSION + 1}"]),
        (["table", str(unreadable)], ["no records (*.json) under", str(unreadable)]),
        (["table", str(broken)], ["not valid JSON"]),
        (["table", "nope"], ["unknown table 'nope'", "cifar10, calibration, ood"]),
        (["table", "cifar10", "--format", "docx"], ["invalid choice: 'docx'", "markdown"]),
        (["table", str(mixed), "--results", str(mixed)], ["--results goes with a published table"]),
        (["report", str(empty)], ["no records (*.json) under"]),
        (["report", str(mixed)], [f"schema_version {SCHEMA_VERSION + 1}"]),
        (["report", str(tmp / "nowhere")], ["does not exist"]),
    ]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for args, fragments in _bad_inputs(tmp_path):
        rc, err = run_cli([*args, "--out", str(out_dir / "t.txt")], capsys)
        assert_one_line_error(rc, err, *fragments)
        assert list(out_dir.iterdir()) == [], args


def test_unwritable_out_is_one_line(reproduced, tmp_path, capsys):
    rc, err = run_cli(["table", "cifar10", "--results", str(reproduced), "--out", str(tmp_path / "no" / "t.md")],
                      capsys)
    assert_one_line_error(rc, err, "cannot write")
    assert not (tmp_path / "no").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any directory: permissions cannot make one unreadable")
def test_unreadable_results_dir(reproduced, capsys):
    reproduced.chmod(0)
    try:
        rc, err = run_cli(["table", str(reproduced)], capsys)
    finally:
        reproduced.chmod(0o755)
    assert_one_line_error(rc, err, "cannot read results directory")


# --- the CIFAR-10 path ---------------------------------------------------------------------------
@pytest.mark.slow  # ~45 s on 2 busy cores: trains the domain extractor, jem and wrn on the fixture
def test_hybrid_on_cifar10_in_torchvision_format_feeds_table1(tmp_path, capsys):
    try:
        from data_fixtures import write_cifar10
    except ImportError:  # tests/ is a package in some runners' layouts
        from tests.data_fixtures import write_cifar10

    write_cifar10(tmp_path / "data" / "cifar-10-batches-py", np.random.default_rng(0), per_batch=40, n_test=100)
    out = tmp_path / "res"
    rc = main(["run", "suite=hybrid", "data=cifar10", f"data.root={tmp_path / 'data'}", "scale=tiny",
               "models=[jem,wrn]", f"out={out}"])
    capsys.readouterr()
    assert rc == 0
    records = load_records(out)
    assert {r.data for r in records} == {"cifar10"} and all(r.ok for r in records)
    df = pd.read_csv(io.StringIO(table("cifar10", out, "csv", capsys)), dtype=str, keep_default_na=False)
    for model in ("jem", "wrn"):
        row = df[df["bench model"] == model].iloc[0]
        assert row["run"] == "tiny · cifar10 · seed 0"
        assert row["Accuracy % ↑ reproduced"].endswith(" †")
        assert "scale tiny (paper: paper)" in row["notes"] and "test images 100 (paper: 10,000)" in row["notes"]
    jem = df[df["bench model"] == "jem"].iloc[0]
    assert jem["FID ↓ reproduced"].endswith(" †") and jem["FID ↓ Δ"].endswith(" †")
    for fragment in ("feature extractor domain-classifier cifar10-net@", "samples 200 (paper: 50,000)",
                     "reference split test (paper: train)"):
        assert fragment in jem["notes"]
    assert "lossy" not in jem["notes"] and "data " not in jem["notes"]  # the official format: data matches


def test_published_files_have_citations_and_reproduce_blocks():
    for name in ("cifar10", "calibration", "ood"):
        pub = load_published(name)
        assert pub.spec["citation"]["arxiv"] == "1912.03263"
        assert pub.spec["reproduce"]["suite"] in ("hybrid", "calibration", "ood")


def test_bounds_and_estimates_are_marked_in_cells():
    from bench.results.tables import format_value

    def entry(**extra):
        return MetricEntry(2.0, False, stderr=0.01, extra={"bound": False, "estimate": False, **extra})

    assert format_value(entry()) == "2.00 ± 0.01"
    assert format_value(entry(bound=True)) == "≤ 2.00 ± 0.01"  # IWAE-k bits/dim: the true value is ≤
    assert format_value(entry(estimate=True)) == "≈ 2.00 ± 0.01"  # AIS log Z
    assert format_value(entry(levelled_off=False)) == "2.00 ± 0.01 (not converged)"
    # AutoAttack's cell carries PGD's figure on the same images, the only PGD figure it may be compared with
    assert format_value(entry(pgd_same_images=3.0)) == "2.00 ± 0.01 (PGD same images 3.00)"
    assert format_value(None) == "N/A"


def _ood_record(model: str, seed: int = 0, scores=("log_px", "max_softmax"), status="ok") -> Record:
    metrics = {f"ood.{s}.{o}.{stat}": MetricEntry(0.5 + 0.01 * i, stat != "fpr95")
               for i, (s, o, stat) in enumerate((s, o, stat) for s in scores for o in ("uniform", "interp", "npz:/a.b")
                                                 for stat in ("auroc", "aupr_in", "aupr_out", "fpr95"))}
    skipped = {"ood.grad_norm": "model has no LogProb or Energy", "ood.*.svhn": "dataset 'svhn' not found; ..."}
    return Record(run_id=f"{model}{seed}", suite="ood", model=model, data="digits", scale="tiny", seed=seed,
                  status=status, protocol={"fingerprint": "f"}, reason="boom" if status == "failed" else None,
                  metrics=metrics if status == "ok" else {}, skipped=skipped if status == "ok" else {},
                  train={"seconds": 1.0})


def test_a_wide_run_table_shows_the_headline_as_the_paper_lays_it_out(monkeypatch):
    """OOD's 24+ values per record: the terminal shows AUROC in a table per score, a row per model and a
    column per set; an N/A reason shared by the models (an absent real set) is numbered once."""
    from rich.console import Console

    import bench.results.tables as tables

    recs = [_ood_record("jem"), _ood_record("wrn", scores=("max_softmax",)), _ood_record("vae", status="failed")]
    t = tables.terminal_tables(recs)
    assert list(t.main["model"]) == ["jem", "wrn", "vae"] and not any(c.startswith("ood") for c in t.main.columns)
    assert [title for title, _ in t.groups] == ["OOD ↑ · log_px · auroc by OOD set",
                                                 "OOD ↑ · max_softmax · auroc by OOD set"]
    log_px, max_softmax = (df for _, df in t.groups)
    assert list(log_px.columns) == ["model", "seed", "uniform", "interp", "npz:/a.b"]
    assert list(log_px["model"]) == ["jem"] and list(max_softmax["model"]) == ["jem", "wrn"]
    assert log_px.iloc[0]["uniform"] == "0.50"
    assert "aupr_in, aupr_out, fpr95" in t.lines[0]

    buf = io.StringIO()
    monkeypatch.setattr(tables, "out", Console(file=buf, width=150))
    tables.print_terminal_tables(t, "ood", drop=("suite", "data", "scale", "seed"))
    text = buf.getvalue()
    assert text.count("dataset 'svhn' not found") == 1 and "[1,2]" in text  # jem's and wrn's share note 2
    assert "boom" in text  # the failed record's reason


def test_a_narrow_run_table_keeps_a_column_per_metric():
    from bench.results.tables import terminal_tables

    rec = Record(run_id="r", suite="hybrid", model="wrn", data="digits", scale="tiny", seed=0, status="ok",
                 protocol={"fingerprint": "f"}, metrics={"accuracy": MetricEntry(99.0, True)},
                 skipped={"fid": "model has no Sampler"}, train={})
    t = terminal_tables([rec])
    assert "accuracy" in t.main.columns and "fid" in t.main.columns and t.main.iloc[0]["fid"] == "N/A"
    assert not t.groups and not t.lines

"""The paper-scale smoke (``bench run scale=paper smoke=N``): the exact paper recipe for N steps with its CPU
cuts recorded; never a reproduction in any table or the report; ``data.hflip`` for generic data. The slow
test runs the smoke of every Table 1 model on CIFAR-format fixture data."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import smoke
from bench.cli import main
from bench.config import load_config
from bench.plan import plan
from bench.results.published import published_view
from bench.results.record import SCHEMA_VERSION, Record
from bench.results.records import fingerprint, load_records, read_record, write_record
from bench.results.report import build_report
from bench.results.tables import render_views, results_views

try:
    from data_fixtures import write_cifar10
except ImportError:  # tests/ is a package in some runners' layouts
    from tests.data_fixtures import write_cifar10

TABLE1 = ("jem", "jem_factored", "wrn", "igebm", "glow_hybrid", "resflow", "sngan", "ncsn")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root / "cifar-10-batches-py", np.random.default_rng(0), per_batch=8, n_test=20)  # 40 + 20
    return root


def _one_line_exit_2(args: list[str], capsys, *fragments: str) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(f in err for f in fragments), err


def test_bad_smoke_settings_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, cifar_root):
    out = tmp_path / "out"
    base = ["run", "model=wrn", "data=cifar10", f"data.root={cifar_root}", f"out={out}"]
    _one_line_exit_2([*base, "smoke=2"], capsys, "add scale=paper")
    _one_line_exit_2([*base, "scale=paper", "smoke=0"], capsys, "smoke=0", ">= 1")
    _one_line_exit_2([*base, "scale=paper", "smoke=1", f"checkpoint={tmp_path / 'x.pt'}"], capsys,
                     "takes no checkpoint=")
    _one_line_exit_2([*base, "data.hflip=false"], capsys, "data.hflip=", "cifar10", "drop data.hflip")
    assert not out.exists()


def test_smoke_plan_shrinks_what_the_models_declare_and_keeps_opts(cifar_root):
    args = ["suite=hybrid", "data=cifar10", f"data.root={cifar_root}", "scale=paper", "smoke=3", "device=cpu"]
    p = plan(load_config([*args, "models=[jem,wrn]"]))
    assert p.configs["jem"].batch_size == 2 and p.configs["jem"].sample_rounds == 157
    assert p.configs["jem"].depth == 28 and p.configs["jem"].sgld_steps == 20  # the rest is the paper recipe
    assert p.smoke_shrunk["jem"]["batch_size"] == {"paper": 64, "smoke": 2}
    assert p.configs["wrn"].batch_size == 2 and p.n_samples == smoke.SAMPLES
    assert (len(p.data.train), len(p.data.test)) == (40, 20)
    kept = plan(load_config([*args, "model=jem", "opts.batch_size=64", "n_samples=30"]))
    assert kept.configs["jem"].batch_size == 64 and "batch_size" not in kept.smoke_shrunk["jem"]
    assert kept.n_samples == 30


def test_generic_data_declares_hflip(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), y=np.arange(40) % 4)
    args = ["suite=hybrid", "model=jem", f"data=npz:{tmp_path / 'd.npz'}", "scale=paper", "device=cpu"]
    plain = plan(load_config(args))
    flipped = plan(load_config([*args, "data.hflip=true"]))
    assert plain.data.hflip is False and plain.configs["jem"].augment.flip is False
    assert flipped.data.hflip is True and flipped.configs["jem"].augment.flip is True
    assert flipped.data.describe()["hflip"] is True  # in the protocol's data, so in the fingerprint
    assert flipped.configs["jem"].augment.pad == 4


# --- tables and the report never show a smoke as a reproduction ----------------------------------------
PAPER = {"suite": "hybrid", "scale": "paper", "data": {"name": "cifar10", "shape": [3, 32, 32], "n_classes": 10,
                                                      "n_test": 10000},
         "classifier": {"split": "test"}, "feature_extractor": {"kind": "inception"}, "samples": {"n": 50000},
         "reference": {"split": "train"}}
SMOKE = {"steps": 2, "shrunk": {"batch_size": {"paper": 64, "smoke": 2}}, "data": {"n_train": 200, "n_test": 20},
         "n_samples": 20, "note": smoke.NOTE}


def _record(model: str, deviations: list[str], smoke_of=None, seed: int = 0) -> Record:
    protocol = {**PAPER, **({"smoke": smoke_of} if smoke_of else {})}
    protocol["fingerprint"] = fingerprint(protocol)
    metrics = {"accuracy": 91.0, "is": 8.0, "fid": 40.0}
    r = {"schema_version": SCHEMA_VERSION, "run_id": f"r-{model}-{seed}-{bool(smoke_of)}", "status": "ok",
         "suite": "hybrid", "suite_version": "2", "model": model, "family": "x",
         "model_config": {"batch_size": 2 if smoke_of else 64, "deviations": deviations, "reference": f"{model} ref"},
         "data": "cifar10", "scale": "paper", "seed": seed, "checkpoint": None, "train": {"seconds": 1.0},
         "protocol": protocol, "skipped": {}, "env": {"git_commit": "abc"},
         "metrics": {k: {"value": v, "stderr": None, "std": None, "n": 10, "higher_is_better": k != "fid",
                         "unit": ""} for k, v in metrics.items()}}
    if smoke_of:
        r["smoke"] = smoke_of
    return Record.from_json(r)


@pytest.fixture
def mixed(tmp_path) -> Path:
    d = tmp_path / "res"
    write_record(_record("jem", ["kept A", "batch_size=2 (paper: 64): minutes on a CPU"], SMOKE), d)
    write_record(_record("wrn", ["kept W"]), d)  # a real paper-scale run
    write_record(_record("wrn", ["kept W", "batch_size=2 (paper: 64): minutes on a CPU"], SMOKE), d)
    return d


def test_cifar10_table_never_shows_a_smoke_as_a_reproduction(mixed, capsys):
    assert main(["table", "cifar10", "--results", str(mixed), "--format", "csv"]) == 0
    df = pd.read_csv(io.StringIO(capsys.readouterr().out), dtype=str, keep_default_na=False)
    jem = df[df["bench model"] == "jem"]
    assert len(jem) == 1 and jem.iloc[0]["run"] == "—" and jem.iloc[0]["Accuracy % ↑ reproduced"] == "—"
    assert "kept A" in jem.iloc[0]["notes"] and "batch_size" not in jem.iloc[0]["notes"]  # the paper recipe's own
    wrn = df[df["bench model"] == "wrn"]
    assert len(wrn) == 1 and wrn.iloc[0]["Accuracy % ↑ reproduced"] == "91.00"  # the real run only
    assert "kept W" in wrn.iloc[0]["notes"]
    assert main(["table", "cifar10", "--results", str(mixed), "--format", "markdown"]) == 0
    text = capsys.readouterr().out
    body = text.split("| Class")[1].split("\n\n")[0]  # the table's rows
    assert "Left out: 2 paper-scale smoke record(s)" in text and "smoke" not in body
    assert "departs from its reference: kept A" in text


def test_deviations_are_numbered_footnotes_of_each_row(mixed):
    view = published_view("cifar10", load_records(mixed), str(mixed))
    marked, notes = view.footnoted()
    assert any("kept W" in n for n in notes) and any("kept A" in n for n in notes)
    rows = marked.reset_index()
    wrn_mark = rows[rows["bench model"] == "wrn"][("notes", "")].iloc[0]
    assert wrn_mark.startswith("[") and "kept W" in notes[int(wrn_mark.strip("[]").split(",")[-1]) - 1]
    assert "<li>" in render_views([view], "html") and "kept W" in render_views([view], "latex")


def test_run_tables_and_the_report_mark_smokes_and_list_deviations(mixed):
    (view,) = results_views(load_records(mixed))
    scales = list(view.frame["scale"])
    assert scales.count("paper (smoke: 2 steps)") == 2 and scales.count("paper") == 1
    _, notes = view.footnoted()
    assert any(n.startswith("smoke: the paper recipe for 2 training step(s)") and "never a reproduction" in n
               for n in notes)
    html = build_report(str(mixed))
    dev = html.split('id="deviations"')[1].split("</section>")[0].split('<section class="group">')[0]
    for fragment in ("jem · paper (smoke: 2 steps)", "kept A", "wrn · paper", "kept W", "reference: wrn ref"):
        assert fragment in dev, fragment


# --- the smoke of every Table 1 model, on CIFAR-format fixture data ------------------------------------
@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory, cifar_root) -> Path:
    return tmp_path_factory.mktemp("smoke-results")


# WRN-28-10 (jem, jem_factored) on a CPU: ~30 s each at batch 2 on 2 idle cores; wrn's smoke (~15 s) runs
# every time, the others are slow
@pytest.mark.parametrize("model", [m if m == "wrn" else pytest.param(m, marks=pytest.mark.slow) for m in TABLE1])
def test_paper_smoke_runs_every_table1_model(model, cifar_root, smoke_results, tmp_path_factory):
    env = {**os.environ, "BENCH_CACHE": str(tmp_path_factory.getbasetemp() / "smoke-cache"), "BENCH_QUIET": "1",
           "PYTHONPATH": str(ROOT)}
    args = ["suite=hybrid", f"model={model}", "data=cifar10", f"data.root={cifar_root}", "scale=paper", "smoke=1",
            "device=cpu", f"out={smoke_results / model}"]
    # a subprocess with a deadline: a recipe that ignores the smoke's cuts must not hold CI for hours
    done = subprocess.run([sys.executable, "-m", "bench", "run", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    (path,) = (smoke_results / model).glob("*.json")
    r = json.loads(path.read_text())
    assert r["status"] == "ok" and r["scale"] == "paper" and r["train"]["steps"] == 1
    assert r["smoke"]["steps"] == 1 and r["protocol"]["smoke"] == r["smoke"]
    assert r["checkpoint"]["path"] is None  # never cached
    assert isinstance(r["model_config"]["deviations"], list) and r["model_config"]["reference"]
    # and no table shows it as a reproduction
    view = published_view("cifar10", [read_record(path)], "x")
    df = pd.read_csv(io.StringIO(render_views([view], "csv")), dtype=str, keep_default_na=False)
    row = df[df["bench model"] == model]
    assert len(row) == 1 and row.iloc[0]["run"] == "—"
    assert all(v in ("—", "N/A") for k, v in row.iloc[0].items() if k.endswith("reproduced"))


def test_the_gate_never_compares_a_smoke_with_a_real_run():
    from bench.results import gate

    real, smoked = _record("wrn", ["kept W"]), _record("wrn", ["kept W"], SMOKE)
    report = gate.compare([real], [smoked])
    assert report.exit_code == 2  # incomparable: the smoke's protocol (and fingerprint) differs
    assert all(r.verdict == "incomparable" and "smoke" in r.note for r in report.rows)

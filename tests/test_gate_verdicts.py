"""Gate verdicts that must never pass silently (failed seeds, NaN, missing metrics, directions from the
registry), and every malformed input to compare/table/report/baseline update: one line, exit 2."""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.errors import UserError
from bench.results import gate
from bench.results.baselines import update_baselines
from bench.results.record import SCHEMA_VERSION, Record
from bench.results.records import fingerprint, write_record
from bench.results.tables import markdown_table, md_escape

PROTOCOL = {"suite": "ood", "suite_version": "1", "sets": ["uniform"]}


def rec(seed=0, model="jem", status="ok", **metrics):
    protocol = {**copy.deepcopy(PROTOCOL), "fingerprint": fingerprint(PROTOCOL)}
    ms = {k: {"value": v, "stderr": None, "std": None, "n": 100, "unit": "",
              "higher_is_better": not k.endswith("fpr95")} for k, v in metrics.items()}
    return {"schema_version": SCHEMA_VERSION, "run_id": f"r{seed}{model}", "status": status, "suite": "ood",
            "suite_version": "1", "model": model, "data": "digits", "scale": "tiny", "seed": seed,
            "protocol": protocol, "metrics": ms, "env": {}, "finished_at": f"2026-01-0{seed + 1}T00:00:00+00:00"}


def as_records(dicts: list[dict]) -> list[Record]:
    """The records of JSON objects, each as if read from a file named after its run id."""
    return [Record.from_json(d, path=Path(f"{d['run_id']}.json")) for d in dicts]


def compare(baseline: list[dict], candidate: list[dict], **kw) -> gate.Report:
    return gate.compare(as_records(baseline), as_records(candidate), **kw)


AUROC, FPR = "ood.log_px.uniform.auroc", "ood.log_px.uniform.fpr95"


def base():
    return [rec(s, **{AUROC: 0.90 + 0.01 * s, FPR: 0.30 + 0.01 * s}) for s in (0, 1)]


def test_a_failed_candidate_seed_is_a_regression_even_when_the_others_pass():
    cand = base()
    failed = rec(2, status="failed")
    failed["reason"] = "SGLD diverged"
    report = compare(base(), cand + [failed])
    assert report.exit_code == 1
    row = next(r for r in report.rows if r.verdict == "failed")
    assert "1 of 3 candidate seed(s) failed" in row.note and "SGLD diverged" in row.note


@pytest.mark.parametrize("side", ["candidate", "baseline"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_value_on_either_side_is_a_regression(side, bad):
    b, c = base(), base()
    (c if side == "candidate" else b)[0]["metrics"][AUROC]["value"] = bad
    report = compare(b, c)
    assert report.exit_code == 1
    row = next(r for r in report.rows if r.metric == AUROC)
    assert row.verdict == "regressed" and side in row.note


def test_a_model_without_baseline_is_a_regression_until_approved():
    report = compare(base(), base() + [rec(0, model="wrn", **{AUROC: 0.9})])
    assert report.exit_code == 1
    assert "bench baseline update" in next(r.note for r in report.rows if r.model == "wrn")


def test_direction_comes_from_the_registry_not_the_record():
    # a worse (higher) fpr95 is a regression even if both records were written claiming higher-is-better
    b, c = base(), base()
    for r in c:
        r["metrics"][FPR]["value"] += 0.3
    assert next(r for r in compare(b, c).rows if r.metric == FPR).verdict == "regressed"
    for r in b + c:
        r["metrics"][FPR]["higher_is_better"] = True
    with pytest.raises(UserError, match="lower-is-better"):
        compare(b, c)


def test_an_unregistered_metric_is_a_user_error():
    b, c = base(), base()
    for r in b + c:
        r["metrics"]["made_up"] = {"value": 1.0, "higher_is_better": True}
    with pytest.raises(UserError, match="not a registered metric"):
        compare(b, c)


def test_latest_keeps_the_newest_rerun():
    old, new = rec(0, **{AUROC: 0.5, FPR: 0.3}), rec(3, **{AUROC: 0.91, FPR: 0.3})
    new.update(seed=0, run_id="r0-rerun")  # a re-run of seed 0, finished later
    with pytest.raises(UserError, match="--latest"):
        compare(base(), [old, new])
    report = compare(base(), [old, new, base()[1]], latest=True)
    assert report.dropped_candidate == 1 and report.exit_code == 0
    assert "left out 1 older re-run" in gate.markdown(report)


def _write(records, d):
    d.mkdir(parents=True, exist_ok=True)
    for r in records:
        write_record(Record.from_json(r), d)
    return d


@pytest.mark.parametrize("field, value", [("suite", "/tmp/x"), ("suite", "../../escape"), ("scale", "../up"),
                                          ("data", "../../d"), ("model", "/abs/m")])
def test_baseline_update_never_writes_outside_dest(tmp_path, field, value):
    r = rec(0, **{AUROC: 0.9})
    r[field] = value
    results = _write([r], tmp_path / "results")
    dest = tmp_path / "sub" / "baselines"
    (line,) = update_baselines(str(results), str(dest))
    written = [p for p in tmp_path.rglob("*.json") if not p.is_relative_to(results)]
    assert len(written) == 1 and written[0].resolve().is_relative_to(dest.resolve()), (line, written)


def test_baseline_update_refuses_non_finite_values(tmp_path):
    r = rec(0, **{AUROC: 0.9})
    results = tmp_path / "results"
    results.mkdir()
    (results / "r.json").write_text(json.dumps(r).replace('"value": 0.9', '"value": NaN'))
    with pytest.raises(UserError, match="non-finite"):
        update_baselines(str(results), str(tmp_path / "b"))
    assert not (tmp_path / "b").exists()


def test_markdown_makes_html_inert():
    report = compare(base(), [rec(0, model='<script>alert(1)</script><img src=x onerror=alert(2)>',
                                       **{AUROC: 0.9})])
    md = gate.markdown(report)
    assert "<script>" not in md and "<img" not in md and "&lt;script&gt;" in md
    assert md_escape("a<b>&c\nd") == "a&lt;b&gt;&amp;c d"
    import pandas as pd

    assert "\\|" in markdown_table(pd.DataFrame({"m|x": ["a|b"]}))


# --- malformed records, for every command that reads them ------------------------------------------------
class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def bench_in_process(capsys, *args) -> Result:
    """The CLI's own entry point in this process (a subprocess per case would cost seconds of imports)."""
    from bench.cli import main

    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return Result(code, out.out, out.err)


def bench(*args):
    env = {**os.environ, "BENCH_QUIET": "1"}
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _good() -> dict:
    return rec(0, **{AUROC: 0.9, FPR: 0.3})


def _malformed_texts() -> dict[str, str]:
    cases = {}
    for name, mutate in {
        "huge_int": lambda r: r["metrics"][AUROC].update(value=10**400),
        "string_value": lambda r: r["metrics"][AUROC].update(value="0.9"),
        "null_value": lambda r: r["metrics"][AUROC].update(value=None),
        "list_value": lambda r: r["metrics"][AUROC].update(value=[0.9]),
        "bool_value": lambda r: r["metrics"][AUROC].update(value=True),
        "no_direction": lambda r: r["metrics"][AUROC].pop("higher_is_better"),
        "metrics_missing": lambda r: r.pop("metrics"),
        "metrics_list": lambda r: r.update(metrics=[1, 2]),
        "model_missing": lambda r: r.pop("model"),
        "model_int": lambda r: r.update(model=7),
        "protocol_missing": lambda r: r.pop("protocol"),
        "protocol_string": lambda r: r.update(protocol="x"),
        "seed_string": lambda r: r.update(seed="0"),
        "seed_huge": lambda r: r.update(seed=2**80),
        "status_other": lambda r: r.update(status="maybe"),
        "env_list": lambda r: r.update(env=[]),
    }.items():
        r = _good()
        mutate(r)
        cases[name] = json.dumps(r)
    cases["deeply_nested"] = json.dumps({**_good(), "env": {}})[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    cases["top_level_list"] = "[1, 2]"
    cases["not_json"] = "{oops"
    cases["binary"] = "\x00\xff\xfe"
    return cases


def test_a_malformed_record_is_one_line_from_the_real_command(tmp_path):
    bad = _write([], tmp_path / "bad")
    (bad / "r.json").write_text(MALFORMED["deeply_nested"])
    res = bench("table", str(bad))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr[-2000:]


MALFORMED = _malformed_texts()


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_every_reader_refuses_a_malformed_record_in_one_line(tmp_path, capsys, case):
    good = _write([rec(1, **{AUROC: 0.9, FPR: 0.3})], tmp_path / "good")
    bad = _write([], tmp_path / "bad")
    (bad / "r.json").write_text(MALFORMED[case])
    for args in (["compare", str(good), str(bad)], ["compare", str(bad), str(good)], ["table", str(bad)],
                 ["report", str(bad), "--out", str(tmp_path / "r.html")],
                 ["baseline", "update", str(bad), "--dest", str(tmp_path / "b")]):
        res = bench_in_process(capsys, *args)
        assert res.returncode == 2, (args, res.stdout[-500:], res.stderr[-2000:])
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "r.html").exists() and not (tmp_path / "b").exists()


def test_a_fifo_named_json_does_not_hang_the_table(tmp_path):
    d = _write([rec(0, **{AUROC: 0.9, FPR: 0.3})], tmp_path / "res")
    os.mkfifo(d / "trap.json")
    res = bench("table", str(d), "--format", "markdown")
    assert res.returncode == 0, res.stderr
    assert "jem" in res.stdout


@pytest.mark.parametrize("args", [["--k", "nan"], ["--k", "-1"], ["--k", "inf"], ["--tol", "fid:nan%"],
                                  ["--tol", ":5%"], ["--markdown", "/proc/nope/x.md"]])
def test_bad_compare_options_are_one_line(tmp_path, capsys, args):
    good = _write([rec(1, **{AUROC: 0.9, FPR: 0.3})], tmp_path / "good")
    res = bench_in_process(capsys, "compare", str(good), str(good), *args)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr

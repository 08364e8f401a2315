"""The regression gate: planted regressions are caught, seed noise passes, mismatches are incomparable."""

import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.errors import UserError
from bench.results import gate
from bench.results.baselines import update_baselines
from bench.results.record import MetricEntry, Record
from bench.results.records import fingerprint, write_record

PROTOCOL = {"suite": "hybrid", "suite_version": "1", "samples": {"n": 2000}, "reference": {"split": "test"}}


def rec(model="jem", seed=0, suite="hybrid", **metrics):
    protocol = copy.deepcopy(PROTOCOL)
    protocol["fingerprint"] = fingerprint(protocol)
    dirs = {"accuracy": True, "is": True, "fid": False, "ece": False}
    ms = {}
    for k, v in metrics.items():
        value, stderr = v if isinstance(v, tuple) else (v, None)
        ms[k] = MetricEntry(value, dirs[k], stderr=stderr, n=360)
    return Record(run_id=f"r{seed}{model}{len(ms)}", status="ok", suite=suite, suite_version="1", model=model,
                  data="digits", scale="small", seed=seed, protocol=protocol, metrics=ms, env={"device_name": "cpu-x"},
                  path=Path(f"{model}-{seed}"))


BASE = [rec(seed=0, accuracy=(97.5, 0.8), fid=4.4, ece=3.0)]


def verdicts(report):
    return {r.metric: r.verdict for r in report.rows}


def test_identical_runs_pass():
    report = gate.compare(BASE, copy.deepcopy(BASE))
    assert report.exit_code == 0
    assert set(verdicts(report).values()) == {"unchanged"}


def test_fid_worse_by_30_percent_is_caught():
    report = gate.compare(BASE, [rec(accuracy=(97.5, 0.8), fid=4.4 * 1.3, ece=3.0)])
    assert report.exit_code == 1 and verdicts(report)["fid"] == "regressed"
    assert "single seed" in next(r.note for r in report.rows if r.metric == "fid")


def test_accuracy_down_3_points_is_caught_despite_its_stderr():
    report = gate.compare(BASE, [rec(accuracy=(94.5, 0.9), fid=4.4, ece=3.0)])
    assert report.exit_code == 1 and verdicts(report)["accuracy"] == "regressed"


def test_ece_up_5_points_is_caught():
    report = gate.compare(BASE, [rec(accuracy=(97.5, 0.8), fid=4.4, ece=8.0)])
    assert report.exit_code == 1 and verdicts(report)["ece"] == "regressed"


def test_a_metric_missing_on_either_side_is_a_regression():
    report = gate.compare(BASE, [rec(accuracy=(97.5, 0.8), ece=3.0, **{"is": 9.0})])
    v = verdicts(report)
    assert report.exit_code == 1 and v["fid"] == "missing" and v["is"] == "missing"
    assert "missing from the baseline" in next(r.note for r in report.rows if r.metric == "is")
    assert "missing from the candidate" in next(r.note for r in report.rows if r.metric == "fid")


def test_failed_candidate_is_a_regression():
    report = gate.compare(BASE, [rec().failed("sampler diverged")])
    assert report.exit_code == 1 and "sampler diverged" in report.rows[0].note


def test_direction_improvement_is_not_a_regression():
    report = gate.compare(BASE, [rec(accuracy=(99.0, 0.5), fid=2.0, ece=1.0)])
    assert report.exit_code == 0 and set(verdicts(report).values()) == {"improved", "unchanged"}
    assert verdicts(report)["fid"] == "improved"


def test_seed_noise_within_k_standard_errors_passes():
    base = [rec(seed=s, accuracy=(a, 0.8), fid=f) for s, a, f in [(0, 97.5, 4.4), (1, 96.4, 5.1), (2, 97.8, 3.9)]]
    cand = [rec(seed=s, accuracy=(a, 0.8), fid=f) for s, a, f in [(3, 96.9, 4.9), (4, 97.2, 4.2), (5, 96.1, 5.3)]]
    report = gate.compare(base, cand)
    assert report.exit_code == 0, [(r.metric, r.verdict, r.delta, r.threshold) for r in report.rows]
    # the same shift with no noise at all would be beyond the 5% FID tolerance
    assert gate.compare([base[0]], [rec(accuracy=(97.5, 0.8), fid=5.3)]).exit_code == 1


def test_a_lucky_tie_between_seeds_does_not_make_the_gate_hypersensitive():
    """Two seeds with identical accuracy have zero spread; the records' stderr still floors the noise."""
    base = [rec(seed=s, accuracy=(99.44, 0.39)) for s in (0, 1)]
    cand = [rec(seed=s, accuracy=(a, 0.45)) for s, a in ((2, 98.9), (3, 98.6))]
    report = gate.compare(base, cand)
    assert report.exit_code == 0, [(r.metric, r.delta, r.threshold) for r in report.rows]
    # a real 3-point drop is still caught
    assert gate.compare(base, [rec(seed=s, accuracy=(96.4, 0.9)) for s in (2, 3)]).exit_code == 1


def test_tolerances_absolute_relative_and_overrides():
    assert gate.Tolerance.parse("5%").absolute(40.0) == pytest.approx(2.0)
    assert gate.Tolerance.parse("0.5").absolute(40.0) == 0.5
    for bad in ("x", "-1", "nan%"):
        with pytest.raises(UserError):
            gate.Tolerance.parse(bad)
    worse = [rec(accuracy=(97.5, 0.8), fid=4.4 * 1.3, ece=3.0)]
    loose = gate.compare(BASE, worse, overrides=gate.parse_tol_overrides(["fid:50%"]))
    assert loose.exit_code == 0
    with pytest.raises(UserError):
        gate.parse_tol_overrides(["fid"])


def test_protocol_mismatch_is_incomparable_and_names_the_field():
    other = rec(accuracy=(97.5, 0.8), fid=4.4, ece=3.0)
    other.protocol["samples"]["n"] = 1000
    other.protocol["fingerprint"] = fingerprint(other.protocol)
    report = gate.compare(BASE, [other])
    assert report.exit_code == 2
    assert "samples.n: 2000 vs 1000" in report.rows[0].note


def test_throughput_compares_only_the_same_device():
    a = rec(suite="throughput", accuracy=(1.0, None))
    b = rec(suite="throughput", accuracy=(1.0, None))
    b.env["device_name"] = "NVIDIA H100"
    report = gate.compare([a], [b])
    assert report.exit_code == 2 and "another device" in report.rows[0].note


def test_duplicate_run_for_the_same_key_is_refused():
    with pytest.raises(UserError, match="two runs"):
        gate.compare(BASE + [rec(seed=0, accuracy=1.0)], BASE)


def _write_all(records, d):
    for r in records:
        write_record(r, d)
    return d


def bench(*args):
    env = {**os.environ, "BENCH_QUIET": "1"}
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_exit_codes_and_reports(tmp_path):
    base = _write_all(BASE, tmp_path / "base")
    worse = _write_all([rec(accuracy=(94.0, 0.8), fid=6.0, ece=3.0)], tmp_path / "cand")
    md, js = tmp_path / "r.md", tmp_path / "r.json"
    res = bench("compare", str(base), str(worse), "--markdown", str(md), "--json", str(js))
    assert res.returncode == 1, res.stderr
    assert "regressed" in md.read_text() and "| fid" in md.read_text()
    assert json.loads(js.read_text())["exit_code"] == 1
    assert bench("compare", str(base), str(base)).returncode == 0


@pytest.mark.parametrize("problem", ["malformed", "schema", "empty", "duplicate", "missing", "badtol"])
def test_cli_bad_input_exit_2_one_line(tmp_path, problem):
    base = _write_all(BASE, tmp_path / "base")
    cand = tmp_path / "cand"
    cand.mkdir()
    extra = []
    if problem == "malformed":
        (cand / "x.json").write_text("{oops")
    elif problem == "schema":
        (cand / "x.json").write_text(json.dumps({**BASE[0].to_json(), "schema_version": 7}))
    elif problem == "duplicate":
        _write_all([BASE[0], dataclasses.replace(BASE[0], run_id="other")], cand)
    elif problem == "missing":
        cand = tmp_path / "nope"
    elif problem == "badtol":
        _write_all(BASE, cand)
        extra = ["--tol", "fid:lots"]
    res = bench("compare", str(base), str(cand), *extra)
    assert res.returncode == 2, res.stdout + res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr


def test_baseline_update_keeps_protocols_apart(tmp_path):
    results = _write_all(BASE, tmp_path / "results")
    dest = tmp_path / "baselines"
    lines = update_baselines(str(results), str(dest))
    target = dest / "hybrid" / "digits" / "jem_small_s0.json"
    assert lines == [f"added: {target}"] and json.loads(target.read_text())["metrics"]["fid"]["value"] == 4.4
    assert update_baselines(str(results), str(dest)) == [f"updated: {target}"]
    other = rec(accuracy=(97.5, 0.8), fid=4.4)
    other.protocol["reference"]["split"] = "train"
    other.protocol["fingerprint"] = fingerprint(other.protocol)
    newer = _write_all([other], tmp_path / "newer")
    with pytest.raises(UserError, match="another protocol"):
        update_baselines(str(newer), str(dest))
    assert json.loads(target.read_text())["protocol"]["reference"]["split"] == "test"
    update_baselines(str(newer), str(dest), force=True)
    assert json.loads(target.read_text())["protocol"]["reference"]["split"] == "train"

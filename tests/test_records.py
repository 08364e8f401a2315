import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.errors import UserError
from bench.results.gate import compare
from bench.results.record import SCHEMA_VERSION, MalformedRecord, MetricEntry, Record
from bench.results.records import fingerprint, load_records, read_record, record_filename, write_record

ROOT = Path(__file__).resolve().parents[1]
V1_BASELINE = Path(__file__).parent / "fixtures" / "record_v1_jem_tiny_s0.json"  # a version-1 baseline as committed


def _record(**kw) -> Record:
    fields = {"run_id": "20261125T1630Z-3f2a", "suite": "hybrid", "model": "jem", "data": "npz:/a b/c.npz",
              "scale": "tiny", "seed": 0, "status": "ok", "protocol": {"fingerprint": "f"}}
    return Record(**{**fields, **kw})


def test_fingerprint_is_order_independent_and_sensitive():
    a = {"n_samples": 2000, "reference": "test", "sampler": {"steps": 20, "step_size": 1.0}}
    b = {"sampler": {"step_size": 1.0, "steps": 20}, "reference": "test", "n_samples": 2000}
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) == fingerprint({**a, "fingerprint": "ignored"})
    assert fingerprint(a) != fingerprint({**a, "reference": "train"})
    assert fingerprint(a) != fingerprint({**a, "sampler": {"steps": 21, "step_size": 1.0}})


def test_write_is_atomic_and_never_overwrites(tmp_path):
    r = _record()
    p = write_record(r, tmp_path)
    assert p.name == record_filename(r) and "/" not in p.name.replace(str(tmp_path), "")
    assert json.loads(p.read_text()) == r.to_json()
    with pytest.raises(FileExistsError):
        write_record(r, tmp_path)
    assert json.loads(p.read_text()) == r.to_json()
    assert [f.name for f in tmp_path.iterdir()] == [p.name]  # no temporary file left behind
    back = read_record(p)
    assert back == r and back.path == p and "path" not in p.read_text()  # where it was read: never written


def test_write_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        write_record(_record(metrics={"fid": MetricEntry(float("nan"), False)}), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_read_record_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_record(bad)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**_record().to_json(), "schema_version": 99}))
    with pytest.raises(UserError, match=f"{old}: schema_version 99 is not one this bench reads"):
        read_record(old)
    private = tmp_path / "private.json"
    private.write_text(json.dumps({**_record().to_json(), "_path": "x.json"}))
    with pytest.raises(UserError, match="unknown field '_path'"):
        read_record(private)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_record().to_json()))
    assert read_record(good).model == "jem"


# --- the JSON round trip ---------------------------------------------------------------------------
_json = st.recursive(st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=8)
                     | st.floats(allow_nan=False, allow_infinity=False),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=3), max_leaves=8)
_name = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
_number = st.floats(allow_nan=False, allow_infinity=False) | st.integers(-2**53, 2**53)
_entries = st.builds(MetricEntry, value=_number, higher_is_better=st.booleans(), stderr=st.none() | _number,
                     std=st.none() | _number, n=st.none() | st.integers(0, 10**6), unit=st.text(max_size=5),
                     extra=st.dictionaries(st.text(max_size=6), _json, max_size=3))
_objects = st.dictionaries(st.text(max_size=6), _json, max_size=3)
_records = st.builds(
    Record, run_id=_name, status=st.just("ok"), suite=_name, model=_name, data=_name,
    scale=st.sampled_from(["tiny", "small", "paper"]), seed=st.integers(0, 2**63 - 1),
    protocol=_objects.map(lambda p: {**p, "fingerprint": fingerprint(p)}),
    metrics=st.dictionaries(_name, _entries, max_size=4),
    skipped=st.dictionaries(_name, st.text(max_size=8), max_size=2), reason=st.none(),
    suite_version=st.none() | _name, model_config=st.none() | _objects, draws=_objects, env=_objects,
    smoke=st.none() | st.dictionaries(st.text(max_size=4), _json, min_size=1, max_size=2),
    seconds=st.none() | st.floats(0, 1e6))


@settings(max_examples=200, deadline=None)
@given(_records)
def test_json_round_trip(record):
    text = json.dumps(record.to_json(), allow_nan=False)
    back = Record.from_json(json.loads(text))
    assert back == record
    assert back.to_json() == record.to_json() and json.loads(text)["schema_version"] == SCHEMA_VERSION


def test_a_failed_record_keeps_its_reason_and_drops_its_values():
    r = _record(metrics={"fid": MetricEntry(4.0, False)}).failed("boom")
    assert r.status == "failed" and r.metrics == {} and Record.from_json(r.to_json()) == r
    with pytest.raises(MalformedRecord, match="needs its 'reason'"):
        Record.from_json({**r.to_json(), "reason": None})


# --- version 1 -------------------------------------------------------------------------------------
def test_a_committed_version_1_baseline_reads_as_version_2_with_its_fingerprint():
    raw = json.loads(V1_BASELINE.read_text())
    assert raw["schema_version"] == 1
    r = read_record(V1_BASELINE)
    assert r.path == V1_BASELINE and r.ok and r.model == "jem" and r.seed == 0
    assert r.fingerprint == raw["protocol"]["fingerprint"] == fingerprint(raw["protocol"])  # the protocol as it was
    assert r.protocol == raw["protocol"]
    assert {k: m.value for k, m in r.metrics.items()} == {k: m["value"] for k, m in raw["metrics"].items()}
    assert r.metrics["accuracy"] == MetricEntry(**raw["metrics"]["accuracy"])
    upgraded = r.to_json()
    assert upgraded["schema_version"] == 2 and upgraded["metrics"]["accuracy"]["extra"] == {}
    assert {k: v for k, v in upgraded.items() if k not in ("schema_version", "metrics")} == \
        {k: v for k, v in raw.items() if k not in ("schema_version", "metrics")}


def test_version_1_facts_move_under_extra():
    raw = json.loads(V1_BASELINE.read_text())
    raw["metrics"]["accuracy"].update(bound=True, k=64)
    r = Record.from_json(raw)
    assert r.metrics["accuracy"].extra == {"bound": True, "k": 64}
    assert r.metrics["accuracy"].value == raw["metrics"]["accuracy"]["value"]
    v2 = r.to_json()
    with pytest.raises(MalformedRecord, match="unknown field 'bound'"):  # a version-2 entry holds facts in extra only
        Record.from_json({**v2, "metrics": {"accuracy": {**v2["metrics"]["accuracy"], "bound": True}}})


def test_a_version_1_baseline_and_its_version_2_copy_compare(tmp_path):
    """A v1 baseline gates a v2 candidate of the same protocol: same fingerprint, same numbers, pass."""
    (r,) = load_records(V1_BASELINE)
    copy = write_record(r, tmp_path)
    assert json.loads(copy.read_text())["schema_version"] == 2
    report = compare([r], load_records(copy))
    assert report.exit_code == 0 and {row.verdict for row in report.rows} == {"unchanged"}

import json

import pytest

from bench.errors import UserError
from bench.results.records import SCHEMA_VERSION, fingerprint, read_record, record_filename, write_record


def _record(**kw):
    r = {"schema_version": SCHEMA_VERSION, "run_id": "20261125T1630Z-3f2a", "suite": "hybrid", "model": "jem",
         "data": "npz:/a b/c.npz", "scale": "tiny", "seed": 0, "status": "ok", "metrics": {},
         "protocol": {"fingerprint": "f"}}
    r.update(kw)
    return r


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
    assert json.loads(p.read_text()) == r
    with pytest.raises(FileExistsError):
        write_record(r, tmp_path)
    assert json.loads(p.read_text()) == r
    assert [f.name for f in tmp_path.iterdir()] == [p.name]  # no temporary file left behind


def test_write_refuses_nan(tmp_path):
    with pytest.raises(ValueError):
        write_record(_record(metrics={"fid": {"value": float("nan")}}), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_read_record_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_record(bad)
    old = tmp_path / "old.json"
    old.write_text(json.dumps(_record(schema_version=99)))
    with pytest.raises(UserError, match="schema_version 99"):
        read_record(old)
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_record()))
    assert read_record(good)["model"] == "jem"

"""docs/record.schema.json describes the records bench writes: every committed baseline (as read, i.e.
upgraded from version 1) and the records of fresh tiny runs (a sampling suite, a likelihood suite, a failed
model) validate against it, the typed record round-trips them, and records with a missing key, a wrong type
or a private key do not validate."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.config import load_config
from bench.errors import ModelFailure
from bench.models.base import BenchModel, register
from bench.results.record import Record
from bench.results.records import read_record
from bench.runner import run

jsonschema = pytest.importorskip("jsonschema")  # the `test` extra installs it

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_PATH = ROOT / "docs" / "record.schema.json"
BASELINES = sorted((ROOT / "baselines").rglob("*.json"))


@pytest.fixture(scope="module")
def validator():
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def problems(validator, record: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path)) or '(record)'}: {e.message}"
            for e in validator.iter_errors(record)]


@dataclass(frozen=True)
class _BrokenConfig:
    pass


@register("test_schema_broken")
class _Broken(BenchModel):
    """Fails while training, so its record is a failed one written before the model exists. It has no
    capability, so no `models: [all]` suite picks it."""

    family = "test"
    Config = _BrokenConfig

    @classmethod
    def recipe(cls, scale, data):
        return _BrokenConfig()

    def fit(self, train, ctx):
        raise ModelFailure("test_schema_broken: training diverged on purpose")


def test_the_committed_baselines_are_there():
    assert BASELINES, "baselines/ holds no record: the gate compares against baselines/hybrid/"


@pytest.mark.parametrize("path", BASELINES, ids=lambda p: str(p.relative_to(ROOT / "baselines")))
def test_every_committed_baseline_validates(validator, path):
    assert problems(validator, json.loads(path.read_text())) == []


def test_a_version_1_record_validates_as_bench_reads_it(validator):
    """A version-1 record (as the baselines were committed before version 2) is upgraded when read."""
    path = ROOT / "tests" / "fixtures" / "record_v1_jem_tiny_s0.json"
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == 1 and problems(validator, raw)  # version 1 itself is not version 2
    assert problems(validator, read_record(path).to_json()) == []


@pytest.fixture(scope="module")
def fresh_runs(tmp_path_factory) -> list[tuple[Record, Path]]:
    """The records of tiny runs, as the runs returned them; written under their ``path``."""
    out = tmp_path_factory.mktemp("schema-records")
    outcomes = [run(load_config(["suite=hybrid", "scale=tiny", "model=pixel_independent", f"out={out}"])),
                run(load_config(["suite=likelihood", "scale=tiny", "models=[pixel_independent,test_schema_broken]",
                                 f"out={out}"]))]
    return [(r, p) for o in outcomes for r, p in o.records]


@pytest.fixture(scope="module")
def fresh_records(fresh_runs) -> dict[tuple[str, str], dict]:
    """Records of tiny runs, as read back from disk: (suite, model) -> record."""
    records = [json.loads(p.read_text()) for _, p in fresh_runs]
    return {(r["suite"], r["model"]): r for r in records}


def test_fresh_records_round_trip(fresh_runs):
    """What a run returns is what it wrote, and reading it back gives the same record (metric facts, protocol,
    draws and env included)."""
    assert any(m.extra for r, _ in fresh_runs for m in r.metrics.values())  # bits/dim's kind, bound, k...
    for record, path in fresh_runs:
        text = json.loads(path.read_text())
        assert text == record.to_json() and "_path" not in text and "path" not in text
        back = read_record(path)
        assert back == record and back.path == path
        assert Record.from_json(back.to_json()) == record


def test_fresh_records_validate(validator, fresh_records):
    assert set(fresh_records) == {("hybrid", "pixel_independent"), ("likelihood", "pixel_independent"),
                                  ("likelihood", "test_schema_broken")}
    failed = fresh_records[("likelihood", "test_schema_broken")]
    assert failed["status"] == "failed" and failed["model_config"] is None and "on purpose" in failed["reason"]
    assert fresh_records[("hybrid", "pixel_independent")]["skipped"] == {"accuracy": "model has no Classifier"}
    for key, record in fresh_records.items():
        assert problems(validator, record) == [], key


def _broken(record: dict, change) -> dict:
    r = copy.deepcopy(record)
    change(r)
    return r


@pytest.mark.parametrize("what, change", [
    ("no protocol", lambda r: r.pop("protocol")),
    ("no fingerprint", lambda r: r["protocol"].pop("fingerprint")),
    ("seed as a string", lambda r: r.update(seed="0")),
    ("negative seed", lambda r: r.update(seed=-1)),
    ("unknown status", lambda r: r.update(status="done")),
    ("another schema version", lambda r: r.update(schema_version=1)),
    ("a fact beside the value (version 1's layout)", lambda r: r["metrics"]["fid"].update(bound=False)),
    ("a metric without its extra", lambda r: r["metrics"]["fid"].pop("extra")),
    ("metric value as a string", lambda r: r["metrics"]["fid"].update(value="4.2")),
    ("metric without its direction", lambda r: r["metrics"]["fid"].pop("higher_is_better")),
    ("failed without a reason", lambda r: r.update(status="failed", metrics={})),
    ("failed with metrics", lambda r: r.update(status="failed", reason="boom")),
    ("a reason on an ok record", lambda r: r.update(reason="boom")),
    ("a private key written out", lambda r: r.update(_path="x.json")),
    ("an unknown capability", lambda r: r.update(capabilities=["Telepathy"])),
    ("a short fingerprint", lambda r: r["protocol"].update(fingerprint="abc")),
])
def test_invalid_records_are_rejected(validator, what, change):
    good = read_record(ROOT / "baselines" / "hybrid" / "digits" / "pixel_independent_tiny_s0.json").to_json()
    assert problems(validator, good) == []
    assert problems(validator, _broken(good, change)), f"{what}: accepted"

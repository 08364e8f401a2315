"""docs/record.schema.json describes the records bench writes: every committed baseline and the records of
fresh tiny runs (a sampling suite, a likelihood suite, a failed model) validate against it, and records
with a missing key, a wrong type or a private key do not."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench.config import load_config
from bench.errors import ModelFailure
from bench.models.base import BenchModel, register
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


@pytest.fixture(scope="module")
def fresh_records(tmp_path_factory) -> dict[tuple[str, str], dict]:
    """Records of tiny runs, as read back from disk: (suite, model) -> record."""
    out = tmp_path_factory.mktemp("schema-records")
    run(load_config(["suite=hybrid", "scale=tiny", "model=pixel_independent", f"out={out}"]))
    run(load_config(["suite=likelihood", "scale=tiny", "models=[pixel_independent,test_schema_broken]",
                     f"out={out}"]))
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    return {(r["suite"], r["model"]): r for r in records}


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
    ("another schema version", lambda r: r.update(schema_version=2)),
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
    good = json.loads((ROOT / "baselines" / "hybrid" / "digits" / "pixel_independent_tiny_s0.json").read_text())
    assert problems(validator, good) == []
    assert problems(validator, _broken(good, change)), f"{what}: accepted"

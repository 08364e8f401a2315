"""The result record as a type: `Record` and its `MetricEntry`s, with the JSON round trip
(`Record.to_json` / `Record.from_json`) and the upgrade of older schema versions.

Schema version 2 (docs/record.schema.json). Version 1 differed in one place: a metric entry's facts (bound,
estimate, k, ci95, positive, ...) sat beside ``value`` in the entry; version 2 holds them under the entry's
``extra``, so no fact can shadow a field. `from_json` reads both and returns a version-2 record; the protocol
(and so its fingerprint) is the same in both.

What a record was read from (`Record.path`) is an attribute, never part of the JSON.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

SCHEMA_VERSION = 2
#: the versions `Record.from_json` reads (older ones are upgraded)
READABLE_VERSIONS = (1, 2)
#: |int| beyond this cannot be a metric value or a seed as float64 and JSON readers elsewhere hold them
MAX_SAFE_INT = 2**53


class MalformedRecord(ValueError):
    """A JSON object that is not a record this bench reads; the message says what is wrong (one line)."""


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and (isinstance(v, float) or abs(v) <= MAX_SAFE_INT)


def _short(v: Any) -> str:
    return json.dumps(v, default=str)[:40]


@dataclass(frozen=True)
class MetricEntry:
    """One recorded value: the metric's number with its uncertainty, unit and direction."""

    value: float
    higher_is_better: bool
    stderr: float | None = None  # standard error of the value (over test examples)
    std: float | None = None  # spread over splits or subsets (IS, KID)
    n: int | None = None
    unit: str = ""
    #: facts that qualify the number: bound, estimate, k, ci95, positive, levelled_off, ...
    extra: dict[str, Any] = field(default_factory=dict)

    FIELDS: ClassVar[tuple[str, ...]] = ("value", "stderr", "std", "n", "unit", "higher_is_better", "extra")

    @property
    def spread(self) -> float | None:
        """The uncertainty to show: the standard error, or else the spread over splits."""
        return self.stderr if self.stderr is not None else self.std

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "stderr": self.stderr, "std": self.std, "n": self.n, "unit": self.unit,
                "higher_is_better": self.higher_is_better, "extra": self.extra}

    @classmethod
    def from_json(cls, name: str, m: Any) -> MetricEntry:
        if not isinstance(m, dict) or not _is_number(m.get("value")):
            got = m.get("value") if isinstance(m, dict) else m
            raise MalformedRecord(f"metric '{name}' must have a numeric 'value', got {_short(got)}")
        if not isinstance(m.get("higher_is_better"), bool):
            raise MalformedRecord(f"metric '{name}' lacks its direction ('higher_is_better')")
        unknown = sorted(set(m) - set(cls.FIELDS))
        if unknown:
            raise MalformedRecord(f"metric '{name}' has an unknown field '{unknown[0]}'")
        for stat in ("stderr", "std"):
            if m.get(stat) is not None and not _is_number(m[stat]):
                raise MalformedRecord(f"metric '{name}' has a non-numeric '{stat}'")
        n = m.get("n")
        if n is not None and not (isinstance(n, int) and not isinstance(n, bool)):
            raise MalformedRecord(f"metric '{name}' has a non-integer 'n'")
        if not isinstance(m.get("unit", ""), str) or not isinstance(m.get("extra", {}), dict):
            raise MalformedRecord(f"metric '{name}' has a 'unit' that is not a string or an 'extra' that is not "
                                  "an object")
        return cls(value=m["value"], higher_is_better=m["higher_is_better"], stderr=m.get("stderr"),
                   std=m.get("std"), n=n, unit=m.get("unit", ""), extra=dict(m.get("extra", {})))


@dataclass(frozen=True)
class Record:
    """One run of one model: what `bench run` writes, and what tables, report and gate read.

    ``protocol`` holds everything that changes a number and is hashed into ``protocol["fingerprint"]``;
    ``draws``, ``data_location``, ``env``, ``seed``, ``run_id``, the times and ``checkpoint`` are kept
    outside it. The dict-valued fields are free-form JSON objects (see docs/record.schema.json)."""

    run_id: str
    status: str  # "ok" | "failed"
    suite: str
    model: str
    data: str
    scale: str
    seed: int
    protocol: dict[str, Any]
    metrics: dict[str, MetricEntry] = field(default_factory=dict)
    #: metric key or prefix (``ood.*.svhn``) -> why the model has no value there (N/A)
    skipped: dict[str, str] = field(default_factory=dict)
    reason: str | None = None  # why a failed run failed
    suite_version: str | None = None
    family: str | None = None
    model_config: dict[str, Any] | None = None
    data_location: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] | None = None
    train: dict[str, Any] | None = None
    draws: dict[str, Any] = field(default_factory=dict)
    capabilities: list[str] = field(default_factory=list)
    env: dict[str, Any] = field(default_factory=dict)
    smoke: dict[str, Any] | None = None
    started_at: str | None = None
    finished_at: str | None = None
    seconds: float | None = None
    #: the file the record was read from; not part of the record
    path: Path | None = field(default=None, compare=False, repr=False)

    schema_version: ClassVar[int] = SCHEMA_VERSION
    #: the JSON keys in the order they are written; ``reason`` and ``smoke`` only when set
    KEYS: ClassVar[tuple[str, ...]] = (
        "schema_version", "run_id", "status", "reason", "suite", "suite_version", "model", "family", "model_config",
        "data", "data_location", "scale", "seed", "checkpoint", "train", "protocol", "draws", "metrics", "skipped",
        "capabilities", "env", "smoke", "started_at", "finished_at", "seconds")

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def fingerprint(self) -> str:
        return self.protocol["fingerprint"]

    @property
    def label(self) -> str:
        """How messages name the record: its file, or its run id."""
        return str(self.path) if self.path is not None else f"record {self.run_id}"

    def failed(self, reason: str) -> Record:
        """This record as a failed one: the reason, and no metric values."""
        return dataclasses.replace(self, status="failed", reason=reason, metrics={})

    def lookup(self, dotted: str) -> Any:
        """The value at a dotted path of the record's JSON (``scale``, ``protocol.samples.n``), or None."""
        v: Any = self.to_json()
        for part in dotted.split("."):
            if not isinstance(v, dict) or part not in v:
                return None
            v = v[part]
        return v

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in self.KEYS:
            if key == "metrics":
                out[key] = {k: m.to_json() for k, m in self.metrics.items()}
            elif key in ("reason", "smoke") and getattr(self, key) is None:
                continue
            else:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_json(cls, obj: Any, path: Path | None = None) -> Record:
        """The record of a JSON object of any readable schema version (an older one is upgraded).
        Raises `MalformedRecord` saying what is wrong. Only the fields readers use are checked for more than
        their type; docs/record.schema.json is stricter."""
        if not isinstance(obj, dict):
            raise MalformedRecord(f"a JSON {type(obj).__name__}, not an object")
        version = obj.get("schema_version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise MalformedRecord(f"schema_version {version!r} is not one this bench reads "
                                  f"({' or '.join(map(str, READABLE_VERSIONS))})")
        if version == 1:
            obj = upgrade_v1(obj)
        _check(obj)
        fields = {k: v for k, v in obj.items() if k not in ("schema_version", "metrics")}
        metrics = {name: MetricEntry.from_json(name, m) for name, m in obj["metrics"].items()}
        return cls(**fields, metrics=metrics, path=path)


def upgrade_v1(obj: dict[str, Any]) -> dict[str, Any]:
    """A version-1 record's JSON as version 2: each metric entry's facts move under its ``extra``."""
    metrics = obj.get("metrics")
    if isinstance(metrics, dict):
        fixed = set(MetricEntry.FIELDS) - {"extra"}
        metrics = {name: ({k: v for k, v in m.items() if k in fixed}
                          | {"extra": {k: v for k, v in m.items() if k not in fixed}}) if isinstance(m, dict) else m
                   for name, m in metrics.items()}
    return {**obj, "schema_version": 2, "metrics": metrics}


def _check(r: dict[str, Any]) -> None:
    """What makes ``r`` not a well-formed version-2 record, as `MalformedRecord`. Non-finite metric values
    pass here: the gate counts them as regressions and the tables mark them."""
    unknown = sorted(set(r) - set(Record.KEYS))
    if unknown:
        raise MalformedRecord(f"unknown field '{unknown[0][:40]}'")
    for key in ("run_id", "suite", "model", "data", "scale", "status"):
        if not isinstance(r.get(key), str) or not r[key]:
            raise MalformedRecord(f"'{key}' must be a non-empty string, got {_short(r.get(key))}")
    if r["status"] not in ("ok", "failed"):
        raise MalformedRecord(f"'status' must be ok or failed, got {r['status']!r}")
    seed = r.get("seed")
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**63):
        raise MalformedRecord(f"'seed' must be an integer in [0, 2^63), got {_short(seed)}")
    for key in ("protocol", "metrics"):
        if not isinstance(r.get(key), dict):
            raise MalformedRecord(f"'{key}' must be an object, got {_short(r.get(key))}")
    if not isinstance(r["protocol"].get("fingerprint"), str):
        raise MalformedRecord("'protocol.fingerprint' is missing")
    for key in ("env", "skipped", "draws", "data_location"):
        if key in r and not isinstance(r[key], dict):
            raise MalformedRecord(f"'{key}' must be an object")
    for key in ("model_config", "checkpoint", "train", "smoke"):
        if r.get(key) is not None and not isinstance(r[key], dict):
            raise MalformedRecord(f"'{key}' must be an object or null")
    if not all(isinstance(v, str) for v in r.get("skipped", {}).values()):
        raise MalformedRecord("'skipped' must map keys to reasons (strings)")
    if not isinstance(r.get("capabilities", []), list):
        raise MalformedRecord("'capabilities' must be a list")
    for key in ("reason", "suite_version", "family", "started_at", "finished_at"):
        if r.get(key) is not None and not isinstance(r[key], str):
            raise MalformedRecord(f"'{key}' must be a string")
    if r.get("seconds") is not None and not _is_number(r["seconds"]):
        raise MalformedRecord("'seconds' must be a number")
    if r["status"] == "failed" and not isinstance(r.get("reason"), str):
        raise MalformedRecord("a failed record needs its 'reason' (a string)")

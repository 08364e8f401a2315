"""What a metric declares: its key, direction, unit, the capabilities it needs, and how to compute it
from an evaluation context. The functional core of each metric lives in its own module as pure tensor
functions; the `Metric` object is the thin layer the runner uses."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.errors import NonFiniteError
from bench.registry import Registry
from bench.results.record import MetricEntry

if TYPE_CHECKING:
    from bench.evaluation import EvalContext


@dataclass(frozen=True)
class MetricValue:
    value: float
    stderr: float | None = None  # standard error of the value (over test examples)
    std: float | None = None  # spread over splits/subsets (IS, KID), as torch-fidelity reports it
    n: int | None = None
    #: further facts that qualify the number, merged into the record's metric entry,
    #: e.g. {"bound": True, "k": 64} for the VAE's IWAE bits/dim
    extra: dict | None = None

    def __post_init__(self):
        shadowing = sorted(set(self.extra or {}) & set(MetricEntry.FIELDS))  # a fact never shadows a field
        if shadowing:
            raise ValueError(f"a metric's extra facts may not name a field of its record entry: {shadowing}")
        for name in ("value", "stderr", "std"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise NonFiniteError(f"metric {name} is {v}: refusing to record a non-finite number")


#: writes one file beside the record, given its path
Artifact = Callable[[Path], None]


@dataclass(frozen=True)
class MetricResult:
    """What computing a metric gives its model's record: the value(s), and what goes beside them. The runner
    merges it into the record (`bench.evaluate`); a metric never writes into the evaluation context."""

    #: the value under the metric's own key (sub-key ""), or several keyed below it, e.g. throughput's
    #: "bs64.samples_per_s" (recorded as ``throughput.bs64.samples_per_s``)
    values: dict[str, MetricValue]
    #: protocol entries: the settings that change the numbers (fingerprinted), e.g. {"kid": {"subsets": 100}}
    protocol: dict[str, Any] = field(default_factory=dict)
    #: what the metric drew but did not decide (seeds, sanity findings, file paths): beside the protocol
    draws: dict[str, Any] = field(default_factory=dict)
    #: metric keys or prefixes (``ood.*.svhn``) that do not apply to this model -> why (N/A cells)
    skipped: dict[str, str] = field(default_factory=dict)
    #: files to write beside the record: suffix (e.g. "reliability.png") -> writer
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    #: results a later metric of the same record may read (never recorded), e.g. robust's per-image PGD
    #: outcome, which autoattack compares itself with: the runner hands them on as ``ctx.earlier[key]``
    handed_on: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, value: MetricValue, **beside: Any) -> MetricResult:
        """A metric of one value, with ``protocol=``, ``draws=``, ``skipped=`` or ``artifacts=`` beside it."""
        return cls({"": value}, **beside)


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    higher_is_better: bool
    unit: str
    requires: tuple[str, ...]  # capability names, see bench.capabilities
    compute: Callable[[EvalContext], MetricResult]
    #: default regression tolerance for the gate: "5%" relative or "0.5" absolute
    tolerance: str = "0"
    #: suite settings this metric reads (e.g. ("ece_bins",)); others given on the command line are refused
    settings: tuple[str, ...] = ()
    #: validate(settings, data, model_classes) raises UserError on bad settings, before any model runs
    validate: Callable[[dict, Any, list], None] | None = None
    #: besides ``requires``: the model needs at least one of these (OOD: a classifier, an energy or a density)
    requires_any: tuple[str, ...] = ()
    #: for a metric of many values keyed <key>.<group>.<column>.<statistic> (OOD: score.set.auroc, robust:
    #: norm.eps.accuracy): the statistics a run's terminal shows, one small table per group with a row per
    #: model and a column per ``headline_axis`` value, when one row per record would not fit; the record
    #: always has every value
    headline: tuple[str, ...] = ()
    headline_axis: str = ""
    #: for a metric of many values: sub-key patterns (fnmatch, on what follows ``<key>.``) whose direction
    #: differs from ``higher_is_better``, e.g. {"*.fpr95": False}; the first match wins
    sub_directions: tuple[tuple[str, bool], ...] = ()
    #: the value is a time or a rate (throughput): its model has the CPU to itself, never side by side with
    #: another model (bench.jobs)
    timed: bool = False

    def higher_is_better_for(self, full_key: str) -> bool:
        """The declared direction of one recorded value, ``<key>`` or ``<key>.<sub-key>``."""
        sub = full_key[len(self.key) + 1:] if full_key.startswith(self.key + ".") else ""
        for pattern, higher in self.sub_directions:
            if sub and fnmatch.fnmatchcase(sub, pattern):
                return higher
        return self.higher_is_better

    def lacking(self, capabilities) -> list[str]:
        """What a model with these capability names misses for this metric (empty: it can take it)."""
        have = set(capabilities)
        missing = [c for c in self.requires if c not in have]
        if self.requires_any and not have & set(self.requires_any):
            missing.append(" or ".join(self.requires_any))
        return missing

    @property
    def arrow(self) -> str:
        return "↑" if self.higher_is_better else "↓"


METRICS: Registry[Metric] = Registry("metric")


def metric_of(full_key: str) -> Metric | None:
    """The registered metric a recorded key belongs to: ``fid``, or ``ood`` for ``ood.log_px.svhn.auroc``."""
    parts = full_key.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        if name in METRICS:
            return METRICS.get(name)
    return None


def register(metric: Metric) -> Metric:
    METRICS.add(metric.key, metric)
    return metric

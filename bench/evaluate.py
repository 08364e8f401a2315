"""Evaluate one planned model: acquire it, compute the suite's metrics on it under the thread policy, and
build its record (a failure inside one model is that model's failed record)."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench import console, distributed, smoke, threads
from bench.acquire import obtain_model_in_order, speed_up
from bench.capabilities import capabilities_of
from bench.errors import BenchError, DistributedFailure
from bench.evaluation import EvalContext
from bench.features import select
from bench.features.domain import ResolvedExtractor
from bench.models import MODELS
from bench.plan import Plan, suite_settings
from bench.results.record import MetricEntry, Record
from bench.results.records import env_info, fingerprint, new_run_id, now_iso


def make_extractor_resolver(p: Plan):
    cache: dict[str, ResolvedExtractor] = {}

    def resolve_here() -> ResolvedExtractor:
        return select.resolve(p.inception, p.data, console.progress)

    def resolve() -> ResolvedExtractor:
        if "x" not in cache:
            # under torchrun, rank 0 trains and caches the domain extractor; the others then load it
            extractor, error = distributed.main_first(resolve_here)
            if error is not None:
                raise error
            cache["x"] = extractor
        return cache["x"]

    return resolve


def base_protocol(p: Plan) -> dict[str, Any]:
    return {
        "suite": p.suite.name,
        "suite_version": p.suite.version,
        "data": p.data.describe(),
        "scale": p.scale.value,
        "metrics": [m.key for m in p.metrics],
        "device_type": p.device.type,
        "precision": p.cfg.precision,
        "speed_options": {"precision": f"{p.cfg.precision} for sampling and feature extraction"
                          + (" (torch.autocast)" if p.cfg.precision == "bf16" else ""),
                          "channels_last": p.cfg.channels_last, "compile": p.cfg.compile},
        **p.checkpoint_protocol,
    }


#: a file written beside the record: suffix (e.g. "reliability.png") -> writer(path)
Artifacts = dict[str, Callable[[Path], None]]


def evaluate_model(p: Plan, name: str, extractor, reference_cache: dict, thread_policy: str | None = None
                   ) -> tuple[Record, Artifacts]:
    """The model's record, and the files to write beside it (none for a failed record). ``thread_policy``:
    why the model has its threads, when the run decided it (models side by side, `bench.jobs`)."""
    started, t0, run_id = now_iso(), time.perf_counter(), new_run_id()
    #: the record's fields as they become known; a failure anywhere sets ``reason``
    fields: dict[str, Any] = {"env": env_info(p.device)}
    artifacts: Artifacts = {}
    protocol = base_protocol(p)
    with threads.using(p.device, p.cfg.threads) as thread_env:
        fields["env"].update(thread_env)
        if thread_policy and thread_env:
            fields["env"]["thread_policy"] = thread_policy
        _train_and_evaluate(p, name, extractor, reference_cache, fields, protocol, artifacts)
    if not distributed.all_ok("reason" not in fields) and "reason" not in fields:
        fields["reason"] = "another rank failed while evaluating this model"
    if distributed.active():  # not part of the protocol: a sharded run computes the same numbers
        fields["env"]["distributed"] = distributed.describe()
    if p.cfg.smoke is not None:  # also in the protocol: a smoke's fingerprint never equals a real run's
        fields["smoke"] = protocol["smoke"] = smoke.describe(p.cfg.smoke, p.smoke_shrunk.get(name, {}), p.data,
                                                             p.n_samples)
    protocol["fingerprint"] = fingerprint(protocol)
    failed = "reason" in fields
    if failed:
        fields["metrics"], artifacts = {}, {}
    record = Record(run_id=run_id, status="failed" if failed else "ok", suite=p.suite.name,
                    suite_version=p.suite.version, model=name, family=MODELS.get(name).family, data=p.data.name,
                    data_location=p.data.location, scale=p.scale.value, seed=p.cfg.seed, protocol=protocol,
                    started_at=started, finished_at=now_iso(), seconds=round(time.perf_counter() - t0, 2), **fields)
    return record, artifacts


def failure_record(p: Plan, name: str, reason: str) -> Record:
    """The failed record of a model whose evaluation never returned one (its worker process died)."""
    protocol = base_protocol(p)
    protocol["fingerprint"] = fingerprint(protocol)
    now = now_iso()
    return Record(run_id=new_run_id(), status="failed", suite=p.suite.name, suite_version=p.suite.version, model=name,
                  family=MODELS.get(name).family, data=p.data.name, data_location=p.data.location,
                  scale=p.scale.value, seed=p.cfg.seed, protocol=protocol, started_at=now, finished_at=now,
                  reason=reason, env=env_info(p.device))


def _train_and_evaluate(p: Plan, name: str, extractor, reference_cache: dict, fields: dict, protocol: dict,
                        artifacts: Artifacts) -> None:
    """Train or load the model and compute the suite's metrics into ``fields`` (the record's), ``protocol``
    and ``artifacts``; a failure is the record's ``reason``."""
    skipped: dict[str, str] = {}
    fields["skipped"] = skipped
    try:
        model, ckpt, train = obtain_model_in_order(p, name)
        model = speed_up(p, model)
        fields.update(model_config={**model.config_dict(), "deviations": model.deviations(p.scale),
                                    "reference": model.reference},
                      checkpoint=ckpt, train=train, capabilities=capabilities_of(model))
        ctx = EvalContext(model, p.data, p.suite, p.scale, p.cfg.seed, p.device, extractor, reference_cache,
                          console.progress)
        ctx.settings = suite_settings(p)
        ctx.n_samples_override = p.n_samples
        ctx.autocast = p.cfg.precision == "bf16"
        ctx.channels_last = p.cfg.channels_last
        ctx.compile = p.cfg.compile
        ctx.checkpoint_sha256 = (ckpt or {}).get("sha256")
        ctx.checkpoint_loaded = train.get("source") in ("cache", "checkpoint")
        # what the metrics report, merged into the record once all of them succeeded
        metrics: dict[str, MetricEntry] = {}
        added: dict[str, Any] = {}
        draws: dict[str, Any] = {}
        not_applicable: dict[str, str] = {}
        figures: Artifacts = {}
        for metric in p.metrics:
            lacking = metric.lacking(capabilities_of(model))
            if lacking:
                skipped[metric.key] = f"model has no {', '.join(lacking)}"
                continue
            result = metric.compute(ctx)
            # what the shared inputs used (the context's) comes first, then what the metric says of itself
            for into, entries, what in ((added, ctx.protocol, "protocol"), (added, result.protocol, "protocol"),
                                        (draws, ctx.draws, "draws"), (draws, result.draws, "draws")):
                merge(into, entries, what, metric.key)
            not_applicable.update(result.skipped)
            figures.update(result.artifacts)
            ctx.earlier[metric.key] = dict(result.handed_on)
            for sub, v in result.values.items():  # sub-keys below the metric's own (throughput.bs64.samples_per_s)
                key = f"{metric.key}.{sub}" if sub else metric.key
                metrics[key] = MetricEntry(value=v.value, stderr=v.stderr, std=v.std, n=v.n, unit=metric.unit,
                                           extra=dict(v.extra or {}),
                                           higher_is_better=metric.higher_is_better_for(key))
        protocol.update(added)
        skipped.update(not_applicable)
        fields.update(metrics=metrics, draws=draws)
        if ctx.grid is not None:
            grid = ctx.grid
            artifacts["samples.png"] = lambda path: save_grid(grid, path)
        artifacts.update(figures)
    except DistributedFailure:
        raise
    except BenchError as e:
        fields["reason"] = str(e)
    except Exception as e:  # a bug or a numerical failure inside one model must not stop the others
        tb = traceback.extract_tb(e.__traceback__)[-1]
        fields["reason"] = f"{type(e).__name__}: {e} (at {Path(tb.filename).name}:{tb.lineno})"


def merge(into: dict, entries: dict, what: str, metric: str) -> None:
    """``entries`` into the record's ``what`` (protocol or draws); two sources may give an entry only if they
    agree (precision and recall share theirs), since the record keeps one."""
    for k, v in entries.items():
        if k in into and into[k] != v:
            raise RuntimeError(f"metric '{metric}' gives {what} entry '{k}' another value than an earlier one")
        into[k] = v


def save_grid(grid: torch.Tensor, path: Path) -> None:
    import torchvision

    nrow = max(1, int(len(grid) ** 0.5))
    images = grid.float() / 255.0
    scale = max(1, 32 // max(images.shape[-2:]))  # blow small images up (nearest) so the grid is legible
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    torchvision.utils.save_image(images, str(path), nrow=nrow, padding=2, pad_value=0.5)

"""Evaluate one planned model: acquire it, compute the suite's metrics on it under the thread policy, and
build its record (a failure inside one model is that model's failed record)."""

from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

from bench import console, distributed, smoke, threads
from bench.acquire import obtain_model_in_order, speed_up
from bench.capabilities import capabilities_of
from bench.errors import BenchError, DistributedFailure
from bench.evaluation import EvalContext
from bench.features import select
from bench.features.domain import ResolvedExtractor
from bench.models import MODELS
from bench.plan import Plan, suite_settings
from bench.results.records import SCHEMA_VERSION, env_info, fingerprint, new_run_id, now_iso


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


def evaluate_model(p: Plan, name: str, extractor, reference_cache: dict) -> dict[str, Any]:
    started, t0 = now_iso(), time.perf_counter()
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "run_id": new_run_id(), "status": "ok",
        "suite": p.suite.name, "suite_version": p.suite.version,
        "model": name, "family": MODELS.get(name).family, "model_config": None,
        "data": p.data.name, "data_location": p.data.location, "scale": p.scale.value, "seed": p.cfg.seed,
        "checkpoint": None, "train": None, "protocol": None, "draws": {}, "metrics": {}, "skipped": {},
        "capabilities": [], "env": env_info(p.device), "started_at": started,
    }
    protocol = base_protocol(p)
    with threads.using(p.device, p.cfg.threads) as thread_env:
        record["env"].update(thread_env)
        _train_and_evaluate(p, name, extractor, reference_cache, record, protocol)
    if not distributed.all_ok(record["status"] == "ok") and record["status"] == "ok":
        record.update(status="failed", reason="another rank failed while evaluating this model", metrics={})
    if distributed.active():  # not part of the protocol: a sharded run computes the same numbers
        record["env"]["distributed"] = distributed.describe()
    if p.cfg.smoke is not None:  # also in the protocol: a smoke's fingerprint never equals a real run's
        record["smoke"] = protocol["smoke"] = smoke.describe(p.cfg.smoke, p.smoke_shrunk.get(name, {}), p.data,
                                                             p.n_samples)
    protocol["fingerprint"] = fingerprint(protocol)
    record["protocol"] = protocol
    record["finished_at"] = now_iso()
    record["seconds"] = round(time.perf_counter() - t0, 2)
    return record


def _train_and_evaluate(p: Plan, name: str, extractor, reference_cache: dict, record: dict, protocol: dict) -> None:
    """Train or load the model and compute the suite's metrics into ``record``; a failure is the record's."""
    try:
        model, ckpt, train = obtain_model_in_order(p, name)
        model = speed_up(p, model)
        record.update(model_config={**model.config_dict(), "deviations": model.deviations(p.scale),
                                    "reference": model.reference},
                      checkpoint=ckpt, train=train,
                      capabilities=capabilities_of(model))
        ctx = EvalContext(model, p.data, p.suite, p.scale, p.cfg.seed, p.device, extractor, reference_cache,
                          console.progress)
        ctx.settings = suite_settings(p)
        ctx.n_samples_override = p.n_samples
        ctx.autocast = p.cfg.precision == "bf16"
        ctx.channels_last = p.cfg.channels_last
        for metric in p.metrics:
            lacking = metric.lacking(capabilities_of(model))
            if lacking:
                record["skipped"][metric.key] = f"model has no {', '.join(lacking)}"
                continue
            values = metric.compute(ctx)
            # a metric returns one value, or several keyed below its own key (e.g. throughput.bs64.samples_per_s)
            items = values.items() if isinstance(values, dict) else [("", values)]
            for sub, v in items:
                record["metrics"][f"{metric.key}.{sub}" if sub else metric.key] = {
                    "value": v.value, "stderr": v.stderr, "std": v.std, "n": v.n,
                    "unit": metric.unit, **(v.extra or {}),
                    "higher_is_better": metric.higher_is_better_for(f"{metric.key}.{sub}" if sub else metric.key),
                }
        protocol.update(ctx.protocol)
        record["draws"] = ctx.draws
        record["skipped"].update(ctx.skipped)
        record["_grid"] = ctx.grid
        record["_artifacts"] = ctx.artifacts
    except DistributedFailure:
        raise
    except BenchError as e:
        record.update(status="failed", reason=str(e), metrics={})
    except Exception as e:  # a bug or a numerical failure inside one model must not stop the others
        tb = traceback.extract_tb(e.__traceback__)[-1]
        record.update(status="failed", reason=f"{type(e).__name__}: {e} (at {Path(tb.filename).name}:{tb.lineno})",
                      metrics={})



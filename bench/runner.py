"""suite × models → capability check → train or load → evaluate → record.

Every failure that is the user's input (unknown names, missing data, a bad checkpoint, an unknown
option) is found before the first model runs and raised as `UserError`; nothing is written. A model
that fails while training or evaluating gets a ``failed`` record with the reason, and the others go on.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.markup import escape

from bench import checkpoints, console, distributed, estimate, fileio, smoke, threads
from bench.cache import cache_dir, cache_root
from bench.capabilities import capabilities_of, class_capabilities
from bench.config import RunConfig
from bench.data import Dataset, load_dataset
from bench.data.base import check_classes, declare_hflip
from bench.data.registry import PATH_LOADERS
from bench.errors import BenchError, DistributedFailure, ModelFailure, UserError, WriteFailure
from bench.evaluation import EVAL_BATCH, EvalContext
from bench.features import select
from bench.features.domain import ResolvedExtractor
from bench.features.inception import InceptionWeights
from bench.fileio import probe_writable
from bench.metrics import METRICS, Metric
from bench.models import MODELS
from bench.models.base import BenchModel, DataInfo, TrainContext
from bench.records import SCHEMA_VERSION, env_info, fingerprint, new_run_id, now_iso, write_record
from bench.scales import Scale
from bench.suites import Suite, load_suite


@dataclass
class Plan:
    """A validated run: everything resolved before any model trains."""

    cfg: RunConfig
    suite: Suite
    models: list[str]
    data: Dataset
    scale: Scale
    device: torch.device
    metrics: list[Metric]
    configs: dict[str, Any]
    checkpoint: checkpoints.Checkpoint | None
    #: verified Inception weights for IS/FID/KID/PRC, or None: the domain extractor
    inception: InceptionWeights | None
    #: protocol entries the checkpoint's format asks for (format, sha256, preprocessing of released weights)
    checkpoint_protocol: dict[str, Any] = field(default_factory=dict)
    #: samples for IS/FID instead of the suite's count (n_samples=, or a smoke's); None: the suite's
    n_samples: int | None = None
    #: a smoke's config changes per model (bench.smoke); empty for a real run
    smoke_shrunk: dict[str, dict] = field(default_factory=dict)


@dataclass
class Outcome:
    records: list[tuple[dict, Path]] = field(default_factory=list)
    #: what could not be written (a record, a figure), one line each
    unwritten: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[dict]:
        return [r for r, _ in self.records if r["status"] == "failed"]


def check_writable(out: Path) -> None:
    """Fail before training, not after, when records cannot be written: a file is created and removed there."""
    probe_writable(out, f"out={out}", "choose a writable directory with out=DIR")


def check_cache_writable() -> None:
    """The checkpoint and extractor cache is written while a run trains: check it before any training."""
    root = cache_root()
    probe_writable(root, f"BENCH_CACHE={root}" if os.environ.get("BENCH_CACHE") else f"the cache {root}",
                   "point BENCH_CACHE at a writable directory")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA device is available; use device=cpu or device=auto")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device '{name}'; valid choices: auto, cpu, cuda")
    return torch.device(name)


def plan(cfg: RunConfig) -> Plan:
    suite = load_suite(cfg.suite)
    if cfg.model and cfg.models:
        raise UserError("give either model=NAME or models=[A,B], not both")
    names = [cfg.model] if cfg.model else list(cfg.models or suite.models)
    metrics = [METRICS.get(k) for k in suite.metrics]
    if names == ["all"]:  # every registered model that can take at least one of the suite's metrics
        names = [n for n, cls in MODELS.items()
                 if any(not m.lacking(class_capabilities(cls)) for m in metrics)]
    if not names:
        raise UserError("no models to run: give model=NAME or models=[A,B]")
    for n in names:
        MODELS.get(n)
    scale = Scale(cfg.scale)
    device = resolve_device(cfg.device)
    threads.parse(threads.setting(cfg.threads))  # a bad threads= (or $BENCH_THREADS) stops the run here
    data = declare_hflip(load_dataset(cfg.data.name or suite.data, cfg.data.root), cfg.data.hflip, PATH_LOADERS)
    if cfg.smoke is not None:
        if cfg.checkpoint:
            raise UserError("smoke= trains the paper recipe for a few steps; it takes no checkpoint=")
        data = smoke.smoke_data(data)
    check_classes(data)
    info = DataInfo.of(data)
    if cfg.opts and len(names) != 1:
        raise UserError("opts.* apply to one model: add model=NAME")
    configs, shrunk = {}, {}
    for n in names:
        try:
            configs[n] = MODELS.get(n).configure(scale, info, dict(cfg.opts))
            if cfg.smoke is not None:
                configs[n], shrunk[n] = smoke.smoke_config(MODELS.get(n), configs[n], dict(cfg.opts))
        except ValueError as e:
            raise UserError(f"invalid options for model '{n}': {e}") from None
    ckpt, ckpt_protocol = None, {}
    if cfg.checkpoint:
        if len(names) != 1:
            raise UserError("checkpoint=PATH evaluates one model: add model=NAME")
        # read and validate now, so a bad file stops the run before anything is written; the file, not
        # scale=, decides the architecture
        ckpt = checkpoints.read_checkpoint(Path(cfg.checkpoint).expanduser(), cfg.checkpoint_format)
        configs[names[0]] = checkpoints.configure_for(MODELS.get(names[0]), configs[names[0]], info, ckpt)
        _refuse_overridden_options(cfg.opts, configs[names[0]], ckpt)
        ckpt_protocol = checkpoints.get_format(ckpt.format).protocol(ckpt, configs[names[0]])
    elif cfg.checkpoint_format != "bench":
        checkpoints.get_format(cfg.checkpoint_format)  # an unknown name first, with the valid choices
        raise UserError("checkpoint_format= needs checkpoint=PATH")
    n_samples = cfg.n_samples if cfg.n_samples is not None or cfg.smoke is None else smoke.SAMPLES
    weights = select.plan(cfg.metrics, suite, data, scale, device, n_samples)  # checked now, before any work
    p = Plan(cfg, suite, names, data, scale, device, metrics, configs, ckpt, weights, ckpt_protocol,
             n_samples=n_samples if suite.n_samples else None, smoke_shrunk=shrunk)
    settings = suite_settings(p)
    for key in SETTING_KEYS:
        if getattr(cfg, key) is not None and not any(key in m.settings for m in metrics):
            raise UserError(f"{key}= does not apply to suite '{suite.name}'; "
                            f"it is a setting of the suites whose metrics use it")
    for m in metrics:
        if m.validate is not None:
            # raises UserError: bad settings stop the run before anything is written
            m.validate(settings, data, [MODELS.get(n) for n in names])
    if cfg.n_samples is not None and not suite.n_samples:
        raise UserError(f"n_samples= does not apply to suite '{suite.name}': none of its metrics draws samples")
    check_shardable(p)
    check_cache_writable()
    check_writable(Path(cfg.out).expanduser())
    return p


def check_shardable(p: Plan) -> None:
    """Under torchrun, every sharded workload needs at least one batch per rank; say so before any work."""
    world = distributed.env_world_size()
    if world <= 1:
        return
    work = {"the test split": -(-len(p.data.test) // EVAL_BATCH)}
    if p.suite.n_samples:
        work["the samples"] = -(-p.suite.n_samples[p.scale.value] // p.suite.sample_batch_size)
    if p.n_samples is not None:
        work["the samples"] = -(-p.n_samples // p.suite.sample_batch_size)
    for what, n in work.items():
        if n < world:
            raise UserError(f"{what} splits into {n} batch(es), fewer than the {world} ranks; "
                            f"run with --nproc_per_node={n} or fewer")


def _refuse_overridden_options(opts: dict[str, Any], config: Any, ckpt: checkpoints.Checkpoint) -> None:
    """An ``opts.`` value that the checkpoint overrode would be ignored silently: refuse it instead."""
    for key, value in opts.items():
        have = getattr(config, key)
        if have != (tuple(value) if isinstance(value, list) else value):
            raise UserError(f"opts.{key}={value} conflicts with checkpoint {ckpt.path}, which needs {key}={have}; "
                            f"drop opts.{key}")


def obtain_model(p: Plan, name: str) -> tuple[BenchModel, dict, dict]:
    """Build the model and either load the given checkpoint, reuse the cached one, or train and cache."""
    cls = MODELS.get(name)
    info = DataInfo.of(p.data)
    torch.manual_seed(p.cfg.seed)  # parameter initialization
    model = cls(p.configs[name], info)
    if p.checkpoint is not None:
        ckpt = checkpoints.apply_checkpoint(model, p.checkpoint)
        return model.to(p.device).eval(), ckpt, {"source": "checkpoint", "steps": None, "seconds": None}
    if p.cfg.smoke is not None:
        return train_smoke(p, model)
    key = checkpoints.cache_key(cls, model.config, p.data, p.scale, p.cfg.seed)
    path = checkpoints.cached_path(cls, key)
    seen = checkpoints.file_id(path)  # the file a retraining may replace; any other was cached meanwhile
    if path.is_file() and not p.cfg.retrain:
        try:
            return _from_cache(p, model, path, key)
        except UserError as e:  # corrupt (checksum, metadata, layout) or unverifiable: never used
            console.info(f"[yellow]{name}: cached checkpoint unusable ({escape(str(e))}); retraining[/yellow]")
    ctx = TrainContext(device=p.device, seed=p.cfg.seed, progress=console.progress)
    t0 = time.perf_counter()
    stats = model.fit(p.data.train, ctx)
    seconds = round(time.perf_counter() - t0, 2)
    train = {**stats, "seconds": seconds}
    try:
        sha = checkpoints.save_to_cache(model, path, {"train": train, "data": p.data.name, "scale": p.scale.value,
                                                      "seed": p.cfg.seed, "cache_key": key}, seen)
    except OSError as e:
        raise ModelFailure(f"{name}: cannot cache its checkpoint at {path} ({e.strerror or e}); free space there or "
                           "point BENCH_CACHE elsewhere") from None
    if sha is None:  # an identical run cached its checkpoint while this one trained: evaluate that file
        console.info(f"{name}: trained in {seconds:.1f} s; an identical run cached its checkpoint first, using it")
        return _from_cache(p, model, path, key)
    console.info(f"{name}: trained in {seconds:.1f} s")
    estimate.write_rate(estimate.rate_key(p, name), train_s=seconds, steps=stats.get("steps"))
    ckpt = {"path": str(path), "sha256": sha, "cache_key": key}
    return model.to(p.device).eval(), ckpt, {**train, "source": "trained"}


def train_smoke(p: Plan, model: BenchModel) -> tuple[BenchModel, dict, dict]:
    """A smoke trains for ``smoke`` steps and is never cached (nor read from the cache): its weights must never
    stand in for a real run's. A fit that ignores ``max_steps`` fails at its next progress step instead of
    running the whole paper schedule."""
    ctx = TrainContext(device=p.device, seed=p.cfg.seed, progress=_capped_progress(model.name, p.cfg.smoke),
                       max_steps=p.cfg.smoke)
    t0 = time.perf_counter()
    stats = model.fit(p.data.train, ctx)
    if stats.get("steps", 0) > p.cfg.smoke:
        raise ModelFailure(f"{model.name} trained {stats['steps']} steps, past smoke={p.cfg.smoke}: its fit ignores "
                           "TrainContext.max_steps")
    train = {**stats, "seconds": round(time.perf_counter() - t0, 2), "source": "trained"}
    return model.to(p.device).eval(), {"path": None, "sha256": None, "cache": "smoke: not cached"}, train


def _capped_progress(name: str, limit: int):
    """`console.progress` whose update (one per optimizer step, by the fits' convention) raises past ``limit``."""
    @contextmanager
    def progress(description: str, total: int):
        with console.progress(description, total) as update:
            done = 0

            def counted(n: int = 1, **fields):
                nonlocal done
                done += n
                if done > limit:
                    raise ModelFailure(f"{name} ran past smoke={limit} training steps: its fit ignores "
                                       "TrainContext.max_steps")
                update(n, **fields)

            yield counted

    return progress

def _from_cache(p: Plan, model: BenchModel, path: Path, key: str) -> tuple[BenchModel, dict, dict]:
    ckpt = checkpoints.load_cached(model, path)  # raises CheckpointError unless its checksum verifies
    console.info(f"[dim]{model.name}: using cached checkpoint {path}[/dim]")
    train = {**ckpt["saved_meta"].get("train", {}), "source": "cache"}
    return model.to(p.device).eval(), {"path": str(path), "sha256": ckpt["sha256"], "cache_key": key}, train


def speed_up(p: Plan, model: BenchModel) -> BenchModel:
    """channels_last and torch.compile, as asked for (recorded in the protocol's speed_options)."""
    if p.cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if p.cfg.compile:
        for child_name, child in list(model.named_children()):
            setattr(model, child_name, torch.compile(child))
    return model


def obtain_model_in_order(p: Plan, name: str):
    """Under torchrun rank 0 trains (or loads) first and the other ranks then load its checkpoint."""
    if not distributed.active():
        return obtain_model(p, name)
    result, error = distributed.main_first(lambda: obtain_model(p, name))
    if not distributed.all_ok(error is None):
        if error is not None:
            raise error
        raise ModelFailure(f"{name}: another rank failed to train or load the model")
    return result


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


SETTING_KEYS = ("ood_sets", "ood_scores", "eps", "norms", "ece_bins")


def suite_settings(p: Plan) -> dict[str, Any]:
    """The suite YAML's settings with the command line's overrides (ood_sets=, eps=, norms=, ece_bins=)."""
    settings = dict(p.suite.settings)
    settings["_explicit"] = tuple(k for k in SETTING_KEYS if getattr(p.cfg, k) is not None)
    for key in settings["_explicit"]:
        settings[key] = getattr(p.cfg, key)
    settings["data_root"] = p.cfg.data.root
    return settings


def save_grid(grid: torch.Tensor, path: Path) -> None:
    import torchvision

    nrow = max(1, int(len(grid) ** 0.5))
    images = grid.float() / 255.0
    scale = max(1, 32 // max(images.shape[-2:]))  # blow small images up (nearest) so the grid is legible
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    torchvision.utils.save_image(images, str(path), nrow=nrow, padding=2, pad_value=0.5)


def run(cfg: RunConfig) -> Outcome:
    p = plan(cfg)
    if cfg.smoke is None and distributed.env_world_size() <= 1:  # a smoke's steps are given; torchrun: a GPU
        estimates = estimate.plan_estimates(p)
        console.info(escape(estimate.report(p, estimates)))
        estimate.confirm(p, estimates, cfg.yes)
    distributed.init(p.device)
    if not distributed.is_main():
        os.environ["BENCH_QUIET"] = "1"  # one rank talks
    out_dir = Path(cfg.out).expanduser()
    if distributed.is_main():
        clean_leftovers(p, out_dir)
    outcome = Outcome()
    extractor = make_extractor_resolver(p)
    reference_cache: dict = {}
    for name in p.models:
        record = evaluate_model(p, name, extractor, reference_cache)
        if record["status"] == "ok" and p.checkpoint is None and p.cfg.smoke is None and distributed.is_main():
            train = record["train"] or {}
            trained = train.get("seconds") or 0 if train.get("source") == "trained" else 0
            estimate.write_rate(estimate.rate_key(p, name, record["env"].get("num_threads")),
                                **{f"eval_s.{p.suite.name}": round(record["seconds"] - trained, 2)})
        grid = record.pop("_grid", None)
        artifacts = record.pop("_artifacts", {})
        if not distributed.is_main():
            continue  # rank 0 writes the one record
        if record["status"] == "failed":
            console.info(f"[red]{name} failed:[/red] {escape(one_line(record['reason']))}")
        try:
            path = write_record(record, out_dir)
        except WriteFailure as e:  # a full disk costs this record, not the models after it
            sys.stderr.write(f"bench: error: {e}\n")
            outcome.unwritten.append(str(e))
            continue
        if record["status"] == "ok":
            write_artifacts(path, grid, artifacts, outcome)
        outcome.records.append((record, path))
    return outcome


def one_line(reason: str, limit: int = 300) -> str:
    """A failure reason for the terminal: its first line, cut short; the record keeps all of it."""
    lines = reason.strip().splitlines() or [""]
    line = lines[0] if len(lines[0]) <= limit else lines[0][:limit] + "..."
    return line + (f" (+{len(lines) - 1} more lines in the record)" if len(lines) > 1 else "")


def write_artifacts(path: Path, grid, artifacts: dict, outcome: Outcome) -> None:
    """The sample grid and the metrics' figures beside the record; one that cannot be written is named and left
    out (the record stands)."""
    writers = ([("samples.png", lambda f: save_grid(grid, f))] if grid is not None else []) + list(artifacts.items())
    for suffix, writer in writers:
        target = path.with_suffix(f".{suffix}")
        try:
            writer(target)
        except OSError as e:
            target.unlink(missing_ok=True)
            message = f"cannot write {target}: {e.strerror or e}"
            sys.stderr.write(f"bench: error: {message}\n")
            outcome.unwritten.append(message)


def clean_leftovers(p: Plan, out_dir: Path) -> None:
    """Temporary files that killed runs left (in out= and in the cache dirs this run uses), if their writers are
    gone; a live concurrent writer's are kept (see `bench.fileio`)."""
    fileio.clean_stale(out_dir, (".json",))
    for name in p.models:
        fileio.clean_stale(cache_dir("checkpoints", MODELS.get(name).name), (".safetensors",))
    fileio.clean_stale(cache_dir("extractors"), (".safetensors", ".sha256"))


__all__ = ["ModelFailure", "Outcome", "plan", "run"]

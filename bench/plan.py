"""Plan a run: resolve and check everything a run needs (suite, models, data, options, checkpoint,
extractor, settings, writable places) before any model trains. A user's mistake is a `UserError` here, and
nothing is written."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench import checkpoints, distributed, jobs, smoke, threads
from bench.cache import cache_root
from bench.capabilities import class_capabilities
from bench.config import RunConfig
from bench.data import Dataset, load_dataset
from bench.data.base import check_classes, declare_hflip
from bench.data.registry import PATH_LOADERS
from bench.errors import UserError
from bench.features import select
from bench.features.inception import InceptionWeights
from bench.fileio import probe_writable
from bench.metrics import METRICS, Metric
from bench.models import MODELS
from bench.models.base import EVAL_BATCH, DataInfo
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
    jobs.parse(cfg.jobs)
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


SETTING_KEYS = ("ood_sets", "ood_scores", "eps", "norms", "ece_bins")


def suite_settings(p: Plan) -> dict[str, Any]:
    """The suite YAML's settings with the command line's overrides (ood_sets=, eps=, norms=, ece_bins=)."""
    settings = dict(p.suite.settings)
    settings["_explicit"] = tuple(k for k in SETTING_KEYS if getattr(p.cfg, k) is not None)
    for key in settings["_explicit"]:
        settings[key] = getattr(p.cfg, key)
    settings["data_root"] = p.cfg.data.root
    return settings



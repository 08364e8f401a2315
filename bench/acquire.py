"""Acquire a planned model: load the given checkpoint, reuse the cached one, or train it and cache it (a
smoke trains a few steps and caches nothing)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch
from rich.markup import escape

from bench import checkpoints, console, distributed, estimate
from bench.errors import ModelFailure, UserError
from bench.models import MODELS
from bench.models.base import BenchModel, DataInfo, TrainContext
from bench.plan import Plan


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
    estimate.record_rate(p, name, train_s=seconds, steps=stats.get("steps"))
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
        compile_children(model)
    return model


def compile_children(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile each child module in place (the SGLD step's network, the sampler's): ``compile=true``."""
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



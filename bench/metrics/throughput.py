"""Sampling throughput: samples per second (and network evaluations per second where the model states
its cost per sample) over a batch-size sweep, after a warm-up call, as the median of repeated timed
calls. CUDA timing is synchronized with events; peak memory is CUDA's max allocated, or the process's
peak RSS on CPU. The record's env names the device (CPU model or GPU name), and the gate compares
throughput only between records from the same device."""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch

from bench.errors import UserError
from bench.metrics.base import Metric, MetricValue, register

DEFAULT_BATCH_SIZES = {"tiny": [4], "small": [16, 64, 256], "paper": [64, 128, 256]}
DEFAULT_REPEATS = 3


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def time_call(fn, device: torch.device) -> float:
    """Seconds for one call, synchronized on CUDA."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def validate(settings: dict, data, model_classes=()) -> None:
    for scale, sizes in settings.get("batch_sizes", DEFAULT_BATCH_SIZES).items():
        if not sizes or not all(isinstance(b, int) and b > 0 for b in sizes):
            raise UserError(f"throughput batch_sizes for {scale} must be positive integers, got {sizes!r}")


def _compute(ctx) -> dict[str, MetricValue]:
    sizes = ctx.settings.get("batch_sizes", DEFAULT_BATCH_SIZES)[ctx.scale.value]
    repeats = int(ctx.settings.get("repeats", DEFAULT_REPEATS))
    model, device = ctx.model, ctx.device
    nfe = model.nfe_per_sample() if callable(getattr(model, "nfe_per_sample", None)) else None
    g = torch.Generator().manual_seed(ctx.seed)
    out: dict[str, MetricValue] = {}
    best = 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.enable_grad():  # SGLD-type samplers differentiate through the network
        for bs in sizes:
            model.sample(bs, g)  # warm-up: allocations, lazy init, caches
            times = [time_call(lambda b=bs: model.sample(b, g), device) for _ in range(repeats)]
            rates = [bs / t for t in times]
            rate = statistics.median(rates)
            spread = statistics.stdev(rates) if len(rates) > 1 else None
            out[f"bs{bs}.samples_per_s"] = MetricValue(rate, std=spread, n=repeats)
            if nfe is not None:
                out[f"bs{bs}.nfe_per_s"] = MetricValue(rate * nfe, n=repeats)
            best = max(best, rate)
    out["samples_per_s"] = MetricValue(best, n=repeats, extra={"peak_memory_mb": round(_peak_memory_mb(device), 1)})
    ctx.protocol["throughput"] = {"batch_sizes": sizes, "repeats": repeats, "warmup_calls": 1,
                                  "statistic": "median", "timing": "cuda events" if device.type == "cuda"
                                  else "perf_counter", "nfe_per_sample": nfe,
                                  "sampler": model.sampler_protocol()}
    return out


THROUGHPUT = register(Metric(key="throughput", title="Throughput", higher_is_better=True, unit="samples/s",
                             requires=("Sampler",), compute=_compute, tolerance="20%",
                             settings=("batch_sizes",), validate=validate))

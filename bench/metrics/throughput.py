"""Sampling throughput: samples per second (and network evaluations per second where the model states
its cost per sample) over a batch-size sweep, after a warm-up call, as the median of repeated timed
calls. CUDA timing is synchronized with events. The record's env names the device (CPU model or GPU name),
and the gate compares throughput only between records from the same device.

Peak memory is this model's: CUDA's max allocated since a reset at the start of the model's calls; on
CPU, the process's peak RSS (VmHWM) since Linux reset it at the same point (``/proc/self/clear_refs``),
which includes what the process held before (torch, the data) but not the peaks of models that ran
earlier. Where the peak cannot be reset, ``getrusage``'s lifetime peak is this model's only if it rose
during the model's calls; otherwise the figure is left out and the record says why."""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch

from bench.errors import UserError
from bench.metrics.base import Metric, MetricResult, MetricValue, register

DEFAULT_BATCH_SIZES = {"tiny": [4], "small": [16, 64, 256], "paper": [64, 128, 256]}
DEFAULT_REPEATS = 3


def _lifetime_peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def _vm_hwm_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Linux ≥ 4.0: writing 5 to clear_refs resets the peak RSS to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _vm_hwm_mb() is not None
    except OSError:
        return False


class PeakMemory:
    """The peak memory of the calls made between ``start()`` and ``read()`` (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device

    def start(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "torch.cuda.max_memory_allocated since a reset at this model's first call"
        elif _reset_rss_peak():
            self.method = "peak RSS (VmHWM) since a reset at this model's first call (/proc/self/clear_refs)"
        else:
            self.lifetime_before = _lifetime_peak_rss_mb()
            self.method = "getrusage lifetime peak RSS, kept only if it rose during this model's calls"
        return self

    def read(self) -> tuple[float | None, str]:
        """(MiB or None, how it was measured or why it is missing)."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20, self.method
        if not hasattr(self, "lifetime_before"):
            return _vm_hwm_mb(), self.method
        peak = _lifetime_peak_rss_mb()
        if peak > self.lifetime_before:
            return peak, self.method
        return None, ("not measured: the peak RSS cannot be reset here and this model did not raise the "
                      "process's lifetime peak")


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


def _compute(ctx) -> MetricResult:
    sizes = ctx.settings.get("batch_sizes", DEFAULT_BATCH_SIZES)[ctx.scale.value]
    repeats = int(ctx.settings.get("repeats", DEFAULT_REPEATS))
    model, device = ctx.model, ctx.device
    nfe = model.nfe_per_sample()
    g = torch.Generator().manual_seed(ctx.seed)
    out: dict[str, MetricValue] = {}
    best = 0.0
    memory = PeakMemory(device).start()
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
    peak, how = memory.read()
    out["samples_per_s"] = MetricValue(best, n=repeats, extra={
        "peak_memory_mb": None if peak is None else round(peak, 1), "peak_memory": how})
    return MetricResult(out, protocol={"throughput": {
        "batch_sizes": sizes, "repeats": repeats, "warmup_calls": 1, "statistic": "median",
        "timing": "cuda events" if device.type == "cuda" else "perf_counter", "nfe_per_sample": nfe,
        "sampler": model.sampler_protocol()}})


THROUGHPUT = register(Metric(key="throughput", title="Throughput", higher_is_better=True, unit="samples/s",
                             requires=("Sampler",), compute=_compute, tolerance="20%",
                             settings=("batch_sizes",), validate=validate, timed=True))

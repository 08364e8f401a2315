"""Throughput's peak memory is each model's own, not the process's lifetime peak."""

from types import SimpleNamespace

import pytest
import torch

from bench.metrics import throughput
from bench.scales import Scale


class _Sampler:
    """A model whose sampling holds ``mb`` MiB at its peak."""

    def __init__(self, mb: int):
        self.mb = mb

    def sample(self, n, generator):
        block = torch.ones(self.mb * 2**18)  # float32: 4 bytes each
        block += 1  # touch every page
        return torch.zeros(n, 1, 8, 8, dtype=torch.uint8) + int(block[0] > 0)

    def sampler_protocol(self):
        return {"algorithm": "test"}

    def nfe_per_sample(self):  # BenchModel's declared hook (this stub is not one)
        return None


def _peak(model):
    ctx = SimpleNamespace(settings={"batch_sizes": {"tiny": [2]}, "repeats": 1}, scale=Scale.tiny, model=model,
                          device=torch.device("cpu"), seed=0)
    return throughput._compute(ctx).values["samples_per_s"].extra


@pytest.mark.skipif(not throughput._reset_rss_peak(), reason="the peak RSS cannot be reset here (Linux >= 4.0)")
def test_peak_memory_is_measured_per_model_on_cpu():
    big, small = _peak(_Sampler(300)), _peak(_Sampler(1))
    assert "since a reset" in big["peak_memory"]
    # the small model ran after the big one: its peak is its own, not the 300 MiB one before it
    assert big["peak_memory_mb"] - small["peak_memory_mb"] > 250, (big, small)
    assert _peak(_Sampler(300))["peak_memory_mb"] - small["peak_memory_mb"] > 250


def test_without_a_reset_the_lifetime_peak_counts_only_when_this_model_raised_it(monkeypatch):
    monkeypatch.setattr(throughput, "_reset_rss_peak", lambda: False)
    peaks = iter([1000.0, 1000.0])
    monkeypatch.setattr(throughput, "_lifetime_peak_rss_mb", lambda: next(peaks))
    out = _peak(_Sampler(1))
    assert out["peak_memory_mb"] is None and "not measured" in out["peak_memory"]
    peaks = iter([1000.0, 1300.0])
    out = _peak(_Sampler(1))
    assert out["peak_memory_mb"] == 1300.0 and "lifetime peak" in out["peak_memory"]

"""Sampling throughput of the registered samplers, with pytest-benchmark (medians, history, compare):

    python -m pytest benchmarks/ --benchmark-only --benchmark-autosave
    python -m pytest benchmarks/ --benchmark-only --benchmark-compare --benchmark-compare-fail=median:10%

Untrained weights at the `small` recipe's size on digits' shape: throughput depends on the architecture
and the sampler's settings, not on what the weights learned.
"""

import pytest
import torch

from bench.models import MODELS
from bench.models.base import DataInfo
from bench.scales import Scale

INFO = DataInfo((1, 8, 8), 10)
N = 100


def _sampler(name: str):
    torch.manual_seed(0)
    cls = MODELS.get(name)
    model = cls(cls.recipe(Scale.small, INFO), INFO).eval()
    if hasattr(model, "replay_buffer"):
        model.replay_buffer.uniform_(-1, 1)
    return model


@pytest.mark.parametrize("name", [n for n, cls in MODELS.items() if hasattr(cls, "sample")])
def test_sample_100(benchmark, name):
    model = _sampler(name)
    g = torch.Generator().manual_seed(0)
    model.sample(N, g)  # warm-up
    out = benchmark(model.sample, N, g)
    assert out.shape == (N, *INFO.shape) and out.dtype == torch.uint8
    benchmark.extra_info["samples_per_call"] = N

"""Negative log-likelihood of the test labels under p(y|x), nats per example, with its standard error."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from bench.metrics.base import Metric, MetricResult, MetricValue, register


def per_example_nll(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.double(), labels, reduction="none")


def _compute(ctx) -> MetricResult:
    nll = per_example_nll(ctx.test_logits(), ctx.data.test.y)
    se = float(nll.std(unbiased=True)) / math.sqrt(len(nll)) if len(nll) > 1 else None
    return MetricResult.of(MetricValue(float(nll.mean()), stderr=se, n=len(nll)))


NLL = register(Metric(key="nll", title="NLL", higher_is_better=False, unit="nats", requires=("Classifier",),
                      compute=_compute, tolerance="5%"))

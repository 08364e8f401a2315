"""Brier score (Brier 1950), multi-class form: mean over examples of Σ_k (p_k − 1[y = k])², in [0, 2]."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from bench.metrics.base import Metric, MetricResult, MetricValue, register


def per_example_brier(probs: Tensor, labels: Tensor) -> Tensor:
    onehot = F.one_hot(labels, probs.shape[1]).double()
    return ((probs.double() - onehot) ** 2).sum(dim=1)


def _compute(ctx) -> MetricResult:
    b = per_example_brier(ctx.test_logits().double().softmax(1), ctx.data.test.y)
    se = float(b.std(unbiased=True)) / math.sqrt(len(b)) if len(b) > 1 else None
    return MetricResult.of(MetricValue(float(b.mean()), stderr=se, n=len(b),
                                       extra={"definition": "sum over classes, mean over examples"}))


BRIER = register(Metric(key="brier", title="Brier", higher_is_better=False, unit="", requires=("Classifier",),
                        compute=_compute, tolerance="5%"))

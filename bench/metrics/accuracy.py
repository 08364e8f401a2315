"""Top-1 accuracy on the test split, in percent, with its binomial standard error."""

from __future__ import annotations

import math

from torch import Tensor

from bench.metrics.base import Metric, MetricResult, MetricValue, register


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of examples whose arg-max logit is the label. Ties go to the lowest index (torch.argmax)."""
    if logits.shape[0] != labels.shape[0] or logits.shape[0] == 0:
        raise ValueError(f"need as many logits as labels (>0), got {logits.shape[0]} and {labels.shape[0]}")
    return (logits.argmax(dim=1) == labels).double().mean().item()


def accuracy_stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1.0 - p) / n)


def _compute(ctx) -> MetricResult:
    logits, labels = ctx.test_logits(), ctx.data.test.y
    p = accuracy(logits, labels)
    return MetricResult.of(MetricValue(100.0 * p, stderr=100.0 * accuracy_stderr(p, len(labels)), n=len(labels)))


ACCURACY = register(Metric(key="accuracy", title="Accuracy", higher_is_better=True, unit="%",
                           requires=("Classifier",), compute=_compute, tolerance="0.5"))



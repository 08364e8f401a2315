"""Maximum calibration error: the largest |accuracy − confidence| over the non-empty bins, in percent
(same binning as `ece`)."""

from __future__ import annotations

from torch import Tensor

from bench.metrics.base import Metric, MetricResult, MetricValue, register
from bench.metrics.ece import DEFAULT_BINS, calibration_bins, n_bins_of, validate


def maximum_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> float:
    b = calibration_bins(probs, labels, n_bins)
    gaps = (b.accuracy - b.confidence).abs()[b.count > 0]
    return float(gaps.max())


def _compute(ctx) -> MetricResult:
    n_bins = n_bins_of(ctx)
    probs = ctx.test_logits().double().softmax(dim=1)
    return MetricResult.of(MetricValue(100.0 * maximum_calibration_error(probs, ctx.data.test.y, n_bins),
                                       n=len(probs), extra={"bins": n_bins}))


MCE = register(Metric(key="mce", title="MCE", higher_is_better=False, unit="%", requires=("Classifier",),
                      compute=_compute, tolerance="5", settings=("ece_bins",), validate=validate))

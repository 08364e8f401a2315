"""Fréchet Inception Distance (Heusel et al. 2017) via torch-fidelity's own functions:
‖μ₁−μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½), features → statistics → metric."""

from __future__ import annotations

from torch import Tensor
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

from bench.metrics.base import Metric, MetricResult, MetricValue, register


def fid_statistics(features: Tensor) -> dict:
    return fid_features_to_statistics(features)


def fid(features_1: Tensor, features_2: Tensor) -> float:
    s1, s2 = fid_statistics(features_1), fid_statistics(features_2)
    return fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID]


def _compute(ctx) -> MetricResult:
    fake = ctx.sample_features()[ctx.extractor.fid_feature]
    real = ctx.reference_features()[ctx.extractor.fid_feature]
    return MetricResult.of(MetricValue(fid(fake, real), n=fake.shape[0]))


FID = register(Metric(key="fid", title="FID", higher_is_better=False, unit="", requires=("Sampler",),
                      compute=_compute, tolerance="5%"))

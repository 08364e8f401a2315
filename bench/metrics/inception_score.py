"""Inception Score (Salimans et al. 2016) from the extractor's logits, via torch-fidelity's own
`isc_features_to_metric` (softmax, 10 splits, fixed shuffle seed): exp E_x KL(p(y|x) || p(y))."""

from __future__ import annotations

from torch import Tensor
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

from bench.metrics.base import Metric, MetricResult, MetricValue, register

SPLITS = 10
SHUFFLE_SEED = 2020  # torch-fidelity's default


def inception_score(logits: Tensor, splits: int = SPLITS, rng_seed: int = SHUFFLE_SEED) -> tuple[float, float]:
    """(mean, std) over ``splits`` splits of the shuffled samples."""
    out = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=rng_seed)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def _compute(ctx) -> MetricResult:
    feats = ctx.sample_features()
    mean, std = inception_score(feats[ctx.extractor.isc_feature])
    return MetricResult.of(MetricValue(mean, std=std, n=feats[ctx.extractor.isc_feature].shape[0]),
                           protocol={"is": {"splits": SPLITS, "shuffle_seed": SHUFFLE_SEED}})


IS = register(Metric(key="is", title="IS", higher_is_better=True, unit="", requires=("Sampler",),
                     compute=_compute, tolerance="5%"))

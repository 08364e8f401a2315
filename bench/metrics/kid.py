"""Kernel Inception Distance (Bińkowski et al. 2018) via torch-fidelity's `kid_features_to_metric`:
unbiased MMD² with the cubic polynomial kernel, mean ± std over random subsets."""

from __future__ import annotations

from torch import Tensor
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

from bench.metrics.base import Metric, MetricResult, MetricValue, register

SUBSETS = 100  # torch-fidelity's default
MAX_SUBSET_SIZE = 1000  # torch-fidelity's default; smaller when either set is smaller
RNG_SEED = 2020


def kid(fake: Tensor, real: Tensor, subsets: int = SUBSETS, subset_size: int | None = None,
        rng_seed: int = RNG_SEED) -> tuple[float, float, int]:
    size = subset_size or min(MAX_SUBSET_SIZE, len(fake), len(real))
    out = kid_features_to_metric(fake, real, kid_subsets=subsets, kid_subset_size=size, rng_seed=rng_seed,
                                 verbose=False, kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,
                                 kid_kernel_poly_coef0=1)
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD], size


def _compute(ctx) -> MetricResult:
    fake = ctx.sample_features()[ctx.extractor.fid_feature]
    real = ctx.reference_features()[ctx.extractor.fid_feature]
    mean, std, size = kid(fake, real)
    return MetricResult.of(MetricValue(mean, std=std, n=len(fake), extra={"subset_size": size, "subsets": SUBSETS}),
                           protocol={"kid": {"subsets": SUBSETS, "subset_size": size, "rng_seed": RNG_SEED,
                                             "kernel": "poly3"}})


KID = register(Metric(key="kid", title="KID", higher_is_better=False, unit="", requires=("Sampler",),
                      compute=_compute, tolerance="10%"))

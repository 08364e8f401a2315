"""Improved precision and recall (Kynkäänniemi et al. 2019) via torch-fidelity's `prc_features_to_metric`:
k-NN manifolds (k = 3) in the extractor's feature space. Precision: the fraction of samples inside the
real manifold; recall: the fraction of real images inside the samples' manifold. In percent."""

from __future__ import annotations

from torch import Tensor
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric

from bench.metrics.base import Metric, MetricResult, MetricValue, register

NEIGHBORHOOD = 3


def precision_recall(fake: Tensor, real: Tensor, neighborhood: int = NEIGHBORHOOD) -> tuple[float, float]:
    out = prc_features_to_metric(fake, real, prc_neighborhood=neighborhood, prc_batch_size=10000,
                                 save_cpu_ram=True, verbose=False)
    return out[KEY_METRIC_PRECISION], out[KEY_METRIC_RECALL]


def _pr(ctx) -> tuple[float, float, int]:
    def compute() -> tuple[float, float, int]:
        fake = ctx.sample_features()[ctx.extractor.fid_feature]
        real = ctx.reference_features()[ctx.extractor.fid_feature]
        return (*precision_recall(fake, real), len(fake))
    return ctx.memo("prc", compute)  # precision and recall come from one computation


PROTOCOL = {"prc": {"neighborhood": NEIGHBORHOOD}}


def _precision(ctx) -> MetricResult:
    p, _, n = _pr(ctx)
    return MetricResult.of(MetricValue(100.0 * p, n=n), protocol=PROTOCOL)


def _recall(ctx) -> MetricResult:
    _, r, n = _pr(ctx)
    return MetricResult.of(MetricValue(100.0 * r, n=n), protocol=PROTOCOL)


PRECISION = register(Metric(key="precision", title="Precision", higher_is_better=True, unit="%",
                            requires=("Sampler",), compute=_precision, tolerance="3"))
RECALL = register(Metric(key="recall", title="Recall", higher_is_better=True, unit="%", requires=("Sampler",),
                         compute=_recall, tolerance="3"))

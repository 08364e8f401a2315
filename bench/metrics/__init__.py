"""Metrics: one per module, each a pure functional core plus its registered `Metric`."""

from bench.metrics import accuracy, fid, inception_score  # noqa: F401  (registers)
from bench.metrics.base import METRICS, Metric, MetricValue

__all__ = ["METRICS", "Metric", "MetricValue"]

"""Metrics: one per module, each a pure functional core plus its registered `Metric`."""

from bench.discovery import import_submodules
from bench.metrics.base import METRICS, Metric, MetricResult, MetricValue

import_submodules(__name__, skip=("base",))

__all__ = ["METRICS", "Metric", "MetricResult", "MetricValue"]

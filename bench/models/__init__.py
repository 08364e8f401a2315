"""The model registry: one family per file."""

from bench.models import jem, pixel_independent, wrn  # noqa: F401  (registers)
from bench.models.base import MODELS, BenchModel

__all__ = ["MODELS", "BenchModel"]

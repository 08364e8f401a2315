"""The model registry: one family per file; every module in this package is imported and registers
its models (third-party models come in through the ``bench.models`` entry-point group)."""

from bench.discovery import import_submodules
from bench.models.base import MODELS, BenchModel

import_submodules(__name__, skip=("base",))

__all__ = ["MODELS", "BenchModel"]

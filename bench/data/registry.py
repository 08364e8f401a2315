"""The dataset registry. A loader is ``fn(root, arg) -> Dataset``; ``arg`` is the part after ``:`` in
specs such as ``npz:/path/x.npz`` or ``imagefolder:/path``."""

from __future__ import annotations

from collections.abc import Callable

from bench.data.base import Dataset
from bench.registry import Registry

Loader = Callable[[str | None, str | None], Dataset]

DATASETS: Registry[Loader] = Registry("dataset", entry_point_group="bench.datasets")

#: loaders whose spec needs ``:<path>``
PATH_LOADERS = ("npz", "imagefolder")

"""Datasets: one module per kind of file layout, all behind `load_dataset(spec, root)`."""

from __future__ import annotations

import os
from functools import lru_cache

from bench.data.base import Dataset, Split
from bench.data.registry import DATASETS, PATH_LOADERS
from bench.errors import UserError

__all__ = ["DATASETS", "Dataset", "Split", "load_dataset", "parse_spec"]

from bench.discovery import import_submodules

import_submodules(__name__, skip=("base", "registry"))


def parse_spec(spec: str) -> tuple[str, str | None]:
    name, sep, arg = str(spec).partition(":")
    if name in PATH_LOADERS and not arg:
        example = "file.npz" if name == "npz" else "dir"
        raise UserError(f"dataset '{name}' needs a path: use data={name}:/path/to/{example}")
    DATASETS.get(name)  # raises UnknownNameError with the valid choices
    if sep and name not in PATH_LOADERS:
        raise UserError(f"dataset '{name}' takes no ':' argument; only {', '.join(PATH_LOADERS)} take a path")
    return name, (arg or None)


def load_dataset(spec: str, root: str | None = None) -> Dataset:
    """Load ``spec`` (e.g. "digits", "mnist", "npz:/path/x.npz"); memoized per process."""
    return _load(str(spec), root, os.environ.get("BENCH_DATA"))


@lru_cache(maxsize=8)
def _load(spec: str, root: str | None, _bench_data_env: str | None) -> Dataset:
    name, arg = parse_spec(spec)
    return DATASETS.get(name)(root, arg)

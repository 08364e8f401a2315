"""Import every module of a package so that its registrations run; one family/metric/loader per file
means adding a file is all it takes to add an entry."""

from __future__ import annotations

import importlib
import pkgutil


def import_submodules(package: str, skip: tuple[str, ...] = ()) -> None:
    pkg = importlib.import_module(package)
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if not info.name.startswith("_") and info.name not in skip:
            importlib.import_module(f"{package}.{info.name}")

"""Deviations from a model's reference, derived from its config: every field that differs from the
``paper`` recipe (the reference's setting) becomes one short line, with the reason where the model gives
one. A ``tiny`` or ``small`` recipe thus lists what it cuts to stay fast, and an ``opts.`` change to the
``paper`` recipe shows up as a deviation too; what the ``paper`` recipe itself keeps different on purpose
is added by the model as fixed lines.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any


def _fmt(value: Any) -> str:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return "(" + ", ".join(f"{k}={_fmt(v)}" for k, v in dataclasses.asdict(value).items()) + ")"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_fmt(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return str(value)


def config_deviations(config: Any, reference: Any, reasons: Mapping[str, str] | None = None,
                      ignore: Collection[str] = ()) -> list[str]:
    """One line per field of ``config`` that differs from ``reference`` (the paper recipe), in field order.
    ``ignore``: fields that change no number (e.g. a sampling batch size)."""
    reasons = reasons or {}
    out = []
    for f in dataclasses.fields(config):
        ours, theirs = getattr(config, f.name), getattr(reference, f.name)
        if f.name in ignore or ours == theirs:
            continue
        line = f"{f.name}={_fmt(ours)} (paper: {_fmt(theirs)})"  # the format of base.recipe_differences (paper-a)
        out.append(f"{line}: {reasons[f.name]}" if f.name in reasons else line)
    return out

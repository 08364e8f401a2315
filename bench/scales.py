"""Scales: presets every model recipe defines.

- tiny: seconds per model on a CPU; the tests use it.
- small: the default; a few minutes per model on 2 CPU cores, numbers meaningful.
- paper: the published hyperparameters, meant for a GPU.
"""

from __future__ import annotations

from enum import Enum


class Scale(str, Enum):
    tiny = "tiny"
    small = "small"
    paper = "paper"


SCALES = tuple(s.value for s in Scale)

"""Scales: presets every model recipe defines.

- tiny: seconds per model on a CPU; the tests use it.
- small: the default; a few minutes per model on 2 CPU cores, numbers meaningful.
- paper: the published hyperparameters, meant for a GPU.
"""

from __future__ import annotations

import math
from enum import Enum


class Scale(str, Enum):
    tiny = "tiny"
    small = "small"
    paper = "paper"


SCALES = tuple(s.value for s in Scale)


# --- small recipes sized by the data ------------------------------------------------------------------
# The small recipes were tuned on the embedded 8×8 digits (1,437 training images). On larger images a
# convolution costs about (H·W / 64) times more per image and real train splits are 40x larger, so the same
# recipe would take days on a CPU. A model's small recipe therefore reads the data's size: images up to
# 16×16 keep the digits recipe; larger ones get the model's large-image sizing (a network that fits the
# image, fewer SGLD steps) and a step budget, calibrated once on 2 CPU cores for a few minutes per model
# (docs/performance.md). Both are functions of the data alone, so the recipe, and with it every number, is
# the same on every machine; the record's model_config holds the sizes chosen.

#: images with more pixels than this get a model's large-image small recipe
SMALL_RECIPE_MAX_AREA = 16 * 16


def large_images(shape: tuple[int, ...]) -> bool:
    """Whether a C×H×W image is past the size the small recipes were tuned on (digits: 8×8)."""
    return shape[-1] * shape[-2] > SMALL_RECIPE_MAX_AREA


def epochs_within(epochs: int, batch_size: int, n_train: int, max_steps: int, drop_last: bool = True) -> int | float:
    """``epochs`` passes over ``n_train`` images in batches of ``batch_size`` when that is at most
    ``max_steps`` optimizer steps, else the fraction of passes that makes ``max_steps`` (4 decimals): a
    small run's length is bounded by its step budget whatever the size of the train split. ``n_train`` 0
    (unknown) keeps ``epochs``. ``drop_last``: the loop's passes are full batches only (else a short last one)."""
    per_epoch = max(1, n_train // batch_size if drop_last else math.ceil(n_train / batch_size))
    if n_train <= 0 or epochs * per_epoch <= max_steps:
        return epochs
    return round(max_steps / per_epoch, 4)


def scale_epochs(marks: tuple[int | float, ...], old: int | float, new: int | float) -> tuple[int | float, ...]:
    """Epoch marks (lr decays) of an ``old``-epoch schedule moved to the same fractions of ``new`` epochs."""
    if new == old:
        return marks
    return tuple(round(m * new / old, 4) for m in marks)


def small_epochs(data, epochs: int, batch_size: int, large_steps: int, drop_last: bool = True) -> int | float:
    """A small recipe's ``epochs`` (tuned on digits), or on images past 16×16 the epochs of at most
    ``large_steps`` updates (`epochs_within`). ``data``: the model's DataInfo (shape, n_train)."""
    if not large_images(data.shape):
        return epochs
    return epochs_within(epochs, batch_size, data.n_train, large_steps, drop_last)

"""The paper-scale smoke: ``bench run scale=paper smoke=N`` runs each model's exact ``paper`` recipe for N
optimizer steps, to show on a CPU (or time on a GPU) that the published recipe runs end to end.

Only what must shrink for a CPU does, and each change is recorded under the record's ``smoke`` and in its
protocol (so a smoke's fingerprint never equals a real run's and the gate never compares the two):

- training stops after N optimizer steps (`TrainContext.max_steps`); the model is never cached;
- the data: the first `TRAIN` training and `TEST` test images (the hold-out and the FID reference shrink
  with them);
- the samples for IS/FID: `SAMPLES`, unless ``n_samples=`` says otherwise;
- each model's ``smoke_overrides`` (batch size, evaluation sampler rounds...), except a field given with
  ``opts.``, which is kept: ``opts.batch_size=64`` times the real batch on a GPU.

`bench table` never shows a smoke as a reproduction (see `bench.results.published`); run tables mark it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from bench.data.base import Dataset, Split

TRAIN = 200
TEST = 20
SAMPLES = 20
NOTE = "a paper-scale smoke: the paper recipe for a few steps with the listed cuts; never a reproduction"


def smoke_data(data: Dataset) -> Dataset:
    """The first `TRAIN` training and `TEST` test images."""
    def head(s: Split, n: int) -> Split:
        return Split(s.x[:n], s.y[:n])

    return dataclasses.replace(data, train=head(data.train, TRAIN), test=head(data.test, TEST),
                               provenance={**data.provenance, "smoke_subset": f"first {TRAIN} train, {TEST} test"})


def smoke_config(model_cls: Any, config: Any, opts: dict[str, Any]) -> tuple[Any, dict[str, dict[str, Any]]]:
    """``config`` with the model's ``smoke_overrides`` (but not the fields in ``opts``); the changes as
    {field: {"paper": value, "smoke": value}}."""
    fields = {f.name for f in dataclasses.fields(config)}
    changes = {k: v for k, v in model_cls.smoke_overrides.items()
               if k in fields and k not in opts and getattr(config, k) != v}
    shrunk = {k: {"paper": getattr(config, k), "smoke": v} for k, v in changes.items()}
    return dataclasses.replace(config, **changes), shrunk


def describe(steps: int, shrunk: dict[str, dict[str, Any]], data: Dataset, n_samples: int | None) -> dict:
    """What the record's ``smoke`` (and ``protocol.smoke``) holds."""
    return {"steps": steps, "shrunk": shrunk, "data": {"n_train": len(data.train), "n_test": len(data.test)},
            "n_samples": n_samples, "note": NOTE}

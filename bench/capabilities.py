"""Capability protocols. Suites never call a method a model lacks: each metric declares the capabilities
it needs, the runner checks them with ``isinstance`` and marks the cell N/A with the reason otherwise.

Conventions for inputs (all models):
- images handed to ``logits``/``energy`` are float tensors in [0, 1] (uint8 / 255), shape N×C×H×W;
- ``log_prob`` takes dequantized images y = (x + u) / 256 in [0, 1) and returns the log-density of y on
  [0, 1]^D in nats, shape [N] (bits/dim then follows docs/architecture.md's convention);
- ``sample`` returns uint8 N×C×H×W and must be deterministic given the generator.
Each model maps these to its own preprocessing (JEM: [-1, 1]).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class Classifier(Protocol):
    def logits(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class Energy(Protocol):
    """Unnormalized: log p(x) = -energy(x) - log Z."""

    def energy(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class LogProb(Protocol):
    #: "exact", "bound" (e.g. the VAE's IWAE bound) or "estimate" (e.g. AIS for the RBM's log Z)
    log_prob_kind: str

    def log_prob(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class Sampler(Protocol):
    def sample(self, n: int, generator: torch.Generator) -> Tensor: ...


@runtime_checkable
class Features(Protocol):
    """The classifier's penultimate layer, N×D, for feature-space OOD detectors (Mahalanobis, KNN): what its
    last linear layer reads, from the same input path as ``logits``."""

    def features(self, x: Tensor) -> Tensor: ...


CAPABILITIES: dict[str, type] = {
    "Classifier": Classifier,
    "Energy": Energy,
    "LogProb": LogProb,
    "Sampler": Sampler,
    "Features": Features,
}


def capabilities_of(model: object) -> list[str]:
    return [name for name, proto in CAPABILITIES.items() if isinstance(model, proto)]


_METHODS = {"Classifier": "logits", "Energy": "energy", "LogProb": "log_prob", "Sampler": "sample",
            "Features": "features"}


def class_capabilities(cls: type) -> list[str]:
    """Capabilities a model class offers, without building it (for listings and ``models: all``)."""
    return [name for name, method in _METHODS.items() if callable(getattr(cls, method, None))]

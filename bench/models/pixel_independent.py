"""`pixel_independent`: every pixel an independent 256-way categorical fitted on the train split.

It has an exact log-likelihood and exact samples, and is the floor every real generative model must
beat on bits/dim and FID. Counts are smoothed with a symmetric Dirichlet(α) prior (α recorded), so
unseen values keep finite likelihood.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bench.data.base import Split
from bench.models.base import BenchModel, DataInfo, TrainContext, register
from bench.scales import Scale


@dataclass(frozen=True)
class PixelIndependentConfig:
    alpha: float = 1.0  # Dirichlet smoothing pseudo-count per value


@register("pixel_independent")
class PixelIndependent(BenchModel):
    trains_in_steps = False  # a closed form: smoothed counts
    family = "baseline"
    Config = PixelIndependentConfig
    log_prob_kind = "exact"
    density_is_differentiable = False  # a histogram per pixel: flat within each 8-bit bin

    def __init__(self, config: PixelIndependentConfig, data: DataInfo):
        super().__init__(config, data)
        d = math.prod(data.shape)
        self.register_buffer("log_probs", torch.full((d, 256), -math.log(256.0)))

    @classmethod
    def recipe(cls, scale: Scale, data: DataInfo) -> PixelIndependentConfig:
        return PixelIndependentConfig()  # nothing to scale: fitting is closed-form

    def fit(self, train: Split, ctx: TrainContext) -> dict[str, Any]:
        x = train.x.reshape(len(train), -1).long()  # N×D
        d = x.shape[1]
        counts = torch.zeros(d, 256, dtype=torch.float64)
        counts.scatter_add_(1, x.T, torch.ones(d, x.shape[0], dtype=torch.float64))
        counts += self.config.alpha
        self.log_probs.copy_((counts / counts.sum(1, keepdim=True)).log().float())
        return {"steps": 1}

    def log_prob(self, x: Tensor) -> Tensor:
        """Density of dequantized y ∈ [0,1)^D: each pixel's mass P(k) spread over its bin of width 1/256."""
        k = (x.reshape(x.shape[0], -1) * 256.0).floor().clamp(0, 255).long()
        lp = self.log_probs.to(x.device).gather(1, k.T).T  # N×D
        return lp.double().sum(1) + k.shape[1] * math.log(256.0)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        probs = self.log_probs.exp().double().cpu()  # drawn on the CPU: the same samples on every device
        vals = torch.multinomial(probs, n, replacement=True, generator=generator)  # D×n
        return vals.T.reshape(n, *self.data_info.shape).to(torch.uint8)

"""`nice`: NICE (Dinh, Krueger & Bengio, "NICE: Non-linear Independent Components Estimation",
ICLR 2015 workshop, arXiv:1410.8516).

The image is flattened to a vector; four additive coupling layers z_b = x_b + t(x_a) alternate which
half of the dimensions (odd/even) they change, each t an MLP of ReLU layers; a final diagonal scaling
layer z = exp(s)⊙h gives the only non-zero log-det, Σ s (§3.3). The base is the standard logistic
distribution (the paper's choice for MNIST, SVHN and CIFAR-10). The `paper` recipe is the CIFAR-10
setting of §5.1: 4 coupling layers with 4 hidden layers of 2000 units, Adam (lr 1e-3, β₁ 0.9, β₂ 0.01,
ε 1e-4).

Differences from the paper: images enter through a logit transform with its log-det (the paper models
[0, 1] or [−1, 1] values directly), so log_prob is the density of y on [0, 1]^D; the last layer of each
coupling MLP starts at zero, so the flow starts as the identity.

The `small` and `tiny` recipes (not `paper`) put `_flows.ValueWarp` in front of the logit: a learned,
data-initialized monotone warp with one bin per 8-bit value, shared by every pixel. It is not in the paper;
it lets a few-minute run on 8×8 digits (17 of 256 values used) spend its capacity on the images rather
than on carving the unused values out of a smooth density. `value_warp` in the record says which it was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bench.models._flows import (
    Coupling,
    Flatten,
    FlowLayer,
    FlowModel,
    FlowSequence,
    Prior,
    alternating_mask,
    input_layers,
    zero_init,
)
from bench.models.base import DataInfo, register
from bench.scales import Scale, small_epochs


@dataclass(frozen=True)
class NICEConfig:
    coupling_layers: int = 4
    hidden: int = 2000  # units per hidden layer of each coupling MLP
    hidden_layers: int = 4
    prior: Prior = "logistic"
    logit_alpha: float = 0.05
    value_warp: bool = False  # learned per-value warp before the logit (see _flows.ValueWarp)
    # optimization (NICE §5.1)
    epochs: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    adam_beta2: float = 0.01
    adam_eps: float = 1e-4
    warmup_iters: int = 0
    max_grad_norm: float = 100.0
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.coupling_layers < 2:
            raise ValueError(f"NICE needs at least 2 coupling layers so every dimension is changed, got "
                             f"{self.coupling_layers}")
        if self.prior not in ("gaussian", "logistic"):
            raise ValueError(f"prior must be 'gaussian' or 'logistic', got {self.prior!r}")


class DiagonalScaling(FlowLayer):
    """z = exp(s)⊙x: NICE's scaling layer, the only part of the flow that changes volume."""

    def __init__(self, dim: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * self.log_scale.exp(), self.log_scale.sum().expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return z * (-self.log_scale).exp()


def mlp(dim: int, hidden: int, layers: int) -> nn.Module:
    mods: list[nn.Module] = []
    width = dim
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*mods, zero_init(nn.Linear(width, dim)))


#: the small recipe's step budget on images past 16×16 (bench.scales: calibrated on 2 CPU cores)
LARGE_STEPS = 1500


@register("nice")
class NICE(FlowModel):
    Config = NICEConfig

    def __init__(self, config: NICEConfig, data: DataInfo):
        super().__init__(config, data)
        c, d = config, self.dim
        self.prior = c.prior
        couplings = [Coupling(mlp(d, c.hidden, c.hidden_layers), alternating_mask(d, i % 2), "additive")
                     for i in range(c.coupling_layers)]
        self.flow = FlowSequence([input_layers(c.logit_alpha, c.value_warp), Flatten(data.shape), *couplings,
                                  DiagonalScaling(d)])

    @classmethod
    def recipe(cls, scale: Scale, data: DataInfo) -> NICEConfig:
        if scale == Scale.paper:
            return NICEConfig()
        d = math.prod(data.shape)
        if scale == Scale.small:
            # NICE's β₂ = 0.01 is tuned for its 1500 epochs; the small run uses Adam's defaults
            return NICEConfig(hidden=min(1000, 4 * d), hidden_layers=4, value_warp=True,
                              epochs=small_epochs(data, 60, 64, LARGE_STEPS, drop_last=False), batch_size=64, lr=1e-3,
                              adam_beta2=0.999, adam_eps=1e-8, warmup_iters=100)
        return NICEConfig(hidden=32, hidden_layers=2, value_warp=True, epochs=1, batch_size=64, adam_beta2=0.999,
                          adam_eps=1e-8)

    def optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.Adam(self.parameters(), lr=c.lr, betas=(0.9, c.adam_beta2), eps=c.adam_eps,
                                weight_decay=c.weight_decay)

"""`realnvp`: Real NVP (Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", ICLR 2017,
arXiv:1605.08803).

Affine coupling layers z_b = x_b·exp(s(x_a)) + t(x_a) with s = γ·tanh(·) (a learned per-channel γ, as in
the authors' code), in the multi-scale architecture of §3.6: each scale but the last applies three
checkerboard-masked couplings, a squeeze, three channel-masked couplings, then factors out half of the
channels to the standard normal base; the last scale applies four checkerboard couplings. Masks
alternate between layers so every dimension is transformed. s and t come from one residual network
per coupling (conv3×3 → `res_blocks` residual blocks of `hidden` channels → zero-initialized conv3×3).
Images enter through the logit transform of §4.1 (α = 0.05) with its log-det, so log_prob is the
density of y on [0, 1]^D. The `paper` recipe is the CIFAR-10 setting of §4.1: 8 residual blocks of
64 feature maps, two scales ("downscale only once"), Adam lr 1e-3, batch 64, L2 5e-5.

Differences from the paper: no batch normalization (neither in the coupling networks nor as a flow
layer: batch statistics would make log p(x) depend on the batch), no weight normalization.

The `small` and `tiny` recipes (not `paper`) put `_flows.ValueWarp` in front of the logit: a learned,
data-initialized monotone warp with one bin per 8-bit value, shared by every pixel. It is not in the paper;
it lets a few-minute run on 8×8 digits (17 of 256 values used) spend its capacity on the images rather
than on carving the unused values out of a smooth density. `value_warp` in the record says which it was.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from bench.models._flows import (
    Coupling,
    FlowModel,
    FlowSequence,
    MultiScale,
    Shape,
    Squeeze,
    channel_mask,
    checkerboard_mask,
    input_layers,
    zero_init,
)
from bench.models.base import DataInfo, register
from bench.scales import Scale, small_epochs


@dataclass(frozen=True)
class RealNVPConfig:
    scales: int = 2
    hidden: int = 64  # feature maps of the s/t residual networks
    res_blocks: int = 8
    logit_alpha: float = 0.05
    value_warp: bool = False  # learned per-value warp before the logit (see _flows.ValueWarp)
    # optimization
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 5e-5
    warmup_iters: int = 0
    max_grad_norm: float = 100.0

    def __post_init__(self):
        if self.scales < 1 or self.res_blocks < 0:
            raise ValueError(f"Real NVP needs scales >= 1 and res_blocks >= 0, got {self.scales}, {self.res_blocks}")


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def st_net(channels: int, hidden: int, res_blocks: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), *(ResBlock(hidden) for _ in range(res_blocks)),
                         nn.ReLU(), zero_init(nn.Conv2d(hidden, 2 * channels, 3, padding=1)))


#: the small recipe's step budget on images past 16×16 (bench.scales: calibrated on 2 CPU cores)
LARGE_STEPS = 600


@register("realnvp")
class RealNVP(FlowModel):
    Config = RealNVPConfig

    def __init__(self, config: RealNVPConfig, data: DataInfo):
        super().__init__(config, data)
        c = config
        _, h, w = data.shape
        if h % (2 ** (c.scales - 1)) or w % (2 ** (c.scales - 1)):
            raise ValueError(f"realnvp: {c.scales} scales squeeze {h}×{w} images {c.scales - 1} times; lower `scales`")

        def coupling(shape: Shape, mask) -> Coupling:
            return Coupling(st_net(shape[0], c.hidden, c.res_blocks), mask, "tanh")

        levels = []
        shape: Shape = tuple(data.shape)
        for i in range(c.scales):
            if i == c.scales - 1:
                levels.append(FlowSequence(coupling(shape, checkerboard_mask(shape, k % 2)) for k in range(4)))
                break
            layers = [coupling(shape, checkerboard_mask(shape, k % 2)) for k in range(3)]
            squeeze = Squeeze()
            shape = squeeze.out_shape(shape)
            layers += [squeeze, *(coupling(shape, channel_mask(shape, k % 2)) for k in range(3))]
            levels.append(FlowSequence(layers))
            shape = (shape[0] // 2, *shape[1:])
        self.flow = FlowSequence([input_layers(c.logit_alpha, c.value_warp),
                                  MultiScale(levels, data.shape, learned_prior=False)])

    @classmethod
    def recipe(cls, scale: Scale, data: DataInfo) -> RealNVPConfig:
        if scale == Scale.paper:
            return RealNVPConfig()
        if scale == Scale.small:
            return RealNVPConfig(scales=2, hidden=32, res_blocks=1, value_warp=True,
                                 epochs=small_epochs(data, 30, 64, LARGE_STEPS, drop_last=False), batch_size=64,
                                 lr=1e-3, warmup_iters=100)
        return RealNVPConfig(scales=2, hidden=8, res_blocks=1, value_warp=True, epochs=1, batch_size=64, lr=1e-3)

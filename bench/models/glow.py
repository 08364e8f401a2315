"""`glow` and `glow_hybrid`: Glow (Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1×1
Convolutions", NeurIPS 2018, arXiv:1807.03039) and its hybrid classifier variant.

Glow is a multi-scale flow of L levels; each level squeezes, then applies K steps of
actnorm (data-dependent init) → invertible 1×1 convolution (LU-parametrized) → affine coupling
(exp(s) = sigmoid(h + 2), channel split, coupling net conv3×3 → ReLU → conv1×1 → ReLU → zero-init
conv3×3), and every level but the last factors out half of its channels under Glow's learned
conditional prior N(μ(z₁), σ(z₁)²). Sampling draws the base at a temperature T (std scaled by T, §5).
The `paper` recipe is the CIFAR-10 setting of openai/glow (L=3, K=32, 512 hidden channels, affine
coupling, LU 1×1 conv, Adam lr 1e-3, batch 64).

Differences from the paper, all small: images enter through a logit transform (with its log-det, so the
density is that of y on [0, 1]^D) instead of being shifted to [−0.5, 0.5]; actnorm inside the coupling
networks is replaced by ordinary biases; the top-level prior is the standard normal (no `learntop`).

`glow_hybrid` is the "Glow" row of JEM's Table 1 (Grathwohl et al. 2020), which took it from Residual
Flows' hybrid experiments (Chen et al. 2019, §6.3, following Nalisnick et al. 2019): a classifier on the
latent of every level (conv3×3 → ReLU → average pooling, then one linear layer) trained jointly on
``nll_weight``·(−log p(x)) + cross-entropy. The paper's weight is 1 (λ = 1, nats; Table 1's 67.6%).

The `small` and `tiny` recipes (not `paper`) put `_flows.ValueWarp` in front of the logit: a learned,
data-initialized monotone warp with one bin per 8-bit value, shared by every pixel. It is not in the paper;
it lets a few-minute run on 8×8 digits (17 of 256 values used) spend its capacity on the images rather
than on carving the unused values out of a smooth density. `value_warp` in the record says which it was.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.models._flows import (
    ActNorm,
    ClassifierHeads,
    Coupling,
    FlowLayer,
    FlowModel,
    FlowSequence,
    InvConv1x1,
    MultiScale,
    Shape,
    Squeeze,
    channel_mask,
    input_layers,
    max_squeezes,
    zero_init,
)
from bench.models.base import DataInfo, register
from bench.scales import Scale


@dataclass(frozen=True)
class GlowConfig:
    levels: int = 3  # L
    steps_per_level: int = 32  # K
    hidden: int = 512  # channels of the coupling networks
    learned_prior: bool = True  # Glow's conditional prior on the factored-out halves
    logit_alpha: float = 0.05
    value_warp: bool = False  # learned per-value warp before the logit (see _flows.ValueWarp)
    temperature: float = 1.0  # sampling: the base's std is scaled by T
    # optimization
    epochs: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_iters: int = 3910  # openai/glow warms up for 10 epochs (CIFAR-10: 10 × 391 batches)
    max_grad_norm: float = 50.0
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.levels < 1 or self.steps_per_level < 1:
            raise ValueError(f"Glow needs levels >= 1 and steps_per_level >= 1, got {self.levels}, "
                             f"{self.steps_per_level}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")


def coupling_net(channels: int, hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
        nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
        zero_init(nn.Conv2d(hidden, 2 * channels, 3, padding=1)),
    )


def glow_step(shape: Shape, hidden: int) -> FlowLayer:
    c = shape[0]
    coupling = Coupling(coupling_net(c, hidden), channel_mask(shape, 0), "sigmoid")
    return FlowSequence([ActNorm(c), InvConv1x1(c), coupling])


def check_levels(data: DataInfo, levels: int, name: str) -> None:
    _, h, w = data.shape
    if h % (2 ** levels) or w % (2 ** levels):
        raise ValueError(f"{name}: {levels} levels squeeze {h}×{w} images {levels} times, which needs both sides "
                         f"divisible by {2 ** levels}; lower `levels`")


def build_glow(c: GlowConfig, data: DataInfo) -> tuple[FlowSequence, MultiScale]:
    check_levels(data, c.levels, "glow")
    levels = []
    shape: Shape = tuple(data.shape)
    for i in range(c.levels):
        squeeze = Squeeze()
        shape = squeeze.out_shape(shape)
        levels.append(FlowSequence([squeeze, *(glow_step(shape, c.hidden) for _ in range(c.steps_per_level))]))
        if i < c.levels - 1:
            shape = (shape[0] // 2, *shape[1:])
    return input_layers(c.logit_alpha, c.value_warp), MultiScale(levels, data.shape, learned_prior=c.learned_prior)


@register("glow")
class Glow(FlowModel):
    Config = GlowConfig

    def __init__(self, config: GlowConfig, data: DataInfo):
        super().__init__(config, data)
        self.flow = FlowSequence(build_glow(config, data))

    # views into `flow` (registering the parts twice would duplicate them in the state dict)
    @property
    def pre(self) -> FlowSequence:
        return self.flow.layers[0]

    @property
    def body(self) -> MultiScale:
        return self.flow.layers[1]

    @classmethod
    def recipe(cls, scale: Scale, data: DataInfo) -> GlowConfig:
        levels = min(3, max_squeezes(data.shape))  # the paper's L = 3 where the image allows it (not 28×28)
        if scale == Scale.paper:
            return GlowConfig(levels=levels)
        levels = min(levels, 2 if min(data.shape[1:]) < 16 else 3)
        if scale == Scale.small:
            return GlowConfig(levels=levels, steps_per_level=8, hidden=64, value_warp=True, epochs=20, batch_size=64,
                              lr=1e-3, warmup_iters=100)
        return GlowConfig(levels=levels, steps_per_level=2, hidden=8, value_warp=True, epochs=1, batch_size=64, lr=1e-3,
                          warmup_iters=5)

    @property
    def temperature(self) -> float:
        return self.config.temperature


@dataclass(frozen=True)
class GlowHybridConfig(GlowConfig):
    nll_weight: float = 1.0  # λ on −log p(x) in nats; cross-entropy has weight 1 (Chen et al. 2019, §6.3)
    classifier_hidden: int = 256  # channels of each level's head (rtqichen/residual-flows `--cdim`)


@register("glow_hybrid")
class GlowHybrid(Glow):
    """Glow with a classifier on its latent: the "Glow" row of JEM's Table 1."""

    Config = GlowHybridConfig

    def __init__(self, config: GlowHybridConfig, data: DataInfo):
        super().__init__(config, data)
        self.classifier = ClassifierHeads(self.body.level_shapes, config.classifier_hidden, data.n_classes)

    @classmethod
    def recipe(cls, scale: Scale, data: DataInfo) -> GlowHybridConfig:
        g = asdict(Glow.recipe(scale, data))
        if scale == Scale.paper:
            return GlowHybridConfig(**g)
        return GlowHybridConfig(**g, classifier_hidden=64 if scale == Scale.small else 8)

    def _features(self, y: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        s, ld_pre = self.pre(y)
        z, ld, features = self.body.forward_features(s)
        return z, ld + ld_pre, features

    def logits(self, x: Tensor) -> Tensor:
        """Class logits of images x ∈ [0, 1] (uint8/255): the classifier reads the latent of the bin centre
        (x·255 + ½)/256, the mean of the dequantized y the model was trained on."""
        self.check_images(x, "logits")
        return self.classifier(self._features((x * 255.0 + 0.5) / 256.0)[2])

    def features(self, x: Tensor) -> Tensor:
        """What the classifier's linear layer reads, from the same latent as ``logits`` (Features capability)."""
        self.check_images(x, "features")
        return self.classifier.pooled(self._features((x * 255.0 + 0.5) / 256.0)[2])

    def _train_latent(self, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Any]:
        return self._features(y)

    def _objective(self, nll: Tensor, features: Any, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        ce = F.cross_entropy(self.classifier(features), labels)
        return self.config.nll_weight * nll + ce, {"ce": ce.item()}

"""`glow` and `glow_hybrid`: Glow (Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1×1
Convolutions", NeurIPS 2018, arXiv:1807.03039) and its hybrid classifier variant.

Glow is a multi-scale flow of L levels; each level squeezes, then applies K steps of
actnorm (data-dependent init) → invertible 1×1 convolution (LU-parametrized) → affine coupling
(exp(s) = sigmoid(h + 2), channel split, coupling net conv3×3 → ReLU → conv1×1 → ReLU → zero-init
conv3×3; or additive, their `--flow_coupling 0`: `coupling`), and every level but the last factors out
half of its channels under Glow's learned conditional prior N(μ(z₁), σ(z₁)²). Sampling draws the base at a
temperature T (std scaled by T, §5).
The `paper` recipe is the CIFAR-10 setting of openai/glow (`train.py --problem cifar10 --n_level 3 --depth
32 --flow_coupling 1 --lr 0.001` run on 8 workers): L=3, K=32, 512 hidden channels, affine coupling; an
effective batch of 512 (8 × 64; here as micro-batches of 256, the size of their data-dependent init
batch), their Adamax (`GlowAdamax`: β1 0.9, β2 = 1 − 1/(steps per epoch)), a Polyak average of the weights
with that same decay, a learning rate warmed up linearly over 10 epochs of images (the first step at 0),
no gradient clipping, and their standard augmentation (`--dal 1`: random shifts of up to 10% of the side).

Kept different on purpose (`deviations`): images enter through a logit transform (with its log-det, so the
density is that of y on [0, 1]^D) instead of being shifted to [−0.5, 0.5]; actnorm inside the coupling
networks is replaced by ordinary biases; the top-level prior is the standard normal (no `learntop`); the
1×1 convolution is LU-parametrized (their code's switch; its default is the plain matrix); shifts are whole
pixels with edge replication (Keras shifts by real amounts with bilinear interpolation); and the evaluated
weights are the Polyak average (their train.py computes it but leaves the swap commented out).

`glow_hybrid` is the "Glow" row of JEM's Table 1 (Grathwohl et al. 2020), which took it from Residual
Flows' hybrid experiments (Chen et al. 2019, §6.3, following Nalisnick et al. 2019): a classifier on the
latent of every level (conv3×3 → actnorm → ReLU → average pooling, then one linear layer) trained jointly
on (``nll_weight``·(−log p(x)) + cross-entropy)/ln 2, i.e. in bits. The paper's weight is 1 (λ = 1;
Table 1's 67.6%). Its optimization is Glow's, as above. The classifier reads test images dequantized as in
training, as their test transform does (`eval_dequantize`; the noise seeded by the images' own bytes).

The `small` and `tiny` recipes (not `paper`) put `_flows.ValueWarp` in front of the logit: a learned,
data-initialized monotone warp with one bin per 8-bit value, shared by every pixel. It is not in the paper;
it lets a few-minute run on 8×8 digits (17 of 256 values used) spend its capacity on the images rather
than on carving the unused values out of a smooth density. `value_warp` in the record says which it was.
Where the small run is shorter than one epoch (MNIST, Fashion-MNIST), it also couples additively and sets
`polyak_epochs` to a twentieth of the run (see `Glow.recipe`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from bench.data.augment import Augment
from bench.errors import UserError
from bench.models._deviations import config_deviations
from bench.models._flows import (
    ActNorm,
    ClassifierHeads,
    Coupling,
    FlowLayer,
    FlowModel,
    FlowSequence,
    GlowAdamax,
    InvConv1x1,
    MultiScale,
    Shape,
    Squeeze,
    channel_mask,
    classifier_input,
    hybrid_objective,
    input_layers,
    max_squeezes,
    zero_init,
)
from bench.models.base import DataInfo, register
from bench.scales import Scale, small_epochs


@dataclass(frozen=True)
class GlowConfig:
    levels: int = 3  # L
    steps_per_level: int = 32  # K
    hidden: int = 512  # channels of the coupling networks
    coupling: Literal["affine", "additive"] = "affine"  # openai/glow's --flow_coupling 1 / 0
    learned_prior: bool = True  # Glow's conditional prior on the factored-out halves
    logit_alpha: float = 0.05
    value_warp: bool = False  # learned per-value warp before the logit (see _flows.ValueWarp)
    temperature: float = 1.0  # sampling: the base's std is scaled by T
    # optimization (openai/glow train.py and optim.py)
    augment: Augment = Augment()
    epochs: int = 1000
    batch_size: int = 512  # the effective batch: 64 per worker × 8 workers
    micro_batch_size: int = 256  # gradients accumulated over these (0: the whole batch at once)
    optimizer: Literal["adamax", "adam"] = "adamax"  # adamax: their `optim.adamax` (GlowAdamax)
    lr: float = 1e-3
    beta1: float = 0.9
    polyak_epochs: float = 1.0  # Adamax's β2 and the Polyak decay are 1 − 1/(steps per epoch · this); 0: no average
    warmup_epochs: float = 10.0  # lr·min(1, images seen before the step / (epochs' images))
    max_grad_norm: float = 0.0  # 0: no clipping, as theirs
    weight_decay: float = 0.0

    def __post_init__(self):
        if self.levels < 1 or self.steps_per_level < 1:
            raise ValueError(f"Glow needs levels >= 1 and steps_per_level >= 1, got {self.levels}, "
                             f"{self.steps_per_level}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.coupling not in ("affine", "additive"):
            raise ValueError(f"coupling must be 'affine' or 'additive', got {self.coupling!r}")
        if self.optimizer not in ("adamax", "adam"):
            raise ValueError(f"optimizer must be 'adamax' or 'adam', got {self.optimizer!r}")
        if self.micro_batch_size < 0 or self.polyak_epochs < 0 or self.warmup_epochs < 0:
            raise ValueError("micro_batch_size, polyak_epochs and warmup_epochs must be >= 0")


def coupling_net(channels: int, hidden: int, outputs: int = 2) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 3, padding=1), nn.ReLU(),
        nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
        zero_init(nn.Conv2d(hidden, outputs * channels, 3, padding=1)),
    )


def glow_step(shape: Shape, hidden: int, coupling: str = "affine") -> FlowLayer:
    c = shape[0]
    if coupling == "additive":
        layer = Coupling(coupling_net(c, hidden, 1), channel_mask(shape, 0), "additive")
    else:
        layer = Coupling(coupling_net(c, hidden), channel_mask(shape, 0), "sigmoid")
    return FlowSequence([ActNorm(c), InvConv1x1(c), layer])


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
        steps = (glow_step(shape, c.hidden, c.coupling) for _ in range(c.steps_per_level))
        levels.append(FlowSequence([squeeze, *steps]))
        if i < c.levels - 1:
            shape = (shape[0] // 2, *shape[1:])
    return input_layers(c.logit_alpha, c.value_warp), MultiScale(levels, data.shape, learned_prior=c.learned_prior)


#: the small recipe's step budget on images past 16×16 (bench.scales: calibrated on 2 CPU cores)
LARGE_STEPS = 400


@register("glow")
class Glow(FlowModel):
    Config = GlowConfig
    reference = "Kingma & Dhariwal 2018 (arXiv:1807.03039); openai/glow train.py, model.py, optim.py"
    #: a paper-scale smoke on a CPU (bench.smoke): tiny batches in one pass
    # batch 8, not 2: actnorm's data-dependent init from 2 images made the paper smoke on digits diverge at
    # its first step (loss inf); 8 runs
    smoke_overrides: ClassVar[dict[str, Any]] = {"batch_size": 8, "micro_batch_size": 0}
    #: what the `paper` recipe keeps different from openai/glow on purpose, and why
    PAPER_DEVIATIONS: tuple[str, ...] = (
        "input: logit transform with its log-det (theirs: x/256 − 0.5), so every flow here models y on [0, 1]^D",
        "coupling networks with plain biases, no actnorm inside them",
        "top prior N(0, I), no learntop",
        "1×1 convolution LU-parametrized (their code switch; its default is the plain matrix)",
        "augmentation: whole-pixel shifts of up to 10% with edge replication (theirs: Keras's real-valued "
        "shifts, bilinear)",
        "evaluated with the Polyak-averaged weights (their train.py computes the average but leaves the swap "
        "commented out)",
    )

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
            # --dal 1: Keras shifts of up to 10% of the width and height (3 px at 32×32), edges replicated
            shift = Augment(pad=round(0.1 * min(data.shape[1:])), pad_mode="replicate")
            return GlowConfig(levels=levels, augment=shift)
        levels = min(levels, 2 if min(data.shape[1:]) < 16 else 3)
        if scale == Scale.small:
            epochs = small_epochs(data, 20, 64, LARGE_STEPS, drop_last=False)
            # digits (20 epochs) and the CIFAR-10 JPEGs (3.2) keep openai/glow's one-epoch average and affine
            # couplings. A run shorter than one epoch (MNIST, Fashion-MNIST: 400 of 938 steps; docs/performance.md)
            # averages (and sets β2) over a twentieth of the run, as on digits, where one epoch would leave the
            # evaluated weights mostly the initial ones; and couples additively, whose inverse cannot overflow as
            # a short run's affine one did (non-finite Fashion-MNIST samples)
            short = epochs < 1
            return GlowConfig(levels=levels, steps_per_level=8, hidden=64, value_warp=True, epochs=epochs,
                              batch_size=64, micro_batch_size=0, warmup_epochs=round(epochs / 5, 4),
                              coupling="additive" if short else "affine",
                              polyak_epochs=round(epochs / 20, 4) if short else 1.0)
        return GlowConfig(levels=levels, steps_per_level=2, hidden=8, value_warp=True, epochs=1, batch_size=64,
                          micro_batch_size=0, warmup_epochs=0.2)

    def deviations(self, scale: Scale) -> list[str]:
        small = "a small network: minutes on a CPU"
        reasons = {
            "levels": "two levels on images smaller than 16×16", "steps_per_level": small, "hidden": small,
            "value_warp": "a learned per-value warp before the logit (_flows.ValueWarp): digits use 17 of 256 values",
            "epochs": "fewer epochs: minutes on a CPU", "batch_size": "a CPU batch",
            "micro_batch_size": "the whole batch at once",
            "warmup_epochs": "a warm-up scaled to the short run", "augment": "no augmentation on digits",
            "polyak_epochs": "Adamax's β2 and the Polyak average over a twentieth of a run shorter than one epoch, "
                             "as on digits (one epoch's average would be mostly the initial weights)",
            "coupling": "additive couplings (openai/glow's --flow_coupling 0, their CelebA and LSUN setting) in a run "
                        "shorter than one epoch, whose affine inverse overflowed (non-finite Fashion-MNIST samples)",
            "classifier_hidden": small,
            "eval_dequantize": "the classifier reads the bin centres (the mean of the dequantized inputs), not one "
                               "dequantization of each test image: lower variance for a short run (digits: 95.28% "
                               "against 88.33%)",
        }
        return [*config_deviations(self.config, self.recipe(Scale.paper, self.data_info), reasons),
                *(self.PAPER_DEVIATIONS if scale == Scale.paper else ())]

    @property
    def temperature(self) -> float:
        return self.config.temperature

    # --- openai/glow's optimization ----------------------------------------------------------------
    def _beta2(self, steps_per_epoch: int) -> float:
        return 1.0 - 1.0 / (steps_per_epoch * self.config.polyak_epochs) if self.config.polyak_epochs > 0 else 0.999

    def _make_optimizer(self, steps_per_epoch: int) -> torch.optim.Optimizer:
        c = self.config
        if 0 < steps_per_epoch * c.polyak_epochs <= 1:
            raise UserError(
                f"{self.name}: {steps_per_epoch} optimizer step(s) per epoch (batch_size {c.batch_size}) × "
                f"polyak_epochs {c.polyak_epochs} makes openai/glow's β2 = 1 − 1/(steps per epoch · "
                "polyak_epochs) zero or less, which divides each step's momentum by the latest gradient alone and "
                "diverges; lower opts.batch_size to at most half the training images, or raise opts.polyak_epochs")
        if c.optimizer == "adamax":
            return GlowAdamax(self.parameters(), c.lr, c.beta1, self._beta2(steps_per_epoch))
        return torch.optim.Adam(self.parameters(), lr=c.lr, betas=(c.beta1, self._beta2(steps_per_epoch)))

    def _lr_factor(self, step: int, steps_per_epoch: int) -> float:
        """train.py: lr·min(1, n_processed/(n_train·epochs_warmup)), n_processed the images of the steps
        before this one (so the first step has lr 0)."""
        c = self.config
        if c.warmup_epochs <= 0:
            return 1.0
        return min(1.0, step / (steps_per_epoch * c.warmup_epochs))

    def _average_decay(self, steps_per_epoch: int) -> float:
        return self._beta2(steps_per_epoch) if self.config.polyak_epochs > 0 else 0.0


@dataclass(frozen=True)
class GlowHybridConfig(GlowConfig):
    nll_weight: float = 1.0  # λ on −log p(x) in nats; cross-entropy has weight 1 (Chen et al. 2019, §6.3)
    classifier_hidden: int = 256  # channels of each level's head (rtqichen/residual-flows `--cdim`)
    # the classifier reads dequantized test images (content-seeded), as their test transform; False: bin centres
    eval_dequantize: bool = True


@register("glow_hybrid")
class GlowHybrid(Glow):
    """Glow with a classifier on its latent: the "Glow" row of JEM's Table 1."""

    Config = GlowHybridConfig

    def __init__(self, config: GlowHybridConfig, data: DataInfo):
        super().__init__(config, data)
        self.classifier = ClassifierHeads(self.body.level_shapes, config.classifier_hidden, data.n_classes)

    @classmethod
    def recipe(cls, scale: Scale, data: DataInfo) -> GlowHybridConfig:
        base = Glow.recipe(scale, data)
        g = {f.name: getattr(base, f.name) for f in fields(base)}  # shallow: asdict would turn Augment into a dict
        if scale == Scale.paper:
            return GlowHybridConfig(**g)
        return GlowHybridConfig(**g, classifier_hidden=64 if scale == Scale.small else 8, eval_dequantize=False)

    def deviations(self, scale: Scale) -> list[str]:
        extra = ("classifier: Residual Flows' hybrid heads and objective (the source of Table 1's 67.6%), not "
                 "openai/glow's --ycond --weight_y top-latent classifier",)
        return [*super().deviations(scale), *(extra if scale == Scale.paper else ())]

    def _features(self, y: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        s, ld_pre = self.pre(y)
        z, ld, features = self.body.forward_features(s)
        return z, ld + ld_pre, features

    def logits(self, x: Tensor) -> Tensor:
        """Class logits of images x ∈ [0, 1] (uint8/255), read from the latent of `_flows.classifier_input`: the
        images dequantized as in training (``eval_dequantize``, seeded by content) or the bin centres."""
        self.check_images(x, "logits")
        return self.classifier(self._features(classifier_input(x, self.config.eval_dequantize))[2])

    def features(self, x: Tensor) -> Tensor:
        """What the classifier's linear layer reads, from the same latent as ``logits`` (Features capability)."""
        self.check_images(x, "features")
        return self.classifier.pooled(self._features(classifier_input(x, self.config.eval_dequantize))[2])

    def _train_latent(self, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Any]:
        return self._features(y)

    def _objective(self, nll: Tensor, features: Any, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        return hybrid_objective(nll, self.classifier(features), labels, self.config.nll_weight)

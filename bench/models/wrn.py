"""`wrn`: the Wide-ResNet classifier (Zagoruyko & Komodakis 2016, arXiv:1605.07146) in the exact form
JEM builds it on (wgrathwohl/JEM `models/wideresnet.py`), so JEM's released weights load by key name.

Block: conv1(lrelu(norm1(x))) then conv2(lrelu(norm2(.))), conv2 carries the stride; a 1×1 conv with
bias as shortcut when the shape changes; every conv has a bias. Head: lrelu(norm(.)), global average
pooling (JEM's 8×8 pool is global at 32×32), flatten, then `class_output`. The parameter names match
JEM's `CCF` model: ``f.*`` for the backbone, ``class_output.*`` for the head.

Batch norm: JEM's ``get_norm`` builds ``torch.nn.BatchNorm2d(n, momentum=0.9)``. That is PyTorch's
convention (the weight of the new batch: running ← 0.1·running + 0.9·batch), not Keras' decay 0.9, so the
`paper` recipe passes 0.9 to PyTorch unchanged: the reference's running statistics are nearly the last
training batch's, and so are bench's.

The `paper` recipe trains it with JEM's ``train_wrn_ebm.py`` as a plain classifier (``--p_x_weight 0
--norm batch``; the mechanics are in `bench.models.training`) and evaluates it as ``eval_wrn_ebm.py
--eval test_clf`` does, with σ = 0.03 input noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.data.augment import NONE, Augment, reference_augment
from bench.data.base import Split
from bench.models.base import BenchModel, DataInfo, TrainContext, recipe_differences, register
from bench.models.training import CPU_CUTS, hold_out, jem_loop, train_inputs
from bench.samplers import content_generator, noise_like
from bench.scales import Scale, epochs_within, large_images, scale_epochs


@dataclass(frozen=True)
class WRNConfig:
    depth: int = 28
    width: int = 10
    norm: Literal["none", "batch", "layer", "instance"] = "none"
    leak: float = 0.2
    dropout: float = 0.0
    #: PyTorch BatchNorm momentum, the new batch's weight: JEM's 0.9 (see the module docstring)
    bn_momentum: float = 0.9
    #: NHWC convolutions (`WideResNetBackbone`): the same math, float rounding apart; faster on a CPU
    channels_last: bool = True
    # training (JEM's train_wrn_ebm.py)
    epochs: int | float = 200  # fractions too: a small recipe on a large train split (bench.scales)
    batch_size: int = 64
    lr: float = 1e-4
    warmup_iters: int = 1000
    decay_epochs: tuple[float, ...] = (160, 180)  # epochs (fractions too, see bench.scales.scale_epochs)
    decay_rate: float = 0.3
    data_noise: float = 0.03  # σ of the Gaussian noise added to training inputs in [-1, 1] (JEM's --sigma)
    augment: Augment = NONE  # the paper recipe: JEM's pad 4 (reflect), crop, flip where the data allows
    #: images held out for choosing the best epoch (JEM's --n_valid 5000), at most a tenth of the train split
    valid_size: int = 5000
    divergence_threshold: float = 1e8  # |loss| above this means training diverged (JEM's check)
    #: σ of the Gaussian noise added to test inputs in [-1, 1]: eval_wrn_ebm.py's test_clf adds --sigma 0.03
    eval_noise: float = 0.03

    def __post_init__(self):
        if (self.depth - 4) % 6 != 0 or self.depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got {self.depth}")


def _norm(kind: str, channels: int, momentum: float) -> nn.Module:
    """JEM's ``get_norm``: batch, or per-image norms (layer: GroupNorm with one group; instance), or none."""
    if kind == "batch":
        return nn.BatchNorm2d(channels, momentum=momentum)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


class WideBasic(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, norm: str, leak: float, dropout: float,
                 bn_momentum: float):
        super().__init__()
        self.bn1 = _norm(norm, in_planes, bn_momentum)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.bn2 = _norm(norm, planes, bn_momentum)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=True))
        self.leak = leak

    def forward(self, x: Tensor) -> Tensor:
        out = self.dropout(self.conv1(F.leaky_relu(self.bn1(x), self.leak)))
        out = self.conv2(F.leaky_relu(self.bn2(out), self.leak))
        return out + self.shortcut(x)


class WideResNetBackbone(nn.Module):
    """Image -> feature vector of size 64·width.

    ``channels_last``: the convolutions run on NHWC activations (the input is laid out so, and oneDNN's
    convolutions keep the layout). The same math, summed in another order: outputs and input gradients differ
    from the NCHW ones by float rounding only. On a CPU it makes JEM's SGLD step 1.2-1.4× faster, from 8×8
    digits to 3×32×32 images (docs/performance.md); the weights stay contiguous, so checkpoints are unchanged."""

    def __init__(self, in_channels: int, depth: int, width: int, norm: str, leak: float, dropout: float,
                 bn_momentum: float = 0.9, channels_last: bool = False):
        super().__init__()
        self.channels_last = channels_last
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=True)
        in_planes = widths[0]
        for i, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(WideBasic(in_planes, planes, s, norm, leak, dropout, bn_momentum))
                in_planes = planes
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.bn1 = _norm(norm, in_planes, bn_momentum)
        self.leak = leak
        self.feature_dim = in_planes

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            # (a one-channel image is NCHW and NHWC at once: the first convolution's output sets the layout)
            nhwc = torch.channels_last
            x = self.conv1(x.contiguous(memory_format=nhwc)).contiguous(memory_format=nhwc)
        else:
            x = self.conv1(x)
        out = self.layer3(self.layer2(self.layer1(x)))
        out = F.leaky_relu(self.bn1(out), self.leak)
        return out.mean(dim=(2, 3))


def add_input_noise(z: Tensor, sigma: float) -> Tensor:
    """z + σ·ε, ε ~ N(0, I) drawn from a generator seeded by the batch's own bytes. The reference adds fresh
    noise to every test image (``eval_wrn_ebm.py``'s transform); seeding it by content gives the same number
    in every run, process and rank, where a global RNG would differ between a trained and a cached model."""
    return z + sigma * noise_like(z, content_generator(z))


#: the small recipe's step budget on images past 16×16 (bench.scales: calibrated on 2 CPU cores)
LARGE_STEPS = 1600


@register("wrn")
class WRN(BenchModel):
    """Wide-ResNet classifier; the discriminative row of JEM's Table 1."""

    family = "discriminative"
    Config = WRNConfig
    reference = ("Wide-ResNet (Zagoruyko & Komodakis 2016) as JEM's code builds and trains it: wgrathwohl/JEM "
                 "wideresnet.py, train_wrn_ebm.py --p_x_weight 0 --norm batch, eval_wrn_ebm.py --eval test_clf")
    smoke_overrides = {"batch_size": 2}  # WRN-28-10 is ~10 GFLOP per image and pass: 64 images take a minute

    def __init__(self, config: WRNConfig, data: DataInfo):
        super().__init__(config, data)
        c = config
        self.f = WideResNetBackbone(data.shape[0], c.depth, c.width, c.norm, c.leak, c.dropout, c.bn_momentum,
                                    c.channels_last)
        self.class_output = nn.Linear(self.f.feature_dim, data.n_classes)

    @classmethod
    def recipe(cls, scale: Scale, data: DataInfo) -> WRNConfig:
        if scale == Scale.paper:
            # WRN-28-10 with batch norm, through JEM's training script as a classifier
            return WRNConfig(norm="batch", augment=reference_augment(data.hflip))
        cpu = dict(norm="batch", bn_momentum=0.1, batch_size=64, lr=1e-3, data_noise=0.03, valid_size=0,
                   eval_noise=0.0)
        if scale == Scale.small and large_images(data.shape):
            # MNIST-, CIFAR-sized images: WRN-10-1 (on MNIST 1,600 steps of it gave 99.11%, Fashion-MNIST 88.39%;
            # 97.07% and 86.67% before the fractional lr decays took effect), the digits schedule within
            # LARGE_STEPS updates; colour images get the reference's crops and flips (CIFAR-10's 8,000-image
            # JPEG train split overfits without them)
            epochs = epochs_within(30, 64, data.n_train, LARGE_STEPS)
            return WRNConfig(depth=10, width=1, epochs=epochs, warmup_iters=100,
                             decay_epochs=scale_epochs((20, 25), 30, epochs), **cpu,
                             augment=reference_augment(data.hflip) if data.shape[0] == 3 else NONE)
        if scale == Scale.small:
            return WRNConfig(depth=10, width=2, epochs=30, warmup_iters=100, decay_epochs=(20, 25), **cpu)
        return WRNConfig(depth=10, width=1, epochs=2, warmup_iters=10, decay_epochs=(), **cpu)

    def deviations(self, scale: Scale) -> list[str]:
        kept = ["the published 95.8% is the Wide-ResNet paper's own WRN-28-10 training (SGD with momentum, lr 0.1, "
                "weight decay); bench trains the classifier of JEM's code (Adam 1e-4, σ=0.03 input noise), whose "
                "recipe the other Table 1 rows share"]
        return kept + recipe_differences(self.config, self.recipe(Scale.paper, self.data_info), CPU_CUTS)

    # inputs are in [0, 1]; JEM's networks see [-1, 1]
    def preprocess(self, x: Tensor) -> Tensor:
        x = 2.0 * x - 1.0
        if self.config.eval_noise > 0 and not self.training:
            x = add_input_noise(x, self.config.eval_noise)
        return x

    def _net_logits(self, z: Tensor) -> Tensor:
        return self.class_output(self.f(z))

    def features(self, x: Tensor) -> Tensor:
        """The pooled backbone, which the linear classifier reads (Features capability)."""
        return self.f(self.preprocess(x))

    def logits(self, x: Tensor) -> Tensor:
        return self._net_logits(self.preprocess(x))

    def fit(self, train: Split, ctx: TrainContext) -> dict[str, Any]:
        """Cross-entropy with Adam, JEM's schedule, augmentation and input noise (`bench.models.training`)."""
        c = self.config
        g = ctx.generator()
        self.to(ctx.device).train()
        train, valid = hold_out(train, c.valid_size)
        run = jem_loop(self, ctx, c, len(train), valid)
        for idx in run.batches(g):
            z = train_inputs(train.x[idx], c, g, ctx.device)
            run.step(F.cross_entropy(self._net_logits(z), train.y[idx].to(ctx.device)))
        return run.finish()

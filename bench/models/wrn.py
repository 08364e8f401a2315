"""`wrn`: the Wide-ResNet classifier (Zagoruyko & Komodakis 2016, arXiv:1605.07146) in the exact form
JEM builds it on (wgrathwohl/JEM `models/wideresnet.py`), so JEM's released weights load by key name.

Block: conv1(lrelu(norm1(x))) then conv2(lrelu(norm2(.))), conv2 carries the stride; a 1×1 conv with
bias as shortcut when the shape changes; every conv has a bias. Head: lrelu(norm(.)), global average
pooling (JEM's 8×8 pool is global at 32×32), flatten, then `class_output`. The parameter names match
JEM's `CCF` model: ``f.*`` for the backbone, ``class_output.*`` for the head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.data.base import Split
from bench.models.base import BenchModel, DataInfo, TrainContext, as_float01, batches, register
from bench.scales import Scale


@dataclass(frozen=True)
class WRNConfig:
    depth: int = 28
    width: int = 10
    norm: Literal["none", "batch"] = "none"
    leak: float = 0.2
    dropout: float = 0.0
    # training
    epochs: int = 200
    batch_size: int = 64
    lr: float = 1e-4
    warmup_iters: int = 1000
    decay_epochs: tuple[int, ...] = (160, 180)
    decay_rate: float = 0.3
    data_noise: float = 0.03  # σ of the Gaussian noise added to training inputs (JEM's default)
    eval_noise: float = 0.0  # JEM's evaluation adds none; kept as an option

    def __post_init__(self):
        if (self.depth - 4) % 6 != 0 or self.depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got {self.depth}")


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.Identity()


class WideBasic(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, norm: str, leak: float, dropout: float):
        super().__init__()
        self.bn1 = _norm(norm, in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.bn2 = _norm(norm, planes)
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
    """Image -> feature vector of size 64·width."""

    def __init__(self, in_channels: int, depth: int, width: int, norm: str, leak: float, dropout: float):
        super().__init__()
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=True)
        in_planes = widths[0]
        for i, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(WideBasic(in_planes, planes, s, norm, leak, dropout))
                in_planes = planes
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.bn1 = _norm(norm, in_planes)
        self.leak = leak
        self.feature_dim = in_planes

    def forward(self, x: Tensor) -> Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = F.leaky_relu(self.bn1(out), self.leak)
        return out.mean(dim=(2, 3))


@register("wrn")
class WRN(BenchModel):
    """Wide-ResNet classifier; the discriminative row of JEM's Table 1."""

    family = "discriminative"
    Config = WRNConfig

    def __init__(self, config: WRNConfig, data: DataInfo):
        super().__init__(config, data)
        c = config
        self.f = WideResNetBackbone(data.shape[0], c.depth, c.width, c.norm, c.leak, c.dropout)
        self.class_output = nn.Linear(self.f.feature_dim, data.n_classes)

    @classmethod
    def recipe(cls, scale: Scale, data: DataInfo) -> WRNConfig:
        if scale == Scale.paper:
            # WRN-28-10; the JEM paper's baseline (95.8% on CIFAR-10) uses batch norm
            return WRNConfig(depth=28, width=10, norm="batch", epochs=200, batch_size=64, lr=1e-4)
        if scale == Scale.small:
            return WRNConfig(depth=10, width=2, norm="batch", epochs=30, batch_size=64, lr=1e-3,
                             warmup_iters=100, decay_epochs=(20, 25), data_noise=0.03)
        return WRNConfig(depth=10, width=1, norm="batch", epochs=2, batch_size=64, lr=1e-3,
                         warmup_iters=10, decay_epochs=(), data_noise=0.03)

    # inputs are in [0, 1]; JEM's networks see [-1, 1]
    def preprocess(self, x: Tensor) -> Tensor:
        x = 2.0 * x - 1.0
        if self.config.eval_noise > 0 and not self.training:
            x = x + self.config.eval_noise * torch.randn_like(x)
        return x

    def features(self, x: Tensor) -> Tensor:
        """The pooled backbone, which the linear classifier reads (Features capability)."""
        return self.f(self.preprocess(x))

    def logits(self, x: Tensor) -> Tensor:
        return self.class_output(self.features(x))

    def fit(self, train: Split, ctx: TrainContext) -> dict[str, Any]:
        return train_classifier(self, train, ctx, self.config)


def lr_at(step: int, epoch: int, c: Any) -> float:
    """JEM's schedule: linear warm-up, then ×decay_rate at each decay epoch."""
    lr = c.lr * min(1.0, (step + 1) / max(1, c.warmup_iters))
    for e in c.decay_epochs:
        if epoch >= e:
            lr *= c.decay_rate
    return lr


def train_classifier(model: BenchModel, train: Split, ctx: TrainContext, c: Any) -> dict[str, Any]:
    """Cross-entropy training with Adam and JEM's schedule and input noise."""
    g = ctx.generator()
    model.to(ctx.device).train()
    opt = torch.optim.Adam(model.parameters(), lr=c.lr)
    n = len(train)
    steps_per_epoch = (n + c.batch_size - 1) // c.batch_size
    step = 0
    with ctx.progress(f"train {model.name}", c.epochs * steps_per_epoch) as update:
        for epoch in range(c.epochs):
            perm = torch.randperm(n, generator=g)
            for a, b in batches(n, c.batch_size):
                idx = perm[a:b]
                x = as_float01(train.x[idx]).to(ctx.device)
                y = train.y[idx].to(ctx.device)
                x = x + c.data_noise / 2 * torch.randn(x.shape, generator=g).to(ctx.device)  # σ in [-1,1] units
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, epoch, c)
                loss = F.cross_entropy(model.logits(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                update(1, loss=loss.item())
    model.eval()
    return {"steps": step, "epochs": c.epochs}

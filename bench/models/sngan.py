"""`sngan`: Spectrally Normalized GAN (Miyato, Kataoka, Koyama & Yoshida, "Spectral Normalization for
Generative Adversarial Networks", ICLR 2018, arXiv:1802.05957).

Every weight layer of the discriminator is divided by its largest singular value, estimated by one step of
power iteration per update (``torch.nn.utils.parametrizations.spectral_norm``; a convolution's kernel is
reshaped to out × (in·k·k), as the paper does). The discriminator is trained with the hinge loss,
the generator with −D(G(z)). Two architectures from the paper:

- ``cnn``: the "standard CNN" of the paper's Table 3 (3×3 / 4×4-stride-2 convolution pairs with
  LeakyReLU(0.1) in D; transposed convolutions with batch norm and ReLU in G);
- ``resnet``: the CIFAR-10 ResNet of its appendix (G: linear to 4×4×256, three up-sampling residual
  blocks, BN-ReLU-conv-tanh; D: an optimized down-sampling block, a down-sampling block and two plain
  blocks of 128 channels, ReLU, global sum pooling, linear). This is the `paper` recipe, with n_dis = 5,
  Adam lr 2e-4, β = (0, 0.9), batch 64 and z ~ N(0, I)^128, which gives SNGAN's row of JEM's Table 1.

Stages adapt to the data shape as in `dcgan` (8×8 has one up-sampling stage, 32×32 three).
After training the power-iteration vectors are refined until they converge: in eval mode torch freezes
them, so this makes the frozen normalization the exact one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from bench.data.base import Split
from bench.models.base import DataInfo, TrainContext, register
from bench.models.dcgan import GANModel, LatentDist, plan_stages, train_gan
from bench.scales import Scale


@dataclass(frozen=True)
class SNGANConfig:
    arch: Literal["cnn", "resnet"] = "resnet"
    latent_dim: int = 128
    latent_dist: LatentDist = "normal"
    g_channels: int = 256  # resnet: every generator block; cnn: the finest stage (doubled per coarser stage)
    d_channels: int = 128  # resnet: every discriminator block; cnn: the finest stage
    # optimization (the paper's CIFAR-10 ResNet setting)
    steps: int = 50_000  # generator updates, as in the paper's CIFAR-10 ResNet runs
    n_dis: int = 5
    batch_size: int = 64
    lr: float = 2e-4
    beta1: float = 0.0
    beta2: float = 0.9
    sn_power_iterations: int = 1  # per discriminator forward pass in training
    sn_refine_iterations: int = 50  # after training, so the frozen estimate is the converged one
    sample_batch_size: int = 500

    def __post_init__(self):
        if self.arch not in ("cnn", "resnet"):
            raise ValueError(f"arch must be 'cnn' or 'resnet', got {self.arch!r}")
        if self.n_dis < 1:
            raise ValueError(f"n_dis must be >= 1, got {self.n_dis}")


# --- spectral normalization helpers (shared with igebm) -------------------------------------------
def sn(module: nn.Module, n_power_iterations: int = 1) -> nn.Module:
    return spectral_norm(module, n_power_iterations=n_power_iterations)


def spectrally_normalized(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The submodules whose ``weight`` is spectrally normalized, with their names."""
    return [(name, m) for name, m in module.named_modules()
            if parametrize.is_parametrized(m, "weight")
            and any(type(p).__name__ == "_SpectralNorm" for p in m.parametrizations.weight)]


@torch.no_grad()
def refine_spectral_norm(module: nn.Module, iterations: int) -> None:
    """Run extra power iterations on every normalized layer (each access to ``weight`` in training mode
    performs ``n_power_iterations`` of them and updates the stored vectors in place)."""
    was_training = module.training
    module.train()
    for _, m in spectrally_normalized(module):
        for _ in range(iterations):
            m.weight  # noqa: B018 -- the access runs the power iteration
    module.train(was_training)


# --- standard CNN -------------------------------------------------------------------------------------
class CNNGenerator(nn.Module):
    def __init__(self, latent_dim: int, shape: tuple[int, int, int], channels: int):
        super().__init__()
        start, stages = plan_stages(shape)
        ch = channels * 2 ** stages
        self.start, self.ch0 = start, ch
        self.project = nn.Linear(latent_dim, ch * start * start)
        layers: list[nn.Module] = [nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
        for _ in range(stages):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, stride=2, padding=1), nn.BatchNorm2d(ch // 2),
                       nn.ReLU(inplace=True)]
            ch //= 2
        layers.append(nn.Conv2d(ch, shape[0], 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return torch.tanh(self.body(self.project(z).view(z.shape[0], self.ch0, self.start, self.start)))


class CNNDiscriminator(nn.Module):
    def __init__(self, shape: tuple[int, int, int], channels: int, power_iterations: int):
        super().__init__()
        start, stages = plan_stages(shape)
        layers: list[nn.Module] = []
        ch_in, ch = shape[0], channels
        for _ in range(stages):
            layers += [sn(nn.Conv2d(ch_in, ch, 3, padding=1), power_iterations), nn.LeakyReLU(0.1, inplace=True),
                       sn(nn.Conv2d(ch, ch, 4, stride=2, padding=1), power_iterations), nn.LeakyReLU(0.1, inplace=True)]
            ch_in, ch = ch, ch * 2
        layers += [sn(nn.Conv2d(ch_in, ch, 3, padding=1), power_iterations), nn.LeakyReLU(0.1, inplace=True)]
        self.body = nn.Sequential(*layers)
        self.out = sn(nn.Linear(ch * start * start, 1), power_iterations)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x).flatten(1)).squeeze(1)


# --- ResNet -------------------------------------------------------------------------------------------
class GBlock(nn.Module):
    """BN-ReLU-up-conv-BN-ReLU-conv, plus an up-sampled 1×1-conv shortcut."""

    def __init__(self, ch_in: int, ch_out: int):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(ch_in), nn.BatchNorm2d(ch_out)
        self.conv1 = nn.Conv2d(ch_in, ch_out, 3, padding=1)
        self.conv2 = nn.Conv2d(ch_out, ch_out, 3, padding=1)
        self.shortcut = nn.Conv2d(ch_in, ch_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.interpolate(F.relu(self.bn1(x)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h))))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class DBlock(nn.Module):
    """ReLU-conv-ReLU-conv(-avgpool); ``optimized`` is the paper's first block, which starts with a conv
    (no ReLU on the raw image) and pools before its shortcut's 1×1 conv."""

    def __init__(self, ch_in: int, ch_out: int, down: bool, optimized: bool, power_iterations: int):
        super().__init__()
        self.conv1 = sn(nn.Conv2d(ch_in, ch_out, 3, padding=1), power_iterations)
        self.conv2 = sn(nn.Conv2d(ch_out, ch_out, 3, padding=1), power_iterations)
        self.learned_shortcut = down or ch_in != ch_out
        if self.learned_shortcut:
            self.shortcut = sn(nn.Conv2d(ch_in, ch_out, 1), power_iterations)
        self.down, self.optimized = down, optimized

    def forward(self, x: Tensor) -> Tensor:
        h = x if self.optimized else F.relu(x)
        h = self.conv2(F.relu(self.conv1(h)))
        if self.down:
            h = F.avg_pool2d(h, 2)
        if not self.learned_shortcut:
            return h + x
        if self.optimized:
            return h + self.shortcut(F.avg_pool2d(x, 2))
        s = self.shortcut(x)
        return h + (F.avg_pool2d(s, 2) if self.down else s)


class ResNetGenerator(nn.Module):
    def __init__(self, latent_dim: int, shape: tuple[int, int, int], channels: int):
        super().__init__()
        start, stages = plan_stages(shape)
        self.start, self.ch = start, channels
        self.project = nn.Linear(latent_dim, channels * start * start)
        self.blocks = nn.Sequential(*[GBlock(channels, channels) for _ in range(stages)])
        self.bn = nn.BatchNorm2d(channels)
        self.out = nn.Conv2d(channels, shape[0], 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.blocks(self.project(z).view(z.shape[0], self.ch, self.start, self.start))
        return torch.tanh(self.out(F.relu(self.bn(h))))


class ResNetDiscriminator(nn.Module):
    def __init__(self, shape: tuple[int, int, int], channels: int, power_iterations: int):
        super().__init__()
        _, stages = plan_stages(shape)
        downs = min(2, stages)  # the paper's 32×32 discriminator pools twice, to 8×8
        blocks = [DBlock(shape[0], channels, down=True, optimized=True, power_iterations=power_iterations)]
        for i in range(1, 4):
            blocks.append(DBlock(channels, channels, down=i < downs, optimized=False,
                                 power_iterations=power_iterations))
        self.blocks = nn.Sequential(*blocks)
        self.out = sn(nn.Linear(channels, 1), power_iterations)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.blocks(x)).sum(dim=(2, 3))  # global sum pooling
        return self.out(h).squeeze(1)


# --- model ------------------------------------------------------------------------------------------
def hinge_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def hinge_g_loss(fake: Tensor) -> Tensor:
    return -fake.mean()


@register("sngan")
class SNGAN(GANModel):
    family = "gan"
    Config = SNGANConfig
    code_modules = ("bench.models.dcgan",)

    def __init__(self, config: SNGANConfig, data: DataInfo):
        super().__init__(config, data)
        c = config
        if c.arch == "resnet":
            self.G = ResNetGenerator(c.latent_dim, data.shape, c.g_channels)
            self.D = ResNetDiscriminator(data.shape, c.d_channels, c.sn_power_iterations)
        else:
            self.G = CNNGenerator(c.latent_dim, data.shape, c.g_channels)
            self.D = CNNDiscriminator(data.shape, c.d_channels, c.sn_power_iterations)

    @classmethod
    def recipe(cls, scale: Scale, data: DataInfo) -> SNGANConfig:
        if scale == Scale.paper:
            return SNGANConfig()
        if scale == Scale.small:
            return SNGANConfig(arch="cnn", g_channels=32, d_channels=32, steps=1500, n_dis=2, batch_size=64)
        return SNGANConfig(arch="cnn", latent_dim=16, g_channels=8, d_channels=8, steps=20, n_dis=2, batch_size=32)

    def fit(self, train: Split, ctx: TrainContext) -> dict[str, Any]:
        c = self.config
        g_opt = torch.optim.Adam(self.G.parameters(), lr=c.lr, betas=(c.beta1, c.beta2))
        d_opt = torch.optim.Adam(self.D.parameters(), lr=c.lr, betas=(c.beta1, c.beta2))
        stats = train_gan(self, train, ctx, c.steps, c.n_dis, hinge_d_loss, hinge_g_loss, g_opt, d_opt, c.batch_size)
        refine_spectral_norm(self.D, c.sn_refine_iterations)
        return stats

    def sampler_protocol(self) -> dict[str, Any]:
        return {**super().sampler_protocol(), "architecture": self.config.arch}

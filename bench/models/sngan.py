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
  blocks of 128 channels, ReLU, global sum pooling, linear without bias). This is the `paper` recipe, with
  n_dis = 5, Adam lr 2e-4, β = (0, 0.9), batch 64 and z ~ N(0, I)^128, which gives SNGAN's row of JEM's
  Table 1.

Training follows the released updater (pfnet-research/sngan_projection `updater.py` with
`configs/sn_cifar10_unconditional.yml`): every iteration first updates the generator on
``n_gen_samples`` = 128 latents (twice the batch), then takes ``n_dis`` discriminator steps, each on a
real batch of 64 and as many fresh fakes; both learning rates decay linearly from lr to 0 over the
iterations (Chainer's `LinearShift`, iteration k of T uses lr·(1 − k/T)). Real images are dequantized
as the released dataset does, x/128 − 1 + U[0, 1/128).

Stages adapt to the data shape as in `dcgan` (8×8 has one up-sampling stage, 32×32 three).
After training the power-iteration vectors are refined until they converge: in eval mode torch freezes
them, so this makes the frozen normalization the exact one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm, spectral_norm  # the class: subclasses count too

from bench.data.base import Split
from bench.models._deviations import config_deviations
from bench.models.base import DataInfo, TrainContext, register
from bench.models.dcgan import GANModel, LatentDist, draw_latent, plan_stages
from bench.models.training import TrainLoop
from bench.scales import Scale, large_images


@dataclass(frozen=True)
class SNGANConfig:
    arch: Literal["cnn", "resnet"] = "resnet"
    latent_dim: int = 128
    latent_dist: LatentDist = "normal"
    g_channels: int = 256  # resnet: every generator block; cnn: the finest stage (doubled per coarser stage)
    d_channels: int = 128  # resnet: every discriminator block; cnn: the finest stage
    # optimization (the paper's CIFAR-10 ResNet setting)
    steps: int = 50_000  # iterations = generator updates, as in the paper's CIFAR-10 ResNet runs
    n_dis: int = 5
    batch_size: int = 64  # real images (and fakes) per discriminator step
    n_gen_samples: int = 128  # latents per generator step: the released config's n_gen_samples, 2× the batch
    lr: float = 2e-4
    lr_decay: Literal["linear", "none"] = "linear"  # linear to 0 over `steps` (the released LinearShift)
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
        if self.lr_decay not in ("linear", "none"):
            raise ValueError(f"lr_decay must be 'linear' or 'none', got {self.lr_decay!r}")


# --- spectral normalization helpers (shared with igebm) -------------------------------------------
def sn(module: nn.Module, n_power_iterations: int = 1) -> nn.Module:
    return spectral_norm(module, n_power_iterations=n_power_iterations)


def spectrally_normalized(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The submodules whose ``weight`` is spectrally normalized, with their names."""
    return [(name, m) for name, m in module.named_modules()
            if parametrize.is_parametrized(m, "weight")
            and any(isinstance(p, _SpectralNorm) for p in m.parametrizations.weight)]


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
        self.out = sn(nn.Linear(channels, 1, bias=False), power_iterations)  # the released l5: nobias

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.blocks(x)).sum(dim=(2, 3))  # global sum pooling
        return self.out(h).squeeze(1)


def reference_init(G: nn.Module, D: nn.Module) -> None:
    """The released ResNets' initialization (Chainer's GlorotUniform, i.e. torch's xavier_uniform_): gain √2
    on the residual convolutions, 1 on the shortcuts, the first linear map, the output convolution and D's
    output; zero biases."""
    def init(m: nn.Module, gain: float) -> None:
        w = m.parametrizations.weight.original if parametrize.is_parametrized(m, "weight") else m.weight
        nn.init.xavier_uniform_(w, gain=gain)
        if m.bias is not None:
            nn.init.zeros_(m.bias)

    for net in (G, D):
        for m in net.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                init(m, 1.0)
        for block in net.modules():
            if isinstance(block, GBlock | DBlock):
                init(block.conv1, math.sqrt(2.0))
                init(block.conv2, math.sqrt(2.0))


def dequantized_reals(train: Split, index_batches: Iterator[Tensor], generator: torch.Generator) -> Iterator[Tensor]:
    """The batches of real images that ``index_batches`` picks, as the released dataset serves them,
    x/128 − 1 + U[0, 1/128) in [−1, 1)."""
    for idx in index_batches:
        x = train.x[idx].float()
        yield x / 128.0 - 1.0 + torch.rand(x.shape, generator=generator) / 128.0


# --- model ------------------------------------------------------------------------------------------
def hinge_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def hinge_g_loss(fake: Tensor) -> Tensor:
    return -fake.mean()


#: the small recipe's generator updates on images past 16×16 (bench.scales: calibrated on 2 CPU cores)
LARGE_STEPS = 250


@register("sngan")
class SNGAN(GANModel):
    family = "gan"
    Config = SNGANConfig
    reference = ("Miyato et al. 2018 (arXiv:1802.05957); pfnet-research/sngan_projection "
                 "configs/sn_cifar10_unconditional.yml, updater.py")
    #: a paper-scale smoke on a CPU (bench.smoke): tiny batches (still twice as many for the generator)
    smoke_overrides: ClassVar[dict[str, Any]] = {"batch_size": 2, "n_gen_samples": 4}

    def __init__(self, config: SNGANConfig, data: DataInfo):
        super().__init__(config, data)
        c = config
        if c.arch == "resnet":
            self.G = ResNetGenerator(c.latent_dim, data.shape, c.g_channels)
            self.D = ResNetDiscriminator(data.shape, c.d_channels, c.sn_power_iterations)
            reference_init(self.G, self.D)
        else:
            self.G = CNNGenerator(c.latent_dim, data.shape, c.g_channels)
            self.D = CNNDiscriminator(data.shape, c.d_channels, c.sn_power_iterations)

    @classmethod
    def recipe(cls, scale: Scale, data: DataInfo) -> SNGANConfig:
        if scale == Scale.paper:
            return SNGANConfig()
        # a constant lr at small scale: over 1,500 iterations the decay to 0 left digits at FID 12.2 against 6.4
        # without it (the rest of the released updater as in `paper`)
        if scale == Scale.small:
            return SNGANConfig(arch="cnn", g_channels=32, d_channels=32, steps=LARGE_STEPS if large_images(data.shape)
                               else 1500, n_dis=2, batch_size=64,
                               n_gen_samples=128, lr_decay="none")
        return SNGANConfig(arch="cnn", latent_dim=16, g_channels=8, d_channels=8, steps=20, n_dis=2, batch_size=32,
                           n_gen_samples=64, lr_decay="none")

    def deviations(self, scale: Scale) -> list[str]:
        reasons = {
            "arch": "the paper's standard CNN instead of its ResNet: minutes on a CPU",
            "n_dis": "fewer discriminator steps per generator step: minutes on a CPU",
            "steps": "fewer iterations: minutes on a CPU",
            "lr_decay": "a constant lr: in a 1,500-iteration run the decay to 0 cost FID on digits (12.2 vs 6.4)",
        }
        return config_deviations(self.config, self.recipe(Scale.paper, self.data_info), reasons,
                                 ignore={"sample_batch_size", "sn_refine_iterations"})

    # --- training ----------------------------------------------------------------------------------
    def lr_at(self, k: int) -> float:
        """The learning rate of iteration k = 0, 1, ...: linear from lr to 0 over `steps` (LinearShift)."""
        c = self.config
        return c.lr * (1.0 - k / c.steps) if c.lr_decay == "linear" else c.lr

    def iteration(self, reals: Iterator[Tensor], g: torch.Generator, g_opt: torch.optim.Optimizer,
                  d_opt: torch.optim.Optimizer) -> tuple[Tensor, Tensor]:
        """One iteration of the released updater: a generator step on ``n_gen_samples`` latents, then
        ``n_dis`` discriminator steps, each on a real batch and as many fresh fakes. Returns (D loss, G loss)."""
        c = self.config
        like = next(self.parameters())  # the device and dtype inputs take
        z = draw_latent(c.n_gen_samples, c.latent_dim, c.latent_dist, g).to(like)
        lg = hinge_g_loss(self.D(self.G(z)))
        g_opt.zero_grad(set_to_none=True)
        lg.backward()
        g_opt.step()
        for _ in range(c.n_dis):
            x = next(reals).to(like)
            z = draw_latent(x.shape[0], c.latent_dim, c.latent_dist, g).to(like)
            real = self.D(x)
            with torch.no_grad():
                fake = self.G(z)
            ld = hinge_d_loss(real, self.D(fake))
            d_opt.zero_grad(set_to_none=True)  # also drops what the generator step left on D
            ld.backward()
            d_opt.step()
        return ld.detach(), lg.detach()

    def fit(self, train: Split, ctx: TrainContext) -> dict[str, Any]:
        c = self.config
        g = ctx.generator()
        self.to(ctx.device).train()
        g_opt = torch.optim.Adam(self.G.parameters(), lr=c.lr, betas=(c.beta1, c.beta2))
        d_opt = torch.optim.Adam(self.D.parameters(), lr=c.lr, betas=(c.beta1, c.beta2))
        # full real batches, reshuffled per pass
        run = TrainLoop(self, ctx, n=len(train), batch_size=c.batch_size, steps=c.steps, optimizer=(g_opt, d_opt),
                        lr=lambda step, epoch: self.lr_at(step))
        reals = dequantized_reals(train, run.cycle(g), g)
        for _ in run.iterations():
            ld, lg = self.iteration(reals, g, g_opt, d_opt)
            run.check(d_loss=ld, g_loss=lg)
            run.advance(d=ld.item(), g=lg.item())
        stats = run.finish(discriminator_steps=run.steps * c.n_dis)
        refine_spectral_norm(self.D, c.sn_refine_iterations)
        return stats

    def sampler_protocol(self) -> dict[str, Any]:
        return {**super().sampler_protocol(), "architecture": self.config.arch}

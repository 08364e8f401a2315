"""`dcgan`: Deep Convolutional GAN (Radford, Metz & Chintala, "Unsupervised Representation Learning with
Deep Convolutional Generative Adversarial Networks", ICLR 2016, arXiv:1511.06434).

Implemented as the paper's guidelines state them: the latent vector is projected and reshaped to a small
spatial map, then fractionally-strided convolutions (4×4, stride 2) double the resolution up to the image
size; batch norm and ReLU in the generator with Tanh on the output; the discriminator mirrors it with
strided convolutions, batch norm (not on its input layer), LeakyReLU(0.2) and a flattened linear output.
Weights are drawn from N(0, 0.02). Training uses the non-saturating loss (the generator maximizes
log D(G(z))) with Adam, lr 2e-4, β₁ = 0.5, batch 128, z ~ U(−1, 1)^100 at `paper` scale.

The number of up/down-sampling stages adapts to the data: 8×8 starts from 4×4 (one stage), 28×28 from
7×7 (two), 32×32 from 4×4 (three). The helpers `plan_stages`, `draw_latent` and `train_gan` are shared
with `sngan`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.data.base import Split
from bench.models.base import BenchModel, DataInfo, TrainContext, as_float01, batches, register, to_uint8
from bench.models.training import TrainLoop
from bench.scales import Scale, large_images

LatentDist = Literal["uniform", "normal"]


@dataclass(frozen=True)
class DCGANConfig:
    latent_dim: int = 100
    latent_dist: LatentDist = "uniform"  # the paper's z ~ U(−1, 1)
    g_channels: int = 64  # channels of the last hidden generator stage; doubled at every coarser stage
    d_channels: int = 64  # channels of the first discriminator stage; doubled at every finer → coarser stage
    # optimization (the paper: Adam, lr 2e-4, β1 0.5, minibatch 128)
    steps: int = 30_000  # generator updates; the paper gives no count for CIFAR-10 (≈ 77 epochs at batch 128)
    batch_size: int = 128
    lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    sample_batch_size: int = 500

    def __post_init__(self):
        if self.latent_dist not in ("uniform", "normal"):
            raise ValueError(f"latent_dist must be 'uniform' or 'normal', got {self.latent_dist!r}")


# --- shared with sngan ------------------------------------------------------------------------------
def plan_stages(shape: tuple[int, int, int]) -> tuple[int, int]:
    """(start size, number of ×2 stages) so that start·2^stages = image size and start ≤ 4 or odd."""
    _, h, w = shape
    if h != w:
        raise ValueError(f"GAN generators here need square images, got {h}×{w}; crop or pad the data")
    start, stages = h, 0
    while start > 4 and start % 2 == 0:
        start //= 2
        stages += 1
    if stages == 0:
        raise ValueError(f"image size {h} cannot be halved; GAN models need an even size ≥ 8")
    return start, stages


def draw_latent(n: int, dim: int, dist: LatentDist, generator: torch.Generator) -> Tensor:
    if dist == "uniform":
        return torch.rand((n, dim), generator=generator) * 2.0 - 1.0
    return torch.randn((n, dim), generator=generator)


def dcgan_init(module: nn.Module) -> None:
    """The paper's initialization: every weight from N(0, 0.02); batch-norm scales from N(1, 0.02)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def train_gan(model: GANModel, train: Split, ctx: TrainContext, steps: int, n_dis: int,
              d_loss: Callable[[Tensor, Tensor], Tensor], g_loss: Callable[[Tensor], Tensor],
              g_opt: torch.optim.Optimizer, d_opt: torch.optim.Optimizer, batch_size: int) -> dict[str, Any]:
    """Alternate ``n_dis`` discriminator updates and one generator update, ``steps`` times, on real images
    in [−1, 1] in full batches, reshuffled per pass."""
    g = ctx.generator()
    dev = ctx.device
    model.to(dev).train()
    run = TrainLoop(model, ctx, n=len(train), batch_size=batch_size, steps=steps)
    reals = (2.0 * as_float01(train.x[idx]) - 1.0 for idx in run.cycle(g))
    c = model.config
    for _ in run.iterations():
        for _ in range(n_dis):
            x = next(reals).to(dev)
            z = draw_latent(x.shape[0], c.latent_dim, c.latent_dist, g).to(dev)
            with torch.no_grad():
                fake = model.G(z)
            ld = d_loss(model.D(x), model.D(fake))
            d_opt.zero_grad(set_to_none=True)
            ld.backward()
            d_opt.step()
        z = draw_latent(batch_size, c.latent_dim, c.latent_dist, g).to(dev)
        lg = g_loss(model.D(model.G(z)))
        g_opt.zero_grad(set_to_none=True)
        lg.backward()
        g_opt.step()
        run.check(d_loss=ld, g_loss=lg)
        run.advance(d=ld.item(), g=lg.item())
    return run.finish(discriminator_steps=run.steps * n_dis)


# --- modules ----------------------------------------------------------------------------------------
class DCGANGenerator(nn.Module):
    def __init__(self, latent_dim: int, shape: tuple[int, int, int], channels: int):
        super().__init__()
        start, stages = plan_stages(shape)
        ch = channels * 2 ** (stages - 1)
        self.start, self.ch0 = start, ch
        # "project and reshape": a linear layer to the coarsest feature map
        self.project = nn.Linear(latent_dim, ch * start * start, bias=False)
        self.project_bn = nn.BatchNorm2d(ch)
        layers: list[nn.Module] = []
        for i in range(stages):
            last = i == stages - 1
            out = shape[0] if last else ch // 2
            layers.append(nn.ConvTranspose2d(ch, out, 4, stride=2, padding=1, bias=last))
            if not last:
                layers += [nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            ch = out
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        h = self.project(z).view(z.shape[0], self.ch0, self.start, self.start)
        return torch.tanh(self.body(F.relu(self.project_bn(h))))


class DCGANDiscriminator(nn.Module):
    def __init__(self, shape: tuple[int, int, int], channels: int):
        super().__init__()
        start, stages = plan_stages(shape)
        layers: list[nn.Module] = []
        ch_in, ch = shape[0], channels
        for i in range(stages):
            layers.append(nn.Conv2d(ch_in, ch, 4, stride=2, padding=1, bias=i == 0))
            if i > 0:  # the paper: no batch norm on the discriminator's input layer
                layers.append(nn.BatchNorm2d(ch))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            ch_in, ch = ch, ch * 2
        self.body = nn.Sequential(*layers)
        self.out = nn.Linear(ch_in * start * start, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x).flatten(1)).squeeze(1)


# --- model ------------------------------------------------------------------------------------------
class GANModel(BenchModel):
    """What dcgan and sngan share: a generator ``G`` fed from ``draw_latent`` and a discriminator ``D``."""

    G: nn.Module
    D: nn.Module

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        c = self.config
        dev = next(self.parameters()).device
        was_training = self.training
        self.eval()  # batch norm uses its running statistics, so a sample does not depend on its batch
        out = []
        with torch.no_grad():
            for a, b in batches(n, c.sample_batch_size):
                z = draw_latent(b - a, c.latent_dim, c.latent_dist, generator).to(dev)
                out.append(to_uint8(self.G(z), -1.0, 1.0, what=f"{self.name} generator samples").cpu())
        self.train(was_training)
        return torch.cat(out)

    def sampler_protocol(self) -> dict[str, Any]:
        c = self.config
        return {
            "algorithm": "generator forward pass",
            "latent_dim": c.latent_dim,
            "latent_distribution": "uniform(-1,1)" if c.latent_dist == "uniform" else "normal(0,1)",
            "truncation": None,
            "batch_norm": "running statistics (eval mode)",
            "output": "tanh in [-1,1] mapped to uint8",
        }


def nonsaturating_d_loss(real: Tensor, fake: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(real, torch.ones_like(real)) + \
        F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))


def nonsaturating_g_loss(fake: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


#: the small recipe's step budget on images past 16×16 (bench.scales: calibrated on 2 CPU cores)
LARGE_STEPS = 600


@register("dcgan")
class DCGAN(GANModel):
    family = "gan"
    Config = DCGANConfig

    def __init__(self, config: DCGANConfig, data: DataInfo):
        super().__init__(config, data)
        self.G = DCGANGenerator(config.latent_dim, data.shape, config.g_channels)
        self.D = DCGANDiscriminator(data.shape, config.d_channels)
        dcgan_init(self)

    @classmethod
    def recipe(cls, scale: Scale, data: DataInfo) -> DCGANConfig:
        if scale == Scale.paper:
            return DCGANConfig()
        if scale == Scale.small:
            return DCGANConfig(g_channels=128, d_channels=128, steps=LARGE_STEPS if large_images(data.shape) else 3000,
                               batch_size=64)
        return DCGANConfig(latent_dim=16, g_channels=16, d_channels=16, steps=30, batch_size=32)

    def fit(self, train: Split, ctx: TrainContext) -> dict[str, Any]:
        c = self.config
        g_opt = torch.optim.Adam(self.G.parameters(), lr=c.lr, betas=(c.beta1, c.beta2))
        d_opt = torch.optim.Adam(self.D.parameters(), lr=c.lr, betas=(c.beta1, c.beta2))
        return train_gan(self, train, ctx, c.steps, 1, nonsaturating_d_loss, nonsaturating_g_loss, g_opt, d_opt,
                         c.batch_size)

"""`ncsn`: Noise Conditional Score Network (Song & Ermon, "Generative Modeling by Estimating Gradients of the
Data Distribution", NeurIPS 2019, arXiv:1907.05600; code: ermongroup/ncsn).

One network s_θ(x, i) estimates the score ∇ₓ log q_{σ_i}(x) of the data perturbed by N(0, σ_i² I) for a
geometric schedule σ_1 > … > σ_L. It is trained by denoising score matching with λ(σ) = σ²:

    ℓ = ½ E_{i, x, z} ‖σ_i·s_θ(x + σ_i z, i) + z‖²,

and sampled by annealed Langevin dynamics (`bench.samplers.annealed_langevin`) from U(0, 1) noise. Data
lives in [0, 1]: training images are dequantized to (x + u)/256, u ~ U[0, 1), as the released code does, and
flipped horizontally at random where the data allows it (CIFAR-10: the released config's `random_flip`; no
crop). Capability: Sampler only (the NCSN row of JEM's Table 1).

Networks:
- ``refinenet``: the paper's CondRefineNetDilated in compact form — conditional instance norm++ (the
  σ-level picks γ, β, α; the spread of the channel means uses the unbiased variance, as the released
  code's ``torch.var``), ELU, four stages of conditional residual blocks (the second halves the
  resolution, the last two are dilated 2 and 4 instead), four RefineNet blocks (residual conv units,
  multi-resolution fusion, chained residual pooling) back up to full resolution. ngf = 128 at `paper`.
  As in the released code, the residual conv units' and the chained residual pooling's convolutions have
  no bias, and that pooling's 5×5 average counts the zero padding.
- ``resnet``: the same residual blocks and norm at full resolution without the RefineNet decoder; cheap
  enough to sample 2,000 digits on a CPU at `small` scale.
``scale_by_sigma`` (off in the 2019 paper) divides the output by σ_i (Song & Ermon 2020, "Improved
Techniques for Training Score-Based Generative Models", technique 3) so one network covers the 100× range
of score magnitudes in few steps; it is recorded in the config.

The `paper` recipe is the published CIFAR-10 setting: σ_1 = 1, σ_L = 0.01, L = 10, Adam lr 1e-3, batch
128, 200k iterations, T = 100 Langevin steps per level, ε = 2e-5 with the released code's step rule
x + α·s + √(2α)·z (``langevin_rule``; "algorithm1" is the paper's printed rule, half the step; see
`bench.samplers.annealed_langevin`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.data.augment import Augment
from bench.data.base import Split
from bench.models._deviations import config_deviations
from bench.models.base import BenchModel, DataInfo, TrainContext, as_float01, batches, register, to_uint8
from bench.models.training import TrainLoop
from bench.numerics import elu
from bench.samplers.annealed_langevin import (
    INITS,
    RULES,
    AnnealedLangevinConfig,
    Rule,
    annealed_langevin,
    geometric_sigmas,
)
from bench.scales import Scale, large_images


@dataclass(frozen=True)
class NCSNConfig:
    # network
    arch: Literal["refinenet", "resnet"] = "refinenet"
    ngf: int = 128
    n_res_blocks: int = 4  # resnet only: conditional residual blocks at full resolution
    #: resnet only: each block's dilation, one per block (empty: all 1). Dilation widens the receptive field
    #: at the same cost, as CondRefineNetDilated's deeper stages do
    dilations: tuple[int, ...] = ()
    scale_by_sigma: bool = False
    # noise levels (shared by training and sampling)
    sigma_begin: float = 1.0
    sigma_end: float = 0.01
    n_levels: int = 10
    # optimization
    n_iters: int = 200_000
    batch_size: int = 128
    lr: float = 1e-3
    beta1: float = 0.9
    ema: float = 0.0  # EMA decay of the weights used for sampling; 0 = none (the 2019 paper has none)
    # training data: (x + u)/256 as the released code feeds it, then the shared augmentation (CIFAR: flip)
    dequantize: bool = True
    augment: Augment = Augment()
    # annealed Langevin sampling
    steps_per_level: int = 100
    sample_eps: float = 2e-5
    langevin_rule: Rule = "released"  # the released code's x + α·s + √(2α)·z; "algorithm1": half the step
    denoise: bool = False
    #: where the chains start: U(0, 1) as the released code; or "data_mean", the training images' mean plus
    #: σ₁·N(0, I) (stored with the weights). A score network trained briefly extrapolates badly from U(0, 1),
    #: whose mean is far from the data's: on MNIST its chains turned white within the first level
    sample_init: Literal["uniform", "data_mean"] = "uniform"
    sample_batch_size: int = 500

    def __post_init__(self):
        if not self.sigma_begin > self.sigma_end > 0 or self.n_levels < 2:
            raise ValueError("need sigma_begin > sigma_end > 0 and n_levels >= 2")
        if self.ngf < 2:
            raise ValueError(f"ngf must be >= 2 (instance norm++ takes the variance over channels), got {self.ngf}")
        if self.dilations and (len(self.dilations) != self.n_res_blocks or min(self.dilations) < 1):
            raise ValueError(f"dilations needs one value >= 1 per residual block ({self.n_res_blocks}), "
                             f"got {self.dilations}")
        if self.langevin_rule not in RULES:
            raise ValueError(f"langevin_rule must be one of {', '.join(RULES)}, got {self.langevin_rule!r}")
        if self.sample_init not in INITS:
            raise ValueError(f"sample_init must be one of {', '.join(INITS)}, got {self.sample_init!r}")

    @property
    def langevin(self) -> AnnealedLangevinConfig:
        return AnnealedLangevinConfig(self.sigma_begin, self.sigma_end, self.n_levels, self.steps_per_level,
                                      self.sample_eps, self.denoise, init=self.sample_init, rule=self.langevin_rule)


# --- modules -------------------------------------------------------------------------------------------
class CondInstanceNormPlus(nn.Module):
    """Conditional instance norm++ (NCSN appendix A): instance norm that also keeps the per-channel means'
    relative offsets (the α term), with γ, α, β looked up per noise level."""

    def __init__(self, channels: int, n_levels: int):
        super().__init__()
        self.channels = channels
        self.embed = nn.Embedding(n_levels, 3 * channels)
        nn.init.normal_(self.embed.weight[:, : 2 * channels], 1.0, 0.02)
        nn.init.zeros_(self.embed.weight[:, 2 * channels:])

    def forward(self, x: Tensor, level: Tensor) -> Tensor:
        means = x.mean(dim=(2, 3))
        m = means.mean(dim=1, keepdim=True)
        v = means.var(dim=1, keepdim=True)  # unbiased, as the released code's torch.var
        means = (means - m) / torch.sqrt(v + 1e-5)
        h = F.instance_norm(x, eps=1e-5)
        gamma, alpha, beta = self.embed(level).chunk(3, dim=1)
        h = h + means[..., None, None] * alpha[..., None, None]
        return gamma[..., None, None] * h + beta[..., None, None]


def _conv(cin: int, cout: int, dilation: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation, bias=bias)


class ConvMeanPool(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv(x), 2)


class CondResBlock(nn.Module):
    """norm → ELU → conv → norm → ELU → conv, plus shortcut. ``down`` halves the resolution with mean
    pooling, or, when dilated, keeps it and widens the receptive field instead (as CondRefineNetDilated)."""

    def __init__(self, cin: int, cout: int, n_levels: int, down: bool = False, dilation: int = 1):
        super().__init__()
        self.norm1 = CondInstanceNormPlus(cin, n_levels)
        mid = cin if down else cout
        self.conv1 = _conv(cin, mid, dilation)
        self.norm2 = CondInstanceNormPlus(mid, n_levels)
        pool = down and dilation == 1
        self.conv2 = ConvMeanPool(mid, cout) if pool else _conv(mid, cout, dilation)
        if pool:
            self.shortcut: nn.Module = ConvMeanPool(cin, cout, kernel=1)
        elif cin != cout or down:
            self.shortcut = _conv(cin, cout, dilation)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor, level: Tensor) -> Tensor:
        h = self.conv1(elu(self.norm1(x, level)))
        h = self.conv2(elu(self.norm2(h, level)))
        return self.shortcut(x) + h


class CondRCU(nn.Module):
    """RefineNet's residual conv unit: ``n_blocks`` × (``n_stages`` × norm → ELU → conv) with skips."""

    def __init__(self, channels: int, n_blocks: int, n_stages: int, n_levels: int):
        super().__init__()
        self.n_stages = n_stages
        self.norms = nn.ModuleList(CondInstanceNormPlus(channels, n_levels) for _ in range(n_blocks * n_stages))
        self.convs = nn.ModuleList(_conv(channels, channels, bias=False) for _ in range(n_blocks * n_stages))

    def forward(self, x: Tensor, level: Tensor) -> Tensor:
        for start in range(0, len(self.convs), self.n_stages):
            residual = x
            for i in range(start, start + self.n_stages):
                x = self.convs[i](elu(self.norms[i](x, level)))
            x = x + residual
        return x


class CondMSF(nn.Module):
    """Multi-resolution fusion: each input normed, convolved to ``channels``, upsampled, summed."""

    def __init__(self, in_channels: list[int], channels: int, n_levels: int):
        super().__init__()
        self.norms = nn.ModuleList(CondInstanceNormPlus(c, n_levels) for c in in_channels)
        self.convs = nn.ModuleList(_conv(c, channels) for c in in_channels)

    def forward(self, xs: list[Tensor], level: Tensor, size: tuple[int, int]) -> Tensor:
        out = 0
        for x, norm, conv in zip(xs, self.norms, self.convs):
            h = conv(norm(x, level))
            out = out + F.interpolate(h, size=size, mode="bilinear", align_corners=True)
        return out


class CondCRP(nn.Module):
    """Chained residual pooling: repeated norm → 5×5 mean pool (zero padding counted) → conv, each stage
    added to the output."""

    def __init__(self, channels: int, n_stages: int, n_levels: int):
        super().__init__()
        self.norms = nn.ModuleList(CondInstanceNormPlus(channels, n_levels) for _ in range(n_stages))
        self.convs = nn.ModuleList(_conv(channels, channels, bias=False) for _ in range(n_stages))

    def forward(self, x: Tensor, level: Tensor) -> Tensor:
        x = elu(x)
        path = x
        for norm, conv in zip(self.norms, self.convs):
            path = conv(F.avg_pool2d(norm(path, level), 5, stride=1, padding=2))
            x = x + path
        return x


class CondRefineBlock(nn.Module):
    def __init__(self, in_channels: list[int], channels: int, n_levels: int, end: bool = False):
        super().__init__()
        self.adapt = nn.ModuleList(CondRCU(c, 2, 2, n_levels) for c in in_channels)
        self.msf = CondMSF(in_channels, channels, n_levels) if len(in_channels) > 1 else None
        self.crp = CondCRP(channels, 2, n_levels)
        self.out = CondRCU(channels, 3 if end else 1, 2, n_levels)

    def forward(self, xs: list[Tensor], level: Tensor, size: tuple[int, int]) -> Tensor:
        hs = [adapt(x, level) for adapt, x in zip(self.adapt, xs)]
        h = self.msf(hs, level, size) if self.msf is not None else hs[0]
        return self.out(self.crp(h, level), level)


class CondRefineNet(nn.Module):
    """CondRefineNetDilated (ermongroup/ncsn) for any C×H×W with H, W even."""

    def __init__(self, channels: int, ngf: int, n_levels: int):
        super().__init__()
        self.begin = nn.Conv2d(channels, ngf, 3, padding=1)
        self.res1 = nn.ModuleList([CondResBlock(ngf, ngf, n_levels), CondResBlock(ngf, ngf, n_levels)])
        self.res2 = nn.ModuleList([CondResBlock(ngf, 2 * ngf, n_levels, down=True),
                                   CondResBlock(2 * ngf, 2 * ngf, n_levels)])
        self.res3 = nn.ModuleList([CondResBlock(2 * ngf, 2 * ngf, n_levels, down=True, dilation=2),
                                   CondResBlock(2 * ngf, 2 * ngf, n_levels, dilation=2)])
        self.res4 = nn.ModuleList([CondResBlock(2 * ngf, 2 * ngf, n_levels, down=True, dilation=4),
                                   CondResBlock(2 * ngf, 2 * ngf, n_levels, dilation=4)])
        self.refine1 = CondRefineBlock([2 * ngf], 2 * ngf, n_levels)
        self.refine2 = CondRefineBlock([2 * ngf, 2 * ngf], 2 * ngf, n_levels)
        self.refine3 = CondRefineBlock([2 * ngf, 2 * ngf], ngf, n_levels)
        self.refine4 = CondRefineBlock([ngf, ngf], ngf, n_levels, end=True)
        self.norm = CondInstanceNormPlus(ngf, n_levels)
        self.end = nn.Conv2d(ngf, channels, 3, padding=1)

    @staticmethod
    def _stage(blocks: nn.ModuleList, h: Tensor, level: Tensor) -> Tensor:
        for block in blocks:
            h = block(h, level)
        return h

    def forward(self, x: Tensor, level: Tensor) -> Tensor:
        h = self.begin(2.0 * x - 1.0)  # the released code centres inputs the same way
        l1 = self._stage(self.res1, h, level)
        l2 = self._stage(self.res2, l1, level)
        l3 = self._stage(self.res3, l2, level)
        l4 = self._stage(self.res4, l3, level)
        r = self.refine1([l4], level, l4.shape[-2:])
        r = self.refine2([l3, r], level, l3.shape[-2:])
        r = self.refine3([l2, r], level, l2.shape[-2:])
        r = self.refine4([l1, r], level, l1.shape[-2:])
        return self.end(elu(self.norm(r, level)))


class CondResNet(nn.Module):
    """Conditional residual blocks at full resolution: the small-scale score network."""

    def __init__(self, channels: int, ngf: int, n_blocks: int, n_levels: int, dilations: tuple[int, ...] = ()):
        super().__init__()
        self.begin = nn.Conv2d(channels, ngf, 3, padding=1)
        self.blocks = nn.ModuleList(CondResBlock(ngf, ngf, n_levels, dilation=d)
                                    for d in (dilations or (1,) * n_blocks))
        self.norm = CondInstanceNormPlus(ngf, n_levels)
        self.end = nn.Conv2d(ngf, channels, 3, padding=1)

    def forward(self, x: Tensor, level: Tensor) -> Tensor:
        h = self.begin(2.0 * x - 1.0)
        for block in self.blocks:
            h = block(h, level)
        return self.end(elu(self.norm(h, level)))


# --- model ---------------------------------------------------------------------------------------------
#: the small recipe's updates on images past 16×16 (bench.scales: calibrated on 2 CPU cores)
LARGE_STEPS = 1000


@register("ncsn")
class NCSN(BenchModel):
    family = "score"
    Config = NCSNConfig
    reference = "Song & Ermon 2019 (arXiv:1907.05600); ermongroup/ncsn configs/anneal.yml (CIFAR-10 lines)"
    #: a paper-scale smoke on a CPU (bench.smoke): tiny batches; 2 noise levels with 1 Langevin step each instead
    #: of 10 × 100 (the RefineNet takes seconds per image on a CPU)
    smoke_overrides: ClassVar[dict[str, Any]] = {"batch_size": 2, "n_levels": 2, "steps_per_level": 1}

    def __init__(self, config: NCSNConfig, data: DataInfo):
        super().__init__(config, data)
        c = config
        ch, h, w = data.shape
        if c.arch == "refinenet" and (h % 2 or w % 2):
            raise ValueError(f"the RefineNet score network halves the resolution; got {h}×{w}, use arch=resnet")
        self.net: nn.Module = (CondRefineNet if c.arch == "refinenet" else CondResNet)(*self._net_args())
        self.register_buffer("sigmas", geometric_sigmas(c.sigma_begin, c.sigma_end, c.n_levels).float())
        if c.sample_init == "data_mean":  # the chains' start, fitted by `fit`
            self.register_buffer("data_mean", torch.zeros(data.shape))
        # EMA copy of the weights (equal to the weights when ema = 0), the ones sampling uses
        self.ema_net = None
        if c.ema > 0:
            self.ema_net = type(self.net)(*self._net_args())
            self.ema_net.load_state_dict(self.net.state_dict())
            self.ema_net.requires_grad_(False)

    def _net_args(self) -> tuple:
        c, ch = self.config, self.data_info.shape[0]
        if c.arch == "refinenet":
            return ch, c.ngf, c.n_levels
        return ch, c.ngf, c.n_res_blocks, c.n_levels, c.dilations

    @classmethod
    def configure(cls, scale: Scale, data: DataInfo, options: dict[str, Any] | None = None) -> NCSNConfig:
        config = super().configure(scale, data, options)
        side = max(data.shape[1:])
        if any(d >= side for d in config.dilations):  # only known with the data: checked here, not in the config
            raise ValueError(f"dilations must be below the image's side ({side}; a larger one sees only padding "
                             f"around the centre tap), got {config.dilations}")
        return config

    @classmethod
    def recipe(cls, scale: Scale, data: DataInfo) -> NCSNConfig:
        augment = Augment(flip=data.hflip)  # the released CIFAR-10 config: random_flip, no crop
        if scale == Scale.paper:
            return NCSNConfig(augment=augment)
        if scale == Scale.small:
            # T = 10 with the released rule's ε = 2.5e-5 (Algorithm 1's 5e-5: α_L/σ_L² = 0.5) and the final
            # denoising step: 100 score evaluations keep sampling 2,000 digits on a CPU in minutes. On images past
            # 16×16 half the width: its full-resolution blocks cost H·W per evaluation (2,000 MNIST samples at
            # ngf 32 took 6 minutes). There the blocks are dilated (2, 4), which lets a score see 14 pixels
            # around instead of 6 at the same cost, and the chains start from the training mean plus σ₁ noise:
            # from U(0, 1) the briefly trained network drove every MNIST chain white (FID 4123, above
            # pixel_independent's 661); dilation alone gave 3595, both together 316 (three blocks (1, 2, 4): 240,
            # at 1.4× the time)
            large = large_images(data.shape)
            return NCSNConfig(arch="resnet", ngf=16 if large else 32, n_res_blocks=2, scale_by_sigma=True,
                              n_iters=LARGE_STEPS if large else 1000,
                              batch_size=64, lr=1e-3, ema=0.99, augment=augment, steps_per_level=10,
                              sample_eps=2.5e-5, denoise=True, dilations=(2, 4) if large else (),
                              sample_init="data_mean" if large else "uniform")
        return NCSNConfig(arch="resnet", ngf=8, n_res_blocks=1, scale_by_sigma=True, n_iters=20, batch_size=32,
                          augment=augment, steps_per_level=2, sample_eps=1e-5, sample_batch_size=100)

    def deviations(self, scale: Scale) -> list[str]:
        reasons = {
            "arch": "full-resolution residual blocks without the RefineNet decoder: sampling thousands of "
                    "images on a CPU",
            "scale_by_sigma": "output divided by σ (Song & Ermon 2020, technique 3): one small network covers "
                              "the 100× range of score sizes",
            "ema": "sampling with an EMA of the weights (Song & Ermon 2020, technique 5): steadier short runs",
            "denoise": "a final Tweedie denoising step (Song & Ermon 2020): cleaner samples after few steps",
            "steps_per_level": "fewer Langevin steps per level: sampling cost on a CPU",
            "sample_eps": "step size retuned for the shorter chains",
            "n_iters": "fewer iterations: minutes on a CPU",
            "dilations": "dilated residual blocks: a receptive field for the digit's shape at the cost of the "
                         "undilated ones",
            "sample_init": "chains from the training mean plus σ₁ noise (≈ q_σ₁): a briefly trained network "
                           "extrapolates badly from U(0, 1)",
        }
        return config_deviations(self.config, self.recipe(Scale.paper, self.data_info), reasons,
                                 ignore={"sample_batch_size"})

    # --- the score -----------------------------------------------------------------------------------
    def _score_with(self, net: nn.Module, x: Tensor, level: Tensor) -> Tensor:
        out = net(x, level)
        if self.config.scale_by_sigma:
            out = out / self.sigmas[level].view(-1, *[1] * (x.dim() - 1))
        return out

    def score(self, x: Tensor, level: Tensor) -> Tensor:
        """s(x, i) ≈ ∇ₓ log q_{σ_i}(x) for x in [0, 1]-space, level i in 0..L−1 (σ decreasing)."""
        return self._score_with(self.ema_net if self.ema_net is not None else self.net, x, level)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        c = self.config
        dev = self.sigmas.device
        was_training = self.training
        self.eval()
        out = []
        for a, b in batches(n, c.sample_batch_size):
            if c.sample_init == "data_mean":
                x0 = self.data_mean + c.sigma_begin * torch.randn((b - a, *self.data_info.shape),
                                                                  generator=generator).to(dev)
            else:
                x0 = torch.rand((b - a, *self.data_info.shape), generator=generator).to(dev)
            x = annealed_langevin(self.score, x0, self.sigmas.double().cpu(), c.steps_per_level, c.sample_eps,
                                  generator, c.denoise, c.langevin_rule)
            out.append(to_uint8(x, 0.0, 1.0, what=f"{self.name} annealed Langevin samples").cpu())
        self.train(was_training)
        return torch.cat(out)

    def sampler_protocol(self) -> dict[str, Any]:
        c = self.config
        return {"eval": {**c.langevin.describe(), "batch_size": c.sample_batch_size,
                         "weights": f"ema({c.ema})" if c.ema > 0 else "raw"},
                "output": "clamp to [0,1], round(x*255)"}

    # --- training ------------------------------------------------------------------------------------
    def dsm_loss(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Denoising score matching with λ(σ) = σ², a level drawn uniformly per example."""
        level = torch.randint(0, self.config.n_levels, (x.shape[0],), generator=generator).to(x.device)
        z = torch.randn(x.shape, generator=generator).to(x.device)
        sigma = self.sigmas[level].view(-1, *[1] * (x.dim() - 1))
        s = self._score_with(self.net, x + sigma * z, level)
        return 0.5 * ((sigma * s + z) ** 2).flatten(1).sum(1).mean()

    def training_batch(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """uint8 images → what the score network is trained on: augmented, then (x + u)/256."""
        c = self.config
        x = c.augment(as_float01(x), generator)
        if c.dequantize:  # the released code: X·255/256 + U[0, 1/256)
            x = x * (255.0 / 256.0) + torch.rand(x.shape, generator=generator) / 256.0
        return x

    def fit(self, train: Split, ctx: TrainContext) -> dict[str, Any]:
        c = self.config
        g = ctx.generator()
        self.to(ctx.device).train()
        if c.sample_init == "data_mean":
            self.data_mean.copy_(train.x.sum(0, dtype=torch.float64).div(255.0 * len(train)).float())
        opt = torch.optim.Adam(self.net.parameters(), lr=c.lr, betas=(c.beta1, 0.999))
        # reshuffled each epoch; the last batch may be partial, as the released loader's
        run = TrainLoop(self, ctx, n=len(train), batch_size=c.batch_size, steps=c.n_iters, drop_last=False,
                        optimizer=opt)
        for idx in run.batches(g):
            run.step(self.dsm_loss(self.training_batch(train.x[idx], g).to(ctx.device), g))
            if self.ema_net is not None:
                with torch.no_grad():
                    for pe, p in zip(self.ema_net.parameters(), self.net.parameters()):
                        pe.lerp_(p, 1.0 - c.ema)
        return run.finish(batch_size=c.batch_size)

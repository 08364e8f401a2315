"""`igebm`: the energy-based model of Du & Mordatch, "Implicit Generation and Generalization in
Energy-Based Models" (NeurIPS 2019, arXiv:1903.08689; code: openai/ebm_code_release).

The energy E(x) (or E(x, y)) is a ResNet whose convolutions are spectrally normalized, with LeakyReLU(0.2),
average-pool down-sampling and global sum pooling before a plain linear output (their `ResNet32`: a 3×3
stem, then per stage a down-sampling and a plain residual block). The class-conditional model feeds the
label into every residual block as a per-class gain and bias, as their ``--cclass`` models do.

Training is contrastive divergence with an L2 penalty on the energies:
    E(x⁺) − E(x⁻) + α (E(x⁺)² + E(x⁻)²),  α = 1,
with x⁻ from Langevin dynamics in the [0, 1] pixel box, started from a replay buffer (a fraction
``reinit_freq`` restarts from U(0, 1)). One step, as in their code: x ← clip₀¹(x − λ·clip_c(∇ₓE(x)) + σε)
with λ = 10, σ = 0.005, c = 0.01 (``--step_lr=10 --proj_norm=0.01``), 60 steps, buffer 10,000,
reinit 0.05, Adam(β₁ = 0, β₂ = 0.999) and their default lr 3e-4, batch 128 at `paper` scale.
The conditional model runs its negative chains under the batch's labels (their negatives use the positive
labels) from one shared, unlabeled buffer, so a chain for label y often starts from another class's image;
it classifies by the lowest energy over the labels, logits(x) = −E(x, y) for every y, and has the marginal
energy E(x) = −logsumexp_y(−E(x, y)). ``buffer_layout="per_class"`` uses JEM's per-class segments instead
(on digits: sharper samples, but a classifier near chance, since no negative ever carries another class).
The unconditional model has no labels and hence no classifier: constructing `igebm` with
``conditional=False`` yields `UnconditionalIGEBM`, which lacks ``logits``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.data.base import Split
from bench.errors import ModelFailure
from bench.models.base import BenchModel, DataInfo, TrainContext, as_float01, batches, register, to_uint8
from bench.models.jem_factored import ClassConditionalBuffer
from bench.models.sngan import refine_spectral_norm, sn
from bench.samplers.sgld import sgld, uniform_init
from bench.scales import Scale


@dataclass(frozen=True)
class IGEBMConfig:
    conditional: bool = True
    # network (their ResNet32 for CIFAR-10: 128 filters, stages ×1, ×2, ×2)
    channels: int = 128
    multipliers: tuple[int, ...] = (1, 2, 2)
    leak: float = 0.2
    # optimization
    epochs: int = 190  # ≈ 74,700 iterations at batch 128, where their released conditional model was saved
    batch_size: int = 128
    lr: float = 3e-4
    beta1: float = 0.0
    beta2: float = 0.999
    l2_weight: float = 1.0  # α on E(x⁺)² + E(x⁻)²
    # Langevin dynamics in [0, 1] during training
    sgld_steps: int = 60
    sgld_step_size: float = 10.0
    sgld_noise: float = 0.005
    grad_clip: float = 0.01  # per-pixel clip of ∇ₓE before the step (their proj_norm); 0 disables it
    buffer_size: int = 10_000
    reinit_freq: float = 0.05
    # "shared": one unlabeled pool whose chains continue under the batch's labels, as their code does, so
    # negatives for label y start from other classes' images (this is what teaches the labels apart);
    # "per_class": JEM's layout, one segment per class (sharper samples, a weaker classifier)
    buffer_layout: Literal["shared", "per_class"] = "shared"
    # sampling for evaluation: chains from the replay buffer (labels balanced over classes), run as many steps
    # as in training (their evaluation does the same)
    sample_source: Literal["replay_buffer", "fresh"] = "replay_buffer"
    sample_steps: int = 60
    sample_batch_size: int = 500
    sn_refine_iterations: int = 50

    def __post_init__(self):
        if not self.multipliers or min(self.multipliers) < 1:
            raise ValueError(f"multipliers must be a non-empty tuple of positive ints, got {self.multipliers}")
        if self.buffer_layout not in ("shared", "per_class"):
            raise ValueError(f"buffer_layout must be 'shared' or 'per_class', got {self.buffer_layout!r}")
        if self.sample_source not in ("replay_buffer", "fresh"):
            raise ValueError(f"sample_source must be 'replay_buffer' or 'fresh', got {self.sample_source!r}")


# --- modules ----------------------------------------------------------------------------------------
class CondResBlock(nn.Module):
    """act-conv-(gain, bias)-act-conv-(gain, bias), average-pooled when down-sampling; the per-class gain and
    bias exist only when ``n_classes`` > 0 and start at zero, so every class starts from the same energy."""

    def __init__(self, ch_in: int, ch_out: int, down: bool, n_classes: int, leak: float):
        super().__init__()
        self.conv1 = sn(nn.Conv2d(ch_in, ch_out, 3, padding=1))
        self.conv2 = sn(nn.Conv2d(ch_out, ch_out, 3, padding=1))
        self.shortcut = sn(nn.Conv2d(ch_in, ch_out, 1)) if (ch_in != ch_out or down) else None
        self.film: nn.ModuleList | None = None
        if n_classes > 0:
            self.film = nn.ModuleList([nn.Embedding(n_classes, 2 * ch_out) for _ in range(2)])
            for e in self.film:
                nn.init.zeros_(e.weight)
        self.down, self.leak = down, leak

    def _modulate(self, h: Tensor, y: Tensor | None, i: int) -> Tensor:
        if self.film is None or y is None:
            return h
        gain, bias = self.film[i](y)[:, :, None, None].chunk(2, dim=1)
        return h * (1.0 + gain) + bias

    def forward(self, x: Tensor, y: Tensor | None) -> Tensor:
        h = self._modulate(self.conv1(F.leaky_relu(x, self.leak)), y, 0)
        h = self._modulate(self.conv2(F.leaky_relu(h, self.leak)), y, 1)
        out = h + (x if self.shortcut is None else self.shortcut(x))
        return F.avg_pool2d(out, 2) if self.down else out


class EnergyNet(nn.Module):
    """Image in [0, 1] (and a label, when conditional) -> energy, shape [N]."""

    def __init__(self, shape: tuple[int, int, int], n_classes: int, channels: int, multipliers: tuple[int, ...],
                 leak: float):
        super().__init__()
        self.stem = sn(nn.Conv2d(shape[0], channels, 3, padding=1))
        blocks = []
        ch, size = channels, min(shape[1:])
        for m in multipliers:
            down = size >= 4  # keep at least a 2×2 map for the last stage
            blocks.append(CondResBlock(ch, channels * m, down, n_classes, leak))
            blocks.append(CondResBlock(channels * m, channels * m, False, n_classes, leak))
            ch = channels * m
            size = size // 2 if down else size
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Linear(ch, 1)  # not normalized, as in their code
        self.leak = leak

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.stem(x)
        for block in self.blocks:
            h = block(h, y)
        return self.out(F.leaky_relu(h, self.leak).sum(dim=(2, 3))).squeeze(1)  # global sum pooling


class _ClipGrad(torch.autograd.Function):
    """Identity forward; clips the incoming gradient elementwise to [−c, c] (IGEBM's proj_norm)."""

    @staticmethod
    def forward(ctx, x: Tensor, c: float) -> Tensor:
        ctx.c = c
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad.clamp(-ctx.c, ctx.c), None


# --- model ------------------------------------------------------------------------------------------
class UnconditionalIGEBM(BenchModel):
    """The unconditional model: Energy and Sampler. `IGEBM` adds labels and the classifier."""

    name = "igebm"
    family = "ebm"
    Config = IGEBMConfig
    code_modules = ("bench.models.jem_factored", "bench.models.sngan", "bench.samplers.sgld")

    def __init__(self, config: IGEBMConfig, data: DataInfo):
        super().__init__(config, data)
        self.n_labels = data.n_classes if config.conditional else 1
        self.n_segments = self.n_labels if config.buffer_layout == "per_class" else 1
        self.net = EnergyNet(data.shape, data.n_classes if config.conditional else 0, config.channels,
                             config.multipliers, config.leak)
        # the persistent chains in [−1, 1] (the shared buffer's convention); the energy sees (z + 1) / 2
        self.register_buffer("replay_buffer", torch.zeros(config.buffer_size, *data.shape))
        ClassConditionalBuffer(torch.empty(config.buffer_size, 0), self.n_segments)  # refuses an uneven layout

    @classmethod
    def recipe(cls, scale: Scale, data: DataInfo) -> IGEBMConfig:
        def per_class(size: int) -> int:
            return data.n_classes * max(1, size // data.n_classes)

        if scale == Scale.paper:
            return IGEBMConfig(buffer_size=per_class(10_000))
        if scale == Scale.small:
            # evaluation chains as long as the training chains: on digits, 40 steps give FID ≈ 39 and 100 give
            # ≈ 86 (strokes saturate), as the energy is only trained to shape 20-step chains
            return IGEBMConfig(channels=32, multipliers=(1, 2), epochs=16, batch_size=64, lr=3e-4, sgld_steps=20,
                               buffer_size=per_class(2000), sample_steps=20)
        return IGEBMConfig(channels=8, multipliers=(1,), epochs=1, batch_size=32, sgld_steps=3,
                           buffer_size=per_class(130), sample_steps=3)

    # --- capabilities ------------------------------------------------------------------------------
    def _labels(self, y: Tensor | None) -> Tensor | None:
        return y if self.config.conditional else None

    def energy(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _langevin(self, x: Tensor, y: Tensor | None, n_steps: int, generator: torch.Generator) -> Tensor:
        """IGEBM's sampler, one shared SGLD step at a time so the box constraint applies after each."""
        c = self.config
        y = self._labels(y)

        def energy(v: Tensor) -> Tensor:
            return self.net(_ClipGrad.apply(v, c.grad_clip) if c.grad_clip > 0 else v, y)

        for _ in range(n_steps):
            x = sgld(energy, x, 1, c.sgld_step_size, c.sgld_noise, generator).clamp_(0.0, 1.0)
        return x

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        c = self.config
        dev = next(self.parameters()).device
        was_training = self.training
        self.eval()
        per_class = c.sample_source == "replay_buffer" and c.buffer_layout == "per_class"
        if c.sample_source == "replay_buffer":
            buf = ClassConditionalBuffer(self.replay_buffer, self.n_segments)
            starts, idx = buf.pick(n, generator)
        else:
            starts = uniform_init(n, self.data_info.shape, generator)
        # a chain keeps its segment's label; otherwise labels are balanced over the classes
        y = buf.labels(idx) if per_class else torch.randperm(n, generator=generator) % self.n_labels
        out = []
        for a, b in batches(n, c.sample_batch_size):
            x = self._langevin((starts[a:b].to(dev) + 1.0) / 2.0, y[a:b].to(dev), c.sample_steps, generator)
            out.append(to_uint8(x, what=f"{self.name} Langevin samples").cpu())
        self.train(was_training)
        return torch.cat(out)

    def sampler_protocol(self) -> dict[str, Any]:
        c = self.config
        from_buffer = c.sample_source == "replay_buffer"
        step = {"algorithm": "langevin (IGEBM)", "space": "[0,1] pixels, clipped to the box after each step",
                "step_size": c.sgld_step_size, "noise": c.sgld_noise, "grad_clip": c.grad_clip,
                "conditional": c.conditional}
        return {
            "train": {**step, "n_steps": c.sgld_steps, "buffer_size": c.buffer_size, "reinit_freq": c.reinit_freq,
                      "init": "uniform(0,1)", "buffer_layout": c.buffer_layout if c.conditional else "shared",
                      "labels": "the positive batch's labels" if c.conditional else None},
            "eval": {**step, "source": c.sample_source, "n_steps": c.sample_steps, "buffer_size": c.buffer_size,
                     "chains": ("per sample batch: distinct buffer entries (batches draw independently)"
                                if from_buffer else "fresh uniform(0,1)"),
                     "labels": ("the chain's buffer segment" if from_buffer and c.buffer_layout == "per_class"
                                else "balanced over classes") if c.conditional else None},
        }

    # --- training ----------------------------------------------------------------------------------
    def fit(self, train: Split, ctx: TrainContext) -> dict[str, Any]:
        c = self.config
        g = ctx.generator()
        dev = ctx.device
        self.to(dev).train()
        buf = ClassConditionalBuffer.fresh_per_class(c.buffer_size, self.data_info.shape, self.n_segments, g)
        opt = torch.optim.Adam(self.net.parameters(), lr=c.lr, betas=(c.beta1, c.beta2))
        n = len(train)
        step = 0
        with ctx.progress(f"train {self.name}", c.epochs * math.ceil(n / c.batch_size)) as update:
            for _ in range(c.epochs):
                perm = torch.randperm(n, generator=g)
                for a, b in batches(n, c.batch_size):
                    idx = perm[a:b]
                    # uniform dequantization, as their data loaders add
                    x = as_float01(train.x[idx]) + torch.rand(train.x[idx].shape, generator=g) / 256.0
                    x = x.clamp(0.0, 1.0).to(dev)
                    y = train.y[idx] if c.conditional else torch.zeros(b - a, dtype=torch.long)
                    self.eval()  # no power-iteration updates while sampling
                    z0, bidx = buf.draw_for(y if self.n_segments > 1 else torch.zeros_like(y), c.reinit_freq, g)
                    xq = self._langevin((z0.to(dev) + 1.0) / 2.0, y.to(dev), c.sgld_steps, g)
                    buf.write(bidx, 2.0 * xq - 1.0)
                    self.train()
                    yl = self._labels(y.to(dev))
                    e_pos, e_neg = self.net(x, yl), self.net(xq, yl)
                    loss = e_pos.mean() - e_neg.mean() + c.l2_weight * ((e_pos ** 2).mean() + (e_neg ** 2).mean())
                    if not torch.isfinite(loss):
                        raise ModelFailure(f"{self.name} training diverged at step {step} (loss={loss.item():.3g}); "
                                           "lower lr or sgld_step_size")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    update(1, loss=loss.item(), e_pos=e_pos.mean().item(), e_neg=e_neg.mean().item())
        refine_spectral_norm(self.net, c.sn_refine_iterations)
        self.eval()
        self.replay_buffer.copy_(buf.data.to(self.replay_buffer.device))
        return {"steps": step, "epochs": c.epochs}


@register("igebm")
class IGEBM(UnconditionalIGEBM):
    """The class-conditional model (the default): Classifier, Energy and Sampler. With
    ``conditional=False`` the constructor returns an `UnconditionalIGEBM`, which has no ``logits``."""

    def __new__(cls, config: IGEBMConfig | None = None, data: DataInfo | None = None):
        # the defaults let copy/pickle recreate an instance before restoring its state
        if config is not None and data is not None and not config.conditional:
            return UnconditionalIGEBM(config, data)
        return super().__new__(cls)

    def _all_labels(self, x: Tensor) -> Tensor:
        """E(x, y) for every label, N×K, in one batched pass."""
        k = self.data_info.n_classes
        xs = x.repeat_interleave(k, dim=0)
        ys = torch.arange(k, device=x.device).repeat(x.shape[0])
        return self.net(xs, ys).view(x.shape[0], k)

    def logits(self, x: Tensor) -> Tensor:
        return -self._all_labels(x)

    def energy(self, x: Tensor) -> Tensor:
        return -torch.logsumexp(-self._all_labels(x), dim=1)

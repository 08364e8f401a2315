"""`igebm`: the energy-based model of Du & Mordatch, "Implicit Generation and Generalization in
Energy-Based Models" (NeurIPS 2019, arXiv:1903.08689; code: openai/ebm_code_release).

The energy E(x) (or E(x, y)) is their `ResNet32` (models.py, utils.py `smart_res_block`): a spectrally
normalized 3×3 stem with LeakyReLU(0.2), then per stage a down-sampling and a plain residual block, ReLU,
global sum pooling and a plain linear output. Each block is post-activation,

    h = act(conv1(x + b1[y])),   out = act(pool(conv2(h + b2[y]) · (s2[y] + c2) + shortcut(x))),

with per-class input biases b1, b2 (zero at the start), a per-class scale s2 (one at the start) plus a
shared offset c2 on conv2 — their conditioning (`--cclass`; the unconditional model has one row of each and
no c2); the shortcut is the identity unless the block changes the width (then a spectrally normalized 3×3
conv); convolutions have no bias; conv2 starts at zero and its spectral norm is only bounded by 1
(their `zero=True` weights use `lower_bound`), the others are set to 1. One power iteration per training
step updates every norm estimate, as their graph does.

Training is contrastive divergence with an L2 penalty on the energies:
    E(x⁺) − E(x⁻) + α (E(x⁺)² + E(x⁻)²),  α = 1,
where x⁺ = (x + u)/256 and x⁻ comes from Langevin dynamics in the [0, 1] box. One step, as their
`langevin_step`: x ← clip₀¹(x̃ − λ·clip_c(∇ₓE(x̃))) with x̃ = x + σε, λ = 10, σ = 0.005, c = 0.01
(``--step_lr=10 --proj_norm=0.01``), 60 steps, under the positive batch's labels. Chains start from their
replay buffer (`FIFOReplayBuffer`: the last 10,000 negatives, stored as uint8 floor(255·x) and read back
as q/256 + U[0, 1/256)), each from U(0, 1) instead with probability 0.05. The optimizer is their
`custom_adam` (`EBMAdam`): Adam(β₁ = 0, β₂ = 0.999) with lr 3e-4 whose gradients are first clipped to
±(3·√v̂ + 0.1); batch 128 (full batches only), 190 epochs ≈ the 74,700 iterations of their released model.

Evaluation sampling (``sample_source``):
- ``test_inception`` (the `paper` default): their test_inception.py. For every 1,000 images, a fresh
  buffer is filled with chains from U(0, 1) under random labels, then for 200 iterations 512 chains drawn
  from it (with replacement) run 20 Langevin steps (λ = 10, σ = 0.005, c = 0.05) and are written back;
  until the last 10 iterations a drawn chain restarts from noise with probability 0.01 and takes a random
  label with probability 0.1. Iteration i uses the energy of checkpoint i mod 10, the ten checkpoints of the
  run's last 2,700 iterations, 300 apart (`ensemble`, `ensemble_every`). Images are floor(256·x), at most
  255. The procedure is simulated chain by chain (`simulate_test_inception`): each image has the
  reference's distribution, and any number of images can be drawn in any batches.
- ``replay_buffer``: the final training buffer's chains (labels balanced over the classes) run
  ``sample_steps`` more training-style steps; cheap, the `small` scale's choice.
- ``fresh``: chains from U(0, 1), ``sample_steps`` training-style steps.
The conditional model classifies by the lowest energy over the labels, logits(x) = −E(x, y) for every y,
and has the marginal energy E(x) = −logsumexp_y(−E(x, y)). The unconditional model has no labels and hence
no classifier: constructing `igebm` with ``conditional=False`` yields `UnconditionalIGEBM`, which lacks
``logits``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm

from bench.data.base import Split
from bench.models._deviations import config_deviations
from bench.models.base import BenchModel, DataInfo, TrainContext, batches, register, to_uint8
from bench.models.sngan import refine_spectral_norm, sn
from bench.models.training import TrainLoop
from bench.samplers import noise_like
from bench.scales import Scale, large_images, small_epochs

SampleSource = Literal["test_inception", "replay_buffer", "fresh"]


@dataclass(frozen=True)
class IGEBMConfig:
    conditional: bool = True
    # network (their ResNet32 for CIFAR-10: 128 filters, stages ×1, ×2, ×2)
    channels: int = 128
    multipliers: tuple[int, ...] = (1, 2, 2)
    leak: float = 0.2
    #: NHWC convolutions after the stem: the same math, float rounding apart; 1.3-1.4× faster SGLD steps on a
    #: CPU (docs/performance.md)
    channels_last: bool = True
    # optimization (train.py: --batch_size=128, lr 3e-4, custom_adam(β1 0, β2 0.999))
    epochs: int = 190  # ≈ 74,700 iterations at batch 128, where their released conditional model was saved
    batch_size: int = 128
    lr: float = 3e-4
    beta1: float = 0.0
    beta2: float = 0.999
    adam_clip: bool = True  # custom_adam's clip of every gradient entry to ±(3·√v̂ + 0.1)
    l2_weight: float = 1.0  # α on E(x⁺)² + E(x⁻)²
    # Langevin dynamics in [0, 1] during training
    sgld_steps: int = 60
    sgld_step_size: float = 10.0
    sgld_noise: float = 0.005
    grad_clip: float = 0.01  # per-pixel clip of ∇ₓE before the step (their proj_norm); 0 disables it
    buffer_size: int = 10_000  # the FIFO replay buffer's capacity
    reinit_freq: float = 0.05
    # evaluation sampling (see the module docstring)
    sample_source: SampleSource = "test_inception"
    eval_buffer_size: int = 1000  # test_inception: images per round (a fresh buffer each)
    eval_batch_size: int = 512
    eval_iterations: int = 200  # 1000/500 · repeat_scale 100
    eval_steps: int = 20
    eval_step_size: float = 10.0
    eval_noise: float = 0.005
    eval_grad_clip: float = 0.05  # test_inception's proj_norm default
    eval_reinit: float = 0.01
    eval_label_reinit: float = 0.1
    eval_nomix: int = 10  # the last iterations without restarts or label changes
    ensemble: int = 10  # checkpoints whose energies the chains take turns with (1: the final weights only)
    ensemble_every: int = 300  # training iterations between them
    # replay_buffer / fresh sources: training-style steps
    sample_steps: int = 60
    sample_batch_size: int = 500  # chains per forward pass (every source); memory only
    sn_refine_iterations: int = 50

    def __post_init__(self):
        if not self.multipliers or min(self.multipliers) < 1:
            raise ValueError(f"multipliers must be a non-empty tuple of positive ints, got {self.multipliers}")
        if self.sample_source not in ("test_inception", "replay_buffer", "fresh"):
            raise ValueError("sample_source must be test_inception, replay_buffer or fresh, "
                             f"got {self.sample_source!r}")
        if self.ensemble < 1 or self.ensemble_every < 1 or self.buffer_size < 1 or self.eval_buffer_size < 1:
            raise ValueError("ensemble, ensemble_every, buffer_size and eval_buffer_size must be >= 1")
        if self.eval_iterations * self.eval_batch_size < self.eval_buffer_size:
            raise ValueError(f"eval_iterations × eval_batch_size ({self.eval_iterations} × {self.eval_batch_size}) "
                             f"must fill eval_buffer_size ({self.eval_buffer_size}) chains")


# --- spectral norm bounded by 1 (their `lower_bound` normalization of zero-initialized weights) -----------
class _BoundedSpectralNorm(_SpectralNorm):
    """torch's spectral norm parametrization, except W / max(σ, 1): σ is bounded by 1 instead of set to 1,
    so a weight that starts at zero can start small (utils.py `spectral_normed_weight(lower_bound=True)`)."""

    def forward(self, weight: Tensor) -> Tensor:
        weight_mat = self._reshape_weight_to_matrix(weight)
        if self.training:
            self._power_method(weight_mat, self.n_power_iterations)
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        return weight / torch.vdot(u, torch.mv(weight_mat, v)).clamp_min(1.0)


def bounded_sn_zero(module: nn.Conv2d) -> nn.Module:
    """A conv that starts at (almost) zero, N(0, 1e-10) as their `zero=True` weights, with σ ≤ 1."""
    with torch.no_grad():
        module.weight.normal_(0.0, 1e-10)
    parametrize.register_parametrization(module, "weight", _BoundedSpectralNorm(module.weight))
    return module


# --- modules ----------------------------------------------------------------------------------------
class CondResBlock(nn.Module):
    """Their `smart_res_block` (see the module docstring); ``n_labels`` rows of input biases and scales
    (1 for the unconditional model), the shared scale offset only when ``conditional``."""

    def __init__(self, ch_in: int, ch_out: int, down: bool, n_labels: int, conditional: bool, leak: float):
        super().__init__()
        self.conv1 = sn(nn.Conv2d(ch_in, ch_out, 3, padding=1, bias=False))
        self.conv2 = bounded_sn_zero(nn.Conv2d(ch_out, ch_out, 3, padding=1, bias=False))
        self.shortcut = sn(nn.Conv2d(ch_in, ch_out, 3, padding=1, bias=False)) if ch_in != ch_out else None
        self.bias1, self.bias2 = nn.Embedding(n_labels, ch_in), nn.Embedding(n_labels, ch_out)
        self.scale2 = nn.Embedding(n_labels, ch_out)
        for e, value in ((self.bias1, 0.0), (self.bias2, 0.0), (self.scale2, 1.0)):
            nn.init.constant_(e.weight, value)
        self.scale2_offset = nn.Parameter(torch.zeros(ch_out)) if conditional else None  # their `cb`
        self.down, self.leak = down, leak

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = F.leaky_relu(self.conv1(x + self.bias1(y)[:, :, None, None]), self.leak)
        scale = self.scale2(y) + (self.scale2_offset if self.scale2_offset is not None else 0.0)
        h = self.conv2(h + self.bias2(y)[:, :, None, None]) * scale[:, :, None, None]
        out = h + (x if self.shortcut is None else self.shortcut(x))
        if self.down:
            out = F.avg_pool2d(out, 2)
        return F.leaky_relu(out, self.leak)


class EnergyNet(nn.Module):
    """Image in [0, 1] (and a label, when conditional) -> energy, shape [N]."""

    def __init__(self, shape: tuple[int, int, int], n_classes: int, channels: int, multipliers: tuple[int, ...],
                 leak: float, channels_last: bool = False):
        super().__init__()
        self.channels_last = channels_last
        self.conditional = n_classes > 0
        n_labels = max(1, n_classes)
        self.stem = sn(nn.Conv2d(shape[0], channels, 3, padding=1, bias=False))
        blocks = []
        ch, size = channels, min(shape[1:])
        for m in multipliers:
            down = size >= 4  # keep at least a 2×2 map for the last stage
            blocks.append(CondResBlock(ch, channels * m, down, n_labels, self.conditional, leak))
            blocks.append(CondResBlock(channels * m, channels * m, False, n_labels, self.conditional, leak))
            ch = channels * m
            size = size // 2 if down else size
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Linear(ch, 1)  # not normalized, Glorot-initialized, as their fc5
        nn.init.xavier_uniform_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.leak = leak

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        if not self.conditional or y is None:
            y = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        h = self.stem(x)
        if self.channels_last:  # (the stem's output sets the layout: a grey image is NCHW and NHWC at once)
            h = h.contiguous(memory_format=torch.channels_last)
        h = F.leaky_relu(h, self.leak)
        for block in self.blocks:
            h = block(h, y)
        return self.out(F.relu(h).sum(dim=(2, 3))).squeeze(1)  # ReLU, global sum pooling


class EBMAdam(torch.optim.Optimizer):
    """Their `custom_adam.AdamOptimizer`: at step t every gradient entry is first clipped to
    ±(3·√(v/(1 − β2^t)) + 0.1), v the second moment before this step; then TensorFlow's Adam,
    m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g², θ ← θ − lr·√(1−β2^t)/(1−β1^t)·m/(√v + ε)."""

    def __init__(self, params, lr: float, betas: tuple[float, float], clip: bool = True, eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "clip": clip, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["t"], st["m"], st["v"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                st["t"] += 1
                t, g = st["t"], p.grad
                if group["clip"]:
                    bound = 3.0 * (st["v"] / (1.0 - b2**t)).sqrt() + 0.1
                    g = torch.maximum(torch.minimum(g, bound), -bound)
                st["m"].mul_(b1).add_(g, alpha=1.0 - b1)
                st["v"].mul_(b2).addcmul_(g, g, value=1.0 - b2)
                lr_t = group["lr"] * math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
                p.sub_(lr_t * st["m"] / (st["v"].sqrt() + group["eps"]))


class FIFOReplayBuffer:
    """Their training `ReplayBuffer` (utils.py): the last ``size`` negatives, oldest overwritten first,
    stored as uint8 floor(255·clip₀¹(x)) (`compress_x_mod`), sampled uniformly with replacement and read back
    as q/256 + U[0, 1/256) (`decompress_x_mod`; the 255-vs-256 mismatch is theirs)."""

    def __init__(self, data: Tensor, filled: int = 0):
        self.data = data  # uint8, size × C × H × W
        self.filled, self.next = filled, filled % data.shape[0]

    def __len__(self) -> int:
        return self.filled

    def add(self, x: Tensor) -> None:
        q = torch.floor(255.0 * x.detach().clamp(0.0, 1.0)).to(torch.uint8).cpu()
        size = self.data.shape[0]
        rows = (self.next + torch.arange(q.shape[0])) % size
        self.data[rows[-size:]] = q[-size:]
        self.next = (self.next + q.shape[0]) % size
        self.filled = min(size, self.filled + q.shape[0])

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        idx = torch.randint(0, self.filled, (n,), generator=generator)
        q = self.data[idx].float()
        return q / 256.0 + torch.rand(q.shape, generator=generator) / 256.0


def langevin(energy: nn.Module, x: Tensor, y: Tensor | None, n_steps: int, step_size: float, noise: float,
             clip: float, generator: torch.Generator) -> Tensor:
    """Their `langevin_step`, ``n_steps`` times: x̃ = x + noise·ε, x ← clip₀¹(x̃ − step_size·clip_c(∇ₓE(x̃)))
    (clip 0: no gradient clipping). Returns a detached tensor.

    In eval mode a spectral norm's W / σ is the same at every step (no power iteration runs), so it is
    computed once for the whole chain (`parametrize.cached`): the same numbers, bit for bit, 6% faster for
    igebm's digits training; in training mode each forward's power iteration is kept."""
    x = x.detach()
    with parametrize.cached() if not energy.training else contextlib.nullcontext():
        for _ in range(n_steps):
            eps = noise_like(x, generator)
            x = (x + noise * eps).requires_grad_(True)
            (grad,) = torch.autograd.grad(energy(x, y).sum(), x)
            if clip > 0:
                grad = grad.clamp(-clip, clip)
            x = (x.detach() - step_size * grad).clamp(0.0, 1.0)
    return x


def simulate_test_inception(run: Callable[[int, Tensor, Tensor], Tensor], n: int, shape: tuple[int, ...],
                          n_labels: int, c: IGEBMConfig, generator: torch.Generator) -> Tensor:
    """``n`` final chains of test_inception.py's procedure, simulated chain by chain.

    In a round the buffer is filled with F = ⌈B/b⌉ batches of b fresh chains (B = eval_buffer_size,
    b = eval_batch_size; entry e is made in fill iteration e // b), and each later iteration i draws b
    entries with replacement from the P = F·b, runs one copy per draw from the stored chain and writes the
    copies back in order. Copies of one entry start from the same state, so the one written last is a single
    draw's result: an entry's history is that of a chain updated at iteration i with probability
    q = 1 − (1 − 1/P)^b, independently of the others but for the (irrelevant) count of draws per iteration.
    A sample is one of the B entries kept, uniformly: this keeps the reference's per-image distribution at a
    cost per image (~1,600 Langevin steps at their settings, vs 2,048 in a literal round that wastes double
    draws), for any number of samples in any batches. ``run(i, x, y)`` runs iteration i's Langevin chains
    (the energy of checkpoint i mod K). Returns x in [0, 1] (CPU)."""
    b = c.eval_batch_size
    fills = math.ceil(c.eval_buffer_size / b)
    q = 1.0 - (1.0 - 1.0 / (fills * b)) ** b
    fill_iteration = torch.randint(0, c.eval_buffer_size, (n,), generator=generator) // b
    x = torch.rand((n, *shape), generator=generator)
    y = torch.randint(0, n_labels, (n,), generator=generator)
    for i in range(fills):
        idx = torch.nonzero(fill_iteration == i).squeeze(1)
        x[idx] = run(i, x[idx], y[idx])
    for i in range(fills, c.eval_iterations):
        idx = torch.nonzero(torch.rand(n, generator=generator) < q).squeeze(1)
        x0, yi = x[idx], y[idx]
        restart = torch.rand(len(idx), generator=generator) < c.eval_reinit
        relabel = torch.rand(len(idx), generator=generator) < c.eval_label_reinit
        new_y = torch.randint(0, n_labels, (len(idx),), generator=generator)
        noise = torch.rand((len(idx), *shape), generator=generator)
        if i < c.eval_iterations - c.eval_nomix:  # the last eval_nomix iterations neither restart nor relabel
            x0 = torch.where(restart.view(-1, *[1] * len(shape)), noise, x0)
            yi = torch.where(relabel, new_y, yi)
        x[idx], y[idx] = run(i, x0, yi), yi
    return x


# --- model ------------------------------------------------------------------------------------------
class UnconditionalIGEBM(BenchModel):
    """The unconditional model: Energy and Sampler. `IGEBM` adds labels and the classifier."""

    name = "igebm"
    family = "ebm"
    Config = IGEBMConfig
    divergence_hint = "lower lr or sgld_step_size"
    reference = "Du & Mordatch 2019 (arXiv:1903.08689); openai/ebm_code_release train.py, models.py, test_inception.py"
    #: a paper-scale smoke on a CPU (bench.smoke): tiny batches, and 4 test_inception iterations of 5 steps
    #: instead of 200 of 20 (a sample costs ~1,600 Langevin steps of the full network at the paper's settings)
    smoke_overrides: ClassVar[dict[str, Any]] = {"batch_size": 2, "eval_iterations": 4, "eval_steps": 5}

    def __init__(self, config: IGEBMConfig, data: DataInfo):
        super().__init__(config, data)
        self.n_labels = data.n_classes if config.conditional else 1
        self.net = self._new_net()
        # the checkpoints before the last that test_inception ensembles (the last is `net`)
        self.ensemble_nets = nn.ModuleList(self._new_net() for _ in range(config.ensemble - 1))
        # the training buffer as training left it (uint8, as stored) and how many of its rows are filled
        self.register_buffer("replay_buffer", torch.zeros(config.buffer_size, *data.shape, dtype=torch.uint8))
        self.register_buffer("replay_filled", torch.tensor(0))

    def _new_net(self) -> EnergyNet:
        c = self.config
        return EnergyNet(self.data_info.shape, self.data_info.n_classes if c.conditional else 0, c.channels,
                         c.multipliers, c.leak, c.channels_last)

    @classmethod
    def recipe(cls, scale: Scale, data: DataInfo) -> IGEBMConfig:
        if scale == Scale.paper:
            return IGEBMConfig()
        if scale == Scale.small:
            # evaluation chains as long as the training chains, from the training buffer: on digits, 40 steps
            # give FID ≈ 39 and 100 give ≈ 86 (strokes saturate), as the energy only shapes 20-step chains
            # on images past 16×16: half the channels, LARGE_STEPS updates
            return IGEBMConfig(channels=16 if large_images(data.shape) else 32, multipliers=(1, 2),
                               epochs=small_epochs(data, 16, 64, LARGE_STEPS),
                               batch_size=64, lr=3e-4, sgld_steps=20, buffer_size=2000, sample_source="replay_buffer",
                               sample_steps=20, ensemble=1)
        return IGEBMConfig(channels=8, multipliers=(1,), epochs=1, batch_size=32, sgld_steps=3, buffer_size=130,
                           sample_source="replay_buffer", sample_steps=3, ensemble=1)

    def deviations(self, scale: Scale) -> list[str]:
        small = "a small network: minutes on a CPU"
        reasons = {
            "channels": small, "multipliers": small, "epochs": "fewer epochs: minutes on a CPU",
            "batch_size": "a CPU batch", "sgld_steps": "shorter training chains: CPU time",
            "buffer_size": "a buffer scaled to the small data set",
            "sample_source": "evaluation chains continued from the training buffer: test_inception's rounds of "
                             "200 × 512 chains per 1,000 images cost about 50 times more",
            "sample_steps": "as many steps as the training chains",
            "ensemble": "the final weights only",
        }
        eval_fields = {f for f in IGEBMConfig.__dataclass_fields__ if f.startswith("eval_")} | {"ensemble_every"}
        ignore = {"sample_batch_size", "sn_refine_iterations"}
        # settings of a procedure that does not run
        ignore |= eval_fields if self.config.sample_source != "test_inception" else {"sample_steps"}
        lines = config_deviations(self.config, self.recipe(Scale.paper, self.data_info), reasons, ignore)
        lines.append("FID against the suite's reference split (for Table 1 the CIFAR-10 training set, as for every "
                     "row), not test_inception's train+test")
        lines.append("spectral-norm estimates refined to convergence after training (theirs: the running "
                     "one-iteration-per-step estimate)")
        return lines

    # --- capabilities ------------------------------------------------------------------------------
    def _labels(self, y: Tensor | None) -> Tensor | None:
        return y if self.config.conditional else None

    def energy(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _train_langevin(self, x: Tensor, y: Tensor | None, n_steps: int, generator: torch.Generator) -> Tensor:
        c = self.config
        return langevin(self.net, x, self._labels(y), n_steps, c.sgld_step_size, c.sgld_noise, c.grad_clip,
                        generator)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        was_training = self.training
        self.eval()
        try:
            if self.config.sample_source == "test_inception":
                return self._sample_test_inception(n, generator)
            return self._sample_continued(n, generator)
        finally:
            self.train(was_training)

    def _sample_continued(self, n: int, generator: torch.Generator) -> Tensor:
        """The replay_buffer and fresh sources: training-style chains, labels balanced over the classes; buffer
        chains are drawn with replacement."""
        c = self.config
        dev = next(self.parameters()).device
        filled = int(self.replay_filled)
        if c.sample_source == "replay_buffer" and filled > 0:
            starts = FIFOReplayBuffer(self.replay_buffer.cpu(), filled).sample(n, generator)
        else:  # fresh, or a buffer that training never filled
            starts = torch.rand((n, *self.data_info.shape), generator=generator)
        y = torch.randperm(n, generator=generator) % self.n_labels
        out = []
        for a, b in batches(n, c.sample_batch_size):
            x = self._train_langevin(starts[a:b].to(dev), y[a:b].to(dev), c.sample_steps, generator)
            out.append(to_uint8(x, what=f"{self.name} Langevin samples").cpu())
        return torch.cat(out)

    def _sample_test_inception(self, n: int, generator: torch.Generator) -> Tensor:
        c = self.config
        dev = next(self.parameters()).device
        nets = [self.net, *self.ensemble_nets]

        def run(k: int, x: Tensor, y: Tensor) -> Tensor:
            out = [langevin(nets[k % len(nets)], x[a:b].to(dev), self._labels(y[a:b].to(dev)), c.eval_steps,
                            c.eval_step_size, c.eval_noise, c.eval_grad_clip, generator).cpu()
                   for a, b in batches(len(x), c.sample_batch_size)]  # memory only: chains are independent
            return torch.cat(out) if out else x

        x = simulate_test_inception(run, n, self.data_info.shape, self.n_labels, c, generator)
        return self._quantize(x)

    def _quantize(self, x: Tensor) -> Tensor:
        """test_inception's `rescale_im`: floor(256·x), clipped to [0, 255]."""
        to_uint8(x, what=f"{self.name} Langevin samples")  # refuses NaN/Inf
        return torch.floor(256.0 * x).clamp(0, 255).to(torch.uint8)

    def sampler_protocol(self) -> dict[str, Any]:
        c = self.config
        step = {"algorithm": "langevin (IGEBM)", "space": "[0,1] pixels, clipped to the box after each step",
                "order": "x += noise·N(0,I); x -= step_size·clip(grad E(x)); clip to [0,1]",
                "conditional": c.conditional}
        train = {**step, "n_steps": c.sgld_steps, "step_size": c.sgld_step_size, "noise": c.sgld_noise,
                 "grad_clip": c.grad_clip, "buffer": "FIFO of the last negatives, uint8 floor(255·x), read as "
                 "q/256 + U[0,1/256)", "buffer_size": c.buffer_size, "reinit_freq": c.reinit_freq,
                 "init": "uniform(0,1)", "labels": "the positive batch's labels" if c.conditional else None}
        if c.sample_source == "test_inception":
            evaluation = {**step, "source": "test_inception", "n_steps": c.eval_steps, "step_size": c.eval_step_size,
                          "noise": c.eval_noise, "grad_clip": c.eval_grad_clip,
                          "buffer_size": c.eval_buffer_size, "batch_size": c.eval_batch_size,
                          "iterations": c.eval_iterations, "reinit": c.eval_reinit,
                          "label_reinit": c.eval_label_reinit if c.conditional else None,
                          "nomix_iterations": c.eval_nomix, "ensemble": c.ensemble,
                          "ensemble_every": c.ensemble_every, "chains": "fresh buffer per round of buffer_size",
                          "simulation": "chain by chain: a kept entry, updated at each iteration with probability "
                                        "1 − (1 − 1/P)^batch_size, P = ⌈buffer_size/batch_size⌉·batch_size",
                          "output": "floor(256·x) clipped to 255"}
        else:
            evaluation = {**step, "source": c.sample_source, "n_steps": c.sample_steps, "step_size": c.sgld_step_size,
                          "noise": c.sgld_noise, "grad_clip": c.grad_clip,
                          "chains": ("the final training buffer (uniform(0,1) if empty)" if c.sample_source ==
                                     "replay_buffer" else "fresh uniform(0,1)"),
                          "labels": "balanced over classes" if c.conditional else None,
                          "output": "round(255·x)"}
        return {"train": train, "eval": evaluation}

    # --- training ----------------------------------------------------------------------------------
    def loss(self, x_pos: Tensor, x_neg: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Their objective (cd, zero_kl): E(x⁺) − E(x⁻) + α(E(x⁺)² + E(x⁻)²), batch means."""
        e_pos, e_neg = self.net(x_pos, y), self.net(x_neg, y)
        loss = e_pos.mean() - e_neg.mean() + self.config.l2_weight * ((e_pos**2).mean() + (e_neg**2).mean())
        return loss, e_pos, e_neg

    def negatives_start(self, buffer: FIFOReplayBuffer, n: int, generator: torch.Generator) -> Tensor:
        """Chain starts: U(0, 1), replaced by buffer samples with probability 1 − reinit_freq once the buffer
        holds more than a batch (train.py)."""
        x0 = torch.rand((n, *self.data_info.shape), generator=generator)
        if len(buffer) > n:
            replay = buffer.sample(n, generator)
            keep = torch.rand(n, generator=generator) > self.config.reinit_freq
            x0[keep] = replay[keep]
        return x0

    def step_loss(self, x: Tensor, y: Tensor, buffer: FIFOReplayBuffer,
                  generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One iteration of train.py up to its loss, on uint8 images x with labels y: positives (x + u)/256,
        negatives by Langevin from the buffer, one power iteration per spectral norm. Returns (loss, E(x⁺),
        E(x⁻), the negatives); the caller updates the weights and adds the negatives to the buffer."""
        c = self.config
        dev = next(self.parameters()).device
        x_pos = ((x.float() + torch.rand(x.shape, generator=generator)) / 256.0).to(dev)
        x0 = self.negatives_start(buffer, x.shape[0], generator).to(dev)
        refine_spectral_norm(self.net, 1)  # their graph updates every u once per iteration
        self.net.eval()  # ... and no forward below changes it
        yl = self._labels(y.to(dev))
        xq = self._train_langevin(x0, yl, c.sgld_steps, generator)
        loss, e_pos, e_neg = self.loss(x_pos, xq, yl)
        return loss, e_pos.detach(), e_neg.detach(), xq

    def fit(self, train: Split, ctx: TrainContext) -> dict[str, Any]:
        c = self.config
        g = ctx.generator()
        self.to(ctx.device)
        buffer = FIFOReplayBuffer(torch.zeros(c.buffer_size, *self.data_info.shape, dtype=torch.uint8))
        opt = EBMAdam(self.net.parameters(), c.lr, (c.beta1, c.beta2), clip=c.adam_clip)
        # their loader drops the last partial batch
        run = TrainLoop(self, ctx, n=len(train), batch_size=min(c.batch_size, len(train)), epochs=c.epochs,
                        optimizer=opt)
        # the ensemble's checkpoints: after updates total − every·k, k = 1..ensemble−1 (at least the first)
        snapshots = {k: max(1, run.total - c.ensemble_every * k) for k in range(1, c.ensemble)}
        negatives = None
        for idx in run.batches(g):
            if negatives is not None:
                buffer.add(negatives)
            y = train.y[idx] if c.conditional else torch.zeros(len(idx), dtype=torch.long)
            loss, e_pos, e_neg, negatives = self.step_loss(train.x[idx], y, buffer, g)
            run.step(loss, e_pos=e_pos.mean().item(), e_neg=e_neg.mean().item())
            for k, at in snapshots.items():
                if at == run.steps:
                    self.ensemble_nets[k - 1].load_state_dict(copy.deepcopy(self.net.state_dict()))
        for net in (self.net, *self.ensemble_nets):
            refine_spectral_norm(net, c.sn_refine_iterations)
        stats = run.finish(ensemble_steps=[run.steps, *(snapshots[k] for k in sorted(snapshots))])
        self.replay_buffer.copy_(buffer.data.to(self.replay_buffer.device))
        self.replay_filled.fill_(len(buffer))
        return stats


#: the small recipe's step budget on images past 16×16 (bench.scales: calibrated on 2 CPU cores)
LARGE_STEPS = 250


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

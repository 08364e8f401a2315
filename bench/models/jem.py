"""`jem`: Joint Energy-based Model (Grathwohl et al., "Your Classifier is Secretly an Energy Based
Model and You Should Treat it Like One", ICLR 2020, arXiv:1912.03263).

The Wide-ResNet's logits f(x) define p(y|x) = softmax(f(x)) and an EBM over x with
E(x) = −logsumexp_y f(x)[y]. Training maximizes log p(y|x) + log p(x); the gradient of log p(x) is
estimated by contrastive divergence with SGLD samples drawn from a persistent replay buffer.
The `paper` recipe is JEM's published CIFAR-10 setting (wgrathwohl/JEM `train_wrn_ebm.py`).
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
from bench.models.wrn import WideResNetBackbone, lr_at
from bench.samplers.sgld import ReplayBuffer, SGLDConfig, sgld
from bench.scales import Scale


@dataclass(frozen=True)
class JEMConfig:
    # network (JEM: WRN-28-10, LeakyReLU(0.2), no normalization)
    depth: int = 28
    width: int = 10
    norm: Literal["none", "batch"] = "none"
    leak: float = 0.2
    dropout: float = 0.0
    # optimization
    epochs: int = 200
    batch_size: int = 64
    lr: float = 1e-4
    warmup_iters: int = 1000
    decay_epochs: tuple[int, ...] = (160, 180)
    decay_rate: float = 0.3
    data_noise: float = 0.03  # σ in the [-1, 1] input space
    eval_noise: float = 0.0  # JEM evaluates without input noise; kept as a documented option
    px_weight: float = 1.0
    pyx_weight: float = 1.0
    # SGLD during training
    sgld_steps: int = 20
    sgld_step_size: float = 1.0
    sgld_noise: float = 0.01
    buffer_size: int = 10_000
    reinit_freq: float = 0.05
    # sampling for evaluation: chains drawn from the replay buffer, refined by `sample_steps` more steps
    sample_source: Literal["replay_buffer", "fresh"] = "replay_buffer"
    sample_steps: int = 40
    sample_batch_size: int = 100
    divergence_threshold: float = 1e8  # |loss| above this means the EBM diverged (JEM's check)

    def __post_init__(self):
        if (self.depth - 4) % 6 != 0 or self.depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, ...), got {self.depth}")

    @property
    def sgld(self) -> SGLDConfig:
        return SGLDConfig(self.sgld_steps, self.sgld_step_size, self.sgld_noise, self.buffer_size, self.reinit_freq)


@register("jem")
class JEM(BenchModel):
    family = "hybrid"
    Config = JEMConfig
    code_modules = ("bench.models.wrn", "bench.samplers.sgld")

    def __init__(self, config: JEMConfig, data: DataInfo):
        super().__init__(config, data)
        c = config
        self.f = WideResNetBackbone(data.shape[0], c.depth, c.width, c.norm, c.leak, c.dropout)
        self.class_output = nn.Linear(self.f.feature_dim, data.n_classes)
        # the persistent SGLD chains, in [-1, 1]; saved with the checkpoint so sampling can resume them
        self.register_buffer("replay_buffer", torch.zeros(c.buffer_size, *data.shape))

    @classmethod
    def recipe(cls, scale: Scale, data: DataInfo) -> JEMConfig:
        if scale == Scale.paper:
            return JEMConfig()
        # grey digits train stably at lr 1e-3; on colour images (CIFAR) that diverges within 100 steps, so
        # they get JEM's published lr 1e-4
        lr = 1e-3 if data.shape[0] == 1 else 1e-4
        if scale == Scale.small:
            return JEMConfig(depth=10, width=2, epochs=25, batch_size=64, lr=lr, warmup_iters=100,
                             decay_epochs=(18, 22), sgld_steps=10, buffer_size=2000, sample_steps=20)
        return JEMConfig(depth=10, width=1, epochs=1, batch_size=32, lr=lr, warmup_iters=10, decay_epochs=(),
                         sgld_steps=2, buffer_size=128, sample_steps=2)

    # --- capabilities: inputs in [0, 1], the network sees [-1, 1] ---------------------------------
    def _net_logits(self, z: Tensor) -> Tensor:
        return self.class_output(self.f(z))

    def features(self, x: Tensor) -> Tensor:
        """The pooled backbone, which the linear classifier reads (Features capability)."""
        z = 2.0 * x - 1.0
        if self.config.eval_noise > 0:
            z = z + self.config.eval_noise * torch.randn_like(z)
        return self.f(z)

    def logits(self, x: Tensor) -> Tensor:
        return self.class_output(self.features(x))

    def energy(self, x: Tensor) -> Tensor:
        return -torch.logsumexp(self.logits(x), dim=1)

    def _energy_net(self, z: Tensor) -> Tensor:
        return -torch.logsumexp(self._net_logits(z), dim=1)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        c = self.config
        dev = next(self.parameters()).device
        was_training = self.training
        self.eval()
        out = []
        if c.sample_source == "replay_buffer":
            if n <= c.buffer_size:
                idx = torch.randperm(c.buffer_size, generator=generator)[:n]
            else:
                idx = torch.randint(0, c.buffer_size, (n,), generator=generator)
            starts = self.replay_buffer[idx.to(self.replay_buffer.device)]
        else:
            starts = torch.rand((n, *self.data_info.shape), generator=generator) * 2 - 1
        for a, b in batches(n, c.sample_batch_size):
            z = sgld(self._energy_net, starts[a:b].to(dev), c.sample_steps, c.sgld_step_size, c.sgld_noise, generator)
            out.append(to_uint8(z, -1.0, 1.0, what=f"{self.name} SGLD samples").cpu())
        self.train(was_training)
        return torch.cat(out)

    def nfe_per_sample(self) -> int:
        """Network evaluations (forward + input-gradient) per evaluation sample."""
        return self.config.sample_steps

    def sampler_protocol(self) -> dict[str, Any]:
        c = self.config
        return {
            "train": c.sgld.describe(),
            "eval": {
                "algorithm": "sgld",
                "source": c.sample_source,
                "chains": ("per sample batch: distinct buffer entries (batches draw independently)"
                           if c.sample_source == "replay_buffer" else "fresh uniform(-1,1)"),
                "n_steps": c.sample_steps,
                "step_size": c.sgld_step_size,
                "noise": c.sgld_noise,
                "buffer_size": c.buffer_size,
            },
        }

    # --- training -------------------------------------------------------------------------------
    def fit(self, train: Split, ctx: TrainContext) -> dict[str, Any]:
        c = self.config
        g = ctx.generator()
        dev = ctx.device
        self.to(dev).train()
        buf = ReplayBuffer.fresh(c.buffer_size, self.data_info.shape, g)
        opt = torch.optim.Adam(self.parameters(), lr=c.lr)
        n = len(train)
        steps_per_epoch = math.ceil(n / c.batch_size)
        step = 0
        with ctx.progress(f"train {self.name}", c.epochs * steps_per_epoch) as update:
            for epoch in range(c.epochs):
                perm = torch.randperm(n, generator=g)
                for a, b in batches(n, c.batch_size):
                    idx = perm[a:b]
                    z = 2.0 * as_float01(train.x[idx]) - 1.0
                    z = (z + c.data_noise * torch.randn(z.shape, generator=g)).to(dev)
                    y = train.y[idx].to(dev)
                    for group in opt.param_groups:
                        group["lr"] = lr_at(step, epoch, c)
                    logits = self._net_logits(z)
                    loss = c.pyx_weight * F.cross_entropy(logits, y)
                    if c.px_weight > 0:
                        # JEM evaluates the network in eval mode while sampling (matters only with batch norm)
                        self.eval()
                        z0, bidx = buf.draw(b - a, c.reinit_freq, g)
                        zq = sgld(self._energy_net, z0.to(dev), c.sgld_steps, c.sgld_step_size, c.sgld_noise, g)
                        buf.write(bidx, zq)
                        self.train()
                        # log p(x) gradient by contrastive divergence: E(x_data) − E(x_model)
                        lse_data = torch.logsumexp(logits, dim=1)
                        lse_model = torch.logsumexp(self._net_logits(zq), dim=1)
                        loss = loss + c.px_weight * (lse_model.mean() - lse_data.mean())
                    if not torch.isfinite(loss) or loss.abs().item() > c.divergence_threshold:
                        raise ModelFailure(
                            f"{self.name} training diverged at step {step} (loss={loss.item():.3g}); "
                            "lower lr or sgld_step_size, or raise sgld_steps")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    update(1, loss=loss.item())
        self.eval()
        self.replay_buffer.copy_(buf.data.to(self.replay_buffer.device))
        return {"steps": step, "epochs": c.epochs}

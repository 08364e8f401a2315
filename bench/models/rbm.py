"""`rbm`: a Bernoulli–Bernoulli restricted Boltzmann machine on binarized images, trained with persistent
contrastive divergence (Smolensky 1986; Hinton 2002; PCD: Tieleman 2008, "Training Restricted Boltzmann
Machines using Approximations to the Likelihood Gradient", ICML), its log partition function estimated by
annealed importance sampling (Salakhutdinov & Murray 2008, "On the Quantitative Analysis of Deep Belief
Networks", ICML).

Binarization: a pixel is 1 when its uint8 level is at least ``threshold`` (128), else 0; the threshold
is in the config and so in every record. The RBM is a distribution P(b) = e^{−F(b)}/Z over binary images.

The density on [0, 1]^D (for bits/dim under docs/architecture.md's convention). Levels k ∈ {0..255} map to bits
b(k) = [k ≥ threshold]; a level's mass given its bit is q_d(k | b) and each level's bin of width 1/256 is
filled uniformly, so

    p(y) = P(b(x)) · Π_d q_d(x_d | b(x_d)) · 256^D,   x = floor(256·y).

``within_bit = "uniform"`` takes q_d(k | b) = 1/|{levels with bit b}| (p(y) is then uniform inside the
cell of levels that binarize alike: bits/dim ≥ 7 on 8-bit data, since the RBM says nothing about grey
levels). ``within_bit = "empirical"`` (the default) takes q_d from the train split's level counts per
pixel and bit, Dirichlet-smoothed by ``within_bit_alpha``: a closed-form, exactly normalized refinement
fitted alongside the RBM. Either way p(y) is a normalized density and the only approximation is AIS's
log Z, hence ``log_prob_kind = "estimate"``. Samples are drawn from the same model: block Gibbs gives the
bits, then every pixel's level is drawn from q_d(· | bit) (binary 0/255 images score FID ≈ 139 on digits
even when the bits are the real test digits', which is why the default is not "uniform"). The energy is
consistent with that density: energy(x) = F(b(x)) − Σ_d log q_d(x_d | b(x_d)), i.e. the free energy plus
a term that is constant under ``within_bit = "uniform"``.

The `paper` recipe is Salakhutdinov & Murray's MNIST RBM size (500 hidden units, batch 100) trained with
PCD as in Tieleman 2008 (one Gibbs sweep per update, learning rate decayed linearly to zero), and their
AIS settings (14,500 β's, 100 runs, base-rate initial model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from bench.data.base import Split
from bench.errors import ModelFailure
from bench.models.base import (
    BenchModel,
    DataInfo,
    TrainContext,
    batches,
    cpu_threads,
    register,
    to_uint8,
)
from bench.models.training import TrainLoop
from bench.samplers.ais import AISConfig, AISResult, ais_log_z, base_rate_bias
from bench.samplers.gibbs import GibbsConfig, PersistentChains, free_energy, gibbs_chain, init_chains
from bench.scales import Scale, small_epochs


@dataclass(frozen=True)
class RBMConfig:
    n_hidden: int = 500
    threshold: int = 128  # uint8 levels >= threshold are 1
    within_bit: Literal["empirical", "uniform"] = "empirical"
    within_bit_alpha: float = 0.1  # Dirichlet pseudo-count per level for the empirical q_d(k | b)
    # PCD training
    epochs: int = 100
    batch_size: int = 100
    lr: float = 0.05  # SGD, decayed linearly to zero over training
    momentum: float = 0.5
    weight_decay: float = 1e-4
    pcd_k: int = 1  # Gibbs sweeps per update of the persistent chains
    n_persistent: int = 100  # fantasy particles
    init_std: float = 0.01
    # sampling: fresh chains
    gibbs_steps: int = 1000
    gibbs_init: Literal["base_rate", "bernoulli_half"] = "base_rate"
    sample_batch_size: int = 1000
    # AIS for log Z
    ais_betas: int = 14_500
    ais_chains: int = 100
    ais_schedule: Literal["sm2008", "linear"] = "sm2008"

    def __post_init__(self):
        if not 1 <= self.threshold <= 255:
            raise ValueError(f"threshold must be a uint8 level in 1..255, got {self.threshold}")

    @property
    def gibbs(self) -> GibbsConfig:
        return GibbsConfig(self.gibbs_steps, self.gibbs_init)

    @property
    def ais(self) -> AISConfig:
        return AISConfig(self.ais_betas, self.ais_chains, self.ais_schedule)


def _single_thread():
    """The RBM's products are tiny (≈100 × 64 × 200): intra-op threads cannot speed them up, and on a shared
    CPU their synchronization made PCD and AIS 13× slower (measured on 2 busy cores)."""
    return cpu_threads(torch.device("cpu"), 1)


#: the small recipe's step budget on images past 16×16 (bench.scales: calibrated on 2 CPU cores)
LARGE_STEPS = 3000


@register("rbm")
class RBM(BenchModel):
    family = "ebm"
    Config = RBMConfig
    log_prob_kind = "estimate"
    density_is_differentiable = False  # p(y) is flat within each 8-bit bin

    def __init__(self, config: RBMConfig, data: DataInfo):
        super().__init__(config, data)
        d, h = math.prod(data.shape), config.n_hidden
        self.w = nn.Parameter(config.init_std * torch.randn(d, h))
        self.a = nn.Parameter(torch.zeros(d))  # visible biases
        self.b = nn.Parameter(torch.zeros(h))  # hidden biases
        self.register_buffer("base_bias", torch.zeros(d))  # the base-rate model of AIS and of the Gibbs init
        # log q_d(k | b(k)) for every pixel d and level k
        self.register_buffer("level_log_probs", self._uniform_level_log_probs(d))
        self.register_buffer("log_z", torch.zeros((), dtype=torch.float64))
        self.register_buffer("log_z_stderr", torch.zeros((), dtype=torch.float64))

    @classmethod
    def recipe(cls, scale: Scale, data: DataInfo) -> RBMConfig:
        if scale == Scale.paper:
            return RBMConfig()
        if scale == Scale.small:
            return RBMConfig(n_hidden=200, epochs=small_epochs(data, 100, 50, LARGE_STEPS, drop_last=False),
                             batch_size=50, lr=0.02, momentum=0.9, pcd_k=1, n_persistent=100, gibbs_steps=1000,
                             ais_betas=14_500, ais_chains=100)
        return RBMConfig(n_hidden=16, epochs=2, batch_size=50, gibbs_steps=20, ais_betas=200, ais_chains=16,
                         sample_batch_size=100)

    # --- binarization and the within-bit density ------------------------------------------------------
    def _levels_with_bit(self) -> Tensor:
        return torch.arange(256) >= self.config.threshold

    def _uniform_level_log_probs(self, d: int) -> Tensor:
        ones = self._levels_with_bit()
        n1 = int(ones.sum())
        per_level = torch.where(ones, torch.tensor(-math.log(n1), dtype=torch.float64),
                                torch.tensor(-math.log(256 - n1), dtype=torch.float64))
        return per_level.expand(d, 256).clone()

    def _fit_level_log_probs(self, x: Tensor) -> Tensor:
        """x: N×D uint8 levels -> D×256 log q_d(k | b(k)), normalized within each bit's levels."""
        d = x.shape[1]
        counts = torch.zeros(d, 256, dtype=torch.float64)
        counts.scatter_add_(1, x.long().T, torch.ones(d, x.shape[0], dtype=torch.float64))
        counts += self.config.within_bit_alpha
        ones = self._levels_with_bit()
        totals = torch.where(ones, counts[:, ones].sum(1, keepdim=True), counts[:, ~ones].sum(1, keepdim=True))
        return (counts / totals).log()

    def binarize_levels(self, k: Tensor) -> Tensor:
        return (k >= self.config.threshold).float()

    def _params(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
        return self.w.to(dtype), self.a.to(dtype), self.b.to(dtype)

    def _log_q(self, k: Tensor) -> Tensor:
        """Σ_d log q_d(k_d | b(k_d)) for integer levels k (N×D), float64."""
        return self.level_log_probs.to(k.device).gather(1, k.T).T.double().sum(1)

    # --- capabilities -------------------------------------------------------------------------------
    def free_energy(self, v: Tensor) -> Tensor:
        w, a, b = self._params(v.dtype)
        return free_energy(v, w, a, b)

    def energy(self, x: Tensor) -> Tensor:
        """x in [0, 1] (uint8/255): free energy of its bits minus the within-bit log-mass of its levels."""
        k = torch.round(x.reshape(x.shape[0], -1) * 255.0).clamp(0, 255).long()
        v = self.binarize_levels(k).to(self.w.dtype)
        return self.free_energy(v) - self._log_q(k).to(v.dtype)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(y) of dequantized y in [0, 1)^D, in nats (see the module docstring), with AIS's log Z."""
        k = (x.reshape(x.shape[0], -1) * 256.0).floor().clamp(0, 255).long()
        v = self.binarize_levels(k).double()
        log_p_bits = -self.free_energy(v) - self.log_z
        return log_p_bits + self._log_q(k) + k.shape[1] * math.log(256.0)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        with _single_thread():
            return self._sample(n, generator)

    def _sample(self, n: int, generator: torch.Generator) -> Tensor:
        c = self.config
        w, a, b = (t.detach().cpu() for t in self._params())
        cum = self.level_log_probs.detach().cpu().double().exp()
        ones = self._levels_with_bit()
        cum0, cum1 = cum[:, ~ones].cumsum(1), cum[:, ones].cumsum(1)  # D×L0, D×L1 per-pixel CDFs
        out = []
        for lo, hi in batches(n, c.sample_batch_size):
            v0 = init_chains(hi - lo, self.base_bias.detach().cpu(), c.gibbs_init, generator)
            v = gibbs_chain(v0, w, a, b, c.gibbs_steps, generator)
            u = torch.rand((w.shape[0], hi - lo), generator=generator, dtype=torch.float64)
            k0 = torch.searchsorted(cum0, u * cum0[:, -1:]).clamp(max=cum0.shape[1] - 1)
            k1 = torch.searchsorted(cum1, u * cum1[:, -1:]).clamp(max=cum1.shape[1] - 1) + c.threshold
            k = torch.where(v.T.bool(), k1, k0).T.float()
            out.append(to_uint8(k / 255.0, what=f"{self.name} Gibbs samples").reshape(hi - lo, *self.data_info.shape))
        return torch.cat(out)

    def sampler_protocol(self) -> dict[str, Any]:
        c = self.config
        return {
            "eval": {**c.gibbs.describe(), "batch_size": c.sample_batch_size,
                     "levels": f"each pixel's level drawn from q_d(level | bit), within_bit={c.within_bit}"},
            "binarization": {"threshold": c.threshold, "rule": "bit = uint8 level >= threshold"},
            "train": {"algorithm": "pcd", "k": c.pcd_k, "n_persistent": c.n_persistent,
                      "chains": "persistent, never reinitialized", "init": "base_rate"},
            "log_z": c.ais.describe(),
        }

    def log_prob_protocol(self) -> dict[str, Any]:
        """The settings behind log_prob for its record. Only settings: the estimate itself (log Ẑ and its
        spread) is a trained quantity, reported in the record's ``train.ais``, and must not change the
        protocol fingerprint that decides which records are comparable."""
        c = self.config
        return {"estimator": "ais", "ais": c.ais.describe(), "threshold": c.threshold, "within_bit": c.within_bit,
                "within_bit_alpha": c.within_bit_alpha if c.within_bit == "empirical" else None}

    # --- training ------------------------------------------------------------------------------------
    def fit(self, train: Split, ctx: TrainContext) -> dict[str, Any]:
        with _single_thread():
            return self._fit(train, ctx)

    def _fit(self, train: Split, ctx: TrainContext) -> dict[str, Any]:
        c = self.config
        g = ctx.generator()
        dev = ctx.device
        levels = train.x.reshape(len(train), -1)
        data = self.binarize_levels(levels.long())
        self.to(dev).train()
        if c.within_bit == "empirical":
            self.level_log_probs.copy_(self._fit_level_log_probs(levels))
        base = base_rate_bias(data, c.ais.base_smoothing)
        self.base_bias.copy_(base.float())
        with torch.no_grad():  # Hinton's guide: visible biases at the data's log-odds
            self.a.copy_(base.float())
        chains = PersistentChains(init_chains(c.n_persistent, base.float(), "base_rate", g).to(dev))
        # weight decay on W only: decaying the biases would pull the marginals away from the data's
        opt = torch.optim.SGD([{"params": [self.w], "weight_decay": c.weight_decay},
                               {"params": [self.a, self.b], "weight_decay": 0.0}], lr=c.lr, momentum=c.momentum)
        # the lr decays linearly to 0 over the recipe's whole run, whether or not max_steps stops it earlier
        run = TrainLoop(self, ctx, n=len(train), batch_size=c.batch_size, epochs=c.epochs, drop_last=False,
                        optimizer=opt, lr=lambda step, epoch: c.lr * (1.0 - step / run.planned))
        for idx in run.batches(g):
            v_data = data[idx].to(dev)
            w, a, b = self._params()
            v_model = chains.advance(c.pcd_k, w, a, b, g)
            # the gradient of this surrogate is the PCD estimate of −∇ log-likelihood
            run.step(self.free_energy(v_data).mean() - self.free_energy(v_model).mean())
        stats = run.finish()
        ais = self.estimate_log_z(ctx.generator(offset=1))
        return {**stats, "ais": ais.describe()}

    def estimate_log_z(self, generator: torch.Generator) -> AISResult:
        """Run AIS with the config's settings and store log Ẑ and its standard error in the model."""
        result = ais_log_z(self.w, self.a, self.b, self.base_bias, self.config.ais, generator)
        if not math.isfinite(result.log_z):
            raise ModelFailure(f"{self.name}: AIS gave a non-finite log Z ({result.log_z}); raise ais_betas")
        self.log_z.fill_(result.log_z)
        self.log_z_stderr.fill_(result.stderr)
        return result

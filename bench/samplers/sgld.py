"""Stochastic gradient Langevin dynamics with a persistent replay buffer, as JEM uses it
(Grathwohl et al. 2020, arXiv:1912.03263, Alg. 1; wgrathwohl/JEM `sample_q`).

One step: x ← x − α·∇ₓE(x) + σ·ε, ε ~ N(0, I). JEM decouples the step size α from the noise σ
(α = 1, σ = 0.01), which is not a proper Langevin discretization but is what produced its numbers; we
keep the two separate so every published setting can be reproduced and is recorded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor

from bench.samplers import noise_like


@dataclass(frozen=True)
class SGLDConfig:
    n_steps: int = 20
    step_size: float = 1.0
    noise: float = 0.01
    buffer_size: int = 10_000
    reinit_freq: float = 0.05
    #: where chains start and restart: U(-1, 1) in the model's [-1, 1] input space (JEM), or `ClassGaussians`
    init: Literal["uniform", "class_gaussian"] = "uniform"

    def describe(self) -> dict:
        return {"algorithm": "sgld", **asdict(self), "init": INIT_NAMES[self.init]}


INIT_NAMES = {"uniform": "uniform(-1,1)",
              "class_gaussian": "class_gaussian: N(class mean, class covariance + 1e-4 I) of the training images, "
                                "the class by its share of them, clamped to [-1,1] (JEM++'s informative "
                                "initialization)"}


def sgld(energy: Callable[[Tensor], Tensor], x: Tensor, n_steps: int, step_size: float, noise: float,
         generator: torch.Generator) -> Tensor:
    """Run ``n_steps`` of SGLD from ``x``; returns a detached tensor. Noise comes from ``generator``."""
    x = x.detach()
    for _ in range(n_steps):
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(energy(x).sum(), x)
        x = (x.detach() - step_size * grad + noise * noise_like(x, generator)).detach()
    return x


def uniform_init(n: int, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.rand((n, *shape), generator=generator, device=generator.device) * 2.0 - 1.0


Init = Callable[[int, tuple[int, ...], torch.Generator], Tensor]


class ClassGaussians:
    """JEM++'s informative initialization (Yang & Ji, "JEM++: Improved Techniques for Training JEM", ICCV 2021,
    arXiv:2109.09032): a chain starts from a Gaussian fitted to one class of the training images,
    N(μ_k, Σ_k + ridge·I), clamped to [-1, 1], the class drawn with its share of the training images. Far
    closer to the data than U(-1, 1), so a few SGLD steps give the contrastive term informative negatives."""

    def __init__(self, means: Tensor, chol: Tensor, weights: Tensor):
        self.means, self.chol, self.weights = means, chol, weights  # (K, D), (K, D, D) lower Cholesky, (K,)

    @classmethod
    def fit(cls, z: Tensor, y: Tensor, n_classes: int, ridge: float = 1e-4, scale: float = 1.0,
            shift: float = 0.0) -> ClassGaussians:
        """The Gaussians of ``scale·z + shift`` (the model's [-1, 1] inputs), ``y``: the labels. ``z`` may be the
        stored images (uint8): each class is converted on its own and the moments mapped affinely, which is
        exact and never copies the whole split to float64. A class with under two images gets the pooled
        moments."""
        flat = z.reshape(len(z), -1)
        eye = ridge * torch.eye(flat.shape[1], dtype=torch.float64)
        means, chols = [], []
        for k in range(n_classes):
            xk = (flat[y == k] if (y == k).sum() > 1 else flat).double()
            means.append(scale * xk.mean(0) + shift)
            chols.append(torch.linalg.cholesky(scale**2 * torch.cov(xk.T) + eye))
            del xk
        weights = torch.bincount(y.long().cpu(), minlength=n_classes)[:n_classes].double()
        return cls(torch.stack(means).float(), torch.stack(chols).float(), weights / weights.sum())

    @classmethod
    def of_images(cls, images: Tensor, y: Tensor, n_classes: int) -> ClassGaussians:
        """Fitted to stored uint8 images (0..255) as the networks see them, in [-1, 1]."""
        return cls.fit(images, y, n_classes, scale=2.0 / 255.0, shift=-1.0)

    def __call__(self, n: int, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        """``n`` starts, each from a class drawn with its share of the training images."""
        return self.of_classes(torch.multinomial(self.weights, n, True, generator=generator), shape, generator)

    def of_classes(self, y: Tensor, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        """One start from each label's Gaussian (class-conditional chains)."""
        y = y.cpu()
        eps = torch.randn((len(y), self.means.shape[1]), generator=generator)
        out = torch.empty_like(eps)
        for c in range(len(self.means)):
            sel = y == c
            if sel.any():
                out[sel] = self.means[c] + eps[sel] @ self.chol[c].T
        return out.clamp_(-1.0, 1.0).reshape(len(y), *shape).to(generator.device)


class ReplayBuffer:
    """A persistent pool of chains; each draw re-initializes a fraction ``reinit_freq`` from ``init``
    (U(-1, 1) unless given)."""

    def __init__(self, data: Tensor, init: Init = uniform_init):
        self.data = data
        self.init = init

    @classmethod
    def fresh(cls, size: int, shape: tuple[int, ...], generator: torch.Generator) -> ReplayBuffer:
        return cls(uniform_init(size, shape, generator))

    def draw(self, batch_size: int, reinit_freq: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, self.data.shape[0], (batch_size,), generator=generator, device=generator.device)
        x = self.data[idx.to(self.data.device)]
        fresh = self.init(batch_size, tuple(x.shape[1:]), generator).to(x.device)
        choose = (torch.rand(batch_size, generator=generator, device=generator.device) < reinit_freq).to(x.device)
        x = torch.where(choose.view(-1, *[1] * (x.dim() - 1)), fresh, x)
        return x, idx

    def write(self, idx: Tensor, x: Tensor) -> None:
        """Chains ``idx`` ← ``x``. An index drawn twice in one batch keeps its last chain: a plain
        ``data[idx] = x`` leaves the winner to whichever thread writes last, which made training runs with
        the same seed differ on a 2-core CPU (jem_factored's accuracy moved from 38.6 % to 65.0 %)."""
        idx = idx.to(self.data.device)
        uniq, inverse = torch.unique(idx, return_inverse=True)
        last = torch.full((len(uniq),), -1, dtype=torch.long, device=idx.device).scatter_reduce(
            0, inverse, torch.arange(len(idx), device=idx.device), reduce="amax")
        self.data[uniq] = x.detach().to(self.data.device, self.data.dtype)[last]


@dataclass(frozen=True)
class FreshRounds:
    """JEM's evaluation sampler (wgrathwohl/JEM ``eval_wrn_ebm.py --eval uncond_samples``): a fresh buffer of
    ``buffer_size`` chains drawn from U(−1, 1), then ``rounds`` rounds; each round picks ``round_batch`` entries
    at random (with replacement), restarts each from U(−1, 1) with probability ``reinit_freq``, runs
    ``n_steps`` SGLD steps and writes it back. The samples are the buffer's final entries.

    Each entry's history depends on the others only through the (rare) double draw of one entry within a
    round, so the procedure is simulated chain by chain (`fresh_rounds`): a sample is one entry, updated
    K ~ Binomial(rounds·round_batch, 1/buffer_size) times, each update a possible restart and ``n_steps``
    steps. That is the reference's per-entry distribution, at the reference's cost per sample, in any batch
    (so evaluation batches shard), for any number of samples."""

    buffer_size: int = 10_000
    rounds: int = 1_000
    round_batch: int = 64
    n_steps: int = 40
    step_size: float = 1.0
    noise: float = 0.01
    reinit_freq: float = 0.05

    def __post_init__(self):
        if self.buffer_size < 1 or self.rounds < 0 or self.round_batch < 1 or self.n_steps < 0:
            raise ValueError(f"fresh-rounds sampler needs buffer_size >= 1, round_batch >= 1, rounds >= 0 and "
                             f"n_steps >= 0, got {self}")

    @property
    def mean_updates(self) -> float:
        """Expected updates per chain: rounds · round_batch / buffer_size (6.4 at JEM's settings)."""
        return self.rounds * self.round_batch / self.buffer_size

    def describe(self) -> dict:
        return {"algorithm": "sgld", "procedure": "fresh_rounds", **asdict(self), "init": "uniform(-1,1)",
                "updates_per_chain": f"Binomial({self.rounds * self.round_batch}, 1/{self.buffer_size})",
                "simulation": "chain by chain (a double draw of one entry within a round is not merged)"}


def fresh_rounds(energy: Callable[[Tensor], Tensor], n: int, shape: tuple[int, ...], cfg: FreshRounds,
                 generator: torch.Generator, device: torch.device, batch_size: int) -> Tensor:
    """``n`` samples of `FreshRounds`, in [-1, 1]-space as the chains end (not clamped); CPU tensor."""
    trials = torch.full((n,), float(cfg.rounds * cfg.round_batch))
    updates = torch.binomial(trials, torch.full((n,), 1.0 / cfg.buffer_size), generator=generator).long()
    x = uniform_init(n, shape, generator)
    for k in range(1, int(updates.max()) + 1 if n else 1):
        idx = torch.nonzero(updates >= k).squeeze(1)  # the chains drawn at least k times
        restart = torch.rand(len(idx), generator=generator) < cfg.reinit_freq
        fresh = uniform_init(len(idx), shape, generator)
        x[idx] = torch.where(restart.view(-1, *[1] * len(shape)), fresh, x[idx])
        for a in range(0, len(idx), batch_size):
            j = idx[a:a + batch_size]
            x[j] = sgld(energy, x[j].to(device), cfg.n_steps, cfg.step_size, cfg.noise, generator).cpu()
    return x

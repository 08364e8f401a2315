"""Block Gibbs sampling and persistent chains for a Bernoulli–Bernoulli RBM (Hinton 2002; persistent
contrastive divergence, Tieleman 2008, "Training Restricted Boltzmann Machines using Approximations to
the Likelihood Gradient", ICML).

The RBM has visible v ∈ {0,1}^D, hidden h ∈ {0,1}^H and energy E(v, h) = −aᵀv − bᵀh − vᵀWh (W is D×H).
Both conditionals factorize, so a sweep draws all of h given v, then all of v given h:
p(h_j = 1 | v) = sigmoid(b_j + vᵀW_{:,j}),  p(v_i = 1 | h) = sigmoid(a_i + W_{i,:}h).
Summing h out gives the free energy F(v) = −aᵀv − Σ_j softplus(b_j + vᵀW_{:,j}), with p(v) = e^{−F(v)}/Z.
All randomness comes from the caller's generator, drawn on its device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class GibbsConfig:
    n_steps: int = 1000
    init: Literal["bernoulli_half", "base_rate"] = "base_rate"  # fresh chains: Bernoulli(0.5) or the data marginals

    def describe(self) -> dict[str, Any]:
        return {"algorithm": "block_gibbs", "n_steps": self.n_steps, "init": self.init, "chains": "fresh",
                "output": "the binary visible state after the last sweep, not the mean-field probabilities"}


def free_energy(v: Tensor, w: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """F(v) = −aᵀv − Σ_j softplus(b_j + vᵀW_j); shape [N]."""
    return -(v @ a) - F.softplus(v @ w + b).sum(-1)


def bernoulli(p: Tensor, generator: torch.Generator) -> Tensor:
    u = torch.rand(p.shape, generator=generator, device=generator.device, dtype=p.dtype).to(p.device)
    return (u < p).to(p.dtype)


def hidden_probs(v: Tensor, w: Tensor, b: Tensor) -> Tensor:
    return torch.sigmoid(v @ w + b)


def visible_probs(h: Tensor, w: Tensor, a: Tensor) -> Tensor:
    return torch.sigmoid(h @ w.T + a)


def gibbs_sweep(v: Tensor, w: Tensor, a: Tensor, b: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One block-Gibbs sweep v → h → v'; returns (v', p(v'=1 | h)) so callers may use either."""
    h = bernoulli(hidden_probs(v, w, b), generator)
    pv = visible_probs(h, w, a)
    return bernoulli(pv, generator), pv


def gibbs_chain(v: Tensor, w: Tensor, a: Tensor, b: Tensor, n_steps: int, generator: torch.Generator) -> Tensor:
    """``n_steps`` sweeps from ``v``; returns the binary visible state."""
    with torch.no_grad():
        for _ in range(n_steps):
            v, _ = gibbs_sweep(v, w, a, b, generator)
    return v


def init_chains(n: int, a_init: Tensor, init: str, generator: torch.Generator) -> Tensor:
    """Fresh visible states: Bernoulli(0.5) or Bernoulli(sigmoid(a_init)) (the base-rate model's marginals)."""
    if init == "bernoulli_half":
        p = torch.full((n, a_init.shape[0]), 0.5, dtype=a_init.dtype, device=a_init.device)
    elif init == "base_rate":
        p = torch.sigmoid(a_init).expand(n, -1)
    else:
        raise ValueError(f"unknown Gibbs init '{init}'; valid choices: bernoulli_half, base_rate")
    return bernoulli(p, generator)


class PersistentChains:
    """The fantasy particles of PCD: a pool of visible states advanced k sweeps per parameter update and
    never reset, so they keep mixing while the model changes slowly (Tieleman 2008)."""

    def __init__(self, v: Tensor):
        self.v = v

    def advance(self, k: int, w: Tensor, a: Tensor, b: Tensor, generator: torch.Generator) -> Tensor:
        self.v = gibbs_chain(self.v, w.detach(), a.detach(), b.detach(), k, generator)
        return self.v

"""Annealed Langevin dynamics (Song & Ermon 2019, "Generative Modeling by Estimating Gradients of the
Data Distribution", NeurIPS, arXiv:1907.05600, Algorithm 1).

A noise-conditional score s(x, i) ≈ ∇ₓ log q_{σ_i}(x) is followed down a geometric schedule
σ_1 > … > σ_L. At level i the step size is α_i = ε·σ_i²/σ_L² and each of the T steps is one of two rules:

- ``released`` (the default; ermongroup/ncsn `anneal_Langevin_dynamics`, which produced the paper's
  numbers):  x ← x + α_i·s(x, i) + √(2α_i)·z,  z ~ N(0, I);
- ``algorithm1`` (Algorithm 1 as printed in the paper):  x ← x + (α_i/2)·s(x, i) + √α_i·z.

With the same ε the released rule takes twice Algorithm 1's step (it is Algorithm 1 with 2ε); the rule is
recorded beside ε so the two are never confused. The optional final denoising step
x ← x + σ_L²·s(x, L) (Tweedie's formula; Jolicoeur-Martineau et al. 2020, Song & Ermon 2020) is off in
the 2019 paper and is recorded when used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from bench.samplers import noise_like

#: score(x, level_index) -> ∇ₓ log q_σ(x) at the σ of that level; level_index is int64 of shape [N]
ScoreFn = Callable[[Tensor, Tensor], Tensor]
Rule = Literal["released", "algorithm1"]
RULES: dict[str, str] = {
    "released": "x + alpha_i*score + sqrt(2*alpha_i)*z (ermongroup/ncsn anneal_Langevin_dynamics)",
    "algorithm1": "x + (alpha_i/2)*score + sqrt(alpha_i)*z (Song & Ermon 2019, Alg. 1 as printed)",
}


def geometric_sigmas(sigma_begin: float, sigma_end: float, n_levels: int) -> Tensor:
    """σ_1 = sigma_begin > … > σ_L = sigma_end with a constant ratio, as NCSN uses (float64)."""
    if not (sigma_begin > sigma_end > 0) or n_levels < 2:
        raise ValueError(f"need sigma_begin > sigma_end > 0 and n_levels >= 2, got {sigma_begin}, {sigma_end}, "
                         f"{n_levels}")
    return torch.logspace(torch.log10(torch.tensor(sigma_begin)), torch.log10(torch.tensor(sigma_end)), n_levels,
                          dtype=torch.float64)


INITS = ("uniform", "data_mean")


@dataclass(frozen=True)
class AnnealedLangevinConfig:
    sigma_begin: float = 1.0
    sigma_end: float = 0.01
    n_levels: int = 10
    steps_per_level: int = 100
    eps: float = 2e-5  # ε of Algorithm 1: α_i = ε·σ_i²/σ_L²
    denoise: bool = False  # one final Tweedie step x + σ_L²·s(x, L)
    #: where chains start: U(0, 1) in the model's [0, 1] space, as NCSN does; or "data_mean": the training
    #: images' mean plus σ₁·N(0, I), a Gaussian approximation of the first level's target q_σ₁
    init: Literal["uniform", "data_mean"] = "uniform"
    rule: Rule = "released"

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"chain init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.rule not in RULES:
            raise ValueError(f"Langevin rule must be one of {', '.join(RULES)}, got {self.rule!r}")

    @property
    def sigmas(self) -> Tensor:
        return geometric_sigmas(self.sigma_begin, self.sigma_end, self.n_levels)

    def describe(self) -> dict[str, Any]:
        sig = self.sigmas
        return {
            "algorithm": "annealed_langevin",
            "rule": self.rule,
            "update": RULES[self.rule],
            "sigmas": [float(s) for s in sig],
            "schedule": "geometric",
            "n_levels": self.n_levels,
            "steps_per_level": self.steps_per_level,
            "eps": self.eps,
            "step_sizes": [float(self.eps * (s / sig[-1]) ** 2) for s in sig],
            "denoise": self.denoise,
            "init": "uniform(0,1)" if self.init == "uniform" else "mean(train images) + sigma_begin * N(0, I)",
            "chains": "fresh",
        }


def annealed_langevin(score: ScoreFn, x: Tensor, sigmas: Tensor, steps_per_level: int, eps: float,
                      generator: torch.Generator, denoise: bool = False, rule: Rule = "released") -> Tensor:
    """Run annealed Langevin dynamics from ``x`` with the given step ``rule``; noise comes from ``generator``
    (drawn on its device, moved to x's)."""
    if rule not in RULES:
        raise ValueError(f"Langevin rule must be one of {', '.join(RULES)}, got {rule!r}")
    # the released rule is Algorithm 1 with the step doubled: drift α·s, noise √(2α)
    drift = 1.0 if rule == "released" else 0.5
    x = x.detach().clone()
    sigma_last = float(sigmas[-1])
    with torch.no_grad():
        for i, sigma in enumerate(sigmas.tolist()):
            labels = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
            alpha = eps * (sigma / sigma_last) ** 2
            for _ in range(steps_per_level):
                z = noise_like(x, generator)
                x = x + drift * alpha * score(x, labels) + (2.0 * drift * alpha) ** 0.5 * z
        if denoise:
            labels = torch.full((x.shape[0],), len(sigmas) - 1, dtype=torch.long, device=x.device)
            x = x + sigma_last**2 * score(x, labels)
    return x


"""Annealed importance sampling of an RBM's log partition function (Neal 2001; Salakhutdinov & Murray
2008, "On the Quantitative Analysis of Deep Belief Networks", ICML, Sec. 3–4).

The path is geometric from a base-rate model A (W = 0, visible biases a_A set from the data's pixel
marginals, so Z_A is known in closed form) to the trained RBM B:

    p_k*(v) = exp((1 − β_k)·a_Aᵀv + β_k·a_Bᵀv) · Π_j (1 + exp(β_k·(b_j + vᵀW_{:,j}))),  0 = β_0 < … < β_K = 1.

M independent chains start from exact samples of p_0, pick up the weight log p_k*(v) − log p_{k−1}*(v) at
each β_k and then move by one block-Gibbs sweep that leaves p_k invariant. Then
log Ẑ_B = log Z_0 + log mean(w). The spread is reported as S&M do: r̂ ± 3σ̂ with σ̂ the standard error
of the mean importance weight, plus its delta-method standard error in nats and the std of log w.
Everything runs in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.samplers.gibbs import bernoulli

#: fractions of the β budget S&M spend on [0, 0.5], [0.5, 0.9] and [0.9, 1] (500, 4,000 and 10,000 of 14,500)
SM2008_SEGMENTS = ((0.5, 500), (0.9, 4000), (1.0, 10000))


@dataclass(frozen=True)
class AISConfig:
    n_betas: int = 14_500  # K: intermediate distributions (S&M 2008)
    n_chains: int = 100  # M: independent AIS runs (S&M 2008)
    schedule: Literal["sm2008", "linear"] = "sm2008"
    base_smoothing: float = 1.0  # pseudo-count on each side of the base-rate marginals (keeps a_A finite)

    def describe(self) -> dict[str, Any]:
        return {"algorithm": "ais", "n_betas": self.n_betas, "n_chains": self.n_chains, "schedule": self.schedule,
                "base": "base-rate RBM (W=0, visible biases from train marginals)",
                "base_smoothing": self.base_smoothing, "transition": "one block-Gibbs sweep per beta"}


@dataclass(frozen=True)
class AISResult:
    log_z: float
    log_z_base: float
    stderr: float  # σ̂ / r̂: the delta-method standard error of log Ẑ, in nats
    log_w_std: float  # std of the log importance weights over chains
    log_z_minus_3sigma: float | None  # log(r̂ − 3σ̂) + log Z_0; None when r̂ − 3σ̂ ≤ 0
    log_z_plus_3sigma: float
    n_chains: int
    n_betas: int

    def describe(self) -> dict[str, Any]:
        return {"log_z": self.log_z, "log_z_stderr": self.stderr, "log_w_std": self.log_w_std,
                "log_z_3sigma": [self.log_z_minus_3sigma, self.log_z_plus_3sigma],
                "n_chains": self.n_chains, "n_betas": self.n_betas}


def beta_schedule(n_betas: int, schedule: str) -> Tensor:
    """β_0 = 0, …, β_K = 1 (K + 1 values, float64)."""
    if n_betas < 1:
        raise ValueError(f"AIS needs n_betas >= 1, got {n_betas}")
    if schedule == "linear":
        return torch.linspace(0.0, 1.0, n_betas + 1, dtype=torch.float64)
    if schedule != "sm2008":
        raise ValueError(f"unknown AIS schedule '{schedule}'; valid choices: sm2008, linear")
    total = sum(n for _, n in SM2008_SEGMENTS)
    counts = [max(1, round(n_betas * n / total)) for _, n in SM2008_SEGMENTS]
    counts[-1] = max(1, n_betas - sum(counts[:-1]))
    parts, start = [torch.zeros(1, dtype=torch.float64)], 0.0
    for (end, _), n in zip(SM2008_SEGMENTS, counts):
        parts.append(torch.linspace(start, end, n + 1, dtype=torch.float64)[1:])
        start = end
    return torch.cat(parts)


def base_rate_bias(v_data: Tensor, smoothing: float) -> Tensor:
    """a_A = logit of the smoothed per-visible marginal of binary data (S&M's base-rate model)."""
    p = (v_data.double().sum(0) + smoothing) / (v_data.shape[0] + 2 * smoothing)
    return torch.log(p) - torch.log1p(-p)


def _log_p_star(v: Tensor, beta: float, w: Tensor, a: Tensor, b: Tensor, a_base: Tensor) -> Tensor:
    return (1.0 - beta) * (v @ a_base) + beta * (v @ a) + F.softplus(beta * (v @ w + b)).sum(-1)


def ais_log_z(w: Tensor, a: Tensor, b: Tensor, a_base: Tensor, config: AISConfig,
              generator: torch.Generator) -> AISResult:
    """Estimate log Z of the RBM (w: D×H, a: D, b: H) along the geometric path from ``a_base``."""
    w, a, b, a_base = (t.detach().double() for t in (w, a, b, a_base))
    betas = beta_schedule(config.n_betas, config.schedule).tolist()
    m, n_hidden = config.n_chains, w.shape[1]
    # p_0(v) ∝ exp(a_Aᵀv)·2^H: the hidden units of the base contribute softplus(0) = log 2 each
    log_z0 = float(F.softplus(a_base).sum() + n_hidden * math.log(2.0))
    with torch.no_grad():
        v = bernoulli(torch.sigmoid(a_base).expand(m, -1), generator)
        log_w = torch.zeros(m, dtype=torch.float64, device=w.device)
        for k in range(1, len(betas)):
            bk = betas[k]
            log_w += _log_p_star(v, bk, w, a, b, a_base) - _log_p_star(v, betas[k - 1], w, a, b, a_base)
            if k < len(betas) - 1:
                h = bernoulli(torch.sigmoid(bk * (v @ w + b)), generator)
                v = bernoulli(torch.sigmoid((1.0 - bk) * a_base + bk * (a + h @ w.T)), generator)
    return _summarize(log_w.cpu(), log_z0, config.n_betas)


def _summarize(log_w: Tensor, log_z0: float, n_betas: int) -> AISResult:
    m = log_w.shape[0]
    top = log_w.max()
    r = torch.exp(log_w - top)  # weights relative to the largest, so nothing overflows
    mean = r.mean()
    sigma = r.std(unbiased=True) / math.sqrt(m) if m > 1 else torch.tensor(0.0, dtype=torch.float64)
    log_mean = float(torch.log(mean) + top)
    lo = mean - 3 * sigma
    return AISResult(
        log_z=log_z0 + log_mean,
        log_z_base=log_z0,
        stderr=float(sigma / mean),
        log_w_std=float(log_w.std(unbiased=True)) if m > 1 else 0.0,
        log_z_minus_3sigma=log_z0 + float(torch.log(lo) + top) if lo > 0 else None,
        log_z_plus_3sigma=log_z0 + float(torch.log(mean + 3 * sigma) + top),
        n_chains=m,
        n_betas=n_betas,
    )


def exact_log_z(w: Tensor, a: Tensor, b: Tensor, max_units: int = 22) -> float:
    """log Z by brute force, summing out the larger layer analytically and enumerating the smaller one."""
    w, a, b = (t.detach().double().cpu() for t in (w, a, b))
    d, h = w.shape
    if min(d, h) > max_units:
        raise ValueError(f"exact log Z enumerates 2^{min(d, h)} states; only RBMs with a layer of at most "
                         f"{max_units} units are supported")
    if h <= d:
        states = _all_binary(h)
        terms = states @ b + F.softplus(states @ w.T + a).sum(-1)
    else:
        states = _all_binary(d)
        terms = states @ a + F.softplus(states @ w + b).sum(-1)
    return float(torch.logsumexp(terms, 0))


def _all_binary(n: int) -> Tensor:
    idx = torch.arange(2**n)
    return ((idx.unsqueeze(1) >> torch.arange(n)) & 1).double()

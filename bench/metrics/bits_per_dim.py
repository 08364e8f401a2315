"""Bits per dimension on the test split, with the convention of docs/architecture.md.

x ∈ {0..255}^D is dequantized as y = (x + u)/256, u ~ U[0,1)^D, the model gives log p(y) (a density on
[0,1]^D, nats) and bpd = −(log p(y) − D·log 256)/(D·ln 2); the figure is the mean over the test split ± its
standard error. For a discrete model P(x) spread uniformly over each bin, log p(y) = log P(x) + D·log 256,
so bpd = −log₂ P(x)/D: the same number either way.

Layers: `bits_per_dim` (pure: nats → per-example bpd), `dequantize` (seeded), `dequantized_log_probs` (batched
evaluation of a model under ``torch.no_grad()``), then the registered `Metric`. Whether the number is exact,
a bound (the VAE's IWAE-k) or an estimate (AIS) is flagged in the record, with the model's settings.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from bench import distributed
from bench.errors import ModelFailure, NonFiniteError
from bench.metrics.base import Metric, MetricResult, MetricValue, register
from bench.models.base import EVAL_BATCH, batches

#: seed offsets from the run's seed; distinct from the sampler's (bench.evaluation.SAMPLE_SEED_OFFSET)
DEQUANT_SEED_OFFSET = 2_000_000
ESTIMATOR_SEED_OFFSET = 2_000_001
#: u is drawn on a grid of 2^-16 so that y = (x·2^16 + k)/2^24 is exact in float32 and floor(256·y) = x
#: always; a continuous u rounds to the next bin (or to y = 1.0) for about one pixel in 10^5
U_BITS = 16
DEQUANTIZATION = f"y = (x + u) / 256, u ~ U[0,1)^D on a 2^-{U_BITS} grid"


def bits_per_dim(log_prob_nats: Tensor, dims: int) -> Tensor:
    """Per-example bits/dim of log-densities of y on [0,1]^D (nats): −(log p(y) − D·log 256)/(D·ln 2)."""
    if dims <= 0:
        raise ValueError(f"dims must be positive, got {dims}")
    lp = log_prob_nats.double()
    return -(lp - dims * math.log(256.0)) / (dims * math.log(2.0))


def dequantize(x: Tensor, generator: torch.Generator) -> Tensor:
    """y = (x + u)/256 for uint8 images x, u uniform in [0, 1) drawn from ``generator``; float32, in [0, 1)."""
    if x.dtype != torch.uint8:
        raise ValueError(f"dequantize takes uint8 images (0..255), got {x.dtype}")
    k = torch.randint(0, 2**U_BITS, x.shape, generator=generator, dtype=torch.int64)
    return ((x.long() * 2**U_BITS + k).double() / 2 ** (U_BITS + 8)).float()


def mean_and_stderr(values: Tensor) -> tuple[float, float]:
    n = values.numel()
    mean = values.double().mean().item()
    stderr = values.double().std(unbiased=True).item() / math.sqrt(n) if n > 1 else 0.0
    return mean, stderr


def log_prob_settings(model: Any) -> dict[str, Any]:
    """What qualifies a model's log_prob (e.g. the VAE's k): its ``log_prob_protocol()`` hook."""
    return dict(model.log_prob_protocol())


def dequantized_log_probs(model: Any, x: Tensor, seed: int, device: torch.device,
                   batch_size: int = EVAL_BATCH) -> Tensor:
    """log p(y) in nats (float64, shape [N]) of the dequantized ``x``, evaluated in batches.

    The dequantization noise is drawn for the whole split at once, so the numbers do not depend on the batch
    size; a stochastic estimator inside ``log_prob`` (IWAE, AIS) draws from torch's global RNG, which is
    seeded per batch (from the batch's index) and restored afterwards.
    """
    y = dequantize(x, torch.Generator().manual_seed(seed + DEQUANT_SEED_OFFSET))
    name = getattr(model, "name", type(model).__name__)
    cuda = [device.index or 0] if device.type == "cuda" else []

    def work(i: int, a: int, b: int) -> Tensor:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            torch.manual_seed(seed + ESTIMATOR_SEED_OFFSET + 7919 * i)  # per batch: the same under sharding
            lp = model.log_prob(y[a:b].to(device))
        if tuple(lp.shape) != (b - a,):
            raise ModelFailure(f"{name}.log_prob returned shape {tuple(lp.shape)}; expected [{b - a}]")
        lp = lp.detach().double().cpu()
        if not torch.isfinite(lp).all():
            bad = (~torch.isfinite(lp)).sum().item()
            raise NonFiniteError(f"{name}.log_prob gave {bad} non-finite log-likelihood(s) on test images "
                                 f"{a}..{b - 1}: the model is broken or its checkpoint is corrupt")
        return lp

    return torch.cat(distributed.map_batches(list(batches(len(y), batch_size)), work, "log-likelihoods"))


def _compute(ctx) -> MetricResult:
    model, x = ctx.model, ctx.data.test.x
    dims = math.prod(x.shape[1:])
    lp = dequantized_log_probs(model, x, ctx.seed, ctx.device)
    mean, stderr = mean_and_stderr(bits_per_dim(lp, dims))
    kind = model.log_prob_kind
    settings = log_prob_settings(model)
    protocol = {
        "split": "test",
        "n": len(x),
        "dims": dims,
        "dequantization": DEQUANTIZATION,
        "dequant_seed_offset": DEQUANT_SEED_OFFSET,
        "estimator_seed_offset": ESTIMATOR_SEED_OFFSET,
        "estimator_seeding": "batch i reseeds torch with seed + estimator_seed_offset + 7919·i",
        "batch_size": EVAL_BATCH,
        "log_prob_kind": kind,
        **settings,
    }
    extra = {"kind": kind, "bound": kind == "bound", "estimate": kind == "estimate", **settings}
    return MetricResult.of(MetricValue(mean, stderr=stderr, n=len(x), extra=extra),
                           protocol={"bits_per_dim": protocol}, draws={"bits_per_dim": {"seed": ctx.seed}})


BITS_PER_DIM = register(Metric(key="bits_per_dim", title="Bits/dim", higher_is_better=False, unit="bits/dim",
                               requires=("LogProb",), compute=_compute, tolerance="1%"))

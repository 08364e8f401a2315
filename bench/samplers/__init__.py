"""Samplers shared by the models: SGLD with a replay buffer (JEM, IGEBM), annealed Langevin (NCSN),
block Gibbs / PCD (RBM), ancestral (VAE, flows, autoregressive models)."""

import hashlib

import torch
from torch import Tensor


def content_generator(x: Tensor) -> torch.Generator:
    """A CPU generator seeded by ``x``'s own bytes (as float32): noise that a reference draws afresh for every
    test image (JEM's evaluation noise, Residual Flows' test-time dequantization), made the same in every run,
    process and rank, where a global RNG would differ between a trained and a cached model."""
    digest = hashlib.blake2b(x.detach().float().cpu().numpy().tobytes(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def noise_like(x: Tensor, generator: torch.Generator) -> Tensor:
    """Standard normal noise of ``x``'s shape, drawn in float32 from ``generator`` on its device, then moved to
    ``x``'s device and dtype: the chains' noise. bench's generators live on the CPU, so a seed gives the same
    chains on every device. The values are ``torch.randn(x.shape, generator=generator)``'s; a chain that is
    not float32 (none of bench's is: autocast leaves the chain itself in float32) gets them in its own dtype.
    (On an H200 a CUDA generator made JEM's SGLD 12-14% faster at batch 64, but its numbers differ from the
    CPU's; a pinned, non-blocking copy of the CPU draw was no faster: docs/performance.md.)"""
    return torch.randn(x.shape, generator=generator, device=generator.device).to(x.device, x.dtype)

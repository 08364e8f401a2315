import math

import torch

from bench.samplers.sgld import ReplayBuffer, sgld


def test_sgld_with_langevin_noise_samples_a_gaussian():
    """With noise = sqrt(2·step) SGLD is unadjusted Langevin: its stationary law is ≈ exp(−E)."""
    mu = torch.tensor([1.0, -2.0])
    cov = torch.tensor([[1.0, 0.6], [0.6, 2.0]])
    prec = torch.linalg.inv(cov)

    def energy(x):
        d = x - mu
        return 0.5 * ((d @ prec) * d).sum(1)

    g = torch.Generator().manual_seed(0)
    step = 0.01
    x = sgld(energy, torch.zeros(4000, 2), 1500, step, math.sqrt(2 * step), g)
    assert torch.allclose(x.mean(0), mu, atol=0.1)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.15)


def test_replay_buffer_reinitializes_a_fraction():
    g = torch.Generator().manual_seed(0)
    buf = ReplayBuffer(torch.full((1000, 1, 2, 2), 5.0))
    x, idx = buf.draw(20000, 0.05, g)
    fresh = (x.abs() <= 1).all(dim=(1, 2, 3)).float().mean().item()
    assert 0.04 < fresh < 0.06
    buf.write(idx[:3], torch.zeros(3, 1, 2, 2))
    assert (buf.data[idx[:3]] == 0).all()

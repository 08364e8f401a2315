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


def test_replay_buffer_write_keeps_the_last_chain_of_a_repeated_index():
    """A repeated index must not leave the winner to thread scheduling (it made same-seed runs differ)."""
    from bench.samplers.sgld import ReplayBuffer

    buf = ReplayBuffer(torch.zeros(6, 3))
    idx = torch.tensor([4, 1, 4, 0, 1, 4])
    x = torch.arange(6, dtype=torch.float32)[:, None].expand(6, 3)
    buf.write(idx, x)
    assert buf.data[:, 0].tolist() == [3.0, 4.0, 0.0, 0.0, 5.0, 0.0]
    big = ReplayBuffer(torch.zeros(50, 4096))  # large enough for index_put to run on several threads
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50, (400,), generator=g)
    vals = torch.randn(400, 4096, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))  # the tests run on one thread; the race needs two
    try:
        big.write(idx, vals)
    finally:
        torch.set_num_threads(threads)
    for i in idx.unique().tolist():
        last = int((idx == i).nonzero().max())
        assert torch.equal(big.data[i], vals[last])

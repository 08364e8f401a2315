import math

import numpy as np
import pytest
import torch

from bench.samplers.sgld import ClassGaussians, ReplayBuffer, sgld


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


def _two_classes(n=4000, seed=0):
    """Two 3-pixel classes well inside [-1, 1] (so clamping leaves the samples alone)."""
    rng = np.random.default_rng(seed)
    a = rng.multivariate_normal([0.3, -0.2, 0.1], [[0.010, 0.004, 0], [0.004, 0.020, 0], [0, 0, 0.005]], n)
    b = rng.multivariate_normal([-0.4, 0.2, 0.0], np.diag([0.02, 0.01, 0.01]), n)
    z = torch.tensor(np.concatenate([a, b]), dtype=torch.float32).view(-1, 3, 1, 1)
    return z, torch.tensor([0] * n + [1] * n)


def test_class_gaussians_fit_the_class_moments_as_numpy_does():
    z, y = _two_classes()
    init = ClassGaussians.fit(z, y, 2, ridge=0.0)
    for k in range(2):
        xk = z[y == k].view(-1, 3).double().numpy()
        np.testing.assert_allclose(init.means[k].numpy(), xk.mean(0), atol=1e-6)
        np.testing.assert_allclose((init.chol[k] @ init.chol[k].T).numpy(), np.cov(xk.T), atol=1e-6)


def test_class_gaussians_of_stored_images_equal_the_fit_of_their_model_inputs():
    """Fitting the uint8 images class by class and mapping the moments to [-1, 1] is the fit of the inputs."""
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (300, 1, 3, 3), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 3, (300,), generator=g)
    stored = ClassGaussians.of_images(images, y, 3)
    inputs = ClassGaussians.fit(2.0 * images.float() / 255.0 - 1.0, y, 3)
    assert torch.allclose(stored.means, inputs.means, atol=1e-6)
    assert torch.allclose(stored.chol, inputs.chol, atol=1e-5)
    assert torch.equal(stored.weights, inputs.weights)


def test_class_gaussians_sample_the_mixture_with_the_class_shares():
    z, y = _two_classes()
    init = ClassGaussians.fit(z, y, 2)
    x = init(40_000, (3, 1, 1), torch.Generator().manual_seed(1)).view(-1, 3)
    near_a = (x - init.means[0]).norm(dim=1) < (x - init.means[1]).norm(dim=1)
    assert 0.48 < near_a.float().mean().item() < 0.52
    xa = x[near_a].double().numpy()
    np.testing.assert_allclose(xa.mean(0), init.means[0].numpy(), atol=0.01)
    np.testing.assert_allclose(np.cov(xa.T), np.cov(z[y == 0].view(-1, 3).double().numpy().T), atol=0.003)


def test_class_gaussians_clamp_to_the_input_range_and_are_seeded():
    z = torch.rand(200, 1, 4, 4) * 2 - 1  # wide classes: samples past ±1 are clamped
    y = torch.arange(200) % 3
    init = ClassGaussians.fit(z, y, 3)
    a = init(500, (1, 4, 4), torch.Generator().manual_seed(7))
    b = init(500, (1, 4, 4), torch.Generator().manual_seed(7))
    assert a.shape == (500, 1, 4, 4) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1 and (a.abs() == 1).any()


def test_class_gaussians_relabelled_classes_swap_their_components():
    z, y = _two_classes(500)
    one, two = ClassGaussians.fit(z, y, 2), ClassGaussians.fit(z, 1 - y, 2)
    assert torch.allclose(one.means, two.means.flip(0)) and torch.allclose(one.chol, two.chol.flip(0))


def test_class_gaussians_a_class_without_two_images_gets_the_pooled_moments():
    z, y = _two_classes(500)
    y = y.clone()
    y[y == 1] = 0
    y[0] = 1  # class 1 has one image; class 2 none
    init = ClassGaussians.fit(z, y, 3)
    assert torch.isfinite(init.chol).all()
    assert torch.allclose(init.means[1], z.view(len(z), -1).mean(0), atol=1e-6)
    assert torch.allclose(init.means[2], init.means[1])
    assert init.weights.tolist() == [pytest.approx(999 / 1000), pytest.approx(1 / 1000), 0]  # never drawn: 2


def test_a_replay_buffer_restarts_chains_from_its_init():
    z, y = _two_classes(500)
    init = ClassGaussians.fit(z, y, 2)
    buf = ReplayBuffer(torch.full((100, 3, 1, 1), 5.0), init)
    x, _ = buf.draw(4000, 0.5, torch.Generator().manual_seed(0))
    fresh = x[(x != 5.0).all(dim=(1, 2, 3))].view(-1, 3)
    assert 0.45 < len(fresh) / 4000 < 0.55 and fresh.abs().max() < 1  # from the classes, not U(-1, 1)
    assert (fresh[:, 2].abs() < 0.5).all()

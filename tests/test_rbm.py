"""The RBM: its density on [0,1]^D is normalized and agrees with its energy, the AIS estimate made in fit
matches brute force on an RBM with few hidden units, PCD learns, sampling is deterministic, divergence is a
ModelFailure."""

import dataclasses
import itertools
import math

import pytest
import torch

from bench.data import load_dataset
from bench.data.base import Split
from bench.errors import ModelFailure
from bench.models.base import DataInfo, TrainContext, no_progress
from bench.models.rbm import RBM, RBMConfig
from bench.samplers.ais import exact_log_z
from bench.samplers.gibbs import free_energy
from bench.scales import Scale

SMALL = DataInfo((1, 3, 4), 10)  # 12 visible units: every binary image can be enumerated


@pytest.fixture(autouse=True)
def _one_thread_seeded():
    """The RBM's matrices are tiny: intra-op threads only add synchronization on a shared CPU. The seed
    makes each test's initial weights independent of the tests run before it."""
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _random_rbm(config: RBMConfig, info: DataInfo, seed: int = 0) -> RBM:
    torch.manual_seed(seed)
    m = RBM(config, info)
    with torch.no_grad():
        m.w.normal_(0, 0.8)
        m.a.normal_(0, 0.5)
        m.b.normal_(0, 0.5)
    m.log_z.fill_(exact_log_z(m.w, m.a, m.b))
    return m.eval()


def _ctx(seed: int = 0) -> TrainContext:
    return TrainContext(torch.device("cpu"), seed, no_progress)


def test_uniform_within_bit_density_sums_to_one_over_all_binary_images():
    """With exact log Z, p(y) integrates to one: Σ_b P(b) = 1, and each bit's levels carry mass 1/2^D of
    [0,1]^D under threshold 128 (so log p(y) = log P(b) + D·log 2)."""
    m = _random_rbm(RBMConfig(n_hidden=5, within_bit="uniform"), SMALL)
    bits = torch.tensor(list(itertools.product([0.0, 1.0], repeat=12)))
    k = bits.double() * 255  # a level on each side of the threshold
    y = (k + 0.5) / 256  # the middle of its bin
    lp = m.log_prob(y.reshape(-1, 1, 3, 4))
    total = torch.logsumexp(lp - 12 * math.log(2.0), 0)
    assert total.item() == pytest.approx(0.0, abs=1e-9)
    # the same number from an independent free energy
    expect = -free_energy(bits.double(), m.w.double(), m.a.double(), m.b.double()) - float(m.log_z) + 12 * math.log(2)
    assert torch.allclose(lp, expect, atol=1e-9)


def test_empirical_within_bit_masses_are_normalized_per_pixel_and_bit(digits):
    info = DataInfo.of(digits)
    m = RBM(dataclasses.replace(RBM.recipe(Scale.tiny, info), epochs=1, ais_betas=10), info)
    m.fit(digits.train, _ctx())
    q = m.level_log_probs.double().exp()
    on = torch.arange(256) >= m.config.threshold
    assert torch.allclose(q[:, on].sum(1), torch.ones(64, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(q[:, ~on].sum(1), torch.ones(64, dtype=torch.float64), atol=1e-5)
    # smoothed counts: pixel 0's share of level 0 among the train split's off-levels there
    x0 = digits.train.x.reshape(len(digits.train), -1)[:, 0].long()
    alpha = m.config.within_bit_alpha
    expect = ((x0 == 0).sum().item() + alpha) / ((x0 < 128).sum().item() + 128 * alpha)
    assert q[0, 0].item() == pytest.approx(expect, rel=1e-5)


def test_energy_and_log_prob_differ_by_a_constant(digits):
    info = DataInfo.of(digits)
    m = RBM(dataclasses.replace(RBM.recipe(Scale.tiny, info), epochs=1, ais_betas=10), info)
    m.fit(digits.train, _ctx())
    x = digits.test.x[:20]
    g = torch.Generator().manual_seed(0)
    y = (x.double() + torch.rand(x.shape, generator=g, dtype=torch.float64)) / 256
    gap = m.log_prob(y) + m.energy(x.float() / 255).double()
    assert torch.allclose(gap, gap[0].expand_as(gap), atol=1e-3)
    assert gap[0].item() == pytest.approx(-float(m.log_z) + 64 * math.log(256), abs=1e-3)


def test_binarization_threshold_is_at_128_and_recorded():
    m = RBM(RBMConfig(n_hidden=3), SMALL)
    assert m.binarize_levels(torch.tensor([0, 127, 128, 255])).tolist() == [0.0, 0.0, 1.0, 1.0]
    assert m.sampler_protocol()["binarization"]["threshold"] == 128
    assert m.log_prob_protocol()["threshold"] == 128 and m.log_prob_protocol()["ais"]["n_betas"] == 14_500


def test_ais_in_fit_matches_brute_force_log_z(digits):
    """8 hidden units on the 64-pixel digits: log Z is enumerable over the hidden layer; fit's AIS
    estimate is within 0.1 nats, and the record gets its spread."""
    info = DataInfo.of(digits)
    cfg = RBMConfig(n_hidden=8, epochs=3, batch_size=50, momentum=0.9, ais_betas=2000, ais_chains=100)
    m = RBM(cfg, info)
    stats = m.fit(digits.train, _ctx())
    exact = exact_log_z(m.w, m.a, m.b)
    assert abs(float(m.log_z) - exact) < 0.1
    assert stats["ais"]["log_z"] == pytest.approx(float(m.log_z))
    assert 0 < stats["ais"]["log_z_stderr"] < 0.1 and stats["ais"]["n_chains"] == 100


def test_pcd_learns_better_than_the_base_rate_model(digits):
    """Held-out log P(bits) under the trained RBM (exact log Z) beats independent Bernoulli pixels."""
    info = DataInfo.of(digits)
    cfg = RBMConfig(n_hidden=12, epochs=15, batch_size=50, lr=0.1, momentum=0.9, ais_betas=10, ais_chains=4)
    m = RBM(cfg, info)
    m.fit(digits.train, _ctx())
    bits = m.binarize_levels(digits.test.x.reshape(len(digits.test), -1).long()).double()
    ll_rbm = (-m.free_energy(bits) - exact_log_z(m.w, m.a, m.b)).mean()
    p = torch.sigmoid(m.base_bias.double())
    ll_base = (bits * p.log() + (1 - bits) * (1 - p).log()).sum(1).mean()
    assert ll_rbm > ll_base + 2.0


def test_sampling_is_deterministic_and_levels_agree_with_bits(digits):
    info = DataInfo.of(digits)
    m = RBM(dataclasses.replace(RBM.recipe(Scale.tiny, info), ais_betas=10), info)
    m.fit(digits.train, _ctx())
    a = m.sample(30, torch.Generator().manual_seed(3))
    b = m.sample(30, torch.Generator().manual_seed(3))
    c = m.sample(30, torch.Generator().manual_seed(4))
    assert a.dtype == torch.uint8 and a.shape == (30, 1, 8, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # every sampled level has positive mass under the within-bit model: no level is invented
    k = a.reshape(30, -1).long()
    assert torch.isfinite(m.level_log_probs.gather(1, k.T)).all()


def test_uniform_within_bit_samples_spread_over_their_bits_levels():
    m = _random_rbm(RBMConfig(n_hidden=4, within_bit="uniform", gibbs_steps=5), SMALL)
    s = m.sample(2000, torch.Generator().manual_seed(0)).long()
    on, off = s[s >= 128], s[s < 128]
    # U{128..255} and U{0..127}: means 191.5 and 63.5, with ~2000·12/2 draws each
    assert on.float().mean().item() == pytest.approx(191.5, abs=2.0)
    assert off.float().mean().item() == pytest.approx(63.5, abs=2.0)


def test_diverging_training_is_a_model_failure():
    info = DataInfo((1, 2, 2), 2)
    x = torch.randint(0, 256, (40, 1, 2, 2), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
    train = Split(x, torch.zeros(40, dtype=torch.int64))
    m = RBM(RBMConfig(n_hidden=3, epochs=50, batch_size=10, lr=1e30, momentum=0.9, ais_betas=10), info)
    with pytest.raises(ModelFailure, match="diverged"):
        m.fit(train, _ctx())

"""Samplers against targets known in closed form or by enumeration: SGLD on a Gaussian mixture, annealed
Langevin with a Gaussian's exact perturbed score, block Gibbs and AIS on RBMs small enough to enumerate."""

import itertools
import math

import pytest
import torch

from bench.samplers.ais import AISConfig, ais_log_z, base_rate_bias, beta_schedule, exact_log_z
from bench.samplers.annealed_langevin import AnnealedLangevinConfig, annealed_langevin, geometric_sigmas
from bench.samplers.gibbs import PersistentChains, free_energy, gibbs_chain, init_chains
from bench.samplers.sgld import sgld


@pytest.fixture(autouse=True)
def _one_thread():
    """These chains push tiny tensors through thousands of steps: intra-op threads only add synchronization,
    which on a shared CPU makes them tens of times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _enumerable_rbm(seed: int, d: int = 12, h: int = 8, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    w = scale * torch.randn(d, h, generator=g, dtype=torch.float64)
    a = 0.5 * torch.randn(d, generator=g, dtype=torch.float64)
    b = 0.5 * torch.randn(h, generator=g, dtype=torch.float64)
    return w, a, b


def _joint_states(d: int, h: int):
    v = torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)), dtype=torch.float64)
    hh = torch.tensor(list(itertools.product([0.0, 1.0], repeat=h)), dtype=torch.float64)
    return v, hh


def _exact_visible_marginals(w, a, b):
    """P(v_i = 1) and log Z by summing exp(−E(v, h)) over every joint state, independently of gibbs.py."""
    v, h = _joint_states(*w.shape)
    neg_e = (v @ a)[:, None] + (h @ b)[None, :] + v @ w @ h.T  # 2^D × 2^H
    log_z = torch.logsumexp(neg_e.flatten(), 0)
    p_v = torch.exp(torch.logsumexp(neg_e, 1) - log_z)
    return p_v @ v, float(log_z), p_v, v


# --- SGLD -------------------------------------------------------------------------------------------------
def test_sgld_with_langevin_noise_samples_a_gaussian_mixture():
    """Two-component 2-D mixture: SGLD with noise sqrt(2·step) reproduces its mean and covariance."""
    weights = torch.tensor([0.3, 0.7])
    mus = torch.tensor([[-1.0, 0.5], [1.0, -0.5]])
    covs = torch.stack([torch.tensor([[0.5, 0.2], [0.2, 0.4]]), torch.tensor([[0.3, -0.1], [-0.1, 0.6]])])
    precs, logdets = torch.linalg.inv(covs), torch.logdet(covs)

    def energy(x):
        d = x[:, None, :] - mus[None]  # N×K×2
        quad = torch.einsum("nki,kij,nkj->nk", d, precs, d)
        return -torch.logsumexp(torch.log(weights) - 0.5 * logdets - 0.5 * quad, dim=1)

    mean = (weights[:, None] * mus).sum(0)
    second = (weights[:, None, None] * (covs + mus[:, :, None] * mus[:, None, :])).sum(0)
    cov = second - mean[:, None] * mean[None, :]

    g = torch.Generator().manual_seed(0)
    step = 0.02
    x = sgld(energy, torch.randn(3000, 2, generator=g), 800, step, math.sqrt(2 * step), g)
    assert torch.allclose(x.mean(0), mean, atol=0.06)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.08)
    # the mixture weights are reproduced too: the share of samples nearer the second mean
    near_second = ((x - mus[1]).norm(dim=1) < (x - mus[0]).norm(dim=1)).float().mean().item()
    assert 0.6 < near_second < 0.8


# --- annealed Langevin -----------------------------------------------------------------------------------
def test_geometric_sigmas_follow_the_papers_schedule():
    sig = geometric_sigmas(1.0, 0.01, 10)
    assert sig[0].item() == pytest.approx(1.0) and sig[-1].item() == pytest.approx(0.01)
    ratios = sig[1:] / sig[:-1]
    assert torch.allclose(ratios, torch.full_like(ratios, 0.01 ** (1 / 9)))
    with pytest.raises(ValueError):
        geometric_sigmas(0.01, 1.0, 10)


def test_annealed_langevin_with_the_exact_score_recovers_a_gaussian():
    mu = torch.tensor([0.5, -1.0, 0.2])
    a = torch.tensor([[0.5, 0.0, 0.0], [0.2, 0.4, 0.0], [-0.1, 0.1, 0.3]])
    cov = a @ a.T
    sigmas = geometric_sigmas(1.0, 0.01, 10)

    # the data convolved with N(0, σ² I) is N(μ, Σ + σ² I): its score is exact
    precs = torch.linalg.inv(cov[None] + (sigmas.float() ** 2)[:, None, None] * torch.eye(3)[None])

    def score(x, level):
        return -(x - mu) @ precs[level[0]]  # one level per call; precisions are symmetric

    g = torch.Generator().manual_seed(0)
    x = annealed_langevin(score, torch.rand(4000, 3, generator=g), sigmas, 100, 2e-5, g)
    assert torch.allclose(x.mean(0), mu, atol=0.04)
    assert torch.allclose(torch.cov(x.T), cov, atol=0.04)


def test_annealed_langevin_is_deterministic_and_records_its_step_sizes():
    cfg = AnnealedLangevinConfig(sigma_begin=1.0, sigma_end=0.01, n_levels=10, steps_per_level=3, eps=2e-5)
    d = cfg.describe()
    assert d["step_sizes"][-1] == pytest.approx(2e-5) and d["step_sizes"][0] == pytest.approx(2e-5 * 1e4)
    assert d["steps_per_level"] == 3 and len(d["sigmas"]) == 10 and d["chains"] == "fresh"

    def score(x, level):
        return -x

    runs = [annealed_langevin(score, torch.zeros(5, 2), cfg.sigmas, 3, 2e-5, torch.Generator().manual_seed(s))
            for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


# --- Gibbs -----------------------------------------------------------------------------------------------
def test_gibbs_reproduces_the_exact_marginals_of_an_enumerable_rbm():
    w, a, b = _enumerable_rbm(0, d=10, h=6)
    marg, _, p_v, states = _exact_visible_marginals(w, a, b)
    g = torch.Generator().manual_seed(0)
    v = init_chains(4000, torch.zeros(10, dtype=torch.float64), "bernoulli_half", g)
    v = gibbs_chain(v, w, a, b, 100, g)
    assert torch.allclose(v.mean(0), marg, atol=0.03)
    # and the pairwise statistics, which independent marginals alone would not give
    pair = (p_v[:, None, None] * states[:, :, None] * states[:, None, :]).sum(0)
    assert torch.allclose(v.T @ v / v.shape[0], pair, atol=0.03)


def test_persistent_chains_keep_their_state_between_updates():
    w, a, b = _enumerable_rbm(1, d=6, h=4)
    g = torch.Generator().manual_seed(0)
    chains = PersistentChains(init_chains(50, a, "base_rate", g))
    first = chains.advance(1, w, a, b, g).clone()
    second = chains.advance(1, w, a, b, g)
    assert second is chains.v and not torch.equal(first, second)


def test_free_energy_sums_out_the_hidden_units():
    w, a, b = _enumerable_rbm(2, d=5, h=4)
    v, h = _joint_states(5, 4)
    neg_e = (v @ a)[:, None] + (h @ b)[None, :] + v @ w @ h.T
    assert torch.allclose(-free_energy(v, w, a, b), torch.logsumexp(neg_e, 1))


# --- AIS -------------------------------------------------------------------------------------------------
def test_exact_log_z_matches_joint_enumeration_either_way_round():
    for d, h in ((12, 8), (5, 9)):
        w, a, b = _enumerable_rbm(3, d, h)
        _, log_z, _, _ = _exact_visible_marginals(w, a, b)
        assert exact_log_z(w, a, b) == pytest.approx(log_z, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_ais_log_z_is_within_a_tenth_of_a_nat_of_brute_force(seed):
    """12 visible × 8 hidden units with O(1) weights: AIS's log Ẑ is within 0.1 nats and its 3σ interval
    covers the exact value. The base rates come from "training data" drawn exactly from the RBM, as S&M
    fit theirs to the data the RBM was trained on."""
    w, a, b = _enumerable_rbm(seed, 12, 8, scale=1.0)
    _, log_z, p_v, states = _exact_visible_marginals(w, a, b)
    g = torch.Generator().manual_seed(10 + seed)
    v_data = states[torch.multinomial(p_v, 500, replacement=True, generator=g)]
    res = ais_log_z(w, a, b, base_rate_bias(v_data, 1.0), AISConfig(n_betas=1000, n_chains=200), g)
    assert abs(res.log_z - log_z) < 0.1
    assert 0 < res.stderr < 0.1 and res.log_w_std > 0
    lo = res.log_z_minus_3sigma if res.log_z_minus_3sigma is not None else -math.inf
    assert lo <= log_z <= res.log_z_plus_3sigma


def test_ais_with_a_single_beta_is_importance_sampling_from_the_base():
    """K = 1 is plain importance sampling with the base-rate proposal; with W = 0 and the base equal to the
    target's visible biases the weights are constant, so the estimate is exact with zero spread."""
    d, h = 7, 3
    a = torch.linspace(-1, 1, d, dtype=torch.float64)
    w, b = torch.zeros(d, h, dtype=torch.float64), torch.zeros(h, dtype=torch.float64)
    res = ais_log_z(w, a, b, a.clone(), AISConfig(n_betas=1, n_chains=10), torch.Generator().manual_seed(0))
    expect = float(torch.nn.functional.softplus(a).sum()) + h * math.log(2)
    assert res.log_z == pytest.approx(expect, abs=1e-12) and res.log_w_std == pytest.approx(0.0, abs=1e-12)


def test_beta_schedules_start_at_zero_end_at_one_and_increase():
    for schedule in ("linear", "sm2008"):
        betas = beta_schedule(1450, schedule)
        assert len(betas) == 1451 and betas[0] == 0 and betas[-1] == 1
        assert (betas[1:] > betas[:-1]).all()
    sm = beta_schedule(14_500, "sm2008")
    # S&M 2008: 500 steps to 0.5, 4,000 to 0.9, 10,000 to 1
    assert sm[500].item() == pytest.approx(0.5) and sm[4500].item() == pytest.approx(0.9)

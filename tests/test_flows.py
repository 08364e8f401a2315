"""The normalizing flows (nice, realnvp, glow, glow_hybrid, resflow): bijectivity, log-determinants against
brute-force Jacobians, Residual Flows' unbiased estimator, closed-form densities, and input checks."""

import copy
import dataclasses
import functools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from bench import checkpoints
from bench.data import load_dataset
from bench.data.base import Split
from bench.errors import NonFiniteError, UserError
from bench.models import MODELS
from bench.models._flows import ActNorm, Coupling, Normalize, ValueWarp, classifier_input
from bench.models.base import DataInfo, TrainContext, no_progress
from bench.models.resflow import LipSwish, LogdetSettings, ResFlowConfig, ResidualBlock, SNConv2d, SNLinear
from bench.scales import Scale

FLOWS = ["nice", "realnvp", "glow", "glow_hybrid", "resflow"]
DIGITS = (1, 8, 8)
MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)


@functools.cache
def _digits():
    return load_dataset("digits")


def digits_batch(n: int, shape=DIGITS, seed: int = 0) -> torch.Tensor:
    """Dequantized digits (or, for other shapes, dequantized random bytes) as float64."""
    g = torch.Generator().manual_seed(seed)
    if shape == DIGITS:
        x = _digits().train.x[:n]
    else:
        x = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    return (x.double() + torch.rand(x.shape, generator=g, dtype=torch.float64)) / 256


def build(name: str, shape=DIGITS, dtype=torch.float64, perturb: bool = True, **opts):
    """The tiny recipe; with ``perturb`` its layers are moved away from the identity they start as, and the
    data-initialized layers (actnorm, value warp) are initialized on a batch, so that every test below
    exercises a non-trivial bijection. A fresh copy of a cached build: tests may change it."""
    return copy.deepcopy(_build(name, shape, dtype, perturb, tuple(sorted(opts.items()))))


@functools.cache
def _build(name: str, shape, dtype, perturb: bool, opts: tuple):
    opts = dict(opts)
    info = DataInfo(shape, 10)
    cls = MODELS.get(name)
    torch.manual_seed(0)
    model = cls(cls.configure(Scale.tiny, info, opts), info).to(dtype)
    if perturb:
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("theta"):
                    continue  # the value warp is initialized from data below
                spread = p.std().item() if p.numel() > 1 else 0.0
                p.add_(torch.randn_like(p) * (0.2 * spread if spread > 0 else 0.02))
        model.train()
        y = digits_batch(16, shape).to(dtype)
        with torch.no_grad():
            model._train_latent(y, torch.Generator().manual_seed(0))
        if hasattr(model, "power_iteration"):
            model.power_iteration(100)
    return model.eval()


def latent_map(model, y):
    """y → z without the log-det (the Residual Flow skips its Jacobian computation here)."""
    if model.name == "resflow":
        return model._run(y, "none", None, 0)[0]
    return model.flow(y)[0]


# --- bijectivity ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [DIGITS, MNIST, CIFAR], ids=["digits", "mnist", "cifar"])
@pytest.mark.parametrize("name", ["nice", "realnvp", "glow", "resflow"])  # glow_hybrid's flow is glow's
def test_inverse_recovers_the_input(name, shape):
    model = build(name, shape, dtype=torch.float32)
    y = digits_batch(4, shape).float()
    with torch.no_grad():
        z = latent_map(model, y)
        back = model.flow.inverse(z)
    assert z.shape == (4, math.prod(shape))
    assert not torch.allclose(z, torch.logit(0.05 + 0.9 * y).flatten(1), atol=1e-2)  # not the identity
    assert (back - y).abs().max().item() < 1e-4


@pytest.mark.parametrize("shape", [DIGITS, (1, 4, 4)], ids=["digits", "1x4x4"])
def test_glow_with_additive_couplings_inverts_and_has_the_exact_log_det(shape):
    """openai/glow's --flow_coupling 0 (the small recipe on runs shorter than an epoch): z₂ = x₂ + t(x₁)."""
    model = build("glow", shape, coupling="additive")
    couplings = [m for m in model.modules() if isinstance(m, Coupling)]
    assert couplings and all(m.scaling == "additive" for m in couplings)
    y = digits_batch(3, shape)
    z, logdet = model.latent(y)
    with torch.no_grad():
        assert (model.flow.inverse(z) - y).abs().max().item() < 1e-9
    for i in range(len(y)):
        jac = torch.autograd.functional.jacobian(lambda v: latent_map(model, v.unsqueeze(0))[0], y[i], vectorize=True)
        assert abs(logdet[i].item() - torch.linalg.slogdet(jac.reshape(y[i].numel(), -1))[1].item()) < 1e-4


@pytest.mark.parametrize("max_iters", [500, 5], ids=["converges", "stops-at-max-iters"])
def test_resflow_inverse_read_back_every_k_iterations_returns_the_same_iterate(monkeypatch, max_iters):
    """On an accelerator the fixed-point test is read back every few iterations; the iterate returned must be
    the one a check at every iteration returns (bit for bit), converged or stopped at the iteration limit."""
    import bench.models.resflow as resflow

    block = _contractive_block(dim=4, coeff=0.9).eval()
    block.inverse_max_iters = max_iters
    y = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3
    every_iteration = block.inverse(y)
    for k in (3, 8, 1000):
        monkeypatch.setattr(resflow, "_check_every", lambda device, k=k: k)
        assert torch.equal(block.inverse(y), every_iteration), k
    if max_iters == 500:  # converged: g(x) + x = y
        assert (block(every_iteration.requires_grad_(False))[0] - y).abs().max().item() < 1e-5


# --- log-determinants -------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 4, 4)], ids=["1x4x4", "3x4x4"])
@pytest.mark.parametrize("name", ["nice", "realnvp", "glow", "resflow"])  # glow_hybrid's flow is glow's
def test_log_det_matches_brute_force_jacobian(name, shape):
    model = build(name, shape)
    y = digits_batch(3, shape)
    _, logdet = model.latent(y)
    for i in range(len(y)):
        jac = torch.autograd.functional.jacobian(lambda v: latent_map(model, v.unsqueeze(0))[0], y[i], vectorize=True)
        brute = torch.linalg.slogdet(jac.reshape(y[i].numel(), -1))[1]
        assert abs(logdet[i].item() - brute.item()) < 1e-4, (name, i)


def _contractive_block(dim: int = 4, coeff: float = 0.7) -> ResidualBlock:
    """One fully connected residual block with J_g = W₂·diag(φ')·W₁, W₂ = W₁ᵀ at the norm bound and a steep
    LipSwish: J_g is symmetric with eigenvalues up to ≈ coeff², so the power series has sizeable higher-order
    terms and a wrong Russian-roulette weight would show (the default Poisson(2) roulette)."""
    torch.manual_seed(1)
    g = torch.nn.Sequential(SNLinear(dim, dim, coeff), LipSwish(), SNLinear(dim, dim, coeff)).double()
    with torch.no_grad():
        g[1].b.fill_(5.0)
        g[0].weight.copy_(torch.eye(dim, dtype=torch.float64) + 0.3 * torch.randn(dim, dim, dtype=torch.float64))
        g[2].weight.copy_(g[0].weight.T)
        for m in (g[0], g[2]):
            m.bias.zero_()
            m.power_iteration(200)
    return ResidualBlock(g, LogdetSettings(), ResFlowConfig(coeff=coeff)).double()


def _exact_block_logdet(block: ResidualBlock, x: torch.Tensor) -> torch.Tensor:
    jac = torch.autograd.functional.jacobian(block.g, x, create_graph=True)  # N×D×N×D
    n, d = x.shape
    per_example = torch.stack([jac[i, :, i, :] for i in range(n)])
    return torch.linalg.slogdet(torch.eye(d, dtype=x.dtype) + per_example)[1]


def test_resflow_estimator_is_unbiased_for_the_log_det():
    block = _contractive_block().eval()
    x = torch.tensor([[3.2, 3.5, 3.1, 3.9], [3.0, -3.0, 0.5, 2.0]], dtype=torch.float64, requires_grad=True)
    exact = _exact_block_logdet(block, x).detach()
    assert exact.abs().min() > 0.3  # a block near the identity would make the check vacuous
    g = torch.Generator().manual_seed(0)
    n_draws = 2000
    # no exact terms: every term of the series goes through the roulette
    draws = torch.stack([block.estimate_logdet(x, block.g(x), 0, g).detach() for _ in range(n_draws)])
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(n_draws)
    assert (se > 1e-3).all()  # really a stochastic estimate
    assert ((mean - exact).abs() < 4 * se).all(), (mean, exact, se)
    # dropping the roulette's 1/P(N >= k) weights truncates the series: a bias the test can see
    truncated = []
    gx = block.g(x)
    for _ in range(n_draws):
        n = block.sample_n(g)
        v = torch.randn(x.shape, generator=g, dtype=x.dtype)
        w, est = v, torch.zeros(2, dtype=x.dtype)
        for k in range(1, n + 1):
            w = torch.autograd.grad(gx, x, w, retain_graph=True)[0]
            est = est + (-1) ** (k + 1) / k * (w * v).sum(1)
        truncated.append(est.detach())
    truncated = torch.stack(truncated)
    tse = truncated.std(0) / math.sqrt(n_draws)
    assert ((truncated.mean(0) - exact).abs() > 4 * tse).any()


def test_resflow_neumann_gradient_is_unbiased():
    block = _contractive_block(dim=3).train()
    x = torch.tensor([[3.0, -1.0, 0.5]], dtype=torch.float64)
    params = [block.g[0].weight, block.g[2].weight]
    exact_grad = torch.autograd.grad(_exact_block_logdet(block, x).sum(), params)
    g = torch.Generator().manual_seed(0)
    grads = []
    for _ in range(1000):
        xg = x.clone().requires_grad_(True)
        est = block.estimate_logdet(xg, block.g(xg), 2, g)
        grads.append(torch.cat([t.flatten() for t in torch.autograd.grad(est.sum(), params)]))
    grads = torch.stack(grads)
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(len(grads))
    want = torch.cat([t.flatten() for t in exact_grad])
    z = ((mean - want).abs() / se.clamp_min(1e-9))
    assert (z < 5).float().mean() > 0.98 and z.max() < 7, z.max()


def test_resflow_log_prob_kind_follows_the_dimension():
    small = build("resflow", (1, 4, 4), torch.float32, perturb=False)
    assert small.log_prob_kind == "exact"
    big = build("resflow", (1, 4, 4), torch.float32, perturb=False, exact_logdet_max_dim=8, eval_exact_terms=4)
    assert big.log_prob_kind == "estimate"
    y = digits_batch(3, (1, 4, 4)).float()
    # the estimate is deterministic given eval_seed, and unbiased for the exact value over seeds
    a, b = big.log_prob(y), big.log_prob(y)
    assert torch.equal(a, b)
    exact = small.log_prob(y)
    draws = []
    for seed in range(1, 31):
        big.config = dataclasses.replace(big.config, eval_seed=seed)
        draws.append(big.log_prob(y))
    draws = torch.stack(draws)
    assert not torch.equal(draws[0], a)
    se = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - exact).abs() < 4 * se + 1e-4).all()


def test_resflow_layers_respect_their_lipschitz_bound():
    model = build("resflow", (1, 8, 8))
    convs = [m for m in model.modules() if isinstance(m, SNConv2d | SNLinear)]
    assert convs
    for m in convs:
        w = m.scaled_weight().detach()
        shape = m.v.shape[1:]
        dense = torch.autograd.functional.jacobian(lambda v, w=w, m=m: m._map(v.unsqueeze(0), w).flatten(),
                                                   torch.zeros(shape, dtype=w.dtype))
        norm = torch.linalg.matrix_norm(dense.reshape(dense.shape[0], -1), ord=2).item()
        assert norm <= m.coeff * (1 + 1e-3), (norm, m.coeff)


# --- closed-form densities --------------------------------------------------------------------
def _bpd(log_prob: torch.Tensor, d: int) -> torch.Tensor:
    return -(log_prob - d * math.log(256)) / (d * math.log(2))


def _gaussian_logit_density(y: torch.Tensor, alpha: float, scale: float = 1.0) -> torch.Tensor:
    """log-density of y when logit(α + (1−2α)y) ~ N(0, scale²), written out independently of bench."""
    p = (alpha + (1 - 2 * alpha) * y).numpy()
    s = np.log(p) - np.log1p(-p)
    dens = stats.norm.logpdf(s, scale=scale) + math.log(1 - 2 * alpha) - np.log(p) - np.log1p(-p)
    return torch.from_numpy(dens).reshape(len(y), -1).sum(1)


@pytest.mark.parametrize("name", ["realnvp", "glow", "glow_hybrid"])
def test_flows_at_initialization_are_the_logit_gaussian(name):
    """Identity couplings, zero-initialized priors, unset actnorm, an orthogonal 1×1 conv: a logit-normal."""
    model = build(name, perturb=False, value_warp=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Coupling) and m.scaling == "sigmoid":
                # Glow's couplings start at scale sigmoid(2); a large bias makes them the identity
                m.net[-1].bias[: m.mask.shape[1]] = 40.0
    y = digits_batch(5)
    alpha = model.config.logit_alpha
    want = _bpd(_gaussian_logit_density(y, alpha), 64)
    assert torch.allclose(_bpd(model.log_prob(y), 64), want, atol=1e-4)


def test_identity_resflow_is_the_logit_gaussian():
    model = build("resflow", perturb=False, value_warp=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ResidualBlock):
                m.g[-1].weight.zero_()
                m.g[-1].bias.zero_()
    y = digits_batch(5)
    want = _bpd(_gaussian_logit_density(y, model.config.logit_alpha), 64)
    assert torch.allclose(_bpd(model.log_prob(y), 64), want, atol=1e-4)


def test_nice_identity_with_logistic_base_is_uniform_on_the_logit_window():
    """logit then a logistic base: p(y) = (1−2α)^D wherever y is, so bpd = 8 − log2(1−2α) exactly."""
    model = build("nice", perturb=False, value_warp=False)
    alpha = model.config.logit_alpha
    bpd = _bpd(model.log_prob(digits_batch(5)), 64)
    assert torch.allclose(bpd, torch.full_like(bpd, 8 - math.log2(1 - 2 * alpha)), atol=1e-4)


def test_nice_scaling_layer_gives_a_known_gaussian():
    """With zero couplings and scaling exp(s), logit(...) ~ N(0, exp(−s)²)."""
    model = build("nice", perturb=False, value_warp=False, prior="gaussian")
    with torch.no_grad():
        model.flow.layers[-1].log_scale.fill_(0.7)
    y = digits_batch(5)
    want = _bpd(_gaussian_logit_density(y, model.config.logit_alpha, scale=math.exp(-0.7)), 64)
    assert torch.allclose(_bpd(model.log_prob(y), 64), want, atol=1e-4)


def test_value_warp_initializes_from_value_counts_and_inverts():
    warp = ValueWarp().double().eval()
    assert torch.allclose(warp(torch.tensor([[0.3, 0.71]], dtype=torch.float64))[0],
                          torch.tensor([[0.3, 0.71]], dtype=torch.float64))  # identity before initialization
    y = digits_batch(32)
    warp.train()
    u, logdet = warp(y)
    k = (y * 256).floor().long().flatten()
    q = (torch.bincount(k, minlength=256).double() + 1) / (k.numel() + 256)
    assert torch.allclose(logdet, torch.log(256 * q[(y * 256).floor().long()]).flatten(1).sum(1))
    assert torch.allclose(warp.inverse(u), y, atol=1e-10)
    assert u.min() >= 0 and u.max() < 1


def test_actnorm_initializes_to_zero_mean_unit_variance():
    layer = ActNorm(3).train()
    x = 5 + 3 * torch.randn(64, 3, 4, 4)
    z, _ = layer(x)
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z.std(dim=(0, 2, 3)), torch.ones(3), atol=1e-3)
    z2, _ = layer(x + 1)  # initialized once only
    assert torch.allclose(z2 - z, torch.full_like(z, 1.0) / x.std(dim=(0, 2, 3)).view(1, 3, 1, 1), atol=1e-3)


# --- sampling ---------------------------------------------------------------------------------
def test_glow_temperature_scales_the_base_draws():
    hot, cold = build("glow", dtype=torch.float32), build("glow", dtype=torch.float32, temperature=0.5)
    assert cold.sampler_protocol()["temperature"] == 0.5
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 64, generator=g)
    with torch.no_grad():
        want = cold.flow.inverse(0.5 * z)
    got = cold.sample(8, torch.Generator().manual_seed(0))
    assert torch.equal(got, (256 * want - 0.5).clamp(0, 255).round().to(torch.uint8))
    assert not torch.equal(got, hot.sample(8, torch.Generator().manual_seed(0)))


# --- training and the hybrid heads ------------------------------------------------------------
@pytest.mark.parametrize("name", FLOWS)
def test_tiny_training_runs_and_improves_likelihood(name):
    d = _digits()
    train = Split(d.train.x[:128], d.train.y[:128])
    info = DataInfo.of(d)
    cls = MODELS.get(name)
    torch.manual_seed(0)
    model = cls(cls.configure(Scale.tiny, info, {"epochs": 2, "lr": 3e-3}), info)
    y = digits_batch(64).float()
    before = model.log_prob(y).mean().item()
    stats_ = model.fit(train, TrainContext(torch.device("cpu"), 0, no_progress))
    assert stats_["steps"] == 2 * 2
    after = model.log_prob(y)
    assert after.dtype == torch.float64 and after.shape == (64,) and torch.isfinite(after).all()
    assert after.mean().item() > before
    if name in ("glow_hybrid", "resflow"):
        logits = model.logits(d.test.x[:5].float() / 255)
        assert logits.shape == (5, 10) and torch.isfinite(logits).all()
    else:
        assert not hasattr(model, "logits")


@pytest.mark.parametrize("name", FLOWS)
def test_sampling_is_deterministic_and_survives_a_checkpoint_round_trip(name, tmp_path):
    model = build(name, dtype=torch.float32)
    a = model.sample(6, torch.Generator().manual_seed(3))
    b = model.sample(6, torch.Generator().manual_seed(3))
    c = model.sample(6, torch.Generator().manual_seed(4))
    assert a.dtype == torch.uint8 and a.shape == (6, *DIGITS)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert "temperature" in model.sampler_protocol()

    path = tmp_path / f"{name}.safetensors"
    checkpoints.save(model, path, {})
    info = DataInfo(DIGITS, 10)
    torch.manual_seed(1)  # a different initialization, overwritten by the checkpoint
    fresh = MODELS.get(name)(model.config, info)
    checkpoints.load_checkpoint(fresh, path)
    fresh.eval()
    y = digits_batch(4).float()
    assert torch.equal(fresh.log_prob(y), model.log_prob(y))
    assert torch.equal(fresh.sample(6, torch.Generator().manual_seed(3)), a)


# --- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FLOWS)
def test_wrong_shapes_and_ranges_are_clear_errors(name):
    model = build(name, dtype=torch.float32, perturb=False)
    with pytest.raises(UserError, match="expects images of shape N×1×8×8"):
        model.log_prob(torch.rand(2, 3, 8, 8) * 0.99)
    with pytest.raises(UserError, match="expects images of shape"):
        model.log_prob(torch.rand(2, 1, 28, 28) * 0.99)
    with pytest.raises(UserError, match=r"in \[0, 1\)"):
        model.log_prob(torch.rand(2, 1, 8, 8) * 255)
    if hasattr(model, "logits"):
        with pytest.raises(UserError, match="expects images of shape"):
            model.logits(torch.rand(2, 3, 32, 32))


@pytest.mark.parametrize("name", FLOWS)
def test_non_finite_log_likelihood_raises(name):
    model = build(name, dtype=torch.float32, perturb=False)
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if not n.endswith("theta")).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="non-finite"):
        model.log_prob(digits_batch(3).float())


# --- recipes ----------------------------------------------------------------------------------
def test_paper_recipes_are_the_published_settings():
    info = DataInfo(CIFAR, 10)
    nice = MODELS.get("nice").recipe(Scale.paper, info)
    assert (nice.coupling_layers, nice.hidden, nice.hidden_layers, nice.prior) == (4, 2000, 4, "logistic")
    assert (nice.lr, nice.adam_beta2, nice.adam_eps) == (1e-3, 0.01, 1e-4)
    rnvp = MODELS.get("realnvp").recipe(Scale.paper, info)
    assert (rnvp.scales, rnvp.res_blocks, rnvp.hidden, rnvp.weight_decay) == (2, 8, 64, 5e-5)
    glow = MODELS.get("glow").recipe(Scale.paper, info)
    assert (glow.levels, glow.steps_per_level, glow.hidden, glow.lr) == (3, 32, 512, 1e-3)
    hyb = MODELS.get("glow_hybrid").recipe(Scale.paper, info)
    assert hyb.nll_weight == 1.0 and hyb.steps_per_level == 32
    assert MODELS.get("glow").recipe(Scale.paper, DataInfo(MNIST, 10)).levels == 2  # 28 → 14 → 7
    res = MODELS.get("resflow").recipe(Scale.paper, info)
    assert (res.blocks, res.hidden, res.coeff, res.n_exact_terms, res.n_dist) == ((16, 16, 16), 512, 0.98, 2, "poisson")
    assert res.nll_weight == 1.0
    for cfg in (nice, rnvp, glow, hyb, res):
        assert not cfg.value_warp  # the papers' flows see the logit of the data directly


# --- step-level checks against the references' training equations ----------------------------------------
def _cifar_like(name: str, size: int = 8, **changes):
    """The paper recipe on 3×size×size CIFAR-like data (flips allowed), shrunk so a step takes milliseconds;
    float64."""
    info = DataInfo((3, size, size), 10, hflip=True)
    cls = MODELS.get(name)
    torch.manual_seed(0)
    return cls(dataclasses.replace(cls.recipe(Scale.paper, info), **changes), info).double(), info


def _train_set(n: int, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g),
                 torch.randint(0, 10, (n,), generator=g))


def _hybrid_loss_in_bits(model, y, labels, g):
    """The reference's hybrid loss (residual-flows train_img.py, task=hybrid, scale_dim=False):
    logpx = log N(z; 0, I) + log|det| − D·log 256, loss = −mean(logpx)/ln 2 + CE/ln 2 (both in bits)."""
    z, logdet, features = model._train_latent(y, g)
    d = y[0].numel()
    logpz = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(1)
    logpx = logpz + logdet - d * math.log(256)
    ce = torch.nn.functional.cross_entropy(model.classifier(features), labels)
    return -logpx.mean() / math.log(2) + ce / math.log(2)


def test_resflow_normalize_input_keeps_an_exact_density():
    """With identity blocks and unset actnorms, the paper's hybrid flow is y ↦ (y − m)/s: log p(y) must be
    Σ log N(y; m, s²) exactly (the normalization's log-det included), and bits/dim follows from it."""
    model, _ = _cifar_like("resflow", 4, blocks=(1, 1), hidden=4, fc_blocks=1, fc_hidden=4, classifier_hidden=4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ResidualBlock):
                m.g[-1].weight.zero_()
                m.g[-1].bias.zero_()
    model.eval()
    y = (torch.randint(0, 256, (3, 3, 4, 4)).double() + torch.rand(3, 3, 4, 4, dtype=torch.float64)) / 256
    mean = np.array(model.config.normalize_mean)[None, :, None, None]
    std = np.array(model.config.normalize_std)[None, :, None, None]
    want = stats.norm.logpdf(y.numpy(), loc=mean, scale=std).reshape(3, -1).sum(1)
    assert np.allclose(model.log_prob(y).detach().numpy(), want, atol=1e-8)
    assert model.config.normalize_std == (0.2023, 0.1994, 0.2010)


def test_resflow_two_training_steps_match_the_reference_update():
    """train_img.py: loss in bits; lr = lr·min(1, (itr+1)/warmup); clip_grad_norm_(1); Adam(β = (0.9, 0.99));
    Lipschitz update; EMA (decay 0.999) started at the first step, evaluated at the end."""
    ours, _ = _cifar_like("resflow", blocks=(1, 1), hidden=4, fc_blocks=1, fc_hidden=4, classifier_hidden=4,
                          warmup_iters=3, batch_size=4, epochs=2, ema=0.9)
    ref = copy.deepcopy(ours)
    train = _train_set(4)
    ours.fit(train, TrainContext(torch.device("cpu"), 5, no_progress))

    c = ref.config
    g = torch.Generator().manual_seed(5 * 1_000_003)  # TrainContext.generator()
    params = list(ref.parameters())
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    shadow = None
    ref.train()
    for t in range(2):
        perm = torch.randperm(4, generator=g)
        y = ref.training_batch(train.x[perm], g).double()
        loss = _hybrid_loss_in_bits(ref, y, train.y[perm], g)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [torch.zeros_like(p) if gr is None else gr for p, gr in zip(params, grads)]
        norm = torch.sqrt(sum((gr**2).sum() for gr in grads))
        grads = [gr * min(1.0, 1.0 / (norm.item() + 1e-6)) for gr in grads]
        lr = c.lr * min(1.0, (t + 1) / c.warmup_iters)
        with torch.no_grad():
            for i, (p, gr) in enumerate(zip(params, grads)):
                m[i] = 0.9 * m[i] + 0.1 * gr
                v[i] = 0.99 * v[i] + 0.01 * gr**2
                p -= lr * (m[i] / (1 - 0.9 ** (t + 1))) / ((v[i] / (1 - 0.99 ** (t + 1))).sqrt() + 1e-8)
        ref.power_iteration(c.power_iters, c.sn_tol)
        shadow = [p.detach().clone() for p in params] if shadow is None else \
            [s - (1 - c.ema) * (s - p.detach()) for s, p in zip(shadow, params)]
    for (name, a), b in zip(ours.named_parameters(), shadow):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9), name


def test_glow_hybrid_three_steps_match_openai_glow_adamax_polyak_and_warmup():
    """openai/glow optim.adamax + train.py: lr_t = lr·min(1, images before the step/(N·epochs_warmup));
    β2 = 1 − 1/(steps per epoch); m ← β1 m + (1−β1) g; u ← max(β2 u, |g|);
    θ ← θ − lr_t·√(1−β2^t)/(1−β1^t)·m/(u + 1e-8); Polyak average with decay β2; no clipping; the batch's
    gradient accumulated over micro-batches."""
    ours, _ = _cifar_like("glow_hybrid", levels=2, steps_per_level=1, hidden=4, classifier_hidden=4,
                          batch_size=4, micro_batch_size=2, epochs=2, warmup_epochs=1.0, lr=1e-2)
    ref = copy.deepcopy(ours)
    train = _train_set(8)
    stats_ = ours.fit(train, TrainContext(torch.device("cpu"), 3, no_progress, max_steps=3))
    assert stats_["steps"] == 3

    g = torch.Generator().manual_seed(3 * 1_000_003)
    params = list(ref.parameters())
    beta2 = 1 - 1 / 2  # 2 steps per epoch, polyak_epochs 1
    m = [torch.zeros_like(p) for p in params]
    u = [torch.zeros_like(p) for p in params]
    shadow = None
    ref.train()
    perm = None
    for t in range(3):
        if t % 2 == 0:
            perm = torch.randperm(8, generator=g)
        idx = perm[(t % 2) * 4:(t % 2) * 4 + 4]
        grads = [torch.zeros_like(p) for p in params]
        for half in (idx[:2], idx[2:]):  # micro-batches of 2: each contributes its mean loss × 2/4
            y = ref.training_batch(train.x[half], g).double()
            z, logdet, features = ref._train_latent(y, g)
            nll = -(logdet + (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(1)).mean()
            ce = torch.nn.functional.cross_entropy(ref.classifier(features), train.y[half])
            loss = (nll + ce) / math.log(2) * 0.5
            for i, gr in enumerate(torch.autograd.grad(loss, params, allow_unused=True)):
                if gr is not None:
                    grads[i] += gr
        lr = ref.config.lr * min(1.0, t * 4 / (8 * 1.0))
        with torch.no_grad():
            for i, (p, gr) in enumerate(zip(params, grads)):
                m[i] = 0.9 * m[i] + 0.1 * gr
                u[i] = torch.maximum(beta2 * u[i], gr.abs())
                p -= lr * math.sqrt(1 - beta2 ** (t + 1)) / (1 - 0.9 ** (t + 1)) * m[i] / (u[i] + 1e-8)
        shadow = [p.detach().clone() for p in params] if shadow is None else \
            [beta2 * s + (1 - beta2) * p.detach() for s, p in zip(shadow, params)]
    for (name, a), b in zip(ours.named_parameters(), shadow):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9), name


def test_flow_paper_recipes_follow_their_references():
    cifar = DataInfo(CIFAR, 10, hflip=True)
    res = MODELS.get("resflow").recipe(Scale.paper, cifar)
    assert (res.beta2, res.ema, res.sn_tol, res.warmup_iters, res.max_grad_norm) == (0.99, 0.999, 1e-3, 1000, 1.0)
    assert res.normalize_mean == (0.4914, 0.4822, 0.4465) and not res.value_warp
    assert (res.augment.pad, res.augment.pad_mode, res.augment.flip) == (4, "reflect", True)
    model = MODELS.get("resflow")(dataclasses.replace(res, blocks=(1, 1, 1), hidden=4, fc_blocks=1, fc_hidden=4),
                                  cifar)
    first = model.stages[0].layers
    assert isinstance(first[0], ActNorm) and first[0].min_var == 0.2  # an actnorm before the first block
    assert isinstance(model.pre.layers[0], Normalize)
    assert all(any(isinstance(m, ActNorm) for m in head.modules()) for head in model.classifier.heads)
    hyb = MODELS.get("glow_hybrid").recipe(Scale.paper, cifar)
    assert (hyb.batch_size, hyb.micro_batch_size, hyb.optimizer, hyb.polyak_epochs) == (512, 256, "adamax", 1.0)
    assert (hyb.warmup_epochs, hyb.max_grad_norm, hyb.augment.pad, hyb.augment.pad_mode) == (10.0, 0.0, 3, "replicate")
    assert MODELS.get("resflow").recipe(Scale.paper, DataInfo(MNIST, 10)).logit_alpha == 1e-6


def test_flow_deviations_per_scale():
    res = MODELS.get("resflow")
    model = build("resflow", perturb=False)  # deviations read only the config and the data shape
    model.config = res.recipe(Scale.paper, model.data_info)
    assert model.deviations(Scale.paper) == []
    model.config = res.recipe(Scale.small, model.data_info)
    lines = model.deviations(Scale.small)
    assert any(line.startswith("ema=0 (paper: 0.999)") for line in lines)
    glow = MODELS.get("glow_hybrid")
    info = DataInfo((3, 8, 8), 10, hflip=True)
    g = glow(dataclasses.replace(glow.recipe(Scale.paper, info), steps_per_level=1, hidden=4), info)
    paper_lines = g.deviations(Scale.paper)
    assert "steps_per_level=1 (paper: 32)" in paper_lines[0] and any("Polyak" in x for x in paper_lines)
    assert any("ycond" in x for x in paper_lines)


def test_resflow_fit_stops_at_max_steps():
    d = _digits()
    model = build("resflow", dtype=torch.float32, perturb=False)
    stats_ = model.fit(Split(d.train.x[:256], d.train.y[:256]), TrainContext(torch.device("cpu"), 0, no_progress,
                                                                            max_steps=2))
    assert stats_["steps"] == 2 and stats_["epochs"] == 0.5  # 4 batches of 64 per epoch


def test_classifier_input_dequantizes_each_pixel_within_its_bin_reproducibly():
    """Residual Flows' test transform (train_img.py's add_noise): y = (255·x + u)/256, u ~ U[0, 1), fresh per
    pixel; here seeded by the batch's bytes, so the same images give the same y and other images other noise."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 1, 8, 8), generator=g).float() / 255.0
    x[0] = 0.0  # a constant image and the extreme values (the bins' edges) are kept in their bins too
    x[1] = 1.0
    y = classifier_input(x, dequantized=True)
    assert torch.equal(y, classifier_input(x.clone(), dequantized=True))
    assert torch.equal(torch.floor(y * 256), torch.round(x * 255))  # every value stays in its pixel's bin
    u = (y * 256 - torch.round(x * 255)).flatten().numpy()
    assert stats.kstest(u, "uniform").pvalue > 1e-3  # and is uniform within it
    assert not torch.equal(classifier_input(x.flip(0), dequantized=True).flip(0), y)  # the noise follows the batch
    assert torch.equal(classifier_input(x, dequantized=False), (x * 255 + 0.5) / 256)
    assert classifier_input(x.double(), dequantized=True).dtype == torch.float64


@pytest.mark.parametrize("name", ["glow_hybrid", "resflow"])
def test_hybrid_flows_classify_dequantized_test_images_as_their_reference(name):
    """logits and features read the latent of `classifier_input` (dequantized, or the bin centres when
    ``eval_dequantize`` is off, which the record lists as a deviation)."""
    small = {"glow_hybrid": dict(levels=2, steps_per_level=1, hidden=4, classifier_hidden=4),
             "resflow": dict(blocks=(1, 1), hidden=4, fc_blocks=1, fc_hidden=4, classifier_hidden=4)}[name]
    model, info = _cifar_like(name, **small)
    model.eval()
    assert model.config.eval_dequantize  # the paper recipe's, as train_img.py
    x = torch.randint(0, 256, (6, *info.shape), generator=torch.Generator().manual_seed(1)).double() / 255.0
    with torch.no_grad():
        logits = model.logits(x)
        assert torch.equal(logits, model.logits(x))
        assert torch.allclose(model.classifier.linear(model.features(x)), logits)
        centres = dataclasses.replace(model.config, eval_dequantize=False)
        ref = type(model)(centres, info).double().eval()
        ref.load_state_dict(model.state_dict())
        assert not torch.allclose(ref.logits(x), logits)
        y = (x * 255 + 0.5) / 256
        latent = ref._features(y)[2] if name == "glow_hybrid" else ref._run(y, "none", None, 0)[2]
        assert torch.allclose(ref.logits(x), ref.classifier(latent))
    assert any("bin centres" in d for d in ref.deviations(Scale.paper))


@pytest.mark.parametrize("batch_size, polyak_epochs, fails", [(8, 1.0, True), (16, 1.0, True), (4, 0.5, True),
                                                              (4, 1.0, False), (8, 0.0, False)])
def test_glow_refuses_a_one_step_epoch_whose_adamax_beta2_is_zero(batch_size, polyak_epochs, fails):
    """openai/glow's β2 = 1 − 1/(steps per epoch · polyak_epochs): at one step (or less) it is 0 and Adamax divides
    the momentum by the latest gradient (the paper smoke at batch 256 on 200 images diverged at its third step);
    bench stops before training with what to change. polyak_epochs 0 (no average, β2 0.999) is unaffected."""
    model, _ = _cifar_like("glow", levels=2, steps_per_level=1, hidden=4, batch_size=batch_size, micro_batch_size=0,
                           polyak_epochs=polyak_epochs)
    ctx = TrainContext(torch.device("cpu"), 0, no_progress, max_steps=1)
    if fails:
        with pytest.raises(UserError, match="lower opts.batch_size"):
            model.fit(_train_set(8), ctx)
    else:
        assert model.fit(_train_set(8), ctx)["steps"] == 1

"""dcgan and sngan: shapes per dataset, paper settings, deterministic sampling, spectral normalization that
holds after training, and failures that surface instead of garbage."""

import copy
import dataclasses

import pytest
import torch

from bench.capabilities import capabilities_of
from bench.config import load_config
from bench.data import load_dataset
from bench.data.base import Split
from bench.errors import ModelFailure, NonFiniteError
from bench.models.base import DataInfo, TrainContext, no_progress
from bench.models.dcgan import DCGAN, plan_stages
from bench.models.sngan import SNGAN, spectrally_normalized
from bench.runner import run
from bench.scales import Scale

DIGITS = DataInfo((1, 8, 8), 10)
SHAPES = [DataInfo((1, 8, 8), 10), DataInfo((1, 28, 28), 10), DataInfo((3, 32, 32), 10)]
CPU = TrainContext(torch.device("cpu"), 0, no_progress)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _tiny(cls, info=DIGITS, **changes):
    torch.manual_seed(0)
    return cls(dataclasses.replace(cls.recipe(Scale.tiny, info), **changes), info)


def largest_singular_value(weight: torch.Tensor) -> float:
    """SVD of the weight reshaped to out × (in·k·k), the matrix torch's spectral_norm normalizes."""
    return torch.linalg.svdvals(weight.detach().reshape(weight.shape[0], -1).double())[0].item()


@pytest.mark.parametrize("info", SHAPES, ids=lambda i: "x".join(map(str, i.shape)))
@pytest.mark.parametrize("cls,arch", [(DCGAN, None), (SNGAN, "cnn"), (SNGAN, "resnet")])
def test_generator_and_discriminator_adapt_to_the_data_shape(cls, arch, info):
    changes = {"arch": arch, "g_channels": 8, "d_channels": 8} if arch else {}
    m = _tiny(cls, info, **changes).eval()
    z = torch.randn(3, m.config.latent_dim)
    x = m.G(z)
    assert x.shape == (3, *info.shape)
    assert x.abs().max() <= 1.0  # tanh output, mapped to [0, 255] by sample()
    assert m.D(x).shape == (3,)


def test_stage_plan_reaches_the_image_size():
    for size in (8, 16, 28, 32, 64):
        start, stages = plan_stages((1, size, size))
        assert start * 2 ** stages == size and (start <= 4 or start % 2 == 1)
    with pytest.raises(ValueError, match="square"):
        plan_stages((1, 8, 16))


def test_paper_recipes_are_the_published_settings():
    cifar = DataInfo((3, 32, 32), 10)
    d = DCGAN.recipe(Scale.paper, cifar)
    assert (d.lr, d.beta1, d.batch_size, d.latent_dim, d.latent_dist) == (2e-4, 0.5, 128, 100, "uniform")
    s = SNGAN.recipe(Scale.paper, cifar)
    assert (s.arch, s.n_dis, s.lr, s.beta1, s.beta2, s.batch_size, s.latent_dim) == \
        ("resnet", 5, 2e-4, 0.0, 0.9, 64, 128)
    assert (s.n_gen_samples, s.lr_decay, s.steps) == (128, "linear", 50_000)  # the released updater's settings
    m = SNGAN(s, cifar)
    # the paper's ResNet discriminator: 4 blocks of 128 channels, a linear output, everything normalized
    assert len(m.D.blocks) == 4 and m.D.out.in_features == 128 and m.D.out.bias is None
    n_weights = sum(1 for mod in m.D.modules() if isinstance(mod, torch.nn.Conv2d | torch.nn.Linear))
    assert len(spectrally_normalized(m.D)) == n_weights


@pytest.mark.parametrize("cls", [DCGAN, SNGAN])
def test_sampling_is_deterministic_given_the_generator(cls):
    m = _tiny(cls)
    a = m.sample(7, torch.Generator().manual_seed(3))
    b = m.sample(7, torch.Generator().manual_seed(3))
    c = m.sample(7, torch.Generator().manual_seed(4))
    assert a.dtype == torch.uint8 and a.shape == (7, 1, 8, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # samples don't depend on how they are batched (batch norm runs on running statistics)
    m.config = dataclasses.replace(m.config, sample_batch_size=2)
    assert torch.equal(m.sample(7, torch.Generator().manual_seed(3)), a)
    assert capabilities_of(m) == ["Sampler"]


@pytest.mark.parametrize("cls", [DCGAN, SNGAN])
def test_sampler_protocol_names_the_latent(cls):
    m = _tiny(cls, latent_dist="normal")
    p = m.sampler_protocol()
    assert p["latent_dim"] == m.config.latent_dim
    assert p["latent_distribution"] == "normal(0,1)" and "truncation" in p
    g = _tiny(cls, latent_dist="uniform").sampler_protocol()
    assert g["latent_distribution"] == "uniform(-1,1)"


def test_sngan_discriminator_is_spectrally_normalized_after_training(digits):
    m = _tiny(SNGAN)
    layers = spectrally_normalized(m.D)
    assert len(layers) == 4  # 3 convolutions and the linear output at 8×8
    m.fit(digits.train, CPU)
    m.eval()
    for name, layer in layers:
        sigma = largest_singular_value(layer.weight)
        assert abs(sigma - 1.0) < 0.05, f"{name}: largest singular value {sigma:.3f}"
    # the check can fail: the raw weights are far from unit norm
    raw = [largest_singular_value(layer.parametrizations.weight.original) for _, layer in layers]
    assert max(abs(s - 1.0) for s in raw) > 0.05


@pytest.mark.parametrize("cls", [DCGAN, SNGAN])
def test_training_reports_steps_and_changes_the_generator(cls, digits):
    m = _tiny(cls)
    before = m.sample(16, torch.Generator().manual_seed(0))
    stats = m.fit(digits.train, CPU)
    assert stats["steps"] == m.config.steps
    assert not torch.equal(m.sample(16, torch.Generator().manual_seed(0)), before)


@pytest.mark.parametrize("cls", [DCGAN, SNGAN])
def test_nonfinite_training_loss_is_a_model_failure(cls, digits):
    m = _tiny(cls, lr=1e30)
    with pytest.raises(ModelFailure, match="diverged"):
        m.fit(digits.train, CPU)


def test_nan_generator_refuses_to_return_samples():
    m = _tiny(DCGAN)
    with torch.no_grad():
        m.G.project.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="non-finite"):
        m.sample(4, torch.Generator().manual_seed(0))


def test_hybrid_suite_gives_gan_records_with_fid(tmp_path):
    outcome = run(load_config(["scale=tiny", "models=[dcgan,sngan]", f"out={tmp_path}"]))
    for record, path in outcome.records:
        assert record.status == "ok", record.reason
        assert record.metrics["fid"].value > 0
        assert record.skipped["accuracy"] == "model has no Classifier"
        assert record.protocol["samples"]["sampler"]["latent_dim"] == record.model_config["latent_dim"]
        assert path.with_suffix(".samples.png").is_file()


# --- SNGAN: one iteration against the released updater's equations (pfnet-research/sngan_projection) --------
def _adam_step(params, grads, state, lr, betas, eps=1e-8):
    """Adam (Kingma & Ba, Alg. 1) written out: m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g²,
    θ ← θ − lr·m̂/(√v̂ + ε) with m̂ = m/(1−β1^t), v̂ = v/(1−β2^t)."""
    b1, b2 = betas
    state["t"] = state.get("t", 0) + 1
    t = state["t"]
    for i, (p, g) in enumerate(zip(params, grads)):
        m, v = state.get(("m", i), torch.zeros_like(p)), state.get(("v", i), torch.zeros_like(p))
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        state[("m", i)], state[("v", i)] = m, v
        with torch.no_grad():
            p -= lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)


def test_sngan_iteration_matches_the_released_updater():
    """update_core: first a generator step on n_gen_samples latents, L_G = −mean D(G(z)); then n_dis
    discriminator steps, each L_D = mean relu(1 − D(x)) + mean relu(1 + D(G(z'))) on a real batch and as many
    fresh fakes; Adam(α, β1 = 0, β2 = 0.9) on each."""
    info = DataInfo((3, 8, 8), 10)
    cfg = dataclasses.replace(SNGAN.recipe(Scale.paper, info), g_channels=8, d_channels=8, latent_dim=4,
                              n_dis=2, batch_size=3, n_gen_samples=6)
    torch.manual_seed(0)
    ours = SNGAN(cfg, info).double().train()
    ref = copy.deepcopy(ours)
    reals = [torch.rand(3, 3, 8, 8, dtype=torch.float64) * 2 - 1 for _ in range(cfg.n_dis)]
    lr = 1e-3
    g_opt = torch.optim.Adam(ours.G.parameters(), lr=lr, betas=(0.0, 0.9))
    d_opt = torch.optim.Adam(ours.D.parameters(), lr=lr, betas=(0.0, 0.9))
    ld, lg = ours.iteration(iter(reals), torch.Generator().manual_seed(4), g_opt, d_opt)

    g = torch.Generator().manual_seed(4)
    gp, dp = list(ref.G.parameters()), list(ref.D.parameters())
    z = torch.randn(6, 4, generator=g).double()
    want_lg = -ref.D(ref.G(z)).mean()
    _adam_step(gp, torch.autograd.grad(want_lg, gp), {}, lr, (0.0, 0.9))
    d_state: dict = {}
    for x in reals:
        z = torch.randn(3, 4, generator=g).double()
        real = ref.D(x)
        with torch.no_grad():
            fake = ref.G(z)
        want_ld = torch.relu(1 - real).mean() + torch.relu(1 + ref.D(fake)).mean()
        _adam_step(dp, torch.autograd.grad(want_ld, dp), d_state, lr, (0.0, 0.9))
    assert lg.item() == pytest.approx(want_lg.item(), rel=1e-9)
    assert ld.item() == pytest.approx(want_ld.item(), rel=1e-9)
    for a, b in zip(ours.state_dict().values(), ref.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-9)  # weights, BN statistics, power-iteration vectors


def test_sngan_learning_rate_decays_linearly_to_zero_and_max_steps_stops_early(digits, monkeypatch):
    m = _tiny(SNGAN, steps=10, lr_decay="linear")
    seen = []
    original = SNGAN.iteration

    def spy(self, reals, g, g_opt, d_opt):
        seen.append((g_opt.param_groups[0]["lr"], d_opt.param_groups[0]["lr"]))
        return original(self, reals, g, g_opt, d_opt)

    monkeypatch.setattr(SNGAN, "iteration", spy)
    stats = m.fit(digits.train, TrainContext(torch.device("cpu"), 0, no_progress, max_steps=4))
    assert stats["steps"] == 4 and len(seen) == 4
    lr = m.config.lr
    assert seen == [pytest.approx((lr * (1 - k / 10), lr * (1 - k / 10))) for k in range(4)]


def test_sngan_reals_are_dequantized_like_the_released_dataset():
    from bench.models.sngan import dequantized_reals
    from bench.models.training import cycle_batches

    x = torch.randint(0, 256, (8, 3, 4, 4), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    batch = next(dequantized_reals(Split(x, torch.zeros(8, dtype=torch.long)), cycle_batches(8, 8, g), g))
    k = torch.floor((batch + 1) * 128)
    assert sorted(k.flatten().tolist()) == sorted(x.float().flatten().tolist())  # x/128 − 1 + U[0, 1/128)
    assert batch.min() >= -1 and batch.max() < 1


def test_sngan_deviations_per_scale():
    cifar = DataInfo((3, 32, 32), 10)
    assert SNGAN(SNGAN.recipe(Scale.paper, cifar), cifar).deviations(Scale.paper) == []
    small = SNGAN(SNGAN.recipe(Scale.small, DIGITS), DIGITS).deviations(Scale.small)
    assert any(line.startswith("arch=cnn (paper: resnet)") for line in small)
    assert any(line.startswith("steps=1500 (paper: 50000)") for line in small)
    assert any(line.startswith("lr_decay=none (paper: linear)") for line in small)

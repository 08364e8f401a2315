"""NCSN: the score networks fit every data shape, denoising score matching is zero exactly at the true
score of the perturbed data, training lowers it, sampling is deterministic and recorded, and a diverging
Langevin step size gives a failed record instead of a crash or a NaN."""

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from bench.config import load_config
from bench.data import load_dataset
from bench.errors import NonFiniteError
from bench.models.base import DataInfo, TrainContext, no_progress
from bench.models.ncsn import NCSN, NCSNConfig
from bench.runner import run
from bench.samplers.annealed_langevin import annealed_langevin
from bench.scales import Scale

INFO = DataInfo((1, 8, 8), 10)


@pytest.fixture(autouse=True)
def _one_thread_seeded():
    """Small convolutions on a shared CPU run faster on one thread; the seed fixes initial weights."""
    torch.manual_seed(0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("arch", ["refinenet", "resnet"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_score_networks_fit_every_data_shape(arch, shape):
    m = NCSN(NCSNConfig(arch=arch, ngf=4, n_res_blocks=1), DataInfo(shape, 10)).eval()
    x = torch.rand(2, *shape)
    s = m.score(x, torch.tensor([0, 9]))
    assert s.shape == x.shape and torch.isfinite(s).all()


class _NoNorm(nn.Module):
    def forward(self, x, level):
        return x


def _reach(m: NCSN, shape) -> int:
    """How far (in pixels, either axis) the convolutions let the score at the image's centre see its input
    (the instance norms, whose statistics span the whole image, replaced by the identity)."""
    for mod in list(m.net.modules()):
        for name in ("norm", "norm1", "norm2"):
            if hasattr(mod, name):
                setattr(mod, name, _NoNorm())
    x = torch.rand(1, *shape, requires_grad=True)
    c = shape[1] // 2
    m.score(x, torch.tensor([0]))[0, 0, c, c].backward()
    ys, xs = torch.nonzero(x.grad[0, 0].abs() > 0, as_tuple=True)
    return int(max((ys - c).abs().max(), (xs - c).abs().max()))


def test_dilated_residual_blocks_widen_the_receptive_field_at_the_same_cost():
    """begin (3×3) + two blocks of two 3×3 convs + end: reach 1 + 2·2·1 + 1 = 6 pixels; with dilations 2
    and 4 the blocks reach 2·(2 + 4) = 12 further, 14 in all, with the same parameters."""
    shape = (1, 33, 33)
    plain = NCSN(NCSNConfig(arch="resnet", ngf=4, n_res_blocks=2), DataInfo(shape, 10))
    wide = NCSN(NCSNConfig(arch="resnet", ngf=4, n_res_blocks=2, dilations=(2, 4)), DataInfo(shape, 10))
    assert _reach(plain, shape) == 6 and _reach(wide, shape) == 14
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in wide.parameters())
    with pytest.raises(ValueError, match="one value >= 1 per residual block"):
        NCSNConfig(arch="resnet", n_res_blocks=2, dilations=(2,))
    with pytest.raises(ValueError, match="one value >= 1 per residual block"):
        NCSNConfig(arch="resnet", n_res_blocks=2, dilations=(0, 2))
    with pytest.raises(ValueError, match=r"below the image's side \(8; "):
        NCSN.configure(Scale.tiny, INFO, {"dilations": [8]})
    assert NCSN.configure(Scale.tiny, INFO, {"dilations": [7]}).dilations == (7,)


class _ExactScore(nn.Module):
    """σ·(score of N(x0, σ² I)) for data that is one image x0: what the network outputs under scale_by_sigma."""

    def __init__(self, x0: torch.Tensor, sigmas: torch.Tensor):
        super().__init__()
        self.x0, self.sigmas = x0, sigmas

    def forward(self, x, level):
        return -(x - self.x0) / self.sigmas[level].view(-1, 1, 1, 1)


def test_denoising_score_matching_vanishes_at_the_true_score():
    """With all data at one point x0, the perturbed data at level i is N(x0, σ_i² I); its exact score makes
    σ·s + z = 0 for every draw, while a zero score leaves ½·E‖z‖² = D/2."""
    m = NCSN(NCSNConfig(arch="resnet", ngf=4, n_res_blocks=1, scale_by_sigma=True), INFO)
    x0 = torch.rand(1, 1, 8, 8)
    x = x0.expand(256, -1, -1, -1)
    m.net = _ExactScore(x0, m.sigmas)
    assert m.dsm_loss(x, torch.Generator().manual_seed(0)).item() == pytest.approx(0.0, abs=1e-8)

    class _Zero(nn.Module):
        def forward(self, x, level):
            return torch.zeros_like(x)

    m.net = _Zero()
    loss = m.dsm_loss(x, torch.Generator().manual_seed(0)).item()
    assert loss == pytest.approx(64 / 2, rel=0.05)


def test_training_lowers_the_denoising_loss():
    d = load_dataset("digits")
    cfg = dataclasses.replace(NCSN.recipe(Scale.tiny, INFO), n_iters=150, batch_size=64)
    m = NCSN(cfg, INFO)
    x = d.test.x[:256].float() / 255
    before = m.dsm_loss(x, torch.Generator().manual_seed(1)).item()
    stats = m.fit(d.train, TrainContext(torch.device("cpu"), 0, no_progress))
    with torch.no_grad():
        after = m.dsm_loss(x, torch.Generator().manual_seed(1)).item()
    assert stats["steps"] == 150
    assert after < 0.7 * before


def test_sampling_is_deterministic_and_fully_recorded():
    m = NCSN(NCSN.recipe(Scale.tiny, INFO), INFO).eval()
    a = m.sample(6, torch.Generator().manual_seed(3))
    b = m.sample(6, torch.Generator().manual_seed(3))
    c = m.sample(6, torch.Generator().manual_seed(4))
    assert a.dtype == torch.uint8 and a.shape == (6, 1, 8, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    p = m.sampler_protocol()["eval"]
    cfg = m.config
    assert p["algorithm"] == "annealed_langevin" and p["steps_per_level"] == cfg.steps_per_level
    assert p["eps"] == cfg.sample_eps and p["denoise"] == cfg.denoise and p["chains"] == "fresh"
    assert p["sigmas"][0] == pytest.approx(cfg.sigma_begin) and p["sigmas"][-1] == pytest.approx(cfg.sigma_end)
    assert len(p["step_sizes"]) == cfg.n_levels


def test_chains_from_the_data_mean_start_at_the_training_mean_plus_first_level_noise():
    """sample_init=data_mean: fit stores the training images' mean (exactly numpy's, in [0, 1]); with no Langevin
    steps and no denoising, the samples are that mean plus σ₁·N(0, I); the start is recorded and saved."""
    d = load_dataset("digits")
    cfg = dataclasses.replace(NCSN.recipe(Scale.tiny, INFO), n_iters=1, sample_init="data_mean",
                              sigma_begin=0.05, sigma_end=0.01, steps_per_level=0, denoise=False)
    m = NCSN(cfg, INFO)
    m.fit(d.train, TrainContext(torch.device("cpu"), 0, no_progress))
    want = d.train.x.numpy().astype("float64").mean(0) / 255.0
    assert torch.allclose(m.data_mean.double(), torch.from_numpy(want), atol=1e-6)
    assert "data_mean" in m.state_dict() and "data_mean" not in NCSN(NCSN.recipe(Scale.tiny, INFO), INFO).state_dict()
    x = m.sample(2000, torch.Generator().manual_seed(0)).float() / 255.0
    inside = (m.data_mean > 0.2) & (m.data_mean < 0.8)  # pixels that clamping to [0, 1] leaves alone
    assert inside.sum() > 20 and torch.allclose(x.mean(0)[inside], m.data_mean[inside], atol=0.005)
    assert x.std(0)[inside].mean().item() == pytest.approx(0.05, rel=0.1)
    assert m.sampler_protocol()["eval"]["init"] == "mean(train images) + sigma_begin * N(0, I)"
    assert NCSN(NCSN.recipe(Scale.tiny, INFO), INFO).sampler_protocol()["eval"]["init"] == "uniform(0,1)"
    with pytest.raises(ValueError, match="sample_init must be one of uniform, data_mean"):
        NCSNConfig(sample_init="prior")


def test_paper_recipe_is_the_published_setting():
    c = NCSN.recipe(Scale.paper, DataInfo((3, 32, 32), 10, hflip=True))
    assert (c.arch, c.ngf, c.scale_by_sigma, c.ema) == ("refinenet", 128, False, 0.0)
    assert (c.sigma_begin, c.sigma_end, c.n_levels) == (1.0, 0.01, 10)
    assert (c.lr, c.batch_size, c.n_iters) == (1e-3, 128, 200_000)
    assert (c.steps_per_level, c.sample_eps, c.denoise, c.langevin_rule) == (100, 2e-5, False, "released")
    assert (c.dilations, c.sample_init) == ((), "uniform")  # undilated RefineNet; chains from U(0, 1)
    assert c.langevin.describe()["init"] == "uniform(0,1)"
    assert c.augment.flip and c.augment.pad == 0 and c.dequantize  # the released CIFAR-10 config: flip only
    # α_1 = ε·σ_1²/σ_L² = 2e-5 · 10^4
    assert c.langevin.describe()["step_sizes"][0] == pytest.approx(0.2)
    assert math.isclose(c.langevin.describe()["step_sizes"][-1], 2e-5)


def test_the_small_recipe_on_mnist_declares_its_dilated_blocks_and_mean_start():
    mnist = DataInfo((1, 28, 28), 10, n_train=60_000)
    m = NCSN(NCSN.recipe(Scale.small, mnist), mnist)
    said = {d.split("=")[0]: d for d in m.deviations(Scale.small)}
    assert said["dilations"].startswith("dilations=(2, 4) (paper: ())") and "receptive field" in said["dilations"]
    assert said["sample_init"].startswith("sample_init=data_mean (paper: uniform)")
    assert "U(0, 1)" in said["sample_init"]
    digits = NCSN(NCSN.recipe(Scale.small, INFO), INFO).deviations(Scale.small)
    assert not [d for d in digits if d.startswith(("dilations", "sample_init"))]  # digits keep their recipe


def test_a_diverging_step_size_raises_non_finite_error():
    cfg = dataclasses.replace(NCSN.recipe(Scale.tiny, INFO), sample_eps=1e38)
    m = NCSN(cfg, INFO).eval()
    with pytest.raises(NonFiniteError, match="non-finite"):
        m.sample(4, torch.Generator().manual_seed(0))


def test_a_diverging_step_size_gives_a_failed_record_not_a_crash(tmp_path):
    cfg = load_config(["scale=tiny", "model=ncsn", "opts.sample_eps=1e38", f"out={tmp_path}"])
    outcome = run(cfg)
    (record, path), = outcome.records
    assert record.status == "failed" and "non-finite" in record.reason
    assert record.metrics == {} and json.loads(path.read_text())["status"] == "failed"


# --- step-level check against the released code's equations (ermongroup/ncsn) ------------------------------
def _paper_like(**changes) -> NCSN:
    """The paper's network and settings, shrunk (ngf 4, 3 levels) so one step runs in milliseconds."""
    cifar = DataInfo((3, 8, 8), 10, hflip=True)
    cfg = dataclasses.replace(NCSN.recipe(Scale.paper, cifar), ngf=4, n_levels=3, **changes)
    m = NCSN(cfg, cifar).eval()
    with torch.no_grad():  # move the norms off their initialization so every term of the network matters
        for mod in m.modules():
            if isinstance(mod, nn.Embedding):
                mod.weight.normal_(1.0, 0.3)
    return m


def test_one_loss_evaluation_matches_the_released_anneal_dsm_loss():
    """anneal_dsm_score_estimation: labels ~ U{0..L−1}, x̃ = x + σ·z, target = −(x̃ − x)/σ²,
    loss = mean_n ½‖s(x̃, i) − target‖²·σ² (anneal_power 2), written out here from the released code's math."""
    m = _paper_like()
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    got = m.dsm_loss(x, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # the same draws, in the released code's order: labels, then noise
    labels = torch.randint(0, 3, (6,), generator=g)
    z = torch.randn(x.shape, generator=g)
    sig = m.sigmas[labels].view(-1, 1, 1, 1)
    perturbed = x + sig * z
    target = -(perturbed - x) / sig**2
    with torch.no_grad():
        s = m.net(perturbed, labels)
    want = (0.5 * ((s - target) ** 2).flatten(1).sum(1) * sig.flatten() ** 2).mean()
    assert torch.allclose(got.detach(), want, rtol=1e-5)


def test_one_sampler_step_per_level_matches_the_released_langevin_update():
    """anneal_Langevin_dynamics: α_i = ε·(σ_i/σ_L)², x ← x + α_i·s(x, i) + √(2α_i)·z; "algorithm1" is the
    paper's printed rule, x ← x + (α_i/2)·s + √α_i·z."""
    m = _paper_like()
    x0 = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    sigmas = m.sigmas.double()
    eps = m.config.sample_eps
    for rule, drift in (("released", 1.0), ("algorithm1", 0.5)):
        got = annealed_langevin(m.score, x0, sigmas, 1, eps, torch.Generator().manual_seed(5), rule=rule)
        g, x = torch.Generator().manual_seed(5), x0.clone()
        with torch.no_grad():
            for i, sigma in enumerate(sigmas.tolist()):
                alpha = eps * (sigma / sigmas[-1].item()) ** 2
                z = torch.randn(x.shape, generator=g)
                x = x + drift * alpha * m.net(x, torch.full((4,), i)) + math.sqrt(2 * drift * alpha) * z
        assert torch.allclose(got, x, atol=1e-6), rule
    assert m.sampler_protocol()["eval"]["rule"] == "released"
    assert "sqrt(2*alpha_i)" in m.sampler_protocol()["eval"]["update"]


def test_instance_norm_plus_uses_the_unbiased_variance_of_the_channel_means():
    from bench.models.ncsn import CondInstanceNormPlus

    norm = CondInstanceNormPlus(5, 2)
    with torch.no_grad():
        norm.embed.weight.normal_(0.0, 1.0)
    x, level = torch.randn(3, 5, 4, 4), torch.tensor([0, 1, 1])
    gamma, alpha, beta = (t[..., None, None] for t in norm.embed(level).chunk(3, dim=1))
    mu = x.mean(dim=(2, 3))
    means = (mu - mu.mean(1, keepdim=True)) / torch.sqrt(mu.var(1, unbiased=True, keepdim=True) + 1e-5)
    h = (x - mu[..., None, None]) / torch.sqrt(x.var(dim=(2, 3), unbiased=False, keepdim=True) + 1e-5)
    want = gamma * (h + means[..., None, None] * alpha) + beta
    assert torch.allclose(norm(x, level), want, atol=1e-5)


def test_refinenet_convolutions_and_pooling_follow_the_released_code():
    """RCU and CRP convolutions have no bias; the CRP's 5×5 average counts the zero padding (nn.AvgPool2d's
    default): a constant map of ones averages to 9/25 in a corner."""
    from bench.models.ncsn import CondCRP, CondRCU

    m = _paper_like()
    rcu_crp = [mod for mod in m.modules() if isinstance(mod, CondRCU | CondCRP)]
    assert rcu_crp and all(conv.bias is None for mod in rcu_crp for conv in mod.convs)
    crp = CondCRP(2, 1, 1)
    with torch.no_grad():
        crp.norms[0].embed.weight.copy_(torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 1.0]]))  # γ = α = 0, β = 1
        crp.convs[0].weight.zero_()
        crp.convs[0].weight[:, :, 1, 1] = torch.eye(2)  # identity convolution
    out = crp(torch.full((1, 2, 6, 6), -5.0), torch.tensor([0]))  # ELU(−5) + pooled ones
    assert out[0, 0, 0, 0].item() == pytest.approx(math.expm1(-5.0) + 9 / 25, abs=1e-6)
    assert out[0, 0, 2, 2].item() == pytest.approx(math.expm1(-5.0) + 1.0, abs=1e-6)


def test_training_batches_are_dequantized_and_flipped_like_the_released_loader():
    m = _paper_like()
    assert m.config.augment.flip and m.config.augment.pad == 0 and m.config.dequantize
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    y = m.training_batch(x, torch.Generator().manual_seed(0))
    k = torch.floor(y * 256)
    flipped = (k == x.flip(-1).float()).flatten(1).all(1)
    kept = (k == x.float()).flatten(1).all(1)
    assert (flipped | kept).all() and flipped.any() and kept.any()  # every image whole, some mirrored
    assert y.min() >= 0 and y.max() < 1
    assert NCSN.recipe(Scale.paper, INFO).augment.flip is False  # digits: no flip


def test_max_steps_stops_training_early_and_deviations_are_declared():
    d = load_dataset("digits")
    m = NCSN(NCSN.recipe(Scale.tiny, INFO), INFO)
    stats = m.fit(d.train, TrainContext(torch.device("cpu"), 0, no_progress, max_steps=3))
    assert stats["steps"] == 3
    tiny = m.deviations(Scale.tiny)
    assert any(line.startswith("arch=resnet (paper: refinenet)") for line in tiny)
    assert not any(line.startswith("sample_batch_size") for line in tiny)
    paper = NCSN(NCSN.recipe(Scale.paper, DataInfo((3, 32, 32), 10, hflip=True)), DataInfo((3, 32, 32), 10, True))
    assert paper.deviations(Scale.paper) == []
    paper.config = dataclasses.replace(paper.config, langevin_rule="algorithm1")
    assert paper.deviations(Scale.paper) == ["langevin_rule=algorithm1 (paper: released)"]

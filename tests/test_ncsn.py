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


def test_paper_recipe_is_the_published_setting():
    c = NCSN.recipe(Scale.paper, DataInfo((3, 32, 32), 10))
    assert (c.arch, c.ngf, c.scale_by_sigma, c.ema) == ("refinenet", 128, False, 0.0)
    assert (c.sigma_begin, c.sigma_end, c.n_levels) == (1.0, 0.01, 10)
    assert (c.lr, c.batch_size, c.n_iters) == (1e-3, 128, 200_000)
    assert (c.steps_per_level, c.sample_eps, c.denoise) == (100, 2e-5, False)
    # α_1 = ε·σ_1²/σ_L² = 2e-5 · 10^4
    assert c.langevin.describe()["step_sizes"][0] == pytest.approx(0.2)
    assert math.isclose(c.langevin.describe()["step_sizes"][-1], 2e-5)


def test_a_diverging_step_size_raises_non_finite_error():
    cfg = dataclasses.replace(NCSN.recipe(Scale.tiny, INFO), sample_eps=1e38)
    m = NCSN(cfg, INFO).eval()
    with pytest.raises(NonFiniteError, match="non-finite"):
        m.sample(4, torch.Generator().manual_seed(0))


def test_a_diverging_step_size_gives_a_failed_record_not_a_crash(tmp_path):
    cfg = load_config(["scale=tiny", "model=ncsn", "opts.sample_eps=1e38", f"out={tmp_path}"])
    outcome = run(cfg)
    (record, path), = outcome.records
    assert record["status"] == "failed" and "non-finite" in record["reason"]
    assert record["metrics"] == {} and json.loads(path.read_text())["status"] == "failed"

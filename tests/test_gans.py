"""dcgan and sngan: shapes per dataset, paper settings, deterministic sampling, spectral normalization that
holds after training, and failures that surface instead of garbage."""

import dataclasses

import pytest
import torch

from bench.capabilities import capabilities_of
from bench.config import load_config
from bench.data import load_dataset
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
    m = SNGAN(s, cifar)
    # the paper's ResNet discriminator: 4 blocks of 128 channels, a linear output, everything normalized
    assert len(m.D.blocks) == 4 and m.D.out.in_features == 128
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
        assert record["status"] == "ok", record.get("reason")
        assert record["metrics"]["fid"]["value"] > 0
        assert record["skipped"]["accuracy"] == "model has no Classifier"
        assert record["protocol"]["samples"]["sampler"]["latent_dim"] == record["model_config"]["latent_dim"]
        assert path.with_suffix(".samples.png").is_file()

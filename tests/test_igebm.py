"""igebm: honest capabilities per variant, energies and logits that agree, IGEBM's Langevin step, spectral
normalization after training, and failures that surface."""

import dataclasses
import math

import pytest
import torch

from bench.capabilities import Classifier, capabilities_of
from bench.config import load_config
from bench.data import load_dataset
from bench.errors import ModelFailure, NonFiniteError, UserError
from bench.models import MODELS
from bench.models.base import DataInfo, TrainContext, no_progress
from bench.models.igebm import IGEBM, UnconditionalIGEBM, _ClipGrad
from bench.models.sngan import spectrally_normalized
from bench.runner import run
from bench.scales import Scale

DIGITS = DataInfo((1, 8, 8), 10)
CPU = TrainContext(torch.device("cpu"), 0, no_progress)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _tiny(info=DIGITS, **changes):
    torch.manual_seed(0)
    return IGEBM(dataclasses.replace(IGEBM.recipe(Scale.tiny, info), **changes), info)


def _with_random_buffer(m):
    m.replay_buffer.uniform_(-1, 1)
    return m


def test_conditional_is_the_default_and_classifies():
    m = _tiny()
    assert MODELS.get("igebm") is IGEBM and m.config.conditional
    assert capabilities_of(m) == ["Classifier", "Energy", "Sampler"]


def test_unconditional_variant_has_no_classifier():
    m = _tiny(conditional=False)
    assert type(m) is UnconditionalIGEBM and not hasattr(m, "logits")
    assert not isinstance(m, Classifier)
    assert capabilities_of(m) == ["Energy", "Sampler"]
    assert m.energy(torch.rand(3, 1, 8, 8)).shape == (3,)
    # the same options through the CLI path give the same class
    cfg = MODELS.get("igebm").configure(Scale.tiny, DIGITS, {"conditional": False})
    assert type(MODELS.get("igebm")(cfg, DIGITS)) is UnconditionalIGEBM


def test_logits_are_minus_energies_over_labels_and_energy_is_their_logsumexp():
    m = _tiny().eval()
    with torch.no_grad():  # give the labels different gains and biases, as training would
        for mod in m.modules():
            if isinstance(mod, torch.nn.Embedding):
                mod.weight.normal_(0, 0.5)
    x = torch.rand(4, 1, 8, 8)
    logits = m.logits(x)
    one_at_a_time = torch.stack([-m.net(x, torch.full((4,), y)) for y in range(10)], dim=1)
    assert torch.allclose(logits, one_at_a_time, atol=1e-5)
    assert logits.std(dim=1).min() > 0  # the label matters
    assert torch.allclose(m.energy(x), -torch.logsumexp(logits, dim=1), atol=1e-5)


def test_clip_grad_is_identity_forward_and_clips_backward():
    x = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    y = _ClipGrad.apply(x, 0.01)
    assert torch.equal(y, x)
    (g,) = torch.autograd.grad((y * torch.tensor([5.0, -0.005, -3.0])).sum(), x)
    assert torch.allclose(g, torch.tensor([0.01, -0.005, -0.01]))


def test_langevin_follows_igebm_step_and_stays_in_the_box():
    m = _tiny(sgld_noise=0.0, grad_clip=0.01, sgld_step_size=10.0).eval()
    x0 = torch.rand(5, 1, 8, 8)
    y = torch.arange(5)
    x1 = m._langevin(x0.clone(), y, 1, torch.Generator().manual_seed(0))
    xr = x0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(m.net(xr, y).sum(), xr)
    assert torch.allclose(x1, (x0 - 10.0 * grad.clamp(-0.01, 0.01)).clamp(0, 1), atol=1e-6)
    noisy = _tiny(sgld_noise=5.0).eval()._langevin(x0.clone(), y, 3, torch.Generator().manual_seed(0))
    assert noisy.min() >= 0 and noisy.max() <= 1 and ((noisy == 0) | (noisy == 1)).any()


def test_sampling_is_deterministic_given_the_generator():
    m = _with_random_buffer(_tiny()).eval()
    a = m.sample(20, torch.Generator().manual_seed(3))
    assert a.dtype == torch.uint8 and a.shape == (20, 1, 8, 8)
    assert torch.equal(a, m.sample(20, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, m.sample(20, torch.Generator().manual_seed(4)))
    fresh = dataclasses.replace(m.config, sample_source="fresh")
    m.config = fresh
    assert m.sample(6, torch.Generator().manual_seed(0)).shape == (6, 1, 8, 8)


def test_buffer_layouts(digits):
    shared, per_class = _tiny(), _tiny(buffer_layout="per_class")
    assert shared.sampler_protocol()["eval"]["labels"] == "balanced over classes"
    assert per_class.sampler_protocol()["eval"]["labels"] == "the chain's buffer segment"
    per_class.fit(digits.train, CPU)
    assert per_class.sample(10, torch.Generator().manual_seed(0)).shape == (10, 1, 8, 8)
    # only the per-class layout needs the buffer to split evenly
    assert _tiny(buffer_size=55).config.buffer_size == 55
    with pytest.raises(UserError, match="multiple of the number of classes"):
        _tiny(buffer_size=55, buffer_layout="per_class")
    with pytest.raises(ValueError, match="buffer_layout"):
        _tiny(buffer_layout="nope")


def test_sampler_protocol_records_every_setting():
    m = _tiny()
    p = m.sampler_protocol()
    for phase in ("train", "eval"):
        for key in ("n_steps", "step_size", "noise", "grad_clip", "buffer_size"):
            assert key in p[phase], (phase, key)
    assert p["train"]["reinit_freq"] == m.config.reinit_freq
    assert p["eval"]["source"] == "replay_buffer" and p["eval"]["n_steps"] == m.config.sample_steps


def test_paper_recipe_is_du_and_mordatchs_setting():
    c = IGEBM.recipe(Scale.paper, DataInfo((3, 32, 32), 10))
    assert (c.sgld_steps, c.sgld_step_size, c.sgld_noise) == (60, 10.0, 0.005)
    assert (c.buffer_size, c.reinit_freq) == (10000, 0.05)
    assert (c.l2_weight, c.grad_clip, c.batch_size, c.beta1, c.conditional) == (1.0, 0.01, 128, 0.0, True)
    m = IGEBM(c, DataInfo((3, 32, 32), 10))
    # a stem and 6 residual blocks; every convolution normalized, the linear output not
    convs = [mod for mod in m.net.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert len(m.net.blocks) == 6 and len(spectrally_normalized(m.net)) == len(convs)
    assert m.net(torch.rand(2, 3, 32, 32), torch.tensor([0, 9])).shape == (2,)


def test_training_normalizes_the_energy_net_and_it_classifies(digits):
    m = _tiny()
    stats = m.fit(digits.train, CPU)
    assert stats["steps"] == math.ceil(len(digits.train) / m.config.batch_size)
    assert not torch.equal(m.replay_buffer, torch.zeros_like(m.replay_buffer))
    layers = spectrally_normalized(m.net)
    for name, layer in layers:
        w = layer.weight.detach()
        sigma = torch.linalg.svdvals(w.reshape(w.shape[0], -1).double())[0].item()
        assert abs(sigma - 1.0) < 0.05, f"{name}: largest singular value {sigma:.3f}"
    raw = [torch.linalg.svdvals(layer.parametrizations.weight.original.detach().reshape(
        layer.weight.shape[0], -1).double())[0].item() for _, layer in layers]
    assert max(abs(s - 1.0) for s in raw) > 0.05  # the check can fail
    with torch.no_grad():
        logits = m.logits(digits.test.x[:50].float() / 255)
    assert logits.shape == (50, 10) and torch.isfinite(logits).all()


def test_nonfinite_training_loss_is_a_model_failure(digits):
    with pytest.raises(ModelFailure, match="diverged"):
        _tiny(sgld_noise=float("nan")).fit(digits.train, CPU)


def test_diverging_sampler_raises_instead_of_returning_garbage():
    m = _with_random_buffer(_tiny(sgld_noise=float("nan"))).eval()
    with pytest.raises(NonFiniteError, match="non-finite"):
        m.sample(4, torch.Generator().manual_seed(0))


def test_hybrid_suite_reports_accuracy_for_the_conditional_model(tmp_path):
    outcome = run(load_config(["scale=tiny", "model=igebm", f"out={tmp_path}"]))
    (record, _), = outcome.records
    assert record["status"] == "ok", record.get("reason")
    assert 0 <= record["metrics"]["accuracy"]["value"] <= 100 and record["metrics"]["fid"]["value"] > 0
    assert record["protocol"]["samples"]["sampler"]["eval"]["n_steps"] == record["model_config"]["sample_steps"]

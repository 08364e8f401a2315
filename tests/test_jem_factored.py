"""jem_factored: the class-conditional energy, JEM's per-class replay buffer, the p(x|y) objective's
settings, deterministic class-conditional sampling, and failures that surface."""

import dataclasses

import pytest
import torch

from bench.capabilities import capabilities_of
from bench.config import load_config
from bench.data import load_dataset
from bench.errors import ModelFailure, NonFiniteError, UserError
from bench.models.base import DataInfo, TrainContext, no_progress
from bench.models.jem import JEM
from bench.models.jem_factored import ClassConditionalBuffer, JEMFactored, JEMFactoredConfig
from bench.runner import run
from bench.samplers.sgld import sgld
from bench.scales import Scale

DIGITS = DataInfo((1, 8, 8), 10)
CPU = TrainContext(torch.device("cpu"), 0, no_progress)


def _tiny(**changes):
    torch.manual_seed(0)
    m = JEMFactored(dataclasses.replace(JEMFactored.recipe(Scale.tiny, DIGITS), **changes), DIGITS)
    m.replay_buffer.uniform_(-1, 1)
    return m.eval()


def test_capabilities_and_energies():
    m = _tiny()
    assert capabilities_of(m) == ["Classifier", "Energy", "Sampler", "Features"]
    x = torch.rand(5, 1, 8, 8)
    logits = m.logits(x)
    assert torch.allclose(m.energy(x), -torch.logsumexp(logits, dim=1))
    y = torch.tensor([0, 3, 9, 3, 1])
    assert torch.allclose(m._class_energy(2 * x - 1, y), -logits[torch.arange(5), y])


def test_per_class_buffer_draws_from_the_labels_segments():
    g = torch.Generator().manual_seed(0)
    data = torch.arange(40.0).view(40, 1, 1, 1) / 100 + 2.0  # every chain outside [-1, 1], tagged by its index
    buf = ClassConditionalBuffer(data, 4)
    y = torch.randint(0, 4, (5000,), generator=g)
    x, idx = buf.draw_for(y, 0.05, g)
    assert torch.equal(buf.labels(idx), y)
    kept = x.flatten() > 1.5
    assert torch.equal(((x.flatten()[kept] - 2.0) * 100).round().long(), idx[kept])  # the chain drawn is the slot
    assert 0.04 < 1 - kept.float().mean().item() < 0.06  # reinit fraction
    with pytest.raises(UserError, match="multiple of the number of classes"):
        ClassConditionalBuffer(torch.zeros(41, 1, 1, 1), 4)
    with pytest.raises(UserError, match="opts.buffer_size"):
        JEMFactored(dataclasses.replace(JEMFactored.recipe(Scale.tiny, DIGITS), buffer_size=55), DIGITS)


def test_class_gaussian_restarts_come_from_the_labels_own_gaussian():
    from bench.samplers.sgld import ClassGaussians

    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([-0.6, -0.2, 0.2, 0.6])
    z = (centres[torch.arange(400) % 4] + 0.01 * torch.randn(400, generator=g)).view(400, 1, 1, 1)
    gauss = ClassGaussians.fit(z, torch.arange(400) % 4, 4)
    buf = ClassConditionalBuffer(torch.full((40, 1, 1, 1), 5.0), 4, gauss)
    y = torch.randint(0, 4, (4000,), generator=g)
    x, _ = buf.draw_for(y, 0.5, g)
    fresh = x.flatten() < 5
    assert 0.45 < fresh.float().mean().item() < 0.55
    assert (x.flatten()[fresh] - centres[y[fresh]]).abs().max() < 0.06  # each restart at its label's centre


def test_recipes_split_the_buffer_evenly():
    for n_classes in (10, 100, 7):
        info = DataInfo((3, 32, 32), n_classes)
        for scale in Scale:
            assert JEMFactored.recipe(scale, info).buffer_size % n_classes == 0


def test_paper_recipe_is_jems_setting_with_the_factored_objective():
    c = JEMFactored.recipe(Scale.paper, DataInfo((3, 32, 32), 10))
    j = JEM.recipe(Scale.paper, DataInfo((3, 32, 32), 10))
    assert (c.px_weight, c.pyx_weight, c.pxy_weight) == (0.0, 0.0, 1.0)
    same = ("depth", "width", "lr", "batch_size", "sgld_steps", "sgld_step_size", "sgld_noise", "buffer_size",
            "reinit_freq", "data_noise")
    assert all(getattr(c, k) == getattr(j, k) for k in same)
    with pytest.raises(ValueError, match="px_weight belongs to model=jem"):
        JEMFactoredConfig(px_weight=1.0)


def test_conditional_sgld_follows_the_class_energy():
    m = _tiny()
    z = torch.rand(4, 1, 8, 8) * 2 - 1
    y = torch.tensor([1, 2, 3, 4])
    got = m._conditional_sgld(z, y, 2, torch.Generator().manual_seed(5))
    manual = sgld(lambda v: -m._net_logits(v)[torch.arange(4), y], z, 2, m.config.sgld_step_size,
                  m.config.sgld_noise, torch.Generator().manual_seed(5))
    assert torch.allclose(got, manual)
    other = m._conditional_sgld(z, (y + 1) % 10, 2, torch.Generator().manual_seed(5))
    assert not torch.allclose(got, other)  # the label steers the chain


def test_sampling_is_deterministic_and_labels_come_from_the_buffer():
    m = _tiny()
    a = m.sample(20, torch.Generator().manual_seed(3))
    assert a.dtype == torch.uint8 and a.shape == (20, 1, 8, 8)
    assert torch.equal(a, m.sample(20, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, m.sample(20, torch.Generator().manual_seed(4)))
    p = m.sampler_protocol()
    assert p["eval"]["conditional"] and p["eval"]["labels"] == "the chain's buffer segment"
    assert p["train"]["n_steps"] == m.config.sgld_steps and p["train"]["buffer_size"] == m.config.buffer_size


def test_training_runs_and_fills_the_buffer():
    d = load_dataset("digits")
    m = _tiny()
    m.replay_buffer.zero_()
    stats = m.fit(d.train, CPU)
    assert stats["steps"] > 0
    assert not torch.equal(m.replay_buffer, torch.zeros_like(m.replay_buffer))


def test_nonfinite_training_loss_is_a_model_failure():
    d = load_dataset("digits")
    with pytest.raises(ModelFailure, match="diverged"):
        _tiny(sgld_noise=float("inf")).fit(d.train, CPU)


def test_diverging_sampler_raises_instead_of_returning_garbage():
    with pytest.raises(NonFiniteError, match="non-finite"):
        _tiny(sgld_noise=float("inf")).sample(4, torch.Generator().manual_seed(0))


def test_hybrid_suite_reports_accuracy(tmp_path):
    outcome = run(load_config(["scale=tiny", "model=jem_factored", f"out={tmp_path}"]))
    (record, _), = outcome.records
    assert record.status == "ok", record.reason
    assert 0 <= record.metrics["accuracy"].value <= 100 and record.metrics["fid"].value > 0
    assert record.protocol["samples"]["sampler"]["eval"]["conditional"] is True

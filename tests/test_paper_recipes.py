"""The paper recipes of jem, jem_factored and wrn are JEM's released settings, and every other recipe (and
every opts. change) declares how it departs from them; the test-time noise is the reference's σ = 0.03,
drawn reproducibly."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench.data.augment import NONE, reference_augment
from bench.models.base import DataInfo, recipe_differences
from bench.models.jem import FRESH_ROUNDS_DEVIATIONS, JEM
from bench.models.jem_factored import JEMFactored
from bench.models.wrn import WRN, add_input_noise
from bench.scales import Scale

CIFAR = DataInfo((3, 32, 32), 10, hflip=True)
SVHN_LIKE = DataInfo((3, 32, 32), 10, hflip=False)


@pytest.mark.parametrize("cls", [JEM, JEMFactored, WRN])
def test_paper_recipes_follow_train_wrn_ebm_py(cls):
    c = cls.recipe(Scale.paper, CIFAR)
    assert (c.depth, c.width, c.epochs, c.batch_size, c.lr, c.warmup_iters) == (28, 10, 200, 64, 1e-4, 1000)
    assert (c.decay_epochs, c.decay_rate, c.data_noise) == ((160, 180), 0.3, 0.03)
    assert c.augment == reference_augment(True) and cls.recipe(Scale.paper, SVHN_LIKE).augment.flip is False
    assert (c.valid_size, c.eval_noise, c.divergence_threshold) == (5000, 0.03, 1e8)
    for scale in (Scale.tiny, Scale.small):  # the CPU recipes keep their measured settings
        s = cls.recipe(scale, CIFAR)
        # wrn's small recipe on colour images past 16×16 crops and flips: the CIFAR-10 JPEG copy's 8,000
        # training images overfit without them (bench.models.wrn)
        crops = cls is WRN and scale == Scale.small
        assert (s.augment, s.valid_size, s.eval_noise) == (reference_augment(True) if crops else NONE, 0, 0.0)
    if cls is not WRN:
        assert (c.sgld_steps, c.sgld_step_size, c.sgld_noise, c.reinit_freq) == (20, 1.0, 0.01, 0.05)
        assert c.sample_source == "fresh_rounds" and cls.recipe(Scale.small, CIFAR).sample_source == "replay_buffer"
    else:
        assert (c.norm, c.bn_momentum) == ("batch", 0.9) and WRN.recipe(Scale.small, CIFAR).bn_momentum == 0.1


def _deviations(cls, scale, info=CIFAR, **opts):
    config = dataclasses.replace(cls.recipe(scale, info), **opts)
    small = dataclasses.replace(config, depth=10, width=1, buffer_size=10) if cls is not WRN else \
        dataclasses.replace(config, depth=10, width=1)
    m = cls(small, info)  # a small network: deviations read the config, so give them the real one
    m.config = config
    return m.deviations(scale)


def test_paper_deviations_are_the_kept_decisions_only():
    assert _deviations(JEM, Scale.paper) == list(FRESH_ROUNDS_DEVIATIONS)
    factored = _deviations(JEMFactored, Scale.paper)
    assert "unconditional" in factored[0] and factored[1:] == list(FRESH_ROUNDS_DEVIATIONS)
    (wrn,) = _deviations(WRN, Scale.paper)
    assert "95.8%" in wrn and "Wide-ResNet paper" in wrn
    # an opts. change to the paper recipe is a deviation too
    assert "sample_source=replay_buffer (paper: fresh_rounds)" in " ".join(
        _deviations(JEM, Scale.paper, sample_source="replay_buffer"))
    assert _deviations(JEM, Scale.paper, sample_source="replay_buffer")[0].startswith("sample_source=")


@pytest.mark.parametrize("cls", [JEM, JEMFactored, WRN])
def test_cpu_recipes_list_what_they_cut(cls):
    for scale in (Scale.tiny, Scale.small):
        devs = _deviations(cls, scale)
        text = " | ".join(devs)
        cuts = ["depth=10 (paper: 28): ", "epochs=", "valid_size=0 (paper: 5000): ", "eval_noise=0.0 (paper: 0.03): "]
        if not (cls is WRN and scale == Scale.small):  # wrn's small recipe crops and flips colour images
            cuts.append("augment=none (paper: pad 4 (reflect) + random crop, flip)")
        for cut in cuts:
            assert cut in text, (scale, cut, devs)
        assert all("(paper: " in d for d in devs if "=" in d.split(" ")[0])


def test_recipe_differences_names_field_value_paper_value_and_reason():
    a, b = JEM.recipe(Scale.paper, CIFAR), JEM.recipe(Scale.tiny, CIFAR)
    diffs = recipe_differences(b, a, {"epochs": "fast"})
    assert "epochs=1 (paper: 200): fast" in diffs and "width=1 (paper: 10)" in diffs
    assert recipe_differences(a, a) == []


def test_eval_noise_is_sigma_003_and_the_same_in_every_call():
    z = torch.zeros(4, 3, 32, 32)
    a, b = add_input_noise(z, 0.03), add_input_noise(z.clone(), 0.03)
    assert torch.equal(a, b)  # seeded by the batch's content: same images, same noise, in any process
    assert (a - z).std().item() == pytest.approx(0.03, rel=0.03) and abs((a - z).mean().item()) < 0.002
    other = add_input_noise(z + 0.5, 0.03) - 0.5
    assert abs(torch.corrcoef(torch.stack([(a - z).flatten(), other.flatten()]))[0, 1].item()) < 0.05
    torch.manual_seed(0)
    m = WRN(dataclasses.replace(WRN.recipe(Scale.tiny, CIFAR), eval_noise=0.03), CIFAR).eval()
    x = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        noisy, again, clean = m.logits(x), m.logits(x), m._net_logits(2 * x - 1)
        want = m._net_logits(add_input_noise(2 * x - 1, 0.03))
    assert torch.equal(noisy, again) and torch.allclose(noisy, want) and not torch.allclose(noisy, clean)

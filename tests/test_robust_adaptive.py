"""AutoAttack against plain PGD, the adaptive attack's gradient through the SGLD chain against finite
differences, scoring a random defense over draws, the convergence verdict, and bad settings."""

import math

import numpy as np
import pytest
import torch
from test_robustness import _EnergyMLP, mlp, plain_robust_accuracy  # noqa: F401  (mlp is a fixture)

from bench.data import load_dataset
from bench.errors import UserError
from bench.metrics import autoattack, robust_refined
from bench.metrics.robust_refined import audit_verdict, refined_logits, score_over_draws


def test_autoattack_is_at_least_as_strong_as_plain_pgd_at_every_eps(mlp):  # noqa: F811
    net, x, y = mlp
    x, y = x[:30], y[:30]
    grid = [0.1, 0.0, 0.05]
    clean, robust, details = autoattack.autoattack_correct(net, x, y, "linf", grid, seed=0)
    with torch.no_grad():
        assert torch.equal(clean, net(x).argmax(1) == y)
    assert robust[1].equal(clean)  # eps 0: the clean images
    for j, e in enumerate(grid):
        if e > 0:
            ours = 100.0 * robust[j].double().mean().item()
            assert ours <= plain_robust_accuracy(net, x, y, "linf", e, 20) + 1e-9, e
    assert details["after"]["0.05"]["square"] == int(robust[2].sum())  # worst case over all four attacks
    assert robust[0].le(robust[2]).all()  # broken at 0.05: broken at 0.1 (the accumulation)


def test_apgd_ce_agrees_with_plain_pgd(mlp):  # noqa: F811
    """One of AutoAttack's attacks against the plain PGD of test_robustness: APGD-CE alone (100 steps,
    its own step-size schedule) is within a few points of 20-step PGD, and not weaker by more than one."""
    from pyautoattack import AutoAttack

    from bench.metrics.robust import _Logits

    net, x, y = mlp
    aa = AutoAttack(_Logits(net).eval(), norm="Linf", eps=0.05, version="standard", seed=0, device="cpu")
    aa.attacks_to_run = ["apgd-ce"]
    adv, _ = aa.run_standard_evaluation(x, y, batch_size=300)
    assert (adv - x).abs().max() <= 0.05 + 1e-6
    with torch.no_grad():
        apgd = 100.0 * (net(adv).argmax(1) == y).double().mean().item()
    ref = plain_robust_accuracy(net, x, y, "linf", 0.05, 20)
    assert apgd <= ref + 1.0 and ref - apgd <= 5.0, (apgd, ref)


def test_full_gradient_runs_through_the_chain_and_bpda_does_not(mlp):  # noqa: F811
    net, x, _ = mlp
    m = _EnergyMLP(net.double())
    x0 = x[:2].double()
    cfg = {"steps": 3, "step_size": 0.5, "noise": 0.0, "draws": 1}

    def f(v, gradient):
        return refined_logits(m, v, gradient=gradient, **cfg)[:, 0].sum()

    grads = {}
    for gradient in ("full", "bpda"):
        v = x0.clone().requires_grad_(True)
        (grads[gradient],) = torch.autograd.grad(f(v, gradient), v)
    fd = torch.zeros_like(x0)  # central differences of the whole (noise-free) defended logit
    h = 1e-5
    for idx in [(0, 0, 3, 3), (0, 0, 5, 2), (1, 0, 2, 6), (1, 0, 4, 4)]:
        d = torch.zeros_like(x0)
        d[idx] = h
        fd[idx] = (f(x0 + d, "none") - f(x0 - d, "none")) / (2 * h)
        assert grads["full"][idx].item() == pytest.approx(fd[idx].item(), rel=1e-4, abs=1e-7)
    net.float()
    assert not torch.allclose(grads["full"], grads["bpda"], atol=1e-4)  # BPDA is an approximation


def test_each_chain_starts_from_the_input_plus_its_own_noise_as_the_reference(mlp):  # noqa: F811
    """attack_model.py's refined_logits: every duplicated chain starts from z + σ·N(0, I) (its --sigma), then
    refines; with no refinement steps the defense is the mean of the logits at those noisy starts."""
    net, x, _ = mlp
    m = _EnergyMLP(net.double())
    x0 = x[:3].double()
    got = refined_logits(m, x0, steps=0, step_size=1.0, noise=0.0, draws=4, input_noise=0.03, gradient="none",
                         generator=torch.Generator().manual_seed(5))
    z = (2 * x0 - 1).repeat(4, 1, 1, 1)
    z = z + 0.03 * torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=z.dtype)
    want = m.logits((z + 1) / 2).view(4, 3, -1).mean(0)
    quiet = refined_logits(m, x0, steps=0, step_size=1.0, noise=0.0, draws=4, gradient="none")
    alone = m.logits(x0)
    net.float()
    assert torch.allclose(got, want, atol=1e-10)
    assert torch.allclose(quiet, alone, atol=1e-10)  # σ 0: the input itself


def _coin_defense(p_correct):
    """A random defense: each image's class is right with probability p in each draw (from the generator)."""
    def classify(v, g):
        right = torch.rand(len(v), generator=g) < p_correct
        logits = torch.zeros(len(v), 3)
        logits[right, 0] = 1.0
        logits[~right, 1] = 1.0
        return logits
    return classify


def test_scoring_over_draws_reaches_its_target_and_takes_the_worst_case():
    y = torch.zeros(200, dtype=torch.long)
    x = torch.zeros(200, 1, 2, 2)
    advs = {"a": {0.0: x, 0.1: x}, "b": {0.0: x, 0.1: x}}
    res = score_over_draws(_coin_defense(0.9), advs, y, seed=0, min_draws=5, max_draws=500, target=1.0)
    assert 5 <= res["draws"] < 500 and max(res["halfwidth"]) <= 1.0
    # clean: one classification per draw, p = 0.9; at 0.1 the image must also survive both attacks' draws
    assert res["mean"][0] == pytest.approx(90.0, abs=3.0)
    assert res["mean"][1] == pytest.approx(100 * 0.9 ** 3, abs=3.0)
    assert res["per_attack"]["a"][1] == pytest.approx(100 * 0.9 ** 2, abs=3.0)
    capped = score_over_draws(_coin_defense(0.5), advs, y, seed=0, min_draws=2, max_draws=3, target=0.01)
    assert capped["draws"] == 3 and max(capped["halfwidth"]) > 0.01  # the cap wins; the record says so
    again = score_over_draws(_coin_defense(0.5), advs, y, seed=0, min_draws=2, max_draws=3, target=0.01)
    assert np.array_equal(capped["mean"], again["mean"])  # the seed decides the draws


@pytest.mark.parametrize("cells, levelled", [
    ({"steps10_eot1": 50, "steps10_eot5": 40, "steps50_eot1": 40, "steps50_eot5": 39}, True),
    ({"steps10_eot1": 50, "steps10_eot5": 31, "steps50_eot1": 40, "steps50_eot5": 30}, False),  # eot still bites
    ({"steps10_eot1": 50, "steps10_eot5": 45, "steps50_eot1": 39, "steps50_eot5": 39}, False),  # steps still bite
])
def test_audit_verdict(cells, levelled):
    v = audit_verdict(cells, [10, 50], [1, 5], 2.0)
    assert v["levelled_off"] is levelled


def _settings(**refine):
    return {"eps_grid": {"default": {"linf": [0, 0.1], "l2": [0, 1]}}, "refine": refine}


@pytest.mark.parametrize("refine, fragment", [
    ({"attacks": ["pgd_full", "cw"]}, "refine.attacks"),
    ({"attacks": []}, "refine.attacks"),
    ({"draws": {"min": 0}}, "refine.draws.min must be >= 1"),
    ({"draws": {"min": 5, "max": 2}}, "min <= max"),
    ({"draws": {"target_halfwidth": 0}}, "positive target_halfwidth"),
    ({"eot": {"small": -1}}, "refine.eot must be >= 1"),
    ({"attack_steps": 0}, "refine.attack_steps must be >= 1"),
    ({"chains": 0}, "refine.chains must be >= 1"),
    ({"audit": {"steps": [10, 0]}}, r"refine.audit.steps\[1\] must be >= 1"),
    ({"audit": {"eps": {"default": {"linf": 0}}}}, "radius > 0"),
    ({"audit": {"eps": {"default": {"l3": 0.1}}}}, "must name a norm"),
    ({"input_noise": {"linf": -0.1}}, "refine.input_noise linf"),
    ({"input_noise": {"linf": float("nan")}}, "refine.input_noise linf"),
    ({"input_noise": {"l1": 0.03}}, "must name a norm"),
])
def test_bad_refinement_settings_are_user_errors(refine, fragment):
    d = load_dataset("digits")
    with pytest.raises(UserError, match=fragment):
        robust_refined.validate(_settings(**refine), d)


def test_bad_autoattack_settings_and_radii_are_user_errors():
    d = load_dataset("digits")
    with pytest.raises(UserError, match=r"autoattack.eps_grid linf eps 1.5 is beyond"):
        autoattack.validate({**_settings(), "autoattack": {"eps_grid": {"digits": {"linf": [0, 1.5]}}}}, d)
    with pytest.raises(UserError, match=r"refine.eps_grid eps grid \[0.0, 0.1, 0.1\] repeats"):
        autoattack.validate({**_settings(eps_grid={"default": {"l2": [0, 0.1, 0.1]}})}, d)
    with pytest.raises(UserError, match="autoattack.version 'plus' is not supported"):
        autoattack.validate({**_settings(), "autoattack": {"version": "plus"}}, d)
    with pytest.raises(UserError, match="autoattack.n_eval must be a positive integer"):
        autoattack.validate({**_settings(), "autoattack": {"n_eval": {"small": 0}}}, d)
    with pytest.raises(UserError, match="beyond the"):
        autoattack.validate({**_settings(), "eps": [1.5], "_explicit": ("eps",), "norms": ["linf"]}, d)
    with pytest.raises(UserError, match="beyond the"):
        autoattack.validate({**_settings(), "eps": [math.sqrt(64) + 0.1], "_explicit": ("eps",), "norms": ["l2"]}, d)
    autoattack.validate({**_settings(), "eps": [8.0], "_explicit": ("eps",), "norms": ["l2"]}, d)


def test_tables_flag_a_value_whose_audit_did_not_level_off():
    from bench.results.record import MetricEntry
    from bench.results.tables import format_value

    not_level = MetricEntry(40.0, True, stderr=1.0, extra={"levelled_off": False})
    assert format_value(not_level) == "40.00 ± 1.00 (not converged)"
    assert format_value(MetricEntry(40.0, True, extra={"levelled_off": True})) == "40.00"

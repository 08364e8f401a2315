"""Robustness: foolbox PGD against an independent plain-torch PGD at every eps of a grid, eps 0 = clean and
a huge L∞ ball breaks an undefended classifier, invariance to batch size and order, seeds outside the
protocol, the SGLD-refinement defense, and the suite end to end with its errors."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_cli import assert_user_error, bench
from torch import nn

from bench.data import load_dataset
from bench.errors import UserError
from bench.metrics.robust import robust_correct, validate
from bench.metrics.robust_refined import refined_logits


@pytest.fixture(scope="module")
def mlp():
    """A small MLP trained on digits in a second: 90%+ clean accuracy, easy to attack."""
    d = load_dataset("digits")
    x, y = d.train.x.float().div(255).flatten(1), d.train.y.long()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    xt, yt = d.test.x[:300].float().div(255), d.test.y[:300].long()
    return net, xt, yt


def plain_pgd(net, x, y, norm, eps, steps, step):
    """Madry et al.'s PGD without random start, written from the definition (no foolbox)."""
    adv = x.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(net(adv), y), adv)
        with torch.no_grad():
            if norm == "linf":
                adv = adv + step * g.sign()
                adv = torch.min(torch.max(adv, x - eps), x + eps)
            else:
                gn = g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
                adv = adv + step * g / gn
                d = adv - x
                dn = d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                adv = x + d * torch.where(dn > eps, eps / dn.clamp_min(1e-12), torch.ones_like(dn))
            adv = adv.clamp(0, 1)
    return adv.detach()


def plain_robust_accuracy(net, x, y, norm, eps, steps):
    with torch.no_grad():
        clean = net(x).argmax(1) == y
    xs, ys = x[clean], y[clean]
    adv = plain_pgd(net, xs, ys, norm, eps, steps, 2.5 * eps / steps)
    with torch.no_grad():
        survived = (net(adv).argmax(1) == ys).sum().item()
    return 100.0 * survived / len(x)


@pytest.mark.parametrize("norm, eps", [("linf", 0.05), ("linf", 0.1), ("l2", 0.2), ("l2", 0.5)])
def test_foolbox_pgd_matches_plain_torch_pgd(mlp, norm, eps):
    net, x, y = mlp
    _, robust = robust_correct(net, x, y, norm, [eps], steps=20, random_start=False)
    ours = 100.0 * robust[0].double().mean().item()
    ref = plain_robust_accuracy(net, x, y, norm, eps, 20)
    assert abs(ours - ref) <= 1.0, (ours, ref)
    assert 0 < ours < 100 * (net(x).argmax(1) == y).double().mean().item()  # the attack bites, not all


def test_random_start_pgd_agrees_with_plain_pgd_and_a_restart_only_adds_breaks(mlp):
    net, x, y = mlp
    _, one = robust_correct(net, x, y, "linf", [0.1], steps=20, random_start=True, restarts=1, seed=3)
    _, two = robust_correct(net, x, y, "linf", [0.1], steps=20, random_start=True, restarts=2, seed=3)
    ref = plain_robust_accuracy(net, x, y, "linf", 0.1, 20)
    assert abs(100.0 * one[0].double().mean().item() - ref) <= 3.0
    # the second restart attacks only the survivors of the first (same seed, same first restart)
    assert not (two & ~one).any() and two.sum() < one.sum()
    assert ref - 5.0 <= 100.0 * two[0].double().mean().item() <= ref


def test_every_eps_of_a_grid_matches_plain_pgd(mlp):
    """Each eps of an unsorted grid against plain PGD run at that eps alone, image by image: an image is
    robust at eps when it is classified correctly and plain PGD breaks it at no grid radius <= eps."""
    net, x, y = mlp
    grid = [0.3, 0.0, 0.05, 1.0, 0.1]  # unsorted on purpose
    clean, robust = robust_correct(net, x, y, "linf", grid, steps=20, random_start=False)
    with torch.no_grad():
        ref_clean = net(x).argmax(1) == y
    assert torch.equal(clean, ref_clean) and ref_clean.double().mean() > 0.85
    broken = {}
    for e in grid:
        adv = plain_pgd(net, x, y, "linf", e, 20, 2.5 * e / 20) if e > 0 else x
        with torch.no_grad():
            broken[e] = net(adv).argmax(1) != y
    for j, e in enumerate(grid):
        ref = ref_clean & ~torch.stack([broken[f] for f in grid if f <= e]).any(0)
        mismatch = (robust[j] != ref).double().mean().item()
        assert mismatch <= 0.01, (e, mismatch)  # float differences may flip an image at the margin
    assert robust[grid.index(0.0)].equal(ref_clean)  # eps 0 = clean accuracy, exactly
    assert robust[grid.index(1.0)].double().mean() <= 0.05  # the whole input box: undefended is broken


def test_invariant_to_batch_size_and_order(mlp):
    net, x, y = mlp
    _, a = robust_correct(net, x, y, "l2", [0.2, 0.5], steps=10, random_start=False, batch=250)
    _, b = robust_correct(net, x, y, "l2", [0.2, 0.5], steps=10, random_start=False, batch=7)
    assert torch.equal(a, b)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    _, c = robust_correct(net, x[perm], y[perm], "l2", [0.2, 0.5], steps=10, random_start=False, batch=64)
    assert torch.equal(a[:, perm], c)


def test_same_seed_same_result_with_random_start(mlp):
    net, x, y = mlp
    _, a = robust_correct(net, x, y, "linf", [0.1], steps=5, seed=5)
    _, b = robust_correct(net, x, y, "linf", [0.1], steps=5, seed=5)
    assert torch.equal(a, b)


def _robust_ctx(net, seed):
    from types import SimpleNamespace

    from bench.scales import Scale

    model = SimpleNamespace(name="mlp", config=SimpleNamespace(eval_noise=0.0), eval_noise=0.0,
                            parameters=net.parameters, logits=net)
    settings = {"norms": ["linf"], "eps": [0.0, 0.1], "_explicit": ("eps",), "n_eval": 100, "attack_steps": 5}
    return SimpleNamespace(model=model, settings=settings, scale=Scale.tiny, data=load_dataset("digits"),
                           device=torch.device("cpu"), seed=seed)


def test_the_seed_and_sanity_findings_are_beside_the_protocol_not_in_it(mlp):
    from bench.metrics.robust import _compute
    from bench.results.records import fingerprint

    net, _, _ = mlp
    a, b = _compute(_robust_ctx(net, 0)), _compute(_robust_ctx(net, 1))
    assert fingerprint(a.protocol) == fingerprint(b.protocol)
    assert a.draws["robust"]["seed"] != b.draws["robust"]["seed"]
    clean = a.draws["robust"]["sanity"]["linf"]["clean_accuracy"]
    assert a.values["linf.0.accuracy"].value == clean > 85.0
    assert a.draws["robust"]["sanity"]["linf"]["eps0_equals_clean"]
    assert set(a.artifacts) == {"robust.png"} and not a.skipped
    # the per-image outcome goes to autoattack through the runner (ctx.earlier), never into the record
    per_image = a.handed_on["robust_per_image"]["linf"]
    assert set(per_image) == {"0", "0.1"} and per_image["0.1"].dtype == torch.bool and len(per_image["0.1"]) == 100


class _EnergyMLP(nn.Module):
    """A classifier whose energy is −logsumexp of its logits, as JEM's."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def logits(self, x):
        return self.net(x)

    def energy(self, x):
        return -torch.logsumexp(self.net(x), 1)


def test_refinement_with_zero_steps_is_the_plain_classifier_and_bpda_gradient(mlp):
    net, x, _ = mlp
    m = _EnergyMLP(net)
    xb = x[:8].clone().requires_grad_(True)
    out = refined_logits(m, xb, steps=0, step_size=1.0, noise=0.01, draws=3)
    assert torch.allclose(out, net(x[:8]), atol=1e-6)
    # BPDA: with refinement, the gradient is the classifier's gradient at the refined point
    torch.manual_seed(0)
    xr = x[:8].clone().requires_grad_(True)
    out = refined_logits(m, xr, steps=2, step_size=1.0, noise=0.0, draws=1)
    (g,) = torch.autograd.grad(out[:, 0].sum(), xr)
    z = 2 * x[:8] - 1
    for _ in range(2):
        z = z.requires_grad_(True)
        (gz,) = torch.autograd.grad(m.energy((z + 1) / 2).sum(), z)
        z = (z - gz).detach()
    zr = ((z + 1) / 2).requires_grad_(True)
    (g_ref,) = torch.autograd.grad(net(zr)[:, 0].sum(), zr)
    assert torch.allclose(g, g_ref, atol=1e-5)


def test_bad_settings_are_user_errors():
    d = load_dataset("digits")
    grid = {"eps_grid": {"default": {"linf": [0, 0.1], "l2": [0, 1]}}}
    validate(grid, d)
    with pytest.raises(UserError, match="unknown norm 'l3'"):
        validate({**grid, "norms": ["l3"]}, d)
    with pytest.raises(UserError, match="not a finite radius"):
        validate({**grid, "eps": [-0.1], "_explicit": ("eps",)}, d)
    with pytest.raises(UserError, match="empty"):
        validate({**grid, "eps": [], "_explicit": ("eps",)}, d)
    with pytest.raises(UserError, match="repeats"):
        validate({**grid, "eps": [0.1, 0.1], "_explicit": ("eps",)}, d)


@pytest.mark.parametrize("args, fragment", [
    (["eps=[-1]"], "not a finite radius"),
    (["norms=[l3]"], "unknown norm 'l3'"),
    (["eps=[0.1,nan]"], "not a finite radius"),
    (["eps=[0,1.5]", "norms=[linf]"], "beyond the"),
])
def test_cli_rejects_bad_robustness_settings(tmp_path, args, fragment):
    res = bench("run", "suite=robustness", "model=wrn", "scale=tiny", f"out={tmp_path}", *args)
    assert_user_error(res, fragment)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_suite_end_to_end_tiny(tmp_path):
    # one norm, two radii: AutoAttack's 5000 Square queries on each surviving image cost ~10 s of CPU per eps
    res = bench("run", "suite=robustness", "models=[wrn,jem,pixel_independent]", "scale=tiny", "eps=[0,0.1,1]",
                "norms=[linf]", f"out={tmp_path}")
    assert res.returncode == 0, res.stderr
    recs = {json.loads(p.read_text())["model"]: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert set(recs) == {"wrn", "jem", "pixel_independent"}
    for name in ("wrn", "jem"):
        r = recs[name]
        assert r["status"] == "ok", r.get("reason")
        keys = [k for k in r["metrics"] if k.startswith("robust.")]
        assert "robust.linf.0.accuracy" in keys and "robust.linf.1.accuracy" in keys
        assert "seed" not in r["protocol"]["robust"] and "sanity" not in r["protocol"]["robust"]
        assert list(tmp_path.glob(f"*{name}*robust.png")) and list(tmp_path.glob(f"*{name}*robust_autoattack.png"))
    jem = recs["jem"]
    for name in ("wrn", "jem"):  # AutoAttack on the suite's grid, with its interval and per-attack trail
        aa = recs[name]["metrics"]["autoattack.linf.0.1.accuracy"]
        facts = aa["extra"]
        assert facts["ci95"][0] <= aa["value"] <= facts["ci95"][1]
        assert set(facts["after"]) == {"apgd-ce", "apgd-t", "fab-t", "square"}
        assert recs[name]["protocol"]["autoattack"]["version"] == "standard"
        # PGD on the very same images beside it: the ensemble is at least as strong
        vs = recs[name]["draws"]["autoattack"]["vs_pgd"]["linf"]["0.1"]
        assert facts["pgd_same_images"] == pytest.approx(100.0 * vs["pgd"] / aa["n"])
        assert aa["value"] <= facts["pgd_same_images"]
    assert list(tmp_path.glob("*jem*robust_refined.png"))
    refined = jem["metrics"]["robust_refined.linf.0.1.accuracy"]["extra"]
    assert set(refined["per_attack"]) == {"pgd_full", "bpda"} and refined["draws"] >= 2
    assert isinstance(refined["levelled_off"], bool)  # the audit's verdict, on every L∞ value
    p = jem["protocol"]["robust_refined"]
    assert p["defense"]["name"] == "sgld_refine" and set(p["attacks"]) == {"pgd_full", "bpda"}
    assert p["audit"]["steps"] == [1, 2] and p["draws"]["target_halfwidth"] == 3.0
    assert '"seed":' not in json.dumps(p)  # seeds are beside the protocol (the offsets are protocol)
    assert "robust_refined" in recs["wrn"]["skipped"] and "Energy" in recs["wrn"]["skipped"]["robust_refined"]
    assert "robust" in recs["pixel_independent"]["skipped"]
    assert "autoattack" in recs["pixel_independent"]["skipped"]

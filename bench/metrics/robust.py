"""Adversarial robustness (JEM §5.3): foolbox 3 PGD under L∞ and L2 over an eps grid.

Protocol (JEM's; docs/architecture.md): only correctly classified test images are attacked; robust accuracy is the
fraction of the whole evaluated set that is classified correctly and stays so under attack. PGD uses a
random start, ``steps`` iterations of step ``2.5·eps/steps`` (Madry et al.'s rule, so the iterate can
cross the ball) and ``restarts`` independent starts; an image counts as broken if any restart breaks it.

An adversarial example found at a smaller eps is also inside every larger ball, so an image broken at
eps is counted broken at every larger eps of the grid: the curve is non-increasing by construction,
and that accumulation is recorded. Sanity rules checked on every run (their findings are per-seed values,
recorded under the record's ``draws``, beside the protocol):
- eps = 0 gives the clean accuracy exactly (the zero ball holds only the image, so it is classified again
  rather than attacked; for a deterministic classifier a mismatch is a failure);
- at an eps that covers the whole input box (L∞ ≥ 1) an undefended classifier must fall to ≤ 5 %;
  otherwise the attack is broken or the gradients are masked, and the record says so.

Keys: ``robust.<linf|l2>.<eps>.accuracy`` in percent. A robustness-curve PNG goes beside the record.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from bench.errors import ModelFailure, UserError
from bench.metrics.base import Metric, MetricResult, MetricValue, register
from bench.models.base import as_float01, batches

NORMS = ("linf", "l2")
LARGE_LINF = 1.0  # an L∞ ball of radius 1 around any image contains the whole [0, 1] box
BREAK_LIMIT = 5.0  # percent
ATTACK_SEED_OFFSET = 31  # from the run's seed: random starts and a stochastic defense's noise


# --- functional core ---------------------------------------------------------------------------
class _Logits(nn.Module):
    """foolbox wants an nn.Module mapping [0, 1] images to logits."""

    def __init__(self, fn: Callable[[Tensor], Tensor]):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def pgd_attack(norm: str, steps: int, random_start: bool = True, rel_stepsize: float | None = None):
    import foolbox as fb

    if norm not in NORMS:
        raise UserError(f"unknown norm '{norm}'; valid choices: {', '.join(NORMS)}")
    rel = 2.5 / steps if rel_stepsize is None else rel_stepsize
    cls = fb.attacks.LinfPGD if norm == "linf" else fb.attacks.L2PGD
    return cls(rel_stepsize=rel, steps=steps, random_start=random_start)


def predict(fn: Callable[[Tensor], Tensor], x: Tensor, batch: int) -> Tensor:
    out = []
    with torch.no_grad():
        for a, b in batches(len(x), batch):
            out.append(fn(x[a:b]).argmax(1).cpu())
    return torch.cat(out)


def robust_correct(fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, norm: str, eps: Sequence[float], *,
                   steps: int, restarts: int = 1, random_start: bool = True, rel_stepsize: float | None = None,
                   batch: int = 250, seed: int = 0,
                   judge: Callable[[Tensor], Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """PGD against the classifier ``fn`` ([0,1] images → logits) on images ``x`` in [0, 1].

    ``judge`` (default ``fn``) is the classifier that decides clean and adversarial correctness; a
    stochastic defense attacks an expectation-over-transformation ``fn`` and is judged by itself.

    Returns (clean_correct [N] bool, robust [len(eps), N] bool): ``robust[j, i]`` is True when image i is
    classified correctly and no restart at any eps ≤ eps[j] changed that. Only correctly classified
    images are attacked, and at each eps (in increasing order) only those no smaller eps or earlier restart
    broke: an adversarial inside a smaller ball lies inside every larger one, so attacking such an image
    again could not change its verdict (AutoAttack's rule for its attacks, here for the radii). Randomness
    (random starts, stochastic defenses) comes from torch's global generator seeded with ``seed``, so a run
    is reproducible on CPU.
    """
    import foolbox as fb

    eps = [float(e) for e in eps]
    order = np.argsort(eps, kind="stable")
    judge = fn if judge is None else judge
    torch.manual_seed(seed)
    clean = predict(judge, x, batch) == y
    broken = torch.zeros(len(eps), len(x), dtype=torch.bool)
    device = x.device
    fmodel = fb.PyTorchModel(_Logits(fn).eval(), bounds=(0.0, 1.0), device=device)
    attack = pgd_attack(norm, steps, random_start, rel_stepsize)
    for r in range(restarts):
        torch.manual_seed(seed + 7919 * (r + 1))
        below = ~clean  # broken at a smaller eps (or never correct): settled, not attacked again
        for j in order:
            idx = torch.nonzero(~(below | broken[j])).flatten()
            for a, b in batches(len(idx), batch):
                sel = idx[a:b]
                xb, yb = x[sel], y[sel].to(device)
                # eps 0: the ball is the image itself, so PGD would return it unchanged; it is judged as it is.
                # Else judged by a fresh classification of the clipped adversarial (a stochastic defense is
                # re-run, as it would be at test time)
                adv = attack(fmodel, xb, yb, epsilons=[eps[j]])[1][0].detach() if eps[j] > 0 else xb
                broken[j, sel] |= predict(judge, adv, batch) != yb.cpu()
            below |= broken[j]
    # accumulate in increasing eps: a break at a smaller eps is a break at every larger one
    acc = torch.zeros(len(x), dtype=torch.bool)
    for j in order:
        acc |= broken[j]
        broken[j] = acc.clone()
    return clean, clean.unsqueeze(0) & ~broken


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion k/n (scipy's)."""
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def eps_label(eps: float) -> str:
    return format(float(eps), ".4g")


# --- suite plumbing ----------------------------------------------------------------------------
def _grid(settings: dict, data_name: str, norm: str) -> list[float]:
    if "eps" in settings.get("_explicit", ()):
        return [float(e) for e in settings["eps"]]
    grids = settings.get("eps_grid", {})
    grid = grids.get(data_name, grids.get("default", {}))
    if norm not in grid:
        raise UserError(f"the suite gives no {norm} eps grid for data '{data_name}'; pass eps=[...]")
    return [float(e) for e in grid[norm]]


def section_grid(settings: dict, section: str, data_name: str, norm: str) -> list[float]:
    """A metric's own eps grid: ``<section>.eps_grid`` for this data when the suite gives one (a costly
    attack's radii, e.g. AutoAttack's and the SGLD defense's), else the robustness grid; eps= on the command
    line replaces both."""
    grids = (settings.get(section, {}) or {}).get("eps_grid")
    if grids and "eps" not in settings.get("_explicit", ()):
        grid = grids.get(data_name, grids.get("default", {}))
        if norm in grid:
            return [float(e) for e in grid[norm]]
    return _grid(settings, data_name, norm)


def _per_scale(settings: dict, key: str, scale: str, default):
    v = settings.get(key, default)
    return v.get(scale, default) if isinstance(v, dict) else v


def validate(settings: dict, data, model_classes=()) -> None:
    norms = settings.get("norms", list(NORMS))
    if not norms:
        raise UserError("norms= is empty; use norms=[linf], norms=[l2] or norms=[linf,l2]")
    for n in norms:
        if n not in NORMS:
            raise UserError(f"unknown norm '{n}'; valid choices: {', '.join(NORMS)}")
    for n in norms:
        for section in ("", "autoattack", "refine"):
            grid = section_grid(settings, section, data.name, n) if section else _grid(settings, data.name, n)
            _check_grid(grid, n, data, f"{section}.eps_grid " if section else "")
    for key in ("steps", "restarts"):
        for scale_value in (settings.get(f"attack_{key}", {}) or {}).values() if isinstance(
                settings.get(f"attack_{key}"), dict) else [settings.get(f"attack_{key}", 1)]:
            if int(scale_value) < 1:
                raise UserError(f"attack_{key} must be >= 1 in the suite file")


def _check_grid(grid: list[float], n: str, data, where: str) -> None:
    if not grid:
        raise UserError(f"{where or 'eps= '}is empty; give at least one radius, e.g. eps=[0,0.1,0.3]")
    # the largest useful radius: L∞ 1 already holds the whole [0,1] box, L2 its diameter √D
    top = 1.0 if n == "linf" else math.sqrt(math.prod(data.shape))
    for e in grid:
        if not math.isfinite(e) or e < 0:
            raise UserError(f"{where}eps {e} is not a finite radius >= 0; e.g. eps=[0,0.1,0.3]")
        if e > top:
            raise UserError(f"{where}{n} eps {e} is beyond the [0,1] input box's reach ({top:.4g}); give radii "
                            f"from 0 to {top:.4g}")
    if len(set(grid)) != len(grid):
        raise UserError(f"{where}eps grid {grid} repeats a value; give each radius once")


def curve_figure(curves: dict[str, tuple[list[float], list[float]]], title: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.2), dpi=120, squeeze=False)
    for ax, (label, (eps, acc)) in zip(axes[0], curves.items(), strict=True):
        ax.plot(eps, acc, marker="o")
        ax.set_xlabel(f"{label} eps")
        ax.set_ylabel("robust accuracy (%)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def evaluate(ctx, classify: Callable[[Tensor], Tensor], *, n_eval: int, stochastic: bool,
             protocol_key: str, defense: dict | None, title: str,
             attack_fn: Callable[[Tensor], Tensor] | None = None) -> MetricResult:
    """The curves for ``classify`` on the first ``n_eval`` test images, with their protocol (under
    ``protocol_key``), draws and figure."""
    settings, scale = ctx.settings, ctx.scale.value
    steps = int(_per_scale(settings, "attack_steps", scale, 40))
    restarts = int(_per_scale(settings, "attack_restarts", scale, 1))
    random_start = bool(settings.get("random_start", True))
    n = min(int(n_eval), len(ctx.data.test))
    x = as_float01(ctx.data.test.x[:n]).to(ctx.device)
    y = ctx.data.test.y[:n].long()
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    for p in params:  # only input gradients are needed
        p.requires_grad_(False)
    out: dict[str, MetricValue] = {}
    curves: dict[str, tuple[list[float], list[float]]] = {}
    sanity: dict[str, dict] = {}
    per_image: dict[str, dict[str, Tensor]] = {}  # norm -> eps -> robust per image (handed on to autoattack)
    try:
        for norm in settings.get("norms", list(NORMS)):
            grid = _grid(settings, ctx.data.name, norm)
            clean, robust = robust_correct(attack_fn or classify, x, y, norm, grid, steps=steps,
                                           restarts=restarts, random_start=random_start,
                                           seed=ctx.seed + ATTACK_SEED_OFFSET, batch=250, judge=classify)
            clean_acc = 100.0 * clean.double().mean().item()
            accs = [100.0 * r.double().mean().item() for r in robust]
            for j, (e, a) in enumerate(zip(grid, accs, strict=True)):
                p = a / 100.0
                lo, hi = wilson_interval(int(robust[j].sum()), n)
                out[f"{norm}.{eps_label(e)}.accuracy"] = MetricValue(
                    a, stderr=100.0 * math.sqrt(p * (1 - p) / n), n=n,
                    extra={"ci95": [round(100 * lo, 4), round(100 * hi, 4)], "ci": "Wilson 95%"})
            per_image[norm] = dict(zip(map(eps_label, grid), robust))
            s = {"clean_accuracy": clean_acc}
            if 0.0 in grid:
                s["eps0_equals_clean"] = accs[grid.index(0.0)] == clean_acc
                if not stochastic and not s["eps0_equals_clean"]:
                    raise ModelFailure(f"{ctx.model.name}: robust accuracy at eps=0 ({accs[grid.index(0.0)]:.2f}%) "
                                       f"differs from clean accuracy ({clean_acc:.2f}%); the classifier is not "
                                       "deterministic in eval mode")
            large = [a for e, a in zip(grid, accs, strict=True) if norm == "linf" and e >= LARGE_LINF]
            if large and not stochastic:
                s["large_eps_breaks"] = min(large) <= BREAK_LIMIT
                if not s["large_eps_breaks"]:
                    from bench import console
                    console.info(f"[yellow]{ctx.model.name}: {min(large):.1f}% robust accuracy at L∞ eps >= 1 "
                                 "(should be ~0): the attack is too weak or the gradients are masked[/yellow]")
            sanity[norm] = s
            order_l = sorted(range(len(grid)), key=lambda i: grid[i])
            curves[norm.upper().replace("LINF", "L∞")] = ([grid[i] for i in order_l], [accs[i] for i in order_l])
    finally:
        for p in params:
            p.requires_grad_(True)
    protocol = {
        "attack": "foolbox PGD", "foolbox": __import__("foolbox").__version__,
        "steps": steps, "rel_stepsize": f"2.5/steps = {2.5 / steps:.4g}", "restarts": restarts,
        "random_start": random_start, "n_eval": n, "subset": f"first {n} test images",
        "attacked": "correctly classified images only (JEM)", "input_space": "[0,1] pixels, bounds (0,1)",
        "eps_grid": {norm: _grid(settings, ctx.data.name, norm) for norm in settings.get("norms", list(NORMS))},
        "accumulate": "an image broken at eps counts broken at every larger eps",
        "judged_by": "a fresh classification of the adversarial image", "seed_offset": ATTACK_SEED_OFFSET,
        "defense": defense,
    }
    # the seed and what the sanity checks found change with the seed: beside the protocol, not in it
    draws = {"seed": ctx.seed + ATTACK_SEED_OFFSET, "sanity": sanity}
    return MetricResult(out, protocol={protocol_key: protocol}, draws={protocol_key: draws},
                        artifacts={f"{protocol_key}.png": lambda path: curve_figure(curves, title, path)},
                        handed_on={"robust_per_image": per_image})


def _compute(ctx) -> MetricResult:
    n_eval = _per_scale(ctx.settings, "n_eval", ctx.scale.value, 1000)
    stochastic = ctx.model.eval_noise > 0
    return evaluate(ctx, ctx.model.logits, n_eval=n_eval, stochastic=stochastic, protocol_key="robust", defense=None,
                    title=f"{ctx.model.name}: PGD robust accuracy (no defense)")


ROBUST = register(Metric(key="robust", title="Robust accuracy", higher_is_better=True, unit="%",
                         requires=("Classifier",), compute=_compute, tolerance="2",
                         settings=("eps", "norms"), validate=validate, headline=("accuracy",),
                         headline_axis="eps"))

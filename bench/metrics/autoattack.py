"""AutoAttack (Croce & Hein, ICML 2020), standard version, under L∞ and L2: APGD-CE, APGD-T (9 target
classes), FAB-T (9 target classes) and Square (5000 queries), each with the library's fixed settings.

The attacks are fra31/auto-attack's own modules (the `pyautoattack` distribution on PyPI, whose attack
files are identical to the upstream repository's); bench only runs them in the standard order on the
images still robust and judges every adversarial itself. An image is robust at eps only if it is
classified correctly and every attack fails on it (the worst case per image), and, as for PGD, an
image broken at eps counts broken at every larger eps (so each eps attacks only the survivors of the
smaller ones). Robust accuracy is over the first ``n_eval`` test images, with a Wilson 95% interval.

Keys: ``autoattack.<linf|l2>.<eps>.accuracy`` in percent; each entry also gives the robust accuracy left
after each attack in turn (``after``) and, when the `robust` metric ran first, PGD's robust accuracy on the
same images (``pgd_same_images``: the suite's own PGD figure may cover more images, so compare with this);
the record's draws then say whether AutoAttack was at least as strong as PGD at every eps (it should be).
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import torch
from torch import Tensor

from bench.errors import ModelFailure, UserError
from bench.metrics.base import Metric, MetricResult, MetricValue, register
from bench.metrics.robust import (
    NORMS,
    _Logits,
    _per_scale,
    curve_figure,
    eps_label,
    predict,
    section_grid,
    wilson_interval,
)
from bench.metrics.robust import validate as validate_robust
from bench.models.base import as_float01

ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square")
VERSIONS = ("standard",)
LIB_NORM = {"linf": "Linf", "l2": "L2"}
SEED_OFFSET = 37  # from the run's seed: the attacks' random starts and Square's proposals
BALL_SLACK = 1e-5  # float32 round-off allowed on the perturbation's norm


def _settings(settings: dict) -> dict:
    return dict(settings.get("autoattack") or {})


def _autoattack(fn, norm: str, eps: float, seed: int, device: torch.device):
    from pyautoattack import AutoAttack

    aa = AutoAttack(_Logits(fn).eval(), norm=LIB_NORM[norm], eps=eps, version="standard", seed=seed,
                    device=device)
    aa.logger.setLevel(logging.ERROR)
    return aa


def _within_ball(adv: Tensor, x: Tensor, norm: str, eps: float) -> Tensor:
    d = (adv - x).flatten(1)
    size = d.abs().max(1).values if norm == "linf" else d.norm(dim=1)
    in_box = (adv >= 0).flatten(1).all(1) & (adv <= 1).flatten(1).all(1)
    return (size <= eps * (1 + BALL_SLACK) + BALL_SLACK) & in_box


def autoattack_correct(fn, x: Tensor, y: Tensor, norm: str, eps: list[float], *, seed: int = 0,
                       batch: int = 250) -> tuple[Tensor, Tensor, dict]:
    """AutoAttack (standard) against ``fn`` ([0,1] images → logits) at each eps.

    Returns (clean [N] bool, robust [len(eps), N] bool, details): an image is robust at eps when it is
    classified correctly and no attack at any eps ≤ eps changed that. ``details`` has, per eps, the
    robust count left after each attack, and the library's own warnings about the model.
    """
    clean = predict(fn, x, batch).cpu() == y.cpu()
    broken = ~clean.clone()
    robust = torch.zeros(len(eps), len(x), dtype=torch.bool)
    details: dict = {"after": {}, "library_checks": []}
    cuda = [x.device.index or 0] if x.device.type == "cuda" else []
    for j in np.argsort(eps, kind="stable"):
        e = float(eps[j])
        after = {}
        if e > 0:
            for attack in ATTACKS:
                idx = torch.nonzero(~broken).flatten()
                if len(idx):
                    broken[idx] |= _run_one(fn, attack, x[idx], y[idx], norm, e, seed, batch, cuda, details)
                after[attack] = int((~broken).sum())
        details["after"][eps_label(e)] = after
        robust[j] = ~broken
    return clean, robust, details


def _run_one(fn, attack: str, x: Tensor, y: Tensor, norm: str, eps: float, seed: int, batch: int, cuda,
             details: dict) -> Tensor:
    """Which of ``x`` the library's ``attack`` breaks (judged here: a fresh classification, inside the ball)."""
    aa = _autoattack(fn, norm, eps, seed, x.device)
    aa.attacks_to_run = [attack]  # the standard version's settings, one attack at a time
    with torch.random.fork_rng(devices=cuda), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adv, _ = aa.run_standard_evaluation(x, y.to(x.device), batch_size=batch)
    for w in caught:
        msg = str(w.message).strip().splitlines()[0]
        if msg not in details["library_checks"]:
            details["library_checks"].append(msg)
    fooled = predict(fn, adv.detach(), batch).cpu() != y.cpu()
    outside = fooled & ~_within_ball(adv.detach().cpu(), x.cpu(), norm, eps)
    if outside.any():
        raise ModelFailure(f"AutoAttack's {attack} returned {int(outside.sum())} adversarial(s) outside the "
                           f"{norm} ball of radius {eps:g} or the [0,1] box; the result is not a valid attack")
    return fooled


def validate(settings: dict, data, model_classes=()) -> None:
    validate_robust(settings, data, model_classes)
    cfg = _settings(settings)
    version = cfg.get("version", "standard")
    if version not in VERSIONS:
        raise UserError(f"autoattack.version '{version}' is not supported; valid: {', '.join(VERSIONS)}")
    for scale_value in _scale_values(cfg.get("n_eval", 1)):
        if isinstance(scale_value, bool) or not isinstance(scale_value, int) or scale_value < 1:
            raise UserError(f"autoattack.n_eval must be a positive integer, got {scale_value!r}")
    n_classes = getattr(data, "n_classes", 10)
    if n_classes < 10:
        raise UserError(f"AutoAttack's standard version targets 9 other classes; this data has {n_classes} "
                        "classes: drop autoattack from the suite's metrics")


def _scale_values(v) -> list:
    return list(v.values()) if isinstance(v, dict) else [v]


def _compute(ctx) -> MetricResult:
    cfg = _settings(ctx.settings)
    models = cfg.get("models")
    if models is not None and ctx.model.name not in models:
        return MetricResult({}, skipped={"autoattack": (
            f"the suite runs AutoAttack on {', '.join(models)} only (autoattack.models in "
            "bench/suite_specs/robustness.yaml; its 5000-query Square attack is the costly part)")})
    n = min(int(_per_scale(cfg, "n_eval", ctx.scale.value, 1000)), len(ctx.data.test))
    x, y = as_float01(ctx.data.test.x[:n]).to(ctx.device), ctx.data.test.y[:n].long()
    params = [p for p in ctx.model.parameters() if p.requires_grad]
    for p in params:  # only input gradients are needed
        p.requires_grad_(False)
    out: dict[str, MetricValue] = {}
    details: dict = {}
    robust_by_norm: dict[str, dict[str, Tensor]] = {}
    try:
        for norm in ctx.settings.get("norms", list(NORMS)):
            grid = section_grid(ctx.settings, "autoattack", ctx.data.name, norm)
            _, robust, details[norm] = autoattack_correct(ctx.model.logits, x, y, norm, grid,
                                                          seed=ctx.seed + SEED_OFFSET)
            robust_by_norm[norm] = dict(zip(map(eps_label, grid), robust))
            for j, e in enumerate(grid):
                k = int(robust[j].sum())
                lo, hi = wilson_interval(k, n)
                out[f"{norm}.{eps_label(e)}.accuracy"] = MetricValue(
                    100.0 * k / n, stderr=100.0 * math.sqrt(k / n * (1 - k / n) / n), n=n,
                    extra={"ci95": [round(100 * lo, 4), round(100 * hi, 4)], "ci": "Wilson 95%",
                           "after": {a: 100.0 * c / n for a, c in details[norm]["after"][eps_label(e)].items()}})
    finally:
        for p in params:
            p.requires_grad_(True)
    import pyautoattack

    protocol = {
        "implementation": f"pyautoattack {pyautoattack.__version__} (fra31/auto-attack's attack modules)",
        "version": "standard", "attacks": list(ATTACKS),
        "settings": "APGD-CE 100 iters 1 restart; APGD-T 100 iters, 9 targets; FAB-T 100 iters, 9 targets; "
                    "Square 5000 queries, p_init 0.8 (the library's standard version)",
        "scoring": "worst case per image over the attacks; broken at eps = broken at every larger eps",
        "n_eval": n, "subset": f"first {n} test images", "input_space": "[0,1] pixels",
        "eps_grid": {nm: section_grid(ctx.settings, "autoattack", ctx.data.name, nm)
                     for nm in ctx.settings.get("norms", list(NORMS))},
        "seed_offset": SEED_OFFSET, "interval": "Wilson 95% over images"}
    curves = {nm.upper().replace("LINF", "L∞"): _curve(out, nm) for nm in robust_by_norm}
    title = f"{ctx.model.name}: AutoAttack (standard) robust accuracy"
    vs_pgd = _versus_pgd(ctx, robust_by_norm, n)
    for norm, by_eps in vs_pgd.items():  # PGD on these very images, beside AutoAttack (the suite's PGD
        for e, counts in by_eps.items():  # figure may cover more images: never compare the two directly)
            out[f"{norm}.{e}.accuracy"].extra["pgd_same_images"] = 100.0 * counts["pgd"] / n
    draws = {"seed": ctx.seed + SEED_OFFSET, "vs_pgd": vs_pgd,
             "library_checks": sorted({m for d in details.values() for m in d["library_checks"]})}
    return MetricResult(out, protocol={"autoattack": protocol}, draws={"autoattack": draws},
                        artifacts={"robust_autoattack.png": lambda path: curve_figure(curves, title, path)})


def _curve(out: dict[str, MetricValue], norm: str) -> tuple[list[float], list[float]]:
    pts = sorted((float(k.split(".", 1)[1].rsplit(".", 1)[0]), v.value) for k, v in out.items()
                 if k.startswith(f"{norm}."))
    return [e for e, _ in pts], [a for _, a in pts]


def _versus_pgd(ctx, robust_by_norm: dict[str, dict[str, Tensor]], n: int) -> dict:
    """Per eps, on the same images: AutoAttack's robust count against PGD's (when `robust` ran first), and the
    images PGD broke that AutoAttack did not. An ensemble weaker than PGD is reported, not hidden."""
    pgd = ctx.earlier.get("robust", {}).get("robust_per_image", {})
    out: dict = {}
    for norm, by_eps in robust_by_norm.items():
        for e, aa in by_eps.items():
            if e not in pgd.get(norm, {}) or len(pgd[norm][e]) < n:
                continue
            p = pgd[norm][e][:n]
            out.setdefault(norm, {})[e] = {"autoattack": int(aa.sum()), "pgd": int(p.sum()),
                                           "pgd_only_breaks": int((aa & ~p).sum()),
                                           "at_least_as_strong": bool(aa.sum() <= p.sum())}
            if aa.sum() > p.sum():
                from bench import console
                console.info(f"[yellow]{ctx.model.name}: AutoAttack left {int(aa.sum())} of {n} images robust at "
                             f"{norm} eps {e}, PGD {int(p.sum())}: see draws.autoattack.vs_pgd[/yellow]")
    return out


AUTOATTACK = register(Metric(key="autoattack", title="Robust accuracy (AutoAttack)", higher_is_better=True, unit="%",
                             requires=("Classifier",), compute=_compute, tolerance="2", settings=("eps", "norms"),
                             validate=validate, headline=("accuracy",), headline_axis="eps"))

"""Adversarial robustness of JEM's SGLD-refinement defense (JEM §5.3, Fig. 6), evaluated adaptively
(Tramèr et al. 2020; Croce et al. 2022).

The defense refines its input with ``steps`` SGLD steps on log p(x) = −E(x) before classifying, in
JEM's space z = 2x − 1: z ← z − α∇_z E + σε, and averages the logits of ``chains`` independent chains; each
chain starts from z plus N(0, input_noise²) (JEM's attack_model.py: ``--sigma``, 0.03 in its README's L∞
command, 0 in its L2 one). JEM-1, its README's attack command, refines one step (``--n_steps_refine 1``).

Attacks (foolbox PGD, random start, step 2.5·eps/steps), each with expectation over transformation: the
attacked logits are the mean over ``eot`` independent SGLD chains.
- ``pgd_full``: the gradient runs through every SGLD step (the chain is differentiated, second-order terms
  included: ``create_graph``), the adaptive attack;
- ``bpda``: the refinement's gradient is taken as the identity (z + stop_gradient(refine(z) − z)).
Every image of the subset is attacked (whether the defense classifies it correctly is itself random).

Scoring. The defense is random, so it is scored over draws: in draw r the defense classifies the clean
image and every attack's adversarial at every eps once. An image is robust at eps in draw r when all of
those at eps' ≤ eps are correct (the worst case over the attacks, and broken at eps means broken at every
larger eps). The robust accuracy is the mean over draws; draws continue (at least ``min``, at most
``max``) until the 95% interval of that mean over draws (Student t) is at most ``target_halfwidth``
points wide on each side at every eps.

Convergence audit (``audit``): at one eps per norm, ``pgd_full`` with every steps × eot of the audit grid
on the first ``audit.n_eval`` images, each cell scored over ``audit.draws`` draws. Robust accuracy has
levelled off when raising either the steps or the eot from the grid's second-largest to its largest
value lowers it by at most ``audit.tolerance`` points; the verdict goes with every value of that norm
(``levelled_off``), and the table flags a value whose audit has not levelled off.

Keys: ``robust_refined.<linf|l2>.<eps>.accuracy`` (worst case), with each attack's own accuracy, the
number of draws and the interval in the entry; every setting is in the protocol.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from bench.errors import UserError
from bench.metrics.autoattack import _curve
from bench.metrics.base import Metric, MetricResult, MetricValue, register
from bench.metrics.robust import NORMS, _per_scale, curve_figure, eps_label, pgd_attack, section_grid
from bench.metrics.robust import validate as validate_robust
from bench.models.base import as_float01, batches
from bench.samplers.sgld import sgld

ATTACKS = ("pgd_full", "bpda")
ATTACK_SEED_OFFSET = 41  # from the run's seed: the attacks' random starts and the chains they sample
DRAW_SEED_OFFSET = 43  # the defense's draws when scoring
AUDIT_SEED_OFFSET = 47
BATCH = 100
DEFAULT_DRAWS = {"min": 10, "max": 200, "target_halfwidth": 3.0}


# --- the defense ---------------------------------------------------------------------------------
def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index or torch.cuda.current_device()]
    return torch.default_generator


def refine_full(model, z: Tensor, steps: int, step_size: float, noise: float) -> Tensor:
    """SGLD steps that keep the graph, so that a gradient of the result reaches ``z`` through every step."""
    if not z.requires_grad:  # a plain forward (the attack judging its result): the same chain, a local graph
        z = z.detach().requires_grad_(True)
    for _ in range(steps):
        (g,) = torch.autograd.grad(model.energy((z + 1.0) / 2.0).sum(), z, create_graph=True)
        z = z - step_size * g + noise * torch.randn_like(z)
    return z


def refined_logits(model, x: Tensor, *, steps: int, step_size: float, noise: float, draws: int,
                   input_noise: float = 0.0, gradient: str = "bpda",
                   generator: torch.Generator | None = None) -> Tensor:
    """Mean logits over ``draws`` SGLD-refined copies of ``x`` (in [0,1]), each starting from z = 2x − 1 plus
    N(0, input_noise²). ``gradient``: "bpda" (identity through the refinement), "full" (through every step)
    or "none" (no gradient needed)."""
    n = x.shape[0]
    gen = generator or _default_generator(x.device)
    z = (2.0 * x - 1.0).repeat(draws, *([1] * (x.dim() - 1)))
    if input_noise > 0:
        z = z + input_noise * torch.randn(z.shape, generator=gen, device=gen.device, dtype=z.dtype).to(z.device)
    with torch.enable_grad():
        if gradient == "full":
            ref = refine_full(model, z, steps, step_size, noise)
        else:
            ref = sgld(lambda v: model.energy((v + 1.0) / 2.0), z, steps, step_size, noise, gen)
            ref = z + (ref - z).detach() if gradient == "bpda" else ref
    return model.logits((ref + 1.0) / 2.0).view(draws, n, -1).mean(0)


# --- attacks -------------------------------------------------------------------------------------
def adversarials(fn: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, norm: str, eps: list[float], *,
                 steps: int, seed: int, random_start: bool = True, batch: int = BATCH) -> dict[float, Tensor]:
    """foolbox PGD's adversarial images of every image of ``x`` at each eps > 0 (eps 0: the image)."""
    import foolbox as fb

    from bench.metrics.robust import _Logits

    fmodel = fb.PyTorchModel(_Logits(fn).eval(), bounds=(0.0, 1.0), device=x.device)
    attack = pgd_attack(norm, steps, random_start)
    positive = [e for e in eps if e > 0]
    out = {e: x for e in eps if e == 0}
    cuda = [x.device.index or 0] if x.device.type == "cuda" else []
    parts: dict[float, list[Tensor]] = {e: [] for e in positive}
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        for a, b in batches(len(x), batch):
            advs = attack(fmodel, x[a:b], y[a:b].to(x.device), epsilons=positive)[1] if positive else []
            for e, adv in zip(positive, advs, strict=True):
                parts[e].append(adv.detach())
    out.update({e: torch.cat(p) for e, p in parts.items()})
    return out


# --- scoring over draws --------------------------------------------------------------------------
def draw_seed(seed: int, r: int) -> int:
    return int(np.random.SeedSequence([seed, r]).generate_state(1)[0])


def t_halfwidth(values: np.ndarray) -> float:
    """Half-width of the 95% Student-t interval of the mean of ``values``."""
    from scipy.stats import t

    if len(values) < 2:
        return math.inf
    return float(t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))


def score_over_draws(defense: Callable[[Tensor, torch.Generator], Tensor], advs: dict[str, dict[float, Tensor]],
                     y: Tensor, *, seed: int, min_draws: int, max_draws: int, target: float) -> dict:
    """Robust accuracy (%) per eps, worst case over the attacks and accumulated over eps, averaged over
    draws of the defense until the 95% half-width is at most ``target`` points (see the module docstring).

    ``advs``: attack -> eps -> adversarial images. Returns the per-draw accuracies and the summaries."""
    eps = sorted(next(iter(advs.values())))
    clean_x = next(iter(advs.values())).get(0.0)
    per_draw: list[np.ndarray] = []  # [len(eps)] worst case
    per_attack: dict[str, list[np.ndarray]] = {a: [] for a in advs}
    for r in range(max_draws):
        g = torch.Generator().manual_seed(draw_seed(seed, r))
        # the clean image is classified once per draw; each attack's adversarial at each eps > 0 once
        clean = (defense(clean_x, g).argmax(1).cpu() == y.cpu()) if clean_x is not None else None
        correct = {a: {e: (defense(adv, g).argmax(1).cpu() == y.cpu()) if e > 0 else clean
                       for e, adv in by_eps.items()} for a, by_eps in advs.items()}
        worst = torch.ones(len(y), dtype=torch.bool)
        alone = {a: torch.ones(len(y), dtype=torch.bool) for a in advs}
        accs, accs_a = [], {a: [] for a in advs}
        for e in eps:
            for a in advs:
                worst &= correct[a][e]
                alone[a] &= correct[a][e]
                accs_a[a].append(100.0 * alone[a].double().mean().item())
            accs.append(100.0 * worst.double().mean().item())
        per_draw.append(np.array(accs))
        for a in advs:
            per_attack[a].append(np.array(accs_a[a]))
        if r + 1 >= min_draws and max(t_halfwidth(np.array(per_draw)[:, j]) for j in range(len(eps))) <= target:
            break
    d = np.array(per_draw)
    hw = [t_halfwidth(d[:, j]) for j in range(len(eps))]
    return {"eps": eps, "mean": d.mean(0), "halfwidth": hw, "draws": len(d),
            "per_attack": {a: np.array(v).mean(0) for a, v in per_attack.items()}}


# --- the convergence audit -----------------------------------------------------------------------
def audit(model, x: Tensor, y: Tensor, norm: str, eps: float, defense_cfg: dict, cfg: dict, seed: int) -> dict:
    """Robust accuracy of ``pgd_full`` at ``eps`` for every steps × eot of the audit grid, and the verdict."""
    steps_grid, eot_grid = sorted(int(s) for s in cfg["steps"]), sorted(int(e) for e in cfg["eot"])
    cells: dict[str, float] = {}
    for s in steps_grid:
        for e in eot_grid:
            def attacked(v: Tensor, e=e) -> Tensor:
                return refined_logits(model, v, draws=e, gradient="full", **_chain(defense_cfg, norm))

            adv = adversarials(attacked, x, y, norm, [eps], steps=s, seed=seed + 7919 * (s * 1000 + e))
            res = score_over_draws(_defense(model, defense_cfg, norm), {"pgd_full": adv}, y, seed=seed + 1,
                                   min_draws=cfg["draws"], max_draws=cfg["draws"], target=math.inf)
            cells[f"steps{s}_eot{e}"] = float(res["mean"][-1])
    return {"eps": eps, "n": len(x), "accuracy": cells,
            **audit_verdict(cells, steps_grid, eot_grid, float(cfg["tolerance"]))}


def audit_verdict(cells: dict[str, float], steps_grid: list[int], eot_grid: list[int], tol: float) -> dict:
    """Levelled off: raising the steps, or the eot, from the grid's second-largest value to its largest
    lowers the robust accuracy (at the other's largest value) by at most ``tol`` points."""
    top = cells[f"steps{steps_grid[-1]}_eot{eot_grid[-1]}"]
    drops = {}
    if len(steps_grid) > 1:
        drops["steps"] = cells[f"steps{steps_grid[-2]}_eot{eot_grid[-1]}"] - top
    if len(eot_grid) > 1:
        drops["eot"] = cells[f"steps{steps_grid[-1]}_eot{eot_grid[-2]}"] - top
    return {"drop_at_largest": drops, "tolerance": tol, "levelled_off": all(d <= tol for d in drops.values())}


def _defense(model, defense_cfg: dict, norm: str) -> Callable[[Tensor, torch.Generator], Tensor]:
    def classify(v: Tensor, g: torch.Generator) -> Tensor:
        with torch.no_grad():
            return torch.cat([refined_logits(model, v[a:b], draws=defense_cfg["chains"], gradient="none",
                                             generator=g, **_chain(defense_cfg, norm))
                              for a, b in batches(len(v), BATCH)])
    return classify


def _chain(defense_cfg: dict, norm: str) -> dict:
    """The refinement of an input under attacks of ``norm`` (the input noise is per norm)."""
    return {**{k: defense_cfg[k] for k in ("steps", "step_size", "noise")},
            "input_noise": float(defense_cfg["input_noise"].get(norm, 0.0))}


# --- suite plumbing ------------------------------------------------------------------------------
def settings_of(settings: dict, scale: str) -> dict:
    """The refinement, attack, draw and audit settings at ``scale`` (see bench/suite_specs/robustness.yaml)."""
    cfg = settings.get("refine", {}) or {}
    draws = {**DEFAULT_DRAWS, **{k: _per_scale(cfg.get("draws", {}) or {}, k, scale, v)
                                 for k, v in DEFAULT_DRAWS.items()}}
    audit_cfg = cfg.get("audit")
    return {
        "defense": {"steps": int(_per_scale(cfg, "steps", scale, 1)), "step_size": float(cfg.get("step_size", 1.0)),
                    "noise": float(cfg.get("noise", 0.01)), "chains": int(_per_scale(cfg, "chains", scale, 5)),
                    "input_noise": {str(k): float(v) for k, v in (cfg.get("input_noise") or {}).items()}},
        "attacks": list(cfg.get("attacks", list(ATTACKS))),
        "attack_steps": int(_per_scale(cfg, "attack_steps", scale, 20)),
        "eot": int(_per_scale(cfg, "eot", scale, 5)),
        "n_eval": int(_per_scale(cfg, "n_eval", scale, 200)),
        "random_start": bool(cfg.get("random_start", True)),
        "draws": {"min": int(draws["min"]), "max": int(draws["max"]),
                  "target_halfwidth": float(draws["target_halfwidth"])},
        "audit": None if not audit_cfg else {
            "steps": list(_per_scale(audit_cfg, "steps", scale, [10, 50, 200])),
            "eot": list(_per_scale(audit_cfg, "eot", scale, [1, 5, 20])),
            "n_eval": int(_per_scale(audit_cfg, "n_eval", scale, 50)),
            "draws": int(_per_scale(audit_cfg, "draws", scale, 10)),
            "tolerance": float(audit_cfg.get("tolerance", 2.0)),
            "eps": audit_cfg.get("eps", {})},
        "eps_grid": cfg.get("eps_grid"),
    }


def _refine_grid(settings: dict, data_name: str, norm: str) -> list[float]:
    return section_grid(settings, "refine", data_name, norm)


def _audit_eps(s: dict, data_name: str) -> dict[str, float]:
    table = s["audit"]["eps"] or {}
    return {k: float(v) for k, v in dict(table.get(data_name, table.get("default", {}))).items()}


def validate(settings: dict, data, model_classes=()) -> None:
    validate_robust(settings, data, model_classes)
    for scale in ("tiny", "small", "paper"):
        s = settings_of(settings, scale)
        unknown = [a for a in s["attacks"] if a not in ATTACKS]
        if unknown or not s["attacks"]:
            raise UserError(f"refine.attacks {s['attacks']} must name at least one of {', '.join(ATTACKS)}")
        counts = {"refine.steps": s["defense"]["steps"], "refine.chains": s["defense"]["chains"],
                  "refine.attack_steps": s["attack_steps"], "refine.eot": s["eot"], "refine.n_eval": s["n_eval"],
                  "refine.draws.min": s["draws"]["min"], "refine.draws.max": s["draws"]["max"]}
        if s["audit"]:
            counts.update({"refine.audit.n_eval": s["audit"]["n_eval"], "refine.audit.draws": s["audit"]["draws"],
                           **{f"refine.audit.steps[{i}]": v for i, v in enumerate(s["audit"]["steps"])},
                           **{f"refine.audit.eot[{i}]": v for i, v in enumerate(s["audit"]["eot"])}})
        for name, v in counts.items():
            if v < 1:
                raise UserError(f"{name} must be >= 1 in the suite file, got {v}")
        for norm, v in s["defense"]["input_noise"].items():
            if norm not in NORMS or not math.isfinite(v) or v < 0:
                raise UserError(f"refine.input_noise {norm}: {v} must name a norm of {', '.join(NORMS)} and a "
                                "noise σ >= 0 (in [-1, 1] units)")
        if s["draws"]["max"] < s["draws"]["min"] or not s["draws"]["target_halfwidth"] > 0:
            raise UserError("refine.draws needs 1 <= min <= max and a positive target_halfwidth (points)")
        if s["audit"]:
            for norm, e in _audit_eps(s, data.name).items():
                if norm not in NORMS or not math.isfinite(e) or e <= 0:
                    raise UserError(f"refine.audit.eps {norm}: {e} must name a norm of {', '.join(NORMS)} "
                                    "and a radius > 0")


def _compute(ctx) -> MetricResult:
    model, scale = ctx.model, ctx.scale.value
    models = (ctx.settings.get("refine", {}) or {}).get("models")
    if models is not None and model.name not in models:
        # each attack step costs steps × chains network passes, twice over through the whole chain for
        # pgd_full (and a class-conditional EBM's energy is one pass per class): the suite names the models
        return MetricResult({}, skipped={"robust_refined": (
            f"the suite evaluates the SGLD-refinement defense for {', '.join(models)} only (refine.models in "
            "bench/suite_specs/robustness.yaml)")})
    s = settings_of(ctx.settings, scale)
    n = min(s["n_eval"], len(ctx.data.test))
    x, y = as_float01(ctx.data.test.x[:n]).to(ctx.device), ctx.data.test.y[:n].long()
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # only input gradients are needed
        p.requires_grad_(False)
    try:
        out, audits = {}, {}
        for norm in ctx.settings.get("norms", list(NORMS)):
            grid = _refine_grid(ctx.settings, ctx.data.name, norm)
            out.update(_evaluate_norm(ctx, s, norm, grid, x, y))
            if s["audit"] and norm in _audit_eps(s, ctx.data.name):
                m = min(s["audit"]["n_eval"], n)
                audits[norm] = audit(model, x[:m], y[:m], norm, _audit_eps(s, ctx.data.name)[norm], s["defense"],
                                     s["audit"], ctx.seed + AUDIT_SEED_OFFSET)
                for key in [k for k in out if k.startswith(f"{norm}.")]:
                    out[key] = MetricValue(out[key].value, out[key].stderr, n=out[key].n, extra={
                        **out[key].extra, "levelled_off": audits[norm]["levelled_off"]})
    finally:
        for p in params:
            p.requires_grad_(True)
    curves = {nm.upper().replace("LINF", "L∞"): _curve(out, nm) for nm in ctx.settings.get("norms", list(NORMS))}
    title = f"{model.name}: robust accuracy with SGLD refinement (worst of {', '.join(s['attacks'])})"
    return MetricResult(out, protocol={"robust_refined": _protocol(ctx, s, n)},
                        draws={"robust_refined": {"seed": ctx.seed, "audit": audits}},
                        artifacts={"robust_refined.png": lambda path: curve_figure(curves, title, path)})


def _evaluate_norm(ctx, s: dict, norm: str, grid: list[float], x: Tensor, y: Tensor) -> dict[str, MetricValue]:
    model, d = ctx.model, s["defense"]
    advs = {}
    for i, attack in enumerate(s["attacks"]):
        gradient = "full" if attack == "pgd_full" else "bpda"

        def attacked(v: Tensor, gradient=gradient) -> Tensor:
            return refined_logits(model, v, draws=s["eot"], gradient=gradient, **_chain(d, norm))

        advs[attack] = adversarials(attacked, x, y, norm, grid, steps=s["attack_steps"], random_start=s["random_start"],
                                    seed=ctx.seed + ATTACK_SEED_OFFSET + 7919 * i)
    res = score_over_draws(_defense(model, d, norm), advs, y, seed=ctx.seed + DRAW_SEED_OFFSET,
                           min_draws=s["draws"]["min"], max_draws=s["draws"]["max"],
                           target=s["draws"]["target_halfwidth"])
    out = {}
    for j, e in enumerate(res["eps"]):
        hw, mean = res["halfwidth"][j], float(res["mean"][j])
        out[f"{norm}.{eps_label(e)}.accuracy"] = MetricValue(mean, stderr=None if not math.isfinite(hw) else hw / 1.96,
                                                             n=len(x), extra={
            "ci95": [round(mean - hw, 4), round(mean + hw, 4)] if math.isfinite(hw) else None,
            "ci": "Student t 95% over the defense's draws", "draws": res["draws"],
            "ci_target_met": bool(hw <= s["draws"]["target_halfwidth"]),
            "per_attack": {a: float(v[j]) for a, v in res["per_attack"].items()}})
    return out


def _protocol(ctx, s: dict, n: int) -> dict:
    d = s["defense"]
    return {
        "defense": {"name": "sgld_refine", **d, "space": "z = 2x-1 in [-1,1] (JEM)", "logits": "mean over chains"},
        "attacks": {a: {"attack": "foolbox PGD", "steps": s["attack_steps"], "rel_stepsize": "2.5/steps",
                        "random_start": s["random_start"], "restarts": 1, "eot_chains": s["eot"],
                        "gradient": "through every SGLD step (create_graph)" if a == "pgd_full"
                        else "BPDA: identity through the refinement"} for a in s["attacks"]},
        "foolbox": __import__("foolbox").__version__,
        "scoring": "per draw: worst case over the attacks, broken at eps = broken at every larger eps; "
                   "mean over draws", "draws": s["draws"],
        "n_eval": n, "subset": f"first {n} test images, all attacked",
        "eps_grid": {nm: _refine_grid(ctx.settings, ctx.data.name, nm)
                     for nm in ctx.settings.get("norms", list(NORMS))},
        "audit": None if not s["audit"] else {**{k: v for k, v in s["audit"].items() if k != "eps"},
                                              "eps": _audit_eps(s, ctx.data.name), "attack": "pgd_full",
                                              "rule": "levelled off: raising steps or eot from the second-largest "
                                                      "to the largest grid value lowers accuracy by <= tolerance"},
        "seed_offsets": {"attacks": ATTACK_SEED_OFFSET, "draws": DRAW_SEED_OFFSET, "audit": AUDIT_SEED_OFFSET},
    }


ROBUST_REFINED = register(Metric(
    key="robust_refined", title="Robust accuracy (SGLD-refined)", higher_is_better=True, unit="%",
    requires=("Classifier", "Energy"), compute=_compute, tolerance="5", settings=("eps", "norms"),
    validate=validate, headline=("accuracy",), headline_axis="eps"))

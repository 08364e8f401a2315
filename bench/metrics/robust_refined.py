"""Adversarial robustness of a classifier defended by SGLD refinement (JEM §5.3, Fig. 6).

The defended classifier refines its input with ``steps`` SGLD steps on log p(x) = −E(x) before
classifying, runs ``chains`` duplicated chains and averages their logits (JEM: 5 chains). Refinement
follows JEM's input space: z = 2x − 1 ∈ [−1, 1], z ← z − α∇_z E + σε, with α and σ from the suite.

The defense is stochastic and its gradient runs through an SGLD loop, so the attack uses
expectation over transformation with BPDA: the gradient through the refinement is taken as the
identity (the refined image is z + stop_gradient(refine(z) − z)), and the attacked logits are the
mean over ``eot`` independent draws of the defended classifier. Every one of these settings is
recorded. Keys: ``robust_refined.<linf|l2>.<eps>.accuracy``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bench.metrics.base import Metric, MetricValue, register
from bench.metrics.robust import _per_scale, evaluate, validate
from bench.samplers.sgld import sgld


def _default_generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index or torch.cuda.current_device()]
    return torch.default_generator


def refined_logits(model, x: Tensor, *, steps: int, step_size: float, noise: float, draws: int) -> Tensor:
    """Mean logits over ``draws`` SGLD-refined copies of ``x`` (in [0,1]); differentiable by BPDA."""
    n = x.shape[0]
    z = (2.0 * x - 1.0).repeat(draws, *([1] * (x.dim() - 1)))
    with torch.enable_grad():
        ref = sgld(lambda v: model.energy((v + 1.0) / 2.0), z, steps, step_size, noise,
                   _default_generator(z.device))
    z = z + (ref - z).detach()
    return model.logits((z + 1.0) / 2.0).view(draws, n, -1).mean(0)


def _compute(ctx) -> dict[str, MetricValue]:
    s, scale, model = ctx.settings, ctx.scale.value, ctx.model
    cfg = s.get("refine", {})
    models = cfg.get("models")
    if models is not None and model.name not in models:
        # the refinement loop costs steps × chains × eot network passes per attack step (and a
        # class-conditional EBM's energy is one pass per class): the suite names the models it defends
        ctx.skipped["robust_refined"] = (f"the suite evaluates the SGLD-refinement defense for {', '.join(models)} "
                                         "only (refine.models in suites/robustness.yaml)")
        return {}
    steps = int(_per_scale(cfg, "steps", scale, 10))
    chains = int(_per_scale(cfg, "chains", scale, 5))
    eot = int(_per_scale(cfg, "eot", scale, 1))
    step_size, noise = float(cfg.get("step_size", 1.0)), float(cfg.get("noise", 0.01))
    n_eval = _per_scale(cfg, "n_eval", scale, 200)

    def defended(x: Tensor) -> Tensor:
        return refined_logits(model, x, steps=steps, step_size=step_size, noise=noise, draws=chains)

    def attacked(x: Tensor) -> Tensor:
        return refined_logits(model, x, steps=steps, step_size=step_size, noise=noise, draws=chains * eot)

    defense = {"name": "sgld_refine", "steps": steps, "step_size": step_size, "noise": noise,
               "space": "z = 2x-1 in [-1,1] (JEM)", "chains": chains, "logits": "mean over chains",
               "gradient": "BPDA (identity through the refinement)",
               "eot_draws": eot, "eot": f"attack gradient of mean logits over eot x chains = {eot * chains} draws",
               "noise_rng": "torch global generator, seeded per attack restart"}
    return evaluate(ctx, defended, n_eval=n_eval, stochastic=True, protocol_key="robust_refined",
                    defense=defense, attack_fn=attacked,
                    title=f"{model.name}: PGD robust accuracy with SGLD refinement ({steps} steps, {chains} chains)")


ROBUST_REFINED = register(Metric(
    key="robust_refined", title="Robust accuracy (SGLD-refined)", higher_is_better=True, unit="%",
    requires=("Classifier", "Energy"), compute=_compute, tolerance="5", settings=("eps", "norms"),
    validate=validate, headline=("accuracy",), headline_axis="eps"))

"""Out-of-distribution detection (JEM §5.2): score every in-distribution test image and every image of
each OOD set, then rank. The in-distribution data is the positive class (JEM's convention).

Scores (higher = more in-distribution):
- `log_px`: log p(x): exact for flows and autoregressive models, the bound for the VAE, −E(x) for EBMs
  (up to log Z, which does not change a ranking). Likelihood models are scored at the bin centres
  y = (x + 0.5)/256; the VAE's IWAE draws come from a generator seeded per batch.
- `max_softmax`: max_y p(y|x) (Hendrycks & Gimpel 2017).
- `grad_norm`: −‖∇ₓ log p(x)‖₂, JEM's "approximate mass".
- `energy`, `odin`, `mahalanobis`, `knn`: the post-hoc detectors of `bench.metrics.ood_detectors`
  (pytorch-ood), for classifiers; the last two need the penultimate features.
Statistics per (score, set), from scikit-learn, each labelled with its positive class: AUROC, AUPR-in
(in-distribution positive), AUPR-out (OOD positive, negated scores), `fpr95` (JEM's convention: the
fraction of OOD images accepted when 95% of the in-distribution test images are) and `fpr95_out`
(OpenOOD's: OOD positive, the fraction of in-distribution images rejected when 95% of the OOD images
are). Keys: ``ood.<score>.<set>.<stat>``; the suite's near/far groups (``ood_groups``) add
``ood.<score>.<group>.<stat>``, the mean over the group's sets that were evaluated (OpenOOD's summary).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from bench import distributed
from bench.capabilities import Classifier, Energy, LogProb
from bench.data.ood import SYNTHETIC, load_ood_set, set_keys
from bench.errors import NonFiniteError, UserError
from bench.metrics import ood_detectors as detectors
from bench.metrics.base import Metric, MetricResult, MetricValue, register
from bench.models.base import batches

SCORES = ("log_px", "max_softmax", "grad_norm", *detectors.POSTHOC)
STATS = ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_out")
#: which class is positive for each statistic (recorded with every value and in the protocol)
POSITIVE = {"auroc": "in-distribution", "aupr_in": "in-distribution", "aupr_out": "OOD",
            "fpr95": "in-distribution (JEM)", "fpr95_out": "OOD (OpenOOD)"}
#: the OOD metric is higher-is-better, except the false-positive rates at 95% TPR
GROUPS = ("near", "far")
BATCH = 100  # the unit of sharding under torchrun (see bench.distributed)


# --- functional core ---------------------------------------------------------------------------
def fpr_at_tpr(labels: np.ndarray, scores: np.ndarray, tpr: float = 0.95) -> float:
    """The smallest false-positive rate at which the true-positive rate reaches ``tpr``.

    Every distinct score is a threshold (``drop_intermediate=False``): the default drops collinear ROC
    points, and under ties the first point with TPR ≥ 0.95 can then be one with a higher FPR (identical
    score lists gave 1.0 instead of 0.95). Both rates only grow along the curve, so the first point that
    reaches ``tpr`` has the smallest FPR; a threshold cannot split tied scores, so none lies between."""
    from sklearn.metrics import roc_curve  # here: scikit-learn takes about a second to import, which a run
    # without the OOD suite (every model's worker process) need not pay

    fpr, tprs, _ = roc_curve(labels, scores, drop_intermediate=False)
    return float(fpr[np.searchsorted(tprs, tpr, side="left")])


def ood_statistics(scores_in: np.ndarray, scores_out: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    labels = np.concatenate([np.ones(len(scores_in)), np.zeros(len(scores_out))])
    scores = np.concatenate([scores_in, scores_out]).astype(np.float64)
    return {
        "auroc": float(roc_auc_score(labels, scores)),
        "aupr_in": float(average_precision_score(labels, scores)),
        "aupr_out": float(average_precision_score(1 - labels, -scores)),
        "fpr95": fpr_at_tpr(labels, scores),
        "fpr95_out": fpr_at_tpr(1 - labels, -scores),
    }


# --- scores ------------------------------------------------------------------------------------
#: offset from the run's seed for the noise inside a score (the VAE's IWAE draws, test-time input noise);
#: distinct from the sampler's and bits/dim's offsets (bench.evaluation, bench.metrics.bits_per_dim)
SCORE_SEED_OFFSET = 3_000_000
#: offset from the run's seed for the synthetic OOD sets and the subsample of a large real set
SET_SEED_OFFSET = 17
FIT_BATCH_INDEX = 10**6  # fitting a detector draws as "batch" FIT_BATCH_INDEX + its index (no test batch is)
SCORE_SEEDING = ("batch i: torch.Generator seeded with numpy SeedSequence([seed + score_seed_offset, i]), "
                 "handed to log_prob(generator=) where the model takes one; torch's global RNG (test-time "
                 "input noise) is reseeded from the same seed and restored afterwards")


def _takes_generator(fn) -> bool:
    try:
        return "generator" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _log_px_fn(model):
    if isinstance(model, LogProb):
        if _takes_generator(model.log_prob):  # a stochastic bound (the VAE's IWAE): explicit noise
            return lambda x, g: model.log_prob((x * 255.0 + 0.5) / 256.0, generator=g)
        return lambda x, g: model.log_prob((x * 255.0 + 0.5) / 256.0)
    if isinstance(model, Energy):
        return lambda x, g: -model.energy(x)
    return None


def available(model, score: str) -> str | None:
    """None if ``score`` applies to ``model``, else the reason it does not."""
    if score in detectors.POSTHOC:
        return detectors.available(model, score)
    if score == "max_softmax":
        return None if isinstance(model, Classifier) else "model has no Classifier"
    if _log_px_fn(model) is None:
        return "model has no LogProb or Energy"
    if score == "grad_norm" and not getattr(model, "density_is_differentiable", True):
        return "log p(x) of this model is not differentiable in x (piecewise constant on 8-bit bins)"
    return None


def _score_batch(model, score: str, xb: Tensor, g: torch.Generator, fitted=None) -> np.ndarray:
    if score in detectors.POSTHOC:  # a post-hoc detector (ODIN takes its input gradient itself)
        if fitted is None:
            raise ValueError(f"the {score} detector must be fitted first (ood_detectors.fit)")
        with torch.no_grad():
            return detectors.numpy_scores(fitted, xb)
    if score == "max_softmax":
        with torch.no_grad():
            s = model.logits(xb).double().softmax(1).max(1).values
    elif score == "log_px":
        with torch.no_grad():
            s = _log_px_fn(model)(xb, g).double()
    else:
        with torch.enable_grad():
            xb.requires_grad_(True)
            lp = _log_px_fn(model)(xb, g)
            if not lp.requires_grad:
                raise UserError(f"grad_norm needs ∇ₓ log p(x), but {model.name}'s log p(x) has no gradient; "
                                "drop grad_norm from ood_scores for this model")
            (grad,) = torch.autograd.grad(lp.sum(), xb)
        s = -grad.flatten(1).double().norm(dim=1)
    return s.detach().cpu().numpy()


def batch_seed(seed: int, i: int) -> int:
    """The seed of batch i's noise: from the run's seed and the batch index, not from the rank that runs it."""
    return int(np.random.SeedSequence([seed + SCORE_SEED_OFFSET, i]).generate_state(1)[0])


def score_images(model, score: str, x: Tensor, device: torch.device, seed: int = 0, fitted=None) -> np.ndarray:
    """Per-image scores in batches (sharded over ranks under torchrun, gathered in order). Any noise a score
    draws comes from ``seed`` and the batch index, so the same call gives the same scores. ``fitted``: a
    post-hoc detector's score function (`ood_detectors.fit`)."""
    cuda = [device.index or 0] if device.type == "cuda" else []

    def work(i: int, a: int, b: int) -> np.ndarray:
        bs = batch_seed(seed, i)
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(bs)
            xb = x[a:b].float().div(255.0).to(device)
            return _score_batch(model, score, xb, torch.Generator().manual_seed(bs), fitted)

    scores = np.concatenate(distributed.map_batches(list(batches(len(x), BATCH)), work, f"OOD {score} scores"))
    if not np.isfinite(scores).all():
        bad = int((~np.isfinite(scores)).sum())
        raise NonFiniteError(f"{model.name} gave non-finite {score} scores on {bad} images")
    return scores


# --- suite plumbing ----------------------------------------------------------------------------
def set_names(settings: dict) -> list[str]:
    return list(settings.get("ood_sets", []))


def validate(settings: dict, data, model_classes=()) -> None:
    from bench.data import parse_spec

    scores = settings.get("ood_scores", list(SCORES))
    for s in scores:
        if s not in SCORES:
            raise UserError(f"unknown OOD score '{s}'; valid choices: {', '.join(SCORES)}")
    names = set_names(settings)
    if not names:
        raise UserError("ood_sets= is empty; name at least one OOD set, e.g. ood_sets=[uniform,interp]")
    if len(set(names)) < len(names):
        raise UserError(f"ood_sets={names} names a set twice; give each set once")
    sha: dict[str, str | None] = {}
    for name in names:
        if name not in SYNTHETIC:
            parse_spec(name)  # unknown names: the valid choices
            # missing files, unmappable shapes
            sha[name] = load_ood_set(name, data, 0, settings.get("data_root"))[1]["sha256"]
    keys = set_keys(names, sha)  # one file at two paths
    _validate_groups(settings, data.name, set(keys.values()))
    detectors.validate_settings(settings)
    if "ood_scores" in settings.get("_explicit", ()):
        _validate_explicit_scores(scores, model_classes)


def _validate_explicit_scores(scores: list[str], model_classes) -> None:
    """Scores named on the command line must apply to every model asked for (the suite's defaults instead
    leave N/A cells where a model lacks what a score needs)."""
    for cls in model_classes:
        if "grad_norm" in scores and (not getattr(cls, "density_is_differentiable", True) or not (
                callable(getattr(cls, "log_prob", None)) or callable(getattr(cls, "energy", None)))):
            raise UserError(f"grad_norm needs a differentiable log p(x), which model '{cls.name}' lacks; "
                            "drop it from ood_scores or from the models")
        for s in (s for s in scores if s in detectors.POSTHOC):
            if not callable(getattr(cls, "logits", None)):
                raise UserError(f"{s} needs a classifier's logits, which model '{cls.name}' lacks; "
                                "drop it from ood_scores or from the models")
            if s in detectors.NEEDS_FEATURES and not callable(getattr(cls, "features", None)):
                raise UserError(f"{s} needs the penultimate features (the Features capability), which model "
                                f"'{cls.name}' lacks; drop it from ood_scores or from the models")


def groups_for(settings: dict, data_name: str) -> dict[str, list[str]]:
    """The suite's near/far groups of OOD sets for this in-distribution data (its own entry, or default)."""
    table = settings.get("ood_groups") or {}
    return dict(table.get(data_name, table.get("default", {})))


def _validate_groups(settings: dict, data_name: str, set_keys_: set[str]) -> None:
    from bench.data import parse_spec

    for group, members in groups_for(settings, data_name).items():
        if group not in GROUPS:
            raise UserError(f"ood_groups names group '{group}'; the groups are {', '.join(GROUPS)}")
        for name in members:
            if name not in SYNTHETIC:
                parse_spec(name)  # a typo in the suite file: the valid choices
    clash = set(GROUPS) & set_keys_
    if clash:
        raise UserError(f"an OOD set is named like a group ({', '.join(sorted(clash))}); rename its file")


@dataclass(frozen=True)
class LoadedSets:
    sets: dict[str, tuple[Tensor, dict]]  # path-free key -> (images, protocol info)
    keys: dict[str, str]  # set name -> its key
    absent: dict[str, str]  # key of an absent optional set -> where it was looked for (its N/A reason)
    draws: dict  # the per-seed draws and the paths, outside the fingerprint


def _load_sets(ctx, names: list[str], optional: list[str]) -> LoadedSets:
    """The OOD sets keyed by their path-free key, and the absent optional sets (by key, with why)."""
    seed = ctx.seed + SET_SEED_OFFSET
    loaded: dict[str, tuple[Tensor, dict, dict]] = {}
    absent: dict[str, str] = {}
    for name in names + optional:
        try:
            loaded[name] = load_ood_set(name, ctx.data, seed, ctx.settings.get("data_root"))
        except UserError as e:
            if name not in optional:
                raise
            absent[name] = str(e)  # real sets join when present; their absence is recorded, not an error
    keys = set_keys(names + optional, {n: v[1].get("sha256") for n, v in loaded.items()})
    draws = {"set_seed": seed, "score_seed": ctx.seed + SCORE_SEED_OFFSET,
             "sets": {keys[n]: {"spec": n, **d} for n, (_, _, d) in loaded.items()}}
    return LoadedSets({keys[n]: (x, info) for n, (x, info, _) in loaded.items()}, keys,
                      {keys[n]: why for n, why in absent.items()}, draws)


def _compute(ctx) -> MetricResult:
    model, settings = ctx.model, ctx.settings
    requested = list(settings.get("ood_scores", list(SCORES)))
    scores = [s for s in requested if available(model, s) is None]
    skipped = {f"ood.{s}": available(model, s) for s in requested if s not in scores}
    names = set_names(settings)
    # an explicit ood_sets= is the whole list; the suite's real sets join only when it is not given
    optional = [] if "ood_sets" in settings.get("_explicit", ()) else [
        n for n in settings.get("ood_sets_if_present", []) if n not in names]
    loaded = _load_sets(ctx, names, optional)
    sets, keys = loaded.sets, loaded.keys
    protocol: dict = {}
    if loaded.absent:
        # the protocol names an absent set; where it was looked for (machine-specific paths, which change no
        # number) goes to its N/A cells, outside the fingerprint
        protocol["ood_absent"] = list(loaded.absent)
        skipped.update({f"ood.*.{key}": why for key, why in loaded.absent.items()})
    fitted = _fit_detectors(ctx, scores)
    out: dict[str, MetricValue] = {}
    hist: dict[str, dict[str, np.ndarray]] = {}
    for s in scores:
        s_in = score_images(model, s, ctx.data.test.x, ctx.device, ctx.seed, fitted.get(s))
        hist[s] = {"in-distribution": s_in}
        for key, (x, _) in sets.items():
            s_out = score_images(model, s, x, ctx.device, ctx.seed, fitted.get(s))
            hist[s][key] = s_out
            for stat, v in ood_statistics(s_in, s_out).items():
                out[f"{s}.{key}.{stat}"] = MetricValue(v, n=len(s_in) + len(s_out), extra=_stat_extra(stat))
    groups = {g: [keys[n] for n in members if keys.get(n) in sets]
              for g, members in groups_for(settings, ctx.data.name).items()}
    for g in (g for g, m in groups.items() if not m):
        skipped[f"ood.*.{g}"] = f"none of the {g}-OOD sets of the suite (ood_groups) was evaluated"
    out.update(group_means(out, scores, groups))
    protocol["ood"] = {"positive": POSITIVE, "scores": scores,
                       "log_px_input": "bin centres (x+0.5)/256 for LogProb; x/255 for Energy",
                       "score_seeding": SCORE_SEEDING, "score_seed_offset": SCORE_SEED_OFFSET,
                       "set_seed_offset": SET_SEED_OFFSET,
                       "detectors": {s: detectors.protocol(s, detectors.detector_settings(settings, s),
                                                           len(ctx.data.train)) for s in fitted},
                       "groups": {g: {"sets": m, "statistic": "mean over the group's sets"}
                                  for g, m in groups.items()},
                       "sets": {k: info for k, (_, info) in sets.items()},
                       "synthetic_definitions": {n: SYNTHETIC_DOC[n] for n in SYNTHETIC if n in sets}}
    artifacts = {}
    for s in scores:
        artifacts[f"ood_{s}.png"] = lambda path, s=s: histogram(hist[s], f"{model.name}: {s}", path)
        artifacts[f"roc_{s}.png"] = lambda path, s=s: roc_figure(hist[s], f"{model.name}: {s}", path)
    return MetricResult(out, protocol=protocol, draws={"ood": loaded.draws}, skipped=skipped, artifacts=artifacts)


def _stat_extra(stat: str) -> dict:
    return {"positive": POSITIVE[stat]}  # the direction is the metric's (sub_directions), never a fact


def _fit_detectors(ctx, scores: list[str]) -> dict:
    """Each post-hoc detector's score function, fitted once per model (on the training split where it needs
    features); test-time noise while extracting them comes from the run's seed."""
    cuda = [ctx.device.index or 0] if ctx.device.type == "cuda" else []
    fitted = {}
    for s in (s for s in scores if s in detectors.POSTHOC):
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(batch_seed(ctx.seed, FIT_BATCH_INDEX + detectors.POSTHOC.index(s)))
            fitted[s] = detectors.fit(ctx.model, s, detectors.detector_settings(ctx.settings, s),
                                      ctx.data.train.x, ctx.data.train.y, ctx.device)
    return fitted


def group_means(values: dict[str, MetricValue], scores: list[str], groups: dict[str, list[str]]) -> dict:
    """OpenOOD's summary: per score, group and statistic, the mean over the group's evaluated sets."""
    out = {}
    for s in scores:
        for g, members in groups.items():
            if not members:
                continue
            for stat in STATS:
                vals = [values[f"{s}.{k}.{stat}"] for k in members]
                out[f"{s}.{g}.{stat}"] = MetricValue(float(np.mean([v.value for v in vals])),
                                                     n=sum(v.n or 0 for v in vals),
                                                     extra={**_stat_extra(stat), "sets": members})
    return out


SYNTHETIC_DOC = {
    "uniform": "pixels uniform on {0..255}",
    "gaussian": "pixels N(0.5, 0.25^2) on [0,1], clipped",
    "constant": "one uniform value per image and channel",
    "interp": "mean of consecutive test images (JEM)",
    "flip": "test images flipped vertically",
}


def histogram(scores: dict[str, np.ndarray], title: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    allv = np.concatenate(list(scores.values()))
    lo, hi = np.percentile(allv, [0.5, 99.5])
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 50)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    for name, v in scores.items():
        ax.hist(np.clip(v, lo, hi), bins=bins, alpha=0.45 if name != "in-distribution" else 0.8, density=True,
                label=name, histtype="stepfilled" if name == "in-distribution" else "step", linewidth=1.5)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("score (higher = more in-distribution)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def roc_figure(scores: dict[str, np.ndarray], title: str, path) -> None:
    """ROC curve of each OOD set against the in-distribution scores (in-distribution positive), AUROC in the legend."""
    import matplotlib
    from sklearn.metrics import roc_auc_score, roc_curve

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s_in = scores["in-distribution"]
    fig, ax = plt.subplots(figsize=(4.2, 3.6), dpi=120)
    for name, s_out in scores.items():
        if name == "in-distribution":
            continue
        labels = np.concatenate([np.ones(len(s_in)), np.zeros(len(s_out))])
        both = np.concatenate([s_in, s_out]).astype(np.float64)
        fpr, tpr, _ = roc_curve(labels, both)
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{name} (AUROC {roc_auc_score(labels, both):.3f})")
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (OOD accepted)")
    ax.set_ylabel("true positive rate (in-dist. accepted)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


OOD = register(Metric(key="ood", title="OOD", higher_is_better=True, unit="", requires=(), compute=_compute,
                      sub_directions=(("*.fpr95*", False),),
                      tolerance="0.02", settings=("ood_sets", "ood_scores"), validate=validate,
                      requires_any=("Classifier", "Energy", "LogProb"), headline=("auroc",),
                      headline_axis="OOD set"))

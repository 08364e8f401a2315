"""Post-hoc OOD detectors on a classifier, from pytorch-ood (the maintained implementations the field
compares against), each turned into an in-distribution score (higher = more in-distribution):

- `energy`: T·logsumexp(f(x)/T), the negated energy of Liu et al. 2020 (pytorch-ood `EnergyBased`; any
  classifier has it; for JEM it is log p(x) up to log Z, so it ranks exactly as `log_px`);
- `odin`: the max softmax at temperature T after one signed-gradient step of size eps on the input (Liang
  et al. 2018, pytorch-ood `ODIN`; eps in [0, 1] pixel units, the images the models take, no clipping);
- `mahalanobis`: minus the smallest class-conditional Mahalanobis distance of the penultimate features,
  class means and a shared covariance fitted on the training split (Lee et al. 2018, pytorch-ood
  `Mahalanobis`, without input preprocessing);
- `knn`: minus the distance of the normalized penultimate feature to its k-th nearest normalized training
  feature (Sun et al. 2022, pytorch-ood `KNN`).

The last two need the model's penultimate layer (the `Features` capability) and are fitted on the
in-distribution training split, whose size, like every detector setting, goes into the protocol.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from bench.capabilities import Classifier, Features
from bench.errors import UserError
from bench.models.base import batches

POSTHOC = ("energy", "odin", "mahalanobis", "knn")
NEEDS_FEATURES = ("mahalanobis", "knn")
NEEDS_INPUT_GRAD = ("odin",)
#: the papers' settings: ODIN's T = 1000 and eps = 0.0014 (CIFAR-10), KNN's k = 50 (CIFAR-10), energy at T = 1
DEFAULTS: dict[str, dict] = {"energy": {"temperature": 1.0}, "odin": {"temperature": 1000.0, "eps": 0.0014},
                             "mahalanobis": {}, "knn": {"k": 50, "normalize": True}}
FIT_BATCH = 100


def detector_settings(settings: dict, score: str) -> dict:
    """The suite's settings of ``score`` (``ood_detectors.<score>``) over the defaults."""
    given = (settings.get("ood_detectors") or {}).get(score) or {}
    return {**DEFAULTS[score], **given}


def _positive(name: str, v, integer: bool = False) -> None:
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not math.isfinite(v) or v <= 0:
        kind = "a positive integer" if integer else "a positive finite number"
        raise UserError(f"ood_detectors.{name}={v!r} must be {kind}")


def validate_settings(settings: dict) -> None:
    given = settings.get("ood_detectors") or {}
    if not isinstance(given, dict):
        raise UserError("ood_detectors must map a detector to its settings, e.g. {odin: {temperature: 1000}}")
    for score, cfg in given.items():
        if score not in DEFAULTS:
            raise UserError(f"ood_detectors names unknown detector '{score}'; valid choices: {', '.join(DEFAULTS)}")
        unknown = set(cfg or {}) - set(DEFAULTS[score])
        if unknown:
            raise UserError(f"ood_detectors.{score} has unknown setting(s) {', '.join(sorted(unknown))}; "
                            f"valid: {', '.join(DEFAULTS[score]) or 'none'}")
    for score in POSTHOC:
        cfg = detector_settings(settings, score)
        for key in ("temperature",):
            if key in cfg:
                _positive(f"{score}.{key}", cfg[key])
    odin_eps = detector_settings(settings, "odin")["eps"]
    if isinstance(odin_eps, bool) or not isinstance(odin_eps, (int, float)) or not 0 <= odin_eps < 1:
        raise UserError(f"ood_detectors.odin.eps={odin_eps!r} must be a step in [0, 1) pixel units (ODIN: 0.0014)")
    _positive("knn.k", detector_settings(settings, "knn")["k"], integer=True)


def available(model, score: str) -> str | None:
    """None if the post-hoc ``score`` applies to ``model``, else why not."""
    if not isinstance(model, Classifier):
        return "model has no Classifier"
    if score in NEEDS_FEATURES and not isinstance(model, Features):
        return "model exposes no penultimate features (the Features capability)"
    return None


def features_of(model, x: Tensor, device: torch.device) -> Tensor:
    """Penultimate features of uint8 images, in batches, float32 on the CPU."""
    out = []
    with torch.no_grad():
        for a, b in batches(len(x), FIT_BATCH):
            out.append(model.features(x[a:b].float().div(255.0).to(device)).float().cpu())
    return torch.cat(out)


def fit(model, score: str, cfg: dict, train_x: Tensor, train_y: Tensor,
        device: torch.device) -> Callable[[Tensor], Tensor]:
    """The in-distribution score of ``score`` for ``model``: a function of a float batch in [0, 1]."""
    from pytorch_ood import detector as pood

    if score == "energy":
        t = float(cfg["temperature"])
        return lambda xb: -pood.EnergyBased.score(model.logits(xb).double(), t=t)
    if score == "odin":
        odin = pood.ODIN(model.logits, eps=float(cfg["eps"]), temperature=float(cfg["temperature"]))
        return lambda xb: -odin.predict(xb).double()
    z, y = features_of(model, train_x, device), train_y.long()
    if score == "mahalanobis":
        if sorted(y.unique().tolist()) != list(range(int(y.max()) + 1)):
            raise UserError("mahalanobis needs every class in the training split (class means); this data lacks "
                            "some: drop mahalanobis from ood_scores")
        maha = pood.Mahalanobis(None).fit_features(z, y)
        return lambda xb: -maha.predict_features(model.features(xb).float().cpu()).double()
    if len(z) < int(cfg["k"]):
        raise UserError(f"knn k={cfg['k']} exceeds the {len(z)} training images; set ood_detectors.knn.k lower")
    knn = pood.KNN(None, k=int(cfg["k"]), normalize=bool(cfg["normalize"])).fit_features(z, y)
    return lambda xb: -knn.predict_features(model.features(xb).float().cpu()).double()


def protocol(score: str, cfg: dict, n_train: int) -> dict:
    """What the record says about ``score``: the library, its settings and, when fitted, on what."""
    import pytorch_ood

    out = {"library": f"pytorch-ood {pytorch_ood.__version__}", **cfg}
    if score in NEEDS_FEATURES:
        out.update(fitted_on={"split": "train", "n": n_train}, features="penultimate layer (model.features)")
    if score == "odin":
        out["eps_units"] = "[0,1] pixels, no clipping (Liang et al.)"
    return out


def numpy_scores(fn: Callable[[Tensor], Tensor], xb: Tensor) -> np.ndarray:
    return fn(xb).detach().cpu().double().numpy()

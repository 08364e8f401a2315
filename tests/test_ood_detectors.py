"""The post-hoc OOD detectors (pytorch-ood) against plain implementations written here, JEM's energy
against its log p(x), both FPR@95 conventions, the near/far groups, and bad detector settings."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from test_ood import _ood_ctx, _tiny, brute_force_fpr95

from bench.data import load_dataset
from bench.errors import UserError
from bench.metrics import ood_detectors as det
from bench.metrics.ood import _compute, groups_for, ood_statistics, score_images, validate

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def wrn():
    torch.manual_seed(0)
    return _tiny("wrn")


def _scores(model, score, x, digits, **cfg):
    fitted = det.fit(model, score, {**det.DEFAULTS[score], **cfg}, digits.train.x, digits.train.y, CPU)
    return score_images(model, score, x, CPU, 0, fitted)


def test_energy_and_max_softmax_agree_with_plain_torch(wrn, digits):
    x = digits.test.x[:120]
    with torch.no_grad():
        logits = wrn.logits(x.float() / 255).double()
    np.testing.assert_allclose(_scores(wrn, "energy", x, digits), torch.logsumexp(logits, 1).numpy(), rtol=1e-12)
    np.testing.assert_allclose(_scores(wrn, "energy", x, digits, temperature=2.0),
                               (2.0 * torch.logsumexp(logits / 2.0, 1)).numpy(), rtol=1e-12)
    # our max_softmax beside pytorch-ood's MaxSoftmax (which returns the negated value, an outlier score)
    from pytorch_ood.detector import MaxSoftmax

    ours = score_images(wrn, "max_softmax", x, CPU)
    np.testing.assert_allclose(ours, -MaxSoftmax.score(logits).numpy(), rtol=1e-12)


def test_odin_agrees_with_plain_torch(wrn, digits):
    x = digits.test.x[:50].float() / 255
    t, eps = 1000.0, 0.0014
    xr = x.clone().requires_grad_(True)
    logits = wrn.logits(xr) / t
    (g,) = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(1)), xr)
    with torch.no_grad():
        ref = (wrn.logits(x - eps * g.sign()) / t).softmax(1).max(1).values.double()
    np.testing.assert_allclose(_scores(wrn, "odin", digits.test.x[:50], digits), ref.numpy(), rtol=1e-6)


def test_mahalanobis_agrees_with_plain_numpy(wrn, digits):
    z = det.features_of(wrn, digits.train.x, CPU).double().numpy()
    y = digits.train.y.numpy()
    mu = np.stack([z[y == c].mean(0) for c in range(10)])
    cov = sum((z[y == c] - mu[c]).T @ (z[y == c] - mu[c]) for c in range(10)) / len(z)
    prec = np.linalg.inv(cov)
    zt = det.features_of(wrn, digits.test.x[:80], CPU).double().numpy()
    d2 = np.stack([np.einsum("nd,de,ne->n", zt - m, prec, zt - m) for m in mu], 1).min(1)
    ours = _scores(wrn, "mahalanobis", digits.test.x[:80], digits)
    # pytorch-ood's covariance is the unnormalized sum (N·Σ, in float32): the same distances divided by N
    np.testing.assert_allclose(ours, -0.5 * d2 / len(z), rtol=2e-3)


def test_knn_agrees_with_brute_force(wrn, digits):
    z = det.features_of(wrn, digits.train.x, CPU).double()
    zt = det.features_of(wrn, digits.test.x[:60], CPU).double()
    zn, ztn = z / z.norm(dim=1, keepdim=True), zt / zt.norm(dim=1, keepdim=True)
    kth = torch.cdist(ztn, zn).sort(1).values[:, 9]
    np.testing.assert_allclose(_scores(wrn, "knn", digits.test.x[:60], digits, k=10), -kth.numpy(), rtol=1e-5)


def test_jem_energy_ranks_exactly_as_log_px(digits):
    torch.manual_seed(1)
    jem = _tiny("jem")
    x = torch.cat([digits.test.x[:100], torch.randint(0, 256, (100, 1, 8, 8), dtype=torch.uint8)])
    energy = _scores(jem, "energy", x, digits)
    log_px = score_images(jem, "log_px", x, CPU)
    # the same number, logsumexp of float64 logits against JEM's float32 energy
    np.testing.assert_allclose(energy, log_px, rtol=1e-6)
    labels = np.r_[np.ones(100), np.zeros(100)]
    assert roc_auc_score(labels, energy) == pytest.approx(roc_auc_score(labels, log_px), abs=1e-4)


@pytest.mark.parametrize("case", range(20))
def test_fpr95_out_is_openoods_convention(case):
    """OOD positive: the fraction of in-distribution images flagged when 95% of OOD images are, i.e. the
    in-distribution-positive rule with the roles and the score's sign swapped."""
    rng = np.random.default_rng(100 + case)
    s_in = rng.integers(0, 6, rng.integers(5, 90)).astype(float)
    s_out = rng.integers(0, 5, rng.integers(5, 90)).astype(float)
    st = ood_statistics(s_in, s_out)
    assert st["fpr95_out"] == brute_force_fpr95(-s_out, -s_in)
    assert st["fpr95"] == brute_force_fpr95(s_in, s_out)


def test_records_label_both_conventions_and_give_group_means(wrn):
    groups = {"default": {"near": ["flip"], "far": ["uniform", "constant"]},
              "digits": {"near": ["flip", "fashion_mnist"], "far": ["uniform", "constant", "svhn"]}}
    settings = {"ood_sets": ["uniform", "constant", "flip"], "ood_scores": ["max_softmax", "energy"],
                "_explicit": ("ood_sets",), "ood_groups": groups}
    result = _compute(_ood_ctx(settings, model=wrn))
    out = result.values
    assert out["energy.uniform.fpr95"].extra == {"positive": "in-distribution (JEM)"}
    assert out["energy.uniform.fpr95_out"].extra == {"positive": "OOD (OpenOOD)"}
    for stat in ("auroc", "fpr95", "fpr95_out"):
        far = out[f"energy.far.{stat}"]
        assert far.value == pytest.approx((out[f"energy.uniform.{stat}"].value + out[f"energy.constant.{stat}"].value)
                                          / 2, abs=1e-15)
        assert far.extra["sets"] == ["uniform", "constant"]  # svhn was not evaluated
        assert out[f"energy.near.{stat}"].value == out[f"energy.flip.{stat}"].value
    assert result.protocol["ood"]["groups"]["far"]["sets"] == ["uniform", "constant"]
    assert result.protocol["ood"]["detectors"]["energy"]["temperature"] == 1.0
    assert groups_for(settings, "cifar10") == settings["ood_groups"]["default"]


@pytest.mark.parametrize("settings, fragment", [
    ({"ood_scores": ["mahalanobes"]}, "unknown OOD score 'mahalanobes'"),
    ({"ood_detectors": {"odin": {"temperature": 0}}}, "odin.temperature=0 must be a positive"),
    ({"ood_detectors": {"odin": {"eps": -0.1}}}, "odin.eps=-0.1 must be a step"),
    ({"ood_detectors": {"knn": {"k": 0}}}, "knn.k=0 must be a positive integer"),
    ({"ood_detectors": {"knn": {"k": 2.5}}}, "knn.k=2.5 must be a positive integer"),
    ({"ood_detectors": {"knn": {"kk": 5}}}, "unknown setting"),
    ({"ood_detectors": {"gram": {}}}, "unknown detector 'gram'"),
    ({"ood_groups": {"default": {"middle": ["uniform"]}}}, "groups are near, far"),
    ({"ood_groups": {"default": {"near": ["unifrom"]}}}, "unknown dataset"),
])
def test_bad_detector_settings_are_user_errors(digits, settings, fragment):
    with pytest.raises(UserError, match=fragment):
        validate({"ood_sets": ["uniform"], **settings}, digits)


def test_a_detector_needing_features_the_model_lacks_is_refused_up_front(digits):
    from bench.models import MODELS

    explicit = {"ood_sets": ["uniform"], "_explicit": ("ood_scores",)}
    for score in ("mahalanobis", "knn"):
        with pytest.raises(UserError, match=f"{score} needs the penultimate features"):
            validate({**explicit, "ood_scores": [score]}, digits, [MODELS.get("igebm")])
        validate({**explicit, "ood_scores": [score]}, digits, [MODELS.get(n) for n in (
            "wrn", "jem", "jem_factored", "resflow", "glow_hybrid")])
    with pytest.raises(UserError, match="energy needs a classifier's logits"):
        validate({**explicit, "ood_scores": ["energy"]}, digits, [MODELS.get("glow")])


def test_cli_refuses_a_feature_detector_for_a_model_without_features(tmp_path):
    from test_cli import assert_user_error, bench

    res = bench("run", "suite=ood", "model=igebm", "ood_scores=[knn]", "scale=tiny", f"out={tmp_path}")
    assert_user_error(res, "knn needs the penultimate features")
    assert not list(tmp_path.iterdir())

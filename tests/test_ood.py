"""OOD detection: statistics against independent computations, the synthetic sets, shape mapping, and
clear errors for bad settings."""

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from bench.data import load_dataset
from bench.data.ood import SYNTHETIC, map_to_shape, synthetic
from bench.errors import UserError
from bench.metrics.ood import available, ood_statistics, validate
from bench.models.base import DataInfo
from bench.models.jem import JEM
from bench.models.pixel_independent import PixelIndependent
from bench.models.wrn import WRN
from bench.scales import Scale


def _scores(seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(1.0, 1.0, 400), rng.normal(0.0, 1.0, 300)


def test_auroc_equals_mann_whitney_and_fpr95_brute_force():
    s_in, s_out = _scores()
    st = ood_statistics(s_in, s_out)
    u = mannwhitneyu(s_in, s_out).statistic
    assert st["auroc"] == pytest.approx(u / (len(s_in) * len(s_out)), abs=1e-12)
    thr = np.sort(s_in)[::-1][int(np.ceil(0.95 * len(s_in))) - 1]  # lowest threshold keeping 95% of in-dist
    assert st["fpr95"] == pytest.approx((s_out >= thr).mean(), abs=1e-12)


def test_aupr_in_and_out_by_hand():
    s_in, s_out = _scores(1)

    def ap(pos, neg):
        order = np.argsort(-np.concatenate([pos, neg]), kind="stable")
        labels = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])[order]
        tp = np.cumsum(labels)
        precision = tp / np.arange(1, len(labels) + 1)
        return float((precision * labels).sum() / labels.sum())

    st = ood_statistics(s_in, s_out)
    assert st["aupr_in"] == pytest.approx(ap(s_in, s_out), abs=1e-9)
    assert st["aupr_out"] == pytest.approx(ap(-s_out, -s_in), abs=1e-9)


def test_statistics_invariant_to_order():
    s_in, s_out = _scores(2)
    rng = np.random.default_rng(0)
    a = ood_statistics(s_in, s_out)
    b = ood_statistics(rng.permutation(s_in), rng.permutation(s_out))
    assert a == pytest.approx(b)


def test_synthetic_sets():
    d = load_dataset("digits")
    for name in SYNTHETIC:
        x = synthetic(name, d, 0)
        assert x.dtype == torch.uint8 and tuple(x.shape[1:]) == d.shape
        assert torch.equal(x, synthetic(name, d, 0))
    interp = synthetic("interp", d, 0)
    assert torch.equal(interp[0], torch.round((d.test.x[0].float() + d.test.x[1].float()) / 2).to(torch.uint8))
    assert torch.equal(synthetic("flip", d, 0)[3], d.test.x[3].flip(-2))
    const = synthetic("constant", d, 0)
    assert (const.flatten(1).max(1).values == const.flatten(1).min(1).values).all()


def test_shape_mapping():
    rgb = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    grey, t = map_to_shape(rgb, (1, 8, 8), "x")
    assert grey.shape == (5, 1, 8, 8) and "rgb->grey" in t["colour"] and "resize" in t
    back, t2 = map_to_shape(grey, (3, 8, 8), "x")
    assert back.shape == (5, 3, 8, 8) and torch.equal(back[:, 0], back[:, 2])
    with pytest.raises(UserError, match="cannot be mapped"):
        map_to_shape(torch.zeros(2, 2, 8, 8, dtype=torch.uint8), (1, 8, 8), "two-channel")


def test_score_availability_follows_capabilities():
    info = DataInfo((1, 8, 8), 10)
    wrn, jem = WRN(WRN.recipe(Scale.tiny, info), info), JEM(JEM.recipe(Scale.tiny, info), info)
    pix = PixelIndependent(PixelIndependent.recipe(Scale.tiny, info), info)
    assert available(wrn, "max_softmax") is None and "no LogProb or Energy" in available(wrn, "log_px")
    assert all(available(jem, s) is None for s in ("log_px", "max_softmax", "grad_norm"))
    assert available(pix, "log_px") is None and "not differentiable" in available(pix, "grad_norm")


def test_bad_settings_are_user_errors(tmp_path):
    d = load_dataset("digits")
    with pytest.raises(UserError, match="unknown OOD score"):
        validate({"ood_sets": ["uniform"], "ood_scores": ["energy"]}, d)
    with pytest.raises(UserError, match="unknown dataset"):
        validate({"ood_sets": ["nope"]}, d)
    with pytest.raises(UserError, match="empty"):
        validate({"ood_sets": []}, d)
    bad = tmp_path / "two.npz"
    np.savez(bad, x=np.zeros((10, 8, 8, 2), np.uint8), y=np.zeros(10, np.int64))
    with pytest.raises(UserError, match="C 1 or 3|cannot be mapped"):  # refused by the loader already
        validate({"ood_sets": [f"npz:{bad}"]}, d)
    with pytest.raises(UserError, match="grad_norm needs a differentiable"):
        validate({"ood_sets": ["uniform"], "ood_scores": ["grad_norm"], "_explicit": ("ood_scores",)}, d,
                 [PixelIndependent])
    validate({"ood_sets": ["uniform", "interp"]}, d, [PixelIndependent])


def test_ood_suite_takes_only_models_with_a_classifier_energy_or_density(tmp_path):
    """`models: [all]` in suites/ood.yaml: a model that can give no OOD score is not trained for nothing."""
    from bench.config import load_config
    from bench.runner import plan

    names = plan(load_config(["suite=ood", f"out={tmp_path}"])).models
    assert {"jem", "wrn", "glow", "pixelcnn", "vae", "rbm"} <= set(names)
    assert not {"dcgan", "sngan", "ncsn"} & set(names)


def _ood_ctx(settings: dict):
    from types import SimpleNamespace

    d = load_dataset("digits")
    info = DataInfo(d.shape, d.n_classes)
    wrn = WRN(WRN.recipe(Scale.tiny, info), info).eval()  # untrained: the plumbing, not the numbers, is tested
    return SimpleNamespace(model=wrn, settings=settings, data=d, seed=0, device=torch.device("cpu"),
                           protocol={}, skipped={}, artifacts={})


def test_explicit_ood_sets_are_the_whole_list_and_fpr95_is_lower_is_better(tmp_path):
    from bench.metrics.ood import _compute

    real = tmp_path / "real.npz"
    np.savez(real, x=np.random.default_rng(0).integers(0, 256, (30, 8, 8, 1), dtype=np.uint8),
             y=np.zeros(30, np.int64))
    missing = f"npz:{tmp_path / 'missing.npz'}"
    base = {"ood_sets": ["uniform"], "ood_sets_if_present": [f"npz:{real}", missing],
            "ood_scores": ["max_softmax"]}

    implicit = _ood_ctx(dict(base))
    out = _compute(implicit)
    # the present real set joined (keys are score.set.stat, and a set's name may hold dots)
    assert {k.split(".", 1)[1].rsplit(".", 1)[0] for k in out} == {"uniform", f"npz:{real}"}
    assert implicit.protocol["ood_absent"] == [missing]  # named in the protocol, without machine paths
    assert "missing.npz" in implicit.skipped[f"ood.*.{missing}"]  # where it was looked for: an N/A cell
    assert out["max_softmax.uniform.fpr95"].extra == {"higher_is_better": False}
    assert out["max_softmax.uniform.auroc"].extra is None  # the metric's own direction (higher)

    explicit = _ood_ctx({**base, "_explicit": ("ood_sets",)})  # ood_sets=[uniform] on the command line
    out = _compute(explicit)
    assert {k.split(".", 1)[1].rsplit(".", 1)[0] for k in out} == {"uniform"}
    assert "ood_absent" not in explicit.protocol and not explicit.skipped

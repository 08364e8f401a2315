"""OOD detection: statistics against independent computations, the synthetic sets, shape mapping, and
clear errors for bad settings."""

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from bench.data import load_dataset
from bench.data.ood import SYNTHETIC, map_to_shape, synthetic
from bench.errors import UserError
from bench.metrics import METRICS
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


def brute_force_fpr95(s_in, s_out):
    """Sweep every threshold t (each score, and one above all): in-distribution accepted when s >= t. The
    smallest FPR among thresholds whose TPR is at least 95%, compared in integers (no float rounding)."""
    best = None
    for t in np.append(np.unique(np.concatenate([s_in, s_out])), np.inf):
        tp, fp = int((s_in >= t).sum()), int((s_out >= t).sum())
        if 100 * tp >= 95 * len(s_in):
            best = fp / len(s_out) if best is None else min(best, fp / len(s_out))
    return best


@pytest.mark.parametrize("case", range(40))
def test_fpr95_is_exact_under_heavy_ties(case):
    rng = np.random.default_rng(case)
    n_in, n_out = rng.integers(5, 120, 2)
    levels = rng.integers(1, 6)  # scores on at most 5 values: almost every score is tied
    s_in = rng.integers(0, levels + 1, n_in).astype(float)
    s_out = rng.integers(0, levels, n_out).astype(float)
    assert ood_statistics(s_in, s_out)["fpr95"] == brute_force_fpr95(s_in, s_out)


@pytest.mark.parametrize("s_in, s_out, expected", [
    (np.arange(20.0), np.arange(20.0), 0.95),  # identical lists: the diagonal (roc_curve's default gave 1.0)
    (np.arange(100.0), np.arange(100.0), 0.95),
    (np.ones(30), np.ones(50), 1.0),  # one tied value: no threshold separates anything
    (np.r_[np.ones(95), np.zeros(5)], np.zeros(40), 0.0),  # exactly 95% above every OOD score
    (np.r_[np.ones(94), np.zeros(6)], np.zeros(40), 1.0),  # 94%: the threshold must take the tie with all OOD
])
def test_fpr95_edge_cases(s_in, s_out, expected):
    assert ood_statistics(s_in, s_out)["fpr95"] == pytest.approx(expected, abs=1e-15)
    assert brute_force_fpr95(s_in, s_out) == pytest.approx(expected, abs=1e-15)


def test_fpr95_on_flip_like_sets_with_duplicate_scores():
    """A flip-like set: OOD scores are the in-distribution scores of other images, with duplicates."""
    rng = np.random.default_rng(7)
    s_in = np.round(rng.normal(0, 1, 360), 1)
    s_out = np.round(s_in[rng.permutation(360)] + rng.normal(0, 0.3, 360), 1)
    assert ood_statistics(s_in, s_out)["fpr95"] == brute_force_fpr95(s_in, s_out)


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
        validate({"ood_sets": ["uniform"], "ood_scores": ["energie"]}, d)
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
    """`models: [all]` in bench/suite_specs/ood.yaml: a model that can give no OOD score is not trained for nothing."""
    from bench.config import load_config
    from bench.plan import plan

    names = plan(load_config(["suite=ood", f"out={tmp_path}"])).models
    assert {"jem", "wrn", "glow", "pixelcnn", "vae", "rbm"} <= set(names)
    assert not {"dcgan", "sngan", "ncsn"} & set(names)


def _ood_ctx(settings: dict, model=None, seed=0):
    from types import SimpleNamespace

    d = load_dataset("digits")
    info = DataInfo(d.shape, d.n_classes)
    # untrained: the plumbing, not the numbers, is tested
    model = model or WRN(WRN.recipe(Scale.tiny, info), info).eval()
    return SimpleNamespace(model=model, settings=settings, data=d, seed=seed, device=torch.device("cpu"))


def test_explicit_ood_sets_are_the_whole_list_and_fpr95_is_lower_is_better(tmp_path):
    from bench.metrics.ood import _compute

    real = tmp_path / "real.npz"
    np.savez(real, x=np.random.default_rng(0).integers(0, 256, (30, 8, 8, 1), dtype=np.uint8),
             y=np.zeros(30, np.int64))
    missing = f"npz:{tmp_path / 'missing.npz'}"
    base = {"ood_sets": ["uniform"], "ood_sets_if_present": [f"npz:{real}", missing],
            "ood_scores": ["max_softmax"]}

    implicit = _compute(_ood_ctx(dict(base)))
    out = implicit.values
    # the present real set joined (keys are score.set.stat, and a set's name may hold dots)
    assert {k.split(".", 1)[1].rsplit(".", 1)[0] for k in out} == {"uniform", "npz:real.npz"}
    assert implicit.protocol["ood_absent"] == ["npz:missing.npz"]  # named in the protocol, without machine paths
    assert str(tmp_path) in implicit.skipped["ood.*.npz:missing.npz"]  # where it was looked for: an N/A cell
    assert implicit.draws["ood"]["sets"]["npz:real.npz"]["source"] == str(real)  # the path: beside the protocol
    assert out["max_softmax.uniform.fpr95"].extra == {"positive": "in-distribution (JEM)"}
    assert METRICS.get("ood").higher_is_better_for("ood.max_softmax.uniform.fpr95") is False  # lower is better
    assert METRICS.get("ood").higher_is_better_for("ood.max_softmax.uniform.auroc") is True
    assert set(implicit.artifacts) == {"ood_max_softmax.png", "roc_max_softmax.png"}

    explicit = _compute(_ood_ctx({**base, "_explicit": ("ood_sets",)}))  # ood_sets=[uniform] on the command line
    assert {k.split(".", 1)[1].rsplit(".", 1)[0] for k in explicit.values} == {"uniform"}
    assert "ood_absent" not in explicit.protocol and not explicit.skipped


def _tiny(name, **opts):
    import dataclasses

    from bench.models import MODELS

    cls = MODELS.get(name)
    info = DataInfo((1, 8, 8), 10)
    return cls(dataclasses.replace(cls.recipe(Scale.tiny, info), **opts), info).eval()


@pytest.mark.parametrize("name, opts", [
    ("vae", {}),  # IWAE draws inside log p(x): they differed by up to 1.78 nats between calls
    ("jem", {"eval_noise": 0.03}),  # test-time input noise from torch's global RNG
    ("wrn", {"eval_noise": 0.03}),
    ("pixel_independent", {}),
    ("rbm", {}),
])
def test_every_ood_score_is_deterministic_for_a_seed(name, opts):
    from bench.metrics.ood import SCORES, _fit_detectors, score_images

    model = _tiny(name, **opts)
    ctx = _ood_ctx({}, model=model)
    x = ctx.data.test.x[:150]  # two batches
    scores = [s for s in SCORES if available(model, s) is None]
    assert scores
    runs = []
    for global_seed in (1, 2):  # whatever the global RNG's state, the seed decides (fitting included)
        torch.manual_seed(global_seed)
        fitted = _fit_detectors(ctx, scores)
        runs.append({s: score_images(model, s, x, torch.device("cpu"), 0, fitted.get(s)) for s in scores})
    for s in scores:
        np.testing.assert_array_equal(runs[0][s], runs[1][s], err_msg=f"{name} {s}")


def test_a_stochastic_score_uses_its_seed():
    """The determinism above is not a score that ignores noise: another seed moves the VAE's IWAE log p(x)."""
    from bench.metrics.ood import score_images

    vae, x = _tiny("vae"), load_dataset("digits").test.x[:50]
    a, b = (score_images(vae, "log_px", x, torch.device("cpu"), seed=s) for s in (0, 1))
    assert np.abs(a - b).max() > 1e-3


def _hidden_npz(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8), y=np.zeros(40, np.int64))
    return path


def test_a_file_set_key_and_the_protocol_do_not_depend_on_its_path_or_the_seed(tmp_path):
    from bench.metrics.ood import _compute
    from bench.results.records import fingerprint

    a, b = _hidden_npz(tmp_path / "a" / "hidden.npz"), _hidden_npz(tmp_path / "elsewhere" / "hidden.npz")
    runs, model = {}, _tiny("wrn")
    for label, path, seed in (("a", a, 0), ("b", b, 0), ("seed1", a, 1)):
        ctx = _ood_ctx({"ood_sets": ["uniform", f"npz:{path}"], "ood_scores": ["max_softmax"],
                        "_explicit": ("ood_sets",)}, model=model, seed=seed)
        runs[label] = _compute(ctx)
    res_a, res_b, res_1 = runs["a"], runs["b"], runs["seed1"]
    out_a, out_b = res_a.values, res_b.values
    assert "max_softmax.npz:hidden.npz.auroc" in out_a and set(out_a) == set(out_b)
    assert all(out_a[k].value == out_b[k].value for k in out_a)  # the same file: the same numbers
    assert fingerprint(res_a.protocol) == fingerprint(res_b.protocol) == fingerprint(res_1.protocol)
    assert str(tmp_path) not in repr(res_a.protocol)
    assert res_a.draws["ood"]["sets"]["npz:hidden.npz"]["source"] == str(a)
    assert res_b.draws["ood"]["sets"]["npz:hidden.npz"]["source"] == str(b)
    seeds = res_a.draws["ood"], res_1.draws["ood"]
    assert seeds[0]["set_seed"] != seeds[1]["set_seed"] and seeds[0]["score_seed"] != seeds[1]["score_seed"]
    # the seed changed the uniform set (so the numbers), but not the protocol
    assert out_a["max_softmax.uniform.auroc"].value != res_1.values["max_softmax.uniform.auroc"].value


def test_clashing_file_names_get_content_keys_and_one_file_twice_is_refused(tmp_path):
    from bench.data.ood import set_keys
    from bench.metrics.ood import _compute

    one, two = _hidden_npz(tmp_path / "1" / "hidden.npz", 0), _hidden_npz(tmp_path / "2" / "hidden.npz", 1)
    ctx = _ood_ctx({"ood_sets": [f"npz:{one}", f"npz:{two}"], "ood_scores": ["max_softmax"],
                    "_explicit": ("ood_sets",)})
    keys = {k.split(".", 1)[1].rsplit(".", 1)[0] for k in _compute(ctx).values}
    sha = {p: load_dataset(f"npz:{p}").fingerprint() for p in (one, two)}
    assert keys == {f"npz:hidden.npz@{sha[one][:8]}", f"npz:hidden.npz@{sha[two][:8]}"}
    # the same keys whichever order and whichever folders: the content names them
    assert set(set_keys(["npz:/x/hidden.npz", "npz:/y/hidden.npz"], {"npz:/x/hidden.npz": sha[two],
                                                                       "npz:/y/hidden.npz": sha[one]}).values()) == keys
    copy = tmp_path / "3" / "hidden.npz"
    copy.parent.mkdir()
    copy.write_bytes(one.read_bytes())
    d = load_dataset("digits")
    with pytest.raises(UserError, match="hold the same images"):
        validate({"ood_sets": [f"npz:{one}", f"npz:{copy}"]}, d)
    with pytest.raises(UserError, match="names a set twice"):
        validate({"ood_sets": ["uniform", "uniform"]}, d)


def test_a_real_set_larger_than_the_test_split_is_subsampled_to_its_size_fixed_and_recorded(tmp_path):
    from bench.data.ood import load_ood_set

    d = load_dataset("digits")
    n_test = len(d.test)
    big = np.random.default_rng(0).integers(0, 256, (n_test + 140, 8, 8, 1), dtype=np.uint8)
    two = {"x_train": big[:10], "y_train": np.zeros(10, np.int64)}  # the OOD set is its test split
    np.savez(tmp_path / "big.npz", **two, x_test=big, y_test=np.zeros(len(big), np.int64))
    np.savez(tmp_path / "small.npz", **two, x_test=big[:50], y_test=np.zeros(50, np.int64))

    x, info, draws = load_ood_set(f"npz:{tmp_path / 'big.npz'}", d, seed=7, root=None)
    assert len(x) == info["n"] == n_test  # balanced with the in-distribution split
    assert info["subsample"]["n"] == n_test and info["subsample"]["of"] == len(big)
    assert "in-distribution test split" in info["subsample"]["rule"] and draws["subsample_seed"] == 7
    rows = {bytes(r) for r in big.transpose(0, 3, 1, 2).reshape(len(big), -1)}
    assert all(bytes(r) in rows for r in x.reshape(len(x), -1).numpy())  # a subset, each image whole
    assert len({bytes(r) for r in x.reshape(len(x), -1).numpy()}) == n_test  # without repeats
    again, _, _ = load_ood_set(f"npz:{tmp_path / 'big.npz'}", d, seed=7, root=None)
    assert torch.equal(x, again)  # fixed by the seed
    other, _, _ = load_ood_set(f"npz:{tmp_path / 'big.npz'}", d, seed=8, root=None)
    assert not torch.equal(x, other)

    x, info, _ = load_ood_set(f"npz:{tmp_path / 'small.npz'}", d, seed=7, root=None)
    assert len(x) == info["n"] == 50 and "subsample" not in info  # a smaller set is kept whole

"""bits/dim and the `likelihood` suite: the functional core against independent computations (numpy/scipy,
closed forms), invariances, and the runner's records (flags, N/A, failed records for non-finite values)."""

import json
from dataclasses import dataclass

import numpy as np
import pytest
import scipy.stats
import torch

from bench.config import load_config
from bench.data import load_dataset
from bench.errors import NonFiniteError, UserError
from bench.metrics import METRICS
from bench.metrics.bits_per_dim import bits_per_dim, dequantize, dequantized_log_probs, mean_and_stderr
from bench.models.base import BenchModel, DataInfo, TrainContext, no_progress, register
from bench.models.pixel_independent import PixelIndependent, PixelIndependentConfig
from bench.runner import run
from bench.suites import load_suite

CPU = torch.device("cpu")


@dataclass(frozen=True)
class _Cfg:
    pass


class _Analytic(BenchModel):
    family = "test"
    Config = _Cfg
    log_prob_kind = "exact"

    @classmethod
    def recipe(cls, scale, data):
        return _Cfg()

    def fit(self, train, ctx):
        return {"steps": 0}


@register("test_uniform_density")
class UniformDensity(_Analytic):
    """p(y) = 1 on [0,1]^D: exactly 8 bits/dim whatever the data."""

    def log_prob(self, x):
        return torch.zeros(x.shape[0], dtype=torch.float64)


@register("test_nan_log_prob")
class NaNLogProb(_Analytic):
    """A broken density: NaN for every other image."""

    def log_prob(self, x):
        out = torch.zeros(x.shape[0], dtype=torch.float64)
        out[::2] = float("nan")
        return out


@register("test_no_density")
class NoDensity(_Analytic):
    """A model without log_prob: bits/dim is N/A for it."""


class LinearDensity(_Analytic):
    """p(y) = Πᵢ 2·yᵢ on [0,1]^D, the Beta(2, 1) density per dimension."""

    def log_prob(self, x):
        return torch.log(2.0 * x.double()).flatten(1).sum(1)


# --- the functional core ------------------------------------------------------------------------
def test_bits_per_dim_formula_against_numpy():
    g = np.random.default_rng(0)
    lp = g.normal(-100.0, 30.0, size=50)
    d = 64
    expected = 8.0 - lp / (d * np.log(2.0))  # −log₂ p(y)/D + log₂ 256
    ours = bits_per_dim(torch.from_numpy(lp), d).numpy()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-12)
    assert bits_per_dim(torch.zeros(3), 784).tolist() == [8.0, 8.0, 8.0]  # the uniform density
    with pytest.raises(ValueError):
        bits_per_dim(torch.zeros(3), 0)


def test_dequantize_stays_in_the_bin_and_is_seeded():
    x = torch.arange(256, dtype=torch.uint8).repeat(200).view(-1, 1, 16, 16)
    y = dequantize(x, torch.Generator().manual_seed(0))
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert (y >= 0).all() and (y < 1).all()
    assert torch.equal((y * 256).floor().long(), x.long())  # floor(256·y) = x, even for x = 255
    assert torch.equal(y, dequantize(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(y, dequantize(x, torch.Generator().manual_seed(1)))
    u = (y.double() * 256 - x.double()).flatten().numpy()
    assert scipy.stats.kstest(u, "uniform").pvalue > 1e-3  # u ~ U[0, 1)
    with pytest.raises(ValueError, match="uint8"):
        dequantize(x.float(), torch.Generator())


def test_mean_and_stderr_equal_scipy():
    v = torch.randn(360, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 2
    mean, se = mean_and_stderr(v)
    assert mean == pytest.approx(float(np.mean(v.numpy())), abs=1e-12)
    assert se == pytest.approx(float(scipy.stats.sem(v.numpy())), rel=1e-10)


def test_analytic_density_gives_the_closed_form_bits_per_dim():
    """Beta(2,1) per dimension: E_u[−log₂ p((x+u)/256)] has a closed form; bright pixels keep the Monte Carlo
    error of the dequantization far below the 1e-4 tolerance."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(128, 256, (400, 1, 8, 8), generator=g, dtype=torch.uint8)
    lp = dequantized_log_probs(LinearDensity(_Cfg(), DataInfo((1, 8, 8), 10)), x, seed=0, device=CPU)
    ours, _ = mean_and_stderr(bits_per_dim(lp, 64))
    xs = x.double().flatten().numpy()
    # ∫ₓ^{x+1} ln t dt = [t ln t − t]ₓ^{x+1}
    e_ln = (xs + 1) * np.log(xs + 1) - (xs + 1) - xs * np.log(xs) + xs
    closed = 8.0 - np.mean(np.log(2.0) + e_ln - np.log(256.0)) / np.log(2.0)
    assert abs(ours - closed) < 1e-4
    # and per image, on the very y the metric drew, scipy's Beta(2,1) log-density agrees
    y = dequantize(x, torch.Generator().manual_seed(0 + 2_000_000)).double().flatten(1).numpy()
    ref = 8.0 - scipy.stats.beta(2, 1).logpdf(y).sum(1) / (64 * np.log(2.0))
    np.testing.assert_allclose(bits_per_dim(lp, 64).numpy(), ref, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def pixel_independent(digits):
    m = PixelIndependent(PixelIndependentConfig(alpha=1.0), DataInfo.of(digits))
    m.fit(digits.train, TrainContext(CPU, 0, no_progress))
    return m


def _cross_entropy_bits(train: np.ndarray, test: np.ndarray, alpha: float) -> np.ndarray:
    """Per-image mean over pixels of −log₂ P(x) under per-pixel Dirichlet-smoothed histograms (numpy only)."""
    n, d = train.shape
    counts = np.stack([np.bincount(train[:, j], minlength=256) for j in range(d)]).astype(np.float64) + alpha
    p = counts / counts.sum(1, keepdims=True)
    return -np.log2(p[np.arange(d), test]).mean(1)


def test_pixel_independent_bits_per_dim_is_its_cross_entropy(digits, pixel_independent):
    lp = dequantized_log_probs(pixel_independent, digits.test.x, seed=0, device=CPU)
    ours = bits_per_dim(lp, 64).numpy()
    ref = _cross_entropy_bits(digits.train.x.flatten(1).numpy().astype(np.int64),
                              digits.test.x.flatten(1).numpy().astype(np.int64), alpha=1.0)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_invariant_to_batch_size_and_order(digits, pixel_independent):
    x = digits.test.x
    a = dequantized_log_probs(pixel_independent, x, seed=0, device=CPU, batch_size=500)
    b = dequantized_log_probs(pixel_independent, x, seed=0, device=CPU, batch_size=7)
    assert torch.equal(a, b)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    c = dequantized_log_probs(pixel_independent, x[perm], seed=0, device=CPU, batch_size=64)
    torch.testing.assert_close(c, a[perm], rtol=0, atol=1e-9)
    ma, _ = mean_and_stderr(bits_per_dim(a, 64))
    mc, _ = mean_and_stderr(bits_per_dim(c, 64))
    assert mc == pytest.approx(ma, abs=1e-12)


def test_non_finite_log_likelihood_raises():
    x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(NonFiniteError, match="non-finite log-likelihood"):
        dequantized_log_probs(NaNLogProb(_Cfg(), DataInfo((1, 8, 8), 10)), x, seed=0, device=CPU)


def test_metric_declaration():
    m = METRICS.get("bits_per_dim")
    assert (m.higher_is_better, m.unit, m.requires) == (False, "bits/dim", ("LogProb",))


# --- the suite, through the runner ----------------------------------------------------------------
def test_suite_file(tmp_path):
    s = load_suite("likelihood")
    assert s.metrics == ("bits_per_dim",) and s.data == "digits" and s.version == "2"
    assert s.models == ("all",)  # every model with a LogProb, pixel_independent (the floor) among them
    from bench.config import load_config
    from bench.plan import plan

    names = plan(load_config(["suite=likelihood", f"out={tmp_path}"])).models
    assert {"pixel_independent", "vae", "pixelcnn", "nice", "realnvp", "glow", "glow_hybrid", "resflow",
            "rbm"} <= set(names)
    assert not {"jem", "wrn", "dcgan", "sngan", "ncsn", "igebm"} & set(names)
    assert s.n_samples == {}  # no sample metric, no samples section


def test_runner_records_flags_and_na(tmp_path, digits):
    models = "models=[test_uniform_density,pixel_independent,test_no_density,vae]"
    cfg = load_config(["suite=likelihood", "scale=tiny", models, f"out={tmp_path}"])
    outcome = run(cfg)
    recs = {r.model: r for r, _ in outcome.records}
    assert all(r.ok for r in recs.values()), [r.reason for r in recs.values()]
    uni = recs["test_uniform_density"].metrics["bits_per_dim"]
    assert uni.value == 8.0 and uni.stderr == 0.0 and uni.n == len(digits.test)
    assert uni.extra["kind"] == "exact" and uni.extra["bound"] is False and uni.unit == "bits/dim"
    assert uni.higher_is_better is False
    pi = recs["pixel_independent"].metrics["bits_per_dim"]
    ref = _cross_entropy_bits(digits.train.x.flatten(1).numpy().astype(np.int64),
                              digits.test.x.flatten(1).numpy().astype(np.int64), alpha=1.0)
    assert pi.value == pytest.approx(ref.mean(), abs=1e-5)
    assert pi.stderr == pytest.approx(scipy.stats.sem(ref), rel=1e-4)
    assert "bits_per_dim" not in recs["test_no_density"].metrics
    assert "LogProb" in recs["test_no_density"].skipped["bits_per_dim"]
    vae = recs["vae"].metrics["bits_per_dim"].extra
    assert vae["kind"] == "bound" and vae["bound"] is True and vae["k"] == recs["vae"].model_config["iwae_k"]
    proto = recs["vae"].protocol["bits_per_dim"]
    assert proto["k"] == vae["k"] and proto["log_prob_kind"] == "bound" and "dequantization" in proto
    # the records on disk say the same
    for r, path in outcome.records:
        assert json.loads(path.read_text()) == json.loads(json.dumps(r.to_json()))


def test_non_finite_log_likelihood_gives_a_failed_record_and_the_run_goes_on(tmp_path):
    cfg = load_config(["suite=likelihood", "scale=tiny", "models=[test_nan_log_prob,test_uniform_density]",
                       f"out={tmp_path}"])
    outcome = run(cfg)
    recs = {r.model: (r, p) for r, p in outcome.records}
    bad, path = recs["test_nan_log_prob"]
    assert bad.status == "failed" and "non-finite" in bad.reason and bad.metrics == {}
    on_disk = json.loads(path.read_text())
    assert on_disk["status"] == "failed" and on_disk["metrics"] == {}
    assert recs["test_uniform_density"][0].ok


def test_unknown_model_option_is_refused_before_anything_is_written(tmp_path):
    cfg = load_config(["suite=likelihood", "scale=tiny", "model=vae", "opts.nope=1", f"out={tmp_path}"])
    with pytest.raises(UserError, match="unknown option 'nope' for model 'vae'"):
        run(cfg)
    assert not any(tmp_path.iterdir())


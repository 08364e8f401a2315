"""VAE: the IWAE bound against the exact marginal likelihood of a one-dimensional latent (quadrature over z),
its tightening with k, the decoder likelihoods against scipy, sampling, shapes, and bad input."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from bench.config import load_config
from bench.data import load_dataset
from bench.errors import ModelFailure, UserError
from bench.models.base import DataInfo, TrainContext, no_progress
from bench.models.vae import VAE, VAEConfig, discretized_logistic_log_prob, stage_strides
from bench.runner import run
from bench.scales import Scale

CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Models this small run fastest on one thread, and tests running beside others don't oversubscribe."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def vae_1d(digits):
    """A VAE with a single latent dimension, trained a little so that q(z|x) differs from the prior."""
    torch.manual_seed(0)
    cfg = VAEConfig(latent_dim=1, widths=(8, 16), likelihood="categorical", epochs=4, batch_size=64, lr=3e-3,
                    iwae_k=16, iwae_chunk=64)
    m = VAE(cfg, DataInfo.of(digits))
    m.fit(digits.train, TrainContext(CPU, 0, no_progress))
    return m


def _exact_log_px(m: VAE, x: torch.Tensor, half_width: float, step: float) -> torch.Tensor:
    """log P(x) = log ∫ P(x|z) N(z; 0, 1) dz by the trapezoid rule on a grid (decoder only, no encoder)."""
    z = torch.arange(-half_width, half_width + step / 2, step, dtype=torch.float64)
    terms = []
    with torch.no_grad():
        for zc in z.split(500):
            logits = m.decoder(zc.float().unsqueeze(1)).view(len(zc), 256, -1).double()  # M×256×D
            lp = torch.log_softmax(logits, 1)  # M×256×D
            flat = x.flatten(1).long()  # N×D
            ll = torch.stack([lp[:, flat[i], torch.arange(flat.shape[1])].sum(1) for i in range(len(x))], 1)  # M×N
            terms.append(ll + torch.from_numpy(scipy.stats.norm.logpdf(zc.numpy()))[:, None])
    t = torch.cat(terms)
    w = torch.full((len(z),), math.log(step), dtype=torch.float64)
    w[0] = w[-1] = math.log(step / 2)
    return torch.logsumexp(t + w[:, None], 0)


def test_iwae_bound_tightens_with_k_and_stays_below_the_exact_likelihood(digits, vae_1d):
    m = vae_1d.eval()
    x = digits.test.x[:4].long()
    exact = _exact_log_px(m, x, 10.0, 0.005)
    coarse = _exact_log_px(m, x, 10.0, 0.01)
    assert torch.allclose(exact, coarse, atol=1e-4)  # the quadrature has converged
    reps = 64
    g = torch.Generator().manual_seed(0)
    means, ses = [], []
    with torch.no_grad():
        for k in (1, 4, 16, 64, 256):
            est = m.iwae_bound(x.repeat(reps, 1, 1, 1), k, g).view(reps, len(x))
            means.append(est.mean(0))
            ses.append(est.std(0) / math.sqrt(reps))
    for mean, se in zip(means, ses):
        assert (mean <= exact + 4 * se + 1e-6).all()  # a lower bound (in expectation)
    for (m1, s1), (m2, s2) in zip(zip(means, ses), zip(means[1:], ses[1:])):
        assert (m2 >= m1 - 4 * torch.sqrt(s1**2 + s2**2)).all()  # non-decreasing in k
    gap_1, gap_256 = exact - means[0], exact - means[-1]
    assert gap_1.mean() > 0.2  # q(z|x) is not the posterior: the ELBO is visibly loose
    assert (gap_256.abs() < 4 * ses[-1] + 0.03).all()  # and IWAE-256 has closed the gap to the exact value
    # k = 1 is the ELBO: the same expectation as the analytic-KL ELBO used for training
    with torch.no_grad():
        elbo = torch.stack([m.elbo(x, 1.0, g) for _ in range(reps)]).double()
    assert (abs(elbo.mean(0) - means[0]) < 4 * torch.sqrt(ses[0] ** 2 + (elbo.std(0) / math.sqrt(reps)) ** 2)).all()


def test_log_prob_is_the_bound_on_the_dequantized_density(digits, vae_1d):
    x = digits.test.x[:6]
    y = (x.double() + 0.37).float() / 256
    with torch.no_grad():
        lp = vae_1d.log_prob(y, generator=torch.Generator().manual_seed(5))
        bound = vae_1d.iwae_bound(x.long(), vae_1d.config.iwae_k, torch.Generator().manual_seed(5))
    assert lp.dtype == torch.float64 and lp.shape == (6,)
    torch.testing.assert_close(lp, bound + 64 * math.log(256.0))
    assert VAE.log_prob_kind == "bound" and vae_1d.log_prob_protocol()["k"] == vae_1d.config.iwae_k
    with pytest.raises(UserError, match="built for images"):
        vae_1d.log_prob(torch.rand(2, 3, 8, 8))


def test_discretized_logistic_equals_scipy_and_normalizes():
    mean = torch.tensor([-0.9, -0.2, 0.0, 0.5, 0.99]).view(5, 1, 1, 1)
    log_scale = torch.tensor([-4.0, -2.5, -1.0, 0.0, -6.5]).view(5, 1, 1, 1)
    values = torch.arange(256)
    lp = torch.stack([discretized_logistic_log_prob(mean, log_scale, torch.full((5, 1, 1, 1), int(v)))
                      for v in values]).view(256, 5).double()
    assert torch.allclose(lp.exp().sum(0), torch.ones(5, dtype=torch.float64), atol=1e-4)
    edges = np.concatenate([[-np.inf], (np.arange(255) + 0.5) / 127.5 - 1.0, [np.inf]])  # bin k: (e_k, e_{k+1}]
    for i in range(5):
        cdf = scipy.stats.logistic(loc=mean[i].item(), scale=math.exp(log_scale[i].item())).cdf(edges)
        ref = np.diff(cdf)
        big = ref > 1e-4
        np.testing.assert_allclose(lp[big, i].exp().numpy(), ref[big], rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("likelihood", ["categorical", "logistic"])
def test_samples_are_deterministic_given_the_generator(likelihood):
    torch.manual_seed(0)
    m = VAE(VAEConfig(latent_dim=3, widths=(8,), likelihood=likelihood, iwae_k=4, iwae_chunk=2),
            DataInfo((1, 8, 8), 10)).eval()
    a = m.sample(9, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == (9, 1, 8, 8)
    assert torch.equal(a, m.sample(9, torch.Generator().manual_seed(1)))
    assert not torch.equal(a, m.sample(9, torch.Generator().manual_seed(2)))


@pytest.mark.parametrize("shape,strides", [((1, 8, 8), [2, 1]), ((1, 28, 28), [2, 2, 1]), ((3, 32, 32), [2, 2, 2])])
def test_architecture_adapts_to_the_data_shape(shape, strides):
    assert stage_strides(shape[1], shape[2], len(strides)) == strides
    torch.manual_seed(0)
    m = VAE(VAEConfig(latent_dim=4, widths=(4,) * len(strides), likelihood="logistic", iwae_k=2, iwae_chunk=2),
            DataInfo(shape, 10)).eval()
    with torch.no_grad():
        lp = m.log_prob(torch.rand(3, *shape))
    assert lp.shape == (3,) and torch.isfinite(lp).all()
    assert m.sample(2, torch.Generator().manual_seed(0)).shape == (2, *shape)


def test_every_scale_has_a_recipe_and_divergence_is_caught(digits):
    info = DataInfo.of(digits)
    for scale in Scale:
        assert isinstance(VAE.recipe(scale, info), VAEConfig)
    assert VAE.recipe(Scale.paper, info).likelihood == "logistic"
    m = VAE(VAE.recipe(Scale.tiny, info), info)
    with torch.no_grad():
        m.decoder.fc.bias.fill_(float("nan"))
    with pytest.raises(ModelFailure, match="diverged"):
        m.fit(digits.train, TrainContext(CPU, 0, no_progress))
    with pytest.raises(ValueError):
        VAEConfig(iwae_k=0)


def test_checkpoint_for_other_image_shape_is_refused_before_anything_is_written(tmp_path):
    first = run(load_config(["suite=likelihood", "scale=tiny", "model=vae", f"out={tmp_path / 'r'}"]))
    rec, _ = first.records[0]
    assert rec.status == "ok" and rec.metrics["bits_per_dim"].extra["bound"] is True
    ckpt = rec.checkpoint["path"]
    rng = np.random.default_rng(0)
    for c, h in [(1, 10), (3, 8)]:
        data = tmp_path / f"d{c}x{h}.npz"
        np.savez(data, x=rng.integers(0, 256, (40, h, h, c), dtype=np.uint8), y=np.arange(40) % 2)
        out = tmp_path / f"out{c}x{h}"
        cfg = load_config(["suite=likelihood", "scale=tiny", "model=vae", f"data=npz:{data}", f"checkpoint={ckpt}",
                           f"out={out}"])
        with pytest.raises(UserError, match="does not fit model 'vae'"):
            run(cfg)
        assert not out.exists() or not any(out.iterdir())

"""Gated PixelCNN: exact causality in raster order (R, G, B within a pixel), no blind spot, a normalized
exact likelihood, samples that follow the model, and refusal of checkpoints for another image shape."""

import itertools

import numpy as np
import pytest
import torch

from bench.config import load_config
from bench.data import load_dataset
from bench.errors import ModelFailure, UserError
from bench.models.base import DataInfo, TrainContext, no_progress
from bench.models.pixelcnn import PixelCNN, PixelCNNConfig
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


def _model(shape, channels=6, n_layers=3, kernel_size=3, seed=0) -> PixelCNN:
    torch.manual_seed(seed)
    m = PixelCNN(PixelCNNConfig(channels=channels, n_layers=n_layers, kernel_size=kernel_size,
                                head_channels=channels), DataInfo(shape, 10)).eval()
    with torch.no_grad():  # biases at zero would hide dependencies behind symmetric activations
        for p in m.parameters():
            p.add_(0.3 * torch.randn(p.shape))
    return m


def _jacobian(m: PixelCNN, shape) -> torch.Tensor:
    """|∂ logits(sub-pixel o) / ∂ input(sub-pixel i)| summed over the 256 logits and over a few random inputs
    (a ReLU of the head can be off for one input), indexed in raster order."""
    c, h, w = shape
    x = torch.rand(4, c, h, w, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = m.net(x * 2 - 1)
    order = [(i, j, ch) for i in range(h) for j in range(w) for ch in range(c)]  # raster, R→G→B
    jac = torch.zeros(len(order), len(order))
    for o, (i, j, ch) in enumerate(order):
        (g,) = torch.autograd.grad(out[:, :, ch, i, j].sum(), x, retain_graph=True)
        jac[o] = torch.stack([g[:, cc, ii, jj].abs().sum() for ii, jj, cc in order])
    return jac


@pytest.mark.parametrize("shape", [(1, 5, 5), (3, 4, 4)])
def test_output_depends_only_on_earlier_subpixels(shape):
    m = _model(shape, channels=12, n_layers=4)
    jac = _jacobian(m, shape)
    assert torch.count_nonzero(torch.triu(jac)) == 0  # exactly zero for every input j >= output i
    c, h, w = shape

    def idx(i, j, ch):
        return (i * w + j) * c + ch

    # and it does look back: at the previous sub-pixel, the pixel to the left, and above-right, where a
    # plain masked-convolution PixelCNN has its blind spot
    centre = (2, 2)
    for ch in range(c):
        o = idx(*centre, ch)
        assert jac[o, idx(2, 1, 0)] > 0 and jac[o, idx(1, 2, 0)] > 0 and jac[o, idx(1, 3, 0)] > 0
        for earlier in range(ch):  # G sees R, B sees R and G, at the same pixel
            assert jac[o, idx(*centre, earlier)] > 0


def test_log_prob_is_a_normalized_exact_distribution():
    """Σₓ P(x) = 1 over all 65,536 images of two sub-pixels, both as 1×1×2 and as one two-colour pixel."""
    for shape in [(1, 1, 2), (2, 1, 1)]:
        m = _model(shape, channels=4, n_layers=2)
        vals = torch.tensor(list(itertools.product(range(256), repeat=2)), dtype=torch.uint8).view(-1, *shape)
        with torch.no_grad():
            lp = m.log_prob((vals.double() + 0.5).float() / 256)
        log_total = torch.logsumexp(lp - 2 * np.log(256.0), 0).item()  # log Σ P(x) from the density
        assert abs(log_total) < 1e-4, shape


def test_log_prob_is_constant_within_a_bin_and_refuses_other_shapes():
    m = _model((1, 4, 4))
    x = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8)
    with torch.no_grad():
        lo = m.log_prob(x.float() / 256)
        hi = m.log_prob((x.double() + 0.999).float() / 256)
    assert torch.allclose(lo, hi, rtol=0, atol=1e-9) and lo.dtype == torch.float64 and lo.shape == (6,)
    with pytest.raises(UserError, match="built for images"):
        m.log_prob(torch.rand(2, 1, 5, 5))


def test_samples_follow_the_model_and_are_deterministic():
    """200,000 ancestral samples of a two-sub-pixel model against its exact distribution (all 65,536 images):
    both marginals (the second one needs the conditioning right) and the mean log-probability (−entropy)."""
    m = _model((1, 1, 2), channels=4, n_layers=2)
    with torch.no_grad():
        m.net.head2.weight.mul_(4.0)  # a more peaked distribution than at initialization
        vals = torch.tensor(list(itertools.product(range(256), repeat=2)), dtype=torch.uint8).view(-1, 1, 1, 2)
        log_p = m.log_prob((vals.double() + 0.5).float() / 256) - 2 * np.log(256.0)  # log P(x₀, x₁), x₀ major
    p = log_p.exp().view(256, 256)
    n = 200_000  # sampling noise in the total variation of a 256-bin histogram: about 0.012
    s = m.sample(n, torch.Generator().manual_seed(0))
    assert s.dtype == torch.uint8 and s.shape == (n, 1, 1, 2)
    for axis, marginal in ((0, p.sum(1)), (1, p.sum(0))):
        emp = torch.bincount(s[:, 0, 0, axis].long(), minlength=256).double() / n
        assert 0.5 * (emp - marginal).abs().sum() < 0.03, axis  # total variation
    lp_s = log_p[s[:, 0, 0, 0].long() * 256 + s[:, 0, 0, 1].long()]
    neg_entropy = (p.flatten() * log_p).sum()
    assert abs(lp_s.mean() - neg_entropy) < 4 * lp_s.std() / np.sqrt(n)
    g = torch.Generator
    assert torch.equal(m.sample(50, g().manual_seed(3)), m.sample(50, g().manual_seed(3)))
    assert not torch.equal(m.sample(50, g().manual_seed(3)), m.sample(50, g().manual_seed(4)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The likelihood suite on digits at tiny scale; the checkpoint lands in the session's cache."""
    out = tmp_path_factory.mktemp("pixelcnn-results")
    outcome = run(load_config(["suite=likelihood", "scale=tiny", "model=pixelcnn", f"out={out}"]))
    return outcome.records[0][0]


def test_tiny_training_beats_the_uniform_density_and_divergence_is_caught(tiny_run):
    assert tiny_run.ok and tiny_run.train["steps"] > 0
    bpd = tiny_run.metrics["bits_per_dim"]
    assert bpd.value < 8.0  # the uniform density over {0..255}
    assert bpd.extra["kind"] == "exact" and bpd.extra["bound"] is False
    d = load_dataset("digits")
    info = DataInfo.of(d)
    broken = PixelCNN(PixelCNN.recipe(Scale.tiny, info), info)
    with torch.no_grad():
        broken.net.head2.bias.fill_(float("nan"))
    with pytest.raises(ModelFailure, match="diverged"):
        broken.fit(d.train, TrainContext(CPU, 0, no_progress))


def test_channels_must_split_into_colour_groups():
    with pytest.raises(UserError, match="multiple of the image's 3 channels.*opts.channels=6"):
        PixelCNN(PixelCNNConfig(channels=4, head_channels=6), DataInfo((3, 8, 8), 10))
    for scale in Scale:  # every recipe adapts to colour images
        for shape in [(1, 8, 8), (3, 32, 32)]:
            cfg = PixelCNN.recipe(scale, DataInfo(shape, 10))
            assert cfg.channels % shape[0] == 0 and cfg.head_channels % shape[0] == 0
    with pytest.raises(ValueError, match="odd"):
        PixelCNNConfig(kernel_size=4)


def _npz(path, shape, n=40):
    rng = np.random.default_rng(0)
    c, h, w = shape
    x = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
    np.savez(path, x=x, y=np.arange(n) % 2)
    return path


def test_checkpoint_for_other_image_shape_is_refused_before_anything_is_written(tmp_path, tiny_run):
    ckpt = tiny_run.checkpoint["path"]
    for shape in [(1, 10, 10), (3, 8, 8)]:
        data = _npz(tmp_path / f"d{shape[0]}x{shape[1]}.npz", shape)
        out2 = tmp_path / f"out{shape[0]}x{shape[1]}"
        cfg = load_config(["suite=likelihood", "scale=tiny", "model=pixelcnn", f"data=npz:{data}",
                           f"checkpoint={ckpt}", f"out={out2}"])
        with pytest.raises(UserError, match="does not fit model 'pixelcnn'"):
            run(cfg)
        assert not out2.exists() or not any(out2.iterdir())

import json
import math

import pytest
import torch

from bench.data import load_dataset
from bench.errors import NonFiniteError, UserError
from bench.models import MODELS
from bench.models.base import DataInfo, TrainContext, no_progress, to_uint8
from bench.models.jem import JEM, JEMConfig
from bench.models.pixel_independent import PixelIndependent, PixelIndependentConfig
from bench.models.wrn import WRN, WRNConfig
from bench.scales import Scale

INFO = DataInfo((1, 8, 8), 10)


def test_wrn_follows_jem_key_layout_at_28x10(shared_dir):
    spec = json.loads((shared_dir / "fixtures" / "jem_ccf_wrn28x10_keys.json").read_text())["model_state_dict"]
    model = WRN(WRNConfig(depth=28, width=10, norm="none"), DataInfo((3, 32, 32), 10))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    unused = {k: v for k, v in spec.items() if k.startswith(("f.linear.", "energy_output."))}
    assert ours == {k: v for k, v in spec.items() if k not in unused}


def test_wrn_depth_must_be_6n_plus_4():
    with pytest.raises(ValueError, match="6n\\+4"):
        WRNConfig(depth=12)


def test_jem_energy_is_minus_logsumexp_of_logits():
    torch.manual_seed(0)
    m = JEM(JEM.recipe(Scale.tiny, INFO), INFO).eval()
    x = torch.rand(5, 1, 8, 8)
    assert torch.allclose(m.energy(x), -torch.logsumexp(m.logits(x), 1))


def test_jem_sampling_is_deterministic_given_generator():
    torch.manual_seed(0)
    m = JEM(JEM.recipe(Scale.tiny, INFO), INFO).eval()
    m.replay_buffer.uniform_(-1, 1)
    a = m.sample(7, torch.Generator().manual_seed(3))
    b = m.sample(7, torch.Generator().manual_seed(3))
    c = m.sample(7, torch.Generator().manual_seed(4))
    assert a.dtype == torch.uint8 and a.shape == (7, 1, 8, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_diverging_sampler_raises_instead_of_returning_garbage():
    torch.manual_seed(0)
    cfg = JEMConfig(depth=10, width=1, buffer_size=8, sample_steps=3, sgld_noise=float("inf"))
    m = JEM(cfg, INFO).eval()
    m.replay_buffer.uniform_(-1, 1)
    with pytest.raises(NonFiniteError, match="non-finite"):
        m.sample(4, torch.Generator().manual_seed(0))


def test_to_uint8_refuses_nan():
    with pytest.raises(NonFiniteError):
        to_uint8(torch.tensor([0.5, float("nan")]))
    assert to_uint8(torch.tensor([0.0, 1.0, 2.0])).tolist() == [0, 255, 255]


def test_pixel_independent_is_a_normalized_exact_density():
    d = load_dataset("digits")
    m = PixelIndependent(PixelIndependentConfig(alpha=1.0), DataInfo.of(d))
    m.fit(d.train, TrainContext(torch.device("cpu"), 0, no_progress))
    # each pixel's categorical sums to one
    assert torch.allclose(m.log_probs.exp().sum(1), torch.ones(64), atol=1e-5)
    # log p(y) on dequantized data = sum log P(k) + D log 256: bits/dim = cross-entropy in bits
    x = d.test.x[:10]
    y = (x.double() + torch.rand(x.shape, dtype=torch.float64)) / 256
    lp = m.log_prob(y)
    k = x.reshape(10, -1).long()
    manual = torch.stack([m.log_probs[torch.arange(64), k[i]].double().sum() for i in range(10)]) + 64 * math.log(256)
    assert torch.allclose(lp, manual, atol=1e-6)
    # smoothing: counts + alpha over N + 256 alpha
    px0 = (d.train.x.reshape(len(d.train), -1)[:, 0] == 0).sum().item()
    assert math.isclose(m.log_probs[0, 0].exp().item(), (px0 + 1) / (len(d.train) + 256), rel_tol=1e-5)


def test_pixel_independent_samples_follow_the_marginals():
    d = load_dataset("digits")
    m = PixelIndependent(PixelIndependentConfig(), DataInfo.of(d))
    m.fit(d.train, TrainContext(torch.device("cpu"), 0, no_progress))
    s = m.sample(4000, torch.Generator().manual_seed(0))
    assert s.dtype == torch.uint8 and s.shape == (4000, 1, 8, 8)
    # mean pixel intensity matches the model's expectation within sampling error
    expect = (m.log_probs.exp() * torch.arange(256.0)).sum(1)
    assert torch.allclose(s.reshape(4000, -1).float().mean(0), expect, atol=6.0)


def test_unknown_option_is_a_user_error():
    with pytest.raises(UserError, match="unknown option 'nope' for model 'jem'"):
        JEM.configure(Scale.tiny, INFO, {"nope": 1})
    with pytest.raises(UserError, match="must be int"):
        JEM.configure(Scale.tiny, INFO, {"sgld_steps": "many"})
    assert JEM.configure(Scale.tiny, INFO, {"sgld_steps": 5}).sgld_steps == 5


def test_every_model_has_a_recipe_per_scale():
    for name, cls in MODELS.items():
        for scale in Scale:
            cfg = cls.recipe(scale, INFO)
            assert isinstance(cfg, cls.Config), name


def test_paper_recipes_are_jems_published_settings():
    c = JEM.recipe(Scale.paper, DataInfo((3, 32, 32), 10))
    assert (c.depth, c.width, c.norm, c.leak) == (28, 10, "none", 0.2)
    assert (c.lr, c.batch_size, c.warmup_iters, c.decay_epochs, c.decay_rate) == (1e-4, 64, 1000, (160, 180), 0.3)
    assert (c.data_noise, c.px_weight, c.pyx_weight) == (0.03, 1.0, 1.0)
    assert (c.sgld_steps, c.sgld_step_size, c.sgld_noise, c.buffer_size, c.reinit_freq) == (20, 1.0, 0.01, 10000, 0.05)
    w = WRN.recipe(Scale.paper, DataInfo((3, 32, 32), 10))
    assert (w.depth, w.width) == (28, 10)


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 12, 12)])
def test_channels_last_is_the_same_math_up_to_float_rounding(shape):
    """NHWC convolutions (the default, faster on a CPU) against NCHW: the same weights give the same logits and
    the same input gradient (SGLD's step) to float tolerance; the checkpoint stays contiguous."""
    from bench.models.wrn import WideResNetBackbone

    torch.manual_seed(0)
    nchw = WideResNetBackbone(shape[0], 10, 2, "batch", 0.2, 0.0, 0.1, channels_last=False).eval()
    nhwc = WideResNetBackbone(shape[0], 10, 2, "batch", 0.2, 0.0, 0.1, channels_last=True).eval()
    nhwc.load_state_dict(nchw.state_dict())
    x = torch.rand(5, *shape) * 2 - 1
    grads = []
    for net in (nchw, nhwc):
        v = x.clone().requires_grad_(True)
        out = net(v)
        (g,) = torch.autograd.grad(torch.logsumexp(out, 1).sum(), v)
        grads.append((out.detach(), g))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-7)
    assert all(t.is_contiguous() for t in nhwc.state_dict().values())


@pytest.mark.parametrize("norm,layer", [("layer", torch.nn.GroupNorm), ("instance", torch.nn.InstanceNorm2d)])
def test_per_image_norms_follow_the_reference_and_ignore_the_rest_of_the_batch(norm, layer):
    """JEM's get_norm: layer = GroupNorm(1, C), instance = InstanceNorm2d(C, affine=True). Unlike batch norm, an
    image's logits (and so its energy) do not depend on what else is in the batch, in training mode too."""
    from bench.models.wrn import WideResNetBackbone

    torch.manual_seed(0)
    net = WideResNetBackbone(1, 10, 1, norm, 0.2, 0.0, 0.1).train()
    norms = [m for m in net.modules() if isinstance(m, layer)]
    assert len(norms) == 7 and all(m.affine for m in norms)  # 2 per block (3 blocks) and the head
    if norm == "layer":
        assert all(m.num_groups == 1 for m in norms)
    x = torch.rand(6, 1, 28, 28) * 2 - 1
    alone = torch.cat([net(x[i:i + 1]) for i in range(6)])
    assert torch.allclose(net(x), alone, atol=1e-5)
    assert torch.allclose(net(x.flip(0)), alone.flip(0), atol=1e-5)

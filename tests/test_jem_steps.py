"""Step-level checks of jem, jem_factored and wrn against JEM's released code (wgrathwohl/JEM), transcribed
here from its update equations (train_wrn_ebm.py, eval_wrn_ebm.py, wideresnet.py), not from bench's code.

Weights, inputs and noise are fixed; one evaluation of each training loss and one sampler step must equal
the transcription. Where the reference draws random numbers (crop offsets, flips, input noise, SGLD noise)
the transcription takes the same numbers from a generator seeded alike, and computes everything else its own
way (torchvision's crops and flips, autograd on the network's logits).

The reference, in symbols (f(x) = the logits; LSE = logsumexp over classes; α = --sgld_lr, σ = --sgld_std):

    SGLD step (sample_q):    x ← x + α ∇ₓ F(x) + σ ε,  F = LSE f (p(x)) or f(x)[y] (p(x|y)),  ε ~ N(0, I)
    chain start (sample_p_0): buffer entry, or U(−1, 1) with probability reinit_freq; class y: segment y
    p(x) loss:               −(mean LSE f(x_data) − mean LSE f(x̃))
    p(y|x) loss:             CrossEntropy(f(x_lab), y_lab)
    p(x, y) loss:            −(mean f(x_lab)[y] − mean f(x̃)[y])
    training input:          Normalize(0.5, 0.5)(Flip(RandomCrop(Pad(x, 4, reflect)))) + 0.03 · N(0, I)
    batch norm:              torch BatchNorm2d(momentum=0.9): running ← 0.1 · running + 0.9 · batch statistic
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from scipy import stats

from bench.data.augment import reference_augment
from bench.data.base import Split
from bench.models.base import DataInfo, TrainContext, no_progress
from bench.models.jem import JEM
from bench.models.jem_factored import ClassConditionalBuffer, JEMFactored
from bench.models.training import epoch_batches, hold_out, lr_at, train_inputs
from bench.models.wrn import WRN
from bench.samplers.sgld import FreshRounds, ReplayBuffer, fresh_rounds, sgld
from bench.scales import Scale

INFO = DataInfo((3, 16, 16), 10, hflip=True)


def _model(cls, **changes):
    torch.manual_seed(0)
    m = cls(dataclasses.replace(cls.recipe(Scale.tiny, INFO), **changes), INFO)
    for p in m.parameters():  # larger than the default init, so that gradients are far from zero
        p.data.mul_(3.0)
    return m.eval()


def _logits(m, z):  # the reference's CCF.classify: class_output(f(x))
    return m.class_output(m.f(z))


def _grad(fn, x):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(x).sum(), x)
    return g


def _inputs(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *INFO.shape), generator=g) * 2 - 1


# --- jem -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.3])  # 0: the reference; > 0: IGEBM's α·(E(x)² + E(x̃)²), E = −LSE f
def test_jem_training_loss_matches_the_reference(alpha):
    m = _model(JEM, sgld_steps=1, sgld_noise=0.0, reinit_freq=0.0, buffer_size=1, px_weight=0.7, pyx_weight=1.3,
               energy_l2=alpha)
    entry = _inputs(1, 1)
    m.replay_buffer.copy_(entry)
    z_px, z_lab, y_lab = _inputs(4, 2), _inputs(4, 3), torch.tensor([1, 5, 5, 9])
    got = m.loss(z_px, z_lab, y_lab, ReplayBuffer(m.replay_buffer), torch.Generator().manual_seed(0))
    # one chain (buffer of one entry, no restarts), one step without noise: x̃ = b + α ∇ LSE f(b)
    x_q = entry + 1.0 * _grad(lambda x: torch.logsumexp(_logits(m, x), 1), entry)
    with torch.no_grad():
        e_data, e_q = -torch.logsumexp(_logits(m, z_px), 1), -torch.logsumexp(_logits(m, x_q), 1)
        l_px = -(-e_data.mean() + e_q.mean())
        l_reg = alpha * ((e_data**2).mean() + (e_q**2).mean())
        l_pyx = F.cross_entropy(_logits(m, z_lab), y_lab)
    assert got.item() == pytest.approx((0.7 * l_px + l_reg + 1.3 * l_pyx).item(), abs=1e-4)
    assert torch.allclose(m.replay_buffer, x_q, atol=1e-6)  # the chain is written back
    assert got.requires_grad


def test_jem_sgld_step_matches_the_reference():
    m = _model(JEM)
    x0 = _inputs(3, 4)
    got = sgld(m._energy_net, x0, 1, 1.0, 0.01, torch.Generator().manual_seed(7))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    want = x0 + 1.0 * _grad(lambda x: torch.logsumexp(_logits(m, x), 1), x0) + 0.01 * eps
    assert torch.allclose(got, want, atol=1e-6)


def test_fresh_rounds_has_the_reference_buffers_distribution():
    """eval_wrn_ebm.py's uncond_samples, transcribed literally, against the chain-by-chain simulation, on a
    1-pixel energy E(x) = −x/2 whose SGLD step adds a constant drift (x + α/2 + σε): a sample's position
    counts the updates since its last restart, so the two-sample KS test sees any error in how often chains
    are updated or restarted. The same test rejects a sampler that updates every chain equally often and one
    that never restarts."""
    cfg = FreshRounds(buffer_size=100, rounds=30, round_batch=10, n_steps=1, step_size=1.0, noise=0.05,
                      reinit_freq=0.2)

    def energy(x):
        return -0.5 * x.flatten(1).sum(1)

    def reference(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        buffer = torch.rand((cfg.buffer_size, 1), generator=g) * 2 - 1  # a fresh U(-1, 1) buffer
        for _ in range(cfg.rounds):  # --n_sample_steps rounds of sample_q
            inds = torch.randint(0, cfg.buffer_size, (cfg.round_batch,), generator=g)
            restart = (torch.rand(cfg.round_batch, generator=g) < cfg.reinit_freq).float()[:, None]
            x = restart * (torch.rand((cfg.round_batch, 1), generator=g) * 2 - 1) + (1 - restart) * buffer[inds]
            for _ in range(cfg.n_steps):  # x += α ∇ₓ(−E) + σ ε
                x = x + cfg.step_size * 0.5 + cfg.noise * torch.randn(x.shape, generator=g)
            buffer[inds] = x
        return buffer.flatten()

    def ours(c: FreshRounds) -> np.ndarray:
        return fresh_rounds(energy, 3000, (1,), c, torch.Generator().manual_seed(0), torch.device("cpu"),
                            500).flatten().numpy()

    ref = torch.cat([reference(s) for s in range(30)]).numpy()
    assert stats.ks_2samp(ref, ours(cfg)).pvalue > 0.01
    equal = dataclasses.replace(cfg, rounds=1, round_batch=3, buffer_size=1)  # exactly the mean, 3 updates
    assert stats.ks_2samp(ref, ours(equal)).pvalue < 1e-6
    assert stats.ks_2samp(ref, ours(dataclasses.replace(cfg, reinit_freq=0.0))).pvalue < 1e-6


def test_jem_paper_samples_with_fresh_rounds():
    m = _model(JEM, sample_source="fresh_rounds", sample_rounds=2, sample_round_batch=4, sample_buffer_size=8,
               sample_steps=1)
    a = m.sample(6, torch.Generator().manual_seed(0))
    b = m.sample(6, torch.Generator().manual_seed(0))
    assert a.dtype == torch.uint8 and a.shape == (6, *INFO.shape) and torch.equal(a, b)
    eval_proto = m.sampler_protocol()["eval"]
    assert eval_proto["procedure"] == "fresh_rounds" and eval_proto["rounds"] == 2
    assert m.nfe_per_sample() == 1  # 2·4/8 = 1 expected update of 1 step
    paper = JEM.recipe(Scale.paper, DataInfo((3, 32, 32), 10, hflip=True))
    assert (paper.sample_source, paper.sample_buffer_size, paper.sample_rounds, paper.sample_round_batch,
            paper.sample_steps, paper.reinit_freq) == ("fresh_rounds", 10_000, 1000, 64, 40, 0.05)
    assert JEM(dataclasses.replace(paper, depth=10, width=1, buffer_size=10), INFO).nfe_per_sample() == 256


# --- jem_factored ------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.3])  # E(x, y) = −f(x)[y]
def test_jem_factored_training_loss_matches_the_reference(alpha):
    m = _model(JEMFactored, sgld_steps=1, sgld_noise=0.0, reinit_freq=0.0, buffer_size=10, pxy_weight=1.2,
               pyx_weight=0.5, energy_l2=alpha)
    entries = _inputs(10, 1)  # one chain per class: segment y is entry y
    m.replay_buffer.copy_(entries)
    z, y = _inputs(3, 2), torch.tensor([3, 7, 3])
    got = m.factored_loss(z, y, ClassConditionalBuffer(m.replay_buffer, 10), torch.Generator().manual_seed(0))
    b = entries[y]
    x_q = b + 1.0 * _grad(lambda x: _logits(m, x).gather(1, y[:, None]).squeeze(1), b)
    with torch.no_grad():
        f_data, f_q = _logits(m, z).gather(1, y[:, None]), _logits(m, x_q).gather(1, y[:, None])
        l_pxy = -(f_data.mean() - f_q.mean())
        l_reg = alpha * ((f_data**2).mean() + (f_q**2).mean())
        l_pyx = F.cross_entropy(_logits(m, z), y)
    assert got.item() == pytest.approx((1.2 * l_pxy + l_reg + 0.5 * l_pyx).item(), abs=1e-4)
    assert torch.allclose(m.replay_buffer[7], x_q[1], atol=1e-6) and torch.allclose(m.replay_buffer[3], x_q[2],
                                                                                    atol=1e-6)


def test_jem_factored_sgld_step_matches_the_reference():
    m = _model(JEMFactored)
    x0, y = _inputs(3, 4), torch.tensor([0, 4, 9])
    got = m._conditional_sgld(x0, y, 1, torch.Generator().manual_seed(7))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    want = x0 + m.config.sgld_step_size * _grad(lambda x: _logits(m, x).gather(1, y[:, None]).squeeze(1), x0) \
        + m.config.sgld_noise * eps
    assert torch.allclose(got, want, atol=1e-6)


# --- wrn, and the training input every model shares -------------------------------------------------
def test_training_input_is_the_reference_transform():
    c = WRN.recipe(Scale.paper, INFO)
    assert c.augment == reference_augment(True) and c.data_noise == 0.03
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5, *INFO.shape), dtype=torch.uint8, generator=g)
    got = train_inputs(x, c, torch.Generator().manual_seed(11), torch.device("cpu"))
    draws = torch.Generator().manual_seed(11)  # crop offsets (y, x), flips, then the noise
    oy, ox = (torch.randint(0, 9, (5,), generator=draws) for _ in range(2))
    flip = torch.rand(5, generator=draws) < 0.5
    want = []
    for i in range(5):
        img = TF.crop(TF.pad(x[i], [4], padding_mode="reflect"), int(oy[i]), int(ox[i]), 16, 16)
        img = TF.horizontal_flip(img) if flip[i] else img
        want.append(TF.normalize(TF.to_dtype(img, torch.float32, scale=True), [0.5] * 3, [0.5] * 3))
    want = torch.stack(want) + 0.03 * torch.randn((5, *INFO.shape), generator=draws)
    assert torch.allclose(got, want, atol=1e-6)
    svhn = WRN.recipe(Scale.paper, DataInfo((3, 32, 32), 10, hflip=False))
    assert svhn.augment.pad == 4 and not svhn.augment.flip  # JEM crops SVHN but never mirrors it


def test_wrn_training_loss_and_batch_norm_follow_the_reference():
    m = _model(WRN)
    m = WRN(dataclasses.replace(m.config, bn_momentum=0.9), INFO).train()
    z, y = _inputs(6, 5), torch.tensor([0, 1, 2, 3, 4, 5])
    bn = m.f.layer1[0].bn1
    with torch.no_grad():
        h = m.f.conv1(z)  # what the first block's first batch norm sees
        loss = F.cross_entropy(m._net_logits(z), y)
    mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)
    assert torch.allclose(bn.running_mean, 0.1 * 0.0 + 0.9 * mean, atol=1e-5)
    assert torch.allclose(bn.running_var, 0.1 * 1.0 + 0.9 * var, atol=1e-5)
    normed = (h - mean[None, :, None, None]) / torch.sqrt(h.var((0, 2, 3), unbiased=False) + 1e-5)[None, :, None,
                                                                                                     None]
    assert torch.allclose(bn(h), normed, atol=1e-4)  # training mode normalizes by the batch's biased variance
    assert loss.item() > 0
    assert WRN.recipe(Scale.paper, INFO).bn_momentum == 0.9 and WRN.recipe(Scale.paper, INFO).norm == "batch"


# --- the training mechanics (train_wrn_ebm.py) ------------------------------------------------------
def test_lr_schedule_is_the_reference_loop():
    c = dataclasses.replace(JEM.recipe(Scale.paper, INFO), warmup_iters=7, decay_epochs=(2, 4), lr=0.5)
    steps_per_epoch, lr, it, want = 5, c.lr, 0, []
    for epoch in range(6):  # the reference: decay at an epoch's start, warm-up sets lr while cur_iter <= warmup
        if epoch in c.decay_epochs:
            lr *= c.decay_rate
        for _ in range(steps_per_epoch):
            if it <= c.warmup_iters:
                lr = c.lr * it / c.warmup_iters
            want.append(lr)
            it += 1
    got = [lr_at(s, s // steps_per_epoch, c) for s in range(30)]
    assert got == pytest.approx(want)


@pytest.mark.parametrize("epochs, decay, planned", [(6, (2, 4), 30), (1.8, (1.2, 1.6), 9)])
def test_the_loop_decays_at_a_fractional_epoch_and_at_integer_ones_as_the_reference(epochs, decay, planned):
    """A short run on a large split scales its decay epochs to fractions (bench.scales.scale_epochs): each must
    take effect at that fraction of its pass. Integer ones keep the reference's values (the test above)."""
    from bench.models.training import TrainLoop

    c = dataclasses.replace(JEM.recipe(Scale.paper, INFO), warmup_iters=0, decay_epochs=decay, lr=1.0)
    seen = []
    run = TrainLoop(_model(WRN), TrainContext(torch.device("cpu"), 0, no_progress), n=25, batch_size=5,
                    epochs=epochs, lr=lambda step, epoch: seen.append(lr_at(step, epoch, c)) or 0.0)
    for _ in run.batches(torch.Generator().manual_seed(0)):
        run.advance()
    assert len(seen) == planned
    # the step at which each decay takes effect: the first whose fraction of passes done reaches it
    firsts = [next(s for s in range(planned) if s / 5 >= d) for d in decay]
    want = [c.decay_rate ** sum(s >= f for f in firsts) for s in range(planned)]
    assert seen == pytest.approx(want)
    assert min(seen) < 1.0  # a decay happened in both runs


def test_hold_out_is_the_references_validation_split():
    n = 500
    inds = list(range(n))
    np.random.seed(1234)
    np.random.shuffle(inds)  # train_wrn_ebm.py's get_data
    train = Split(torch.arange(n, dtype=torch.uint8).repeat_interleave(3).view(n, 3, 1, 1) * 0,
                  torch.arange(n, dtype=torch.int64))
    rest, valid = hold_out(train, 5000)
    assert len(valid) == 50  # capped at a tenth of a small split (CIFAR-10: 5,000 of 50,000)
    assert valid.y.tolist() == inds[:50] and sorted(rest.y.tolist()) == sorted(inds[50:])
    assert hold_out(train, 0) == (train, None)


def test_batches_drop_the_last_partial_one_as_the_reference_loader():
    g = torch.Generator().manual_seed(0)
    passes = [torch.cat(epoch_batches(10, 3, g)) for _ in range(3)]
    assert all(len(p) == 9 and len(set(p.tolist())) == 9 for p in passes)
    assert [len(b) for b in epoch_batches(2, 3, g)] == [2]  # smaller than a batch: one short batch


def test_jem_draws_its_px_and_pyx_batches_from_independent_loaders(monkeypatch):
    m = _model(JEM, valid_size=0, epochs=2, batch_size=4, data_noise=0.0)
    seen = []

    def capture(z_px, z_lab, y_lab, buf, g):
        seen.append((z_px.clone(), z_lab.clone()))
        return (m.class_output.weight ** 2).sum()

    monkeypatch.setattr(m, "loss", capture)
    x = (torch.arange(12, dtype=torch.uint8) * 20).view(12, 1, 1, 1).expand(12, *INFO.shape).contiguous()
    m.fit(Split(x, torch.arange(12) % 10), TrainContext(torch.device("cpu"), 0, no_progress))
    assert len(seen) == 6  # 2 epochs of 3 full batches
    ids = [((a[:, 0, 0, 0] + 1) / 2 * 255 / 20).round().long() for a, _ in seen]  # each image's index
    labs = [((b[:, 0, 0, 0] + 1) / 2 * 255 / 20).round().long() for _, b in seen]
    assert sorted(torch.cat(ids[:3]).tolist()) == list(range(12))  # each pass sees every image once
    assert sorted(torch.cat(labs[:3]).tolist()) == list(range(12))
    assert any(not torch.equal(a, b) for a, b in zip(ids, labs))  # the two orders are independent


@pytest.mark.parametrize("cls", [JEM, JEMFactored, WRN])
def test_best_validation_epoch_is_kept_and_max_steps_stops(cls, monkeypatch):
    from bench.models import training

    m = _model(cls, valid_size=50, epochs=3, batch_size=16)
    snapshots, accs = [], iter([0.3, 0.6, 0.5])

    def fake_accuracy(model, split, device):
        assert len(split) == 10  # a tenth of the 100-image split is held out
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(accs)

    monkeypatch.setattr(training, "accuracy", fake_accuracy)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (100, *INFO.shape), dtype=torch.uint8, generator=g)
    stats_ = m.fit(Split(x, torch.randint(0, 10, (100,), generator=g)),
                   TrainContext(torch.device("cpu"), 0, no_progress))
    assert stats_["steps"] == 3 * (90 // 16) and stats_["best_epoch"] == 1 and stats_["valid_accuracy"] == 0.6
    assert all(torch.equal(v, snapshots[1][k]) for k, v in m.state_dict().items())  # epoch 1's weights
    capped = _model(cls, valid_size=0, epochs=3, batch_size=16)
    out = capped.fit(Split(x, torch.zeros(100, dtype=torch.int64)),
                     TrainContext(torch.device("cpu"), 0, no_progress, max_steps=2))
    assert out["steps"] == 2


@pytest.mark.parametrize("cls", [JEM, JEMFactored])
def test_class_gaussian_chains_start_at_the_training_classes(cls):
    """chain_init=class_gaussian (JEM++'s informative init): the buffer starts from the classes' Gaussians, fitted
    to the training images the loop trains on; U(-1, 1) stays the default, and the fresh samplers refuse it."""
    m = _model(cls, valid_size=0, epochs=1, batch_size=4, chain_init="class_gaussian", sgld_steps=0)
    x = torch.zeros(40, *INFO.shape, dtype=torch.uint8)
    x[20:] = 255  # class 0 black, class 1 white: every start is one or the other (no pixel noise)
    m.fit(Split(x, (torch.arange(40) >= 20).long()), TrainContext(torch.device("cpu"), 0, no_progress))
    starts = m.replay_buffer.flatten(1)
    black, white = (starts + 1).abs().max(1).values < 0.05, (starts - 1).abs().max(1).values < 0.05
    if cls is JEM:  # classes by their share: only 0 and 1 have images
        assert (black | white).all() and 0.25 < white.float().mean() < 0.75
    else:  # each class's segment from its own Gaussian (the image-less classes' from the pooled one)
        label = ClassConditionalBuffer(m.replay_buffer, 10).labels(torch.arange(len(starts)))
        assert black[label == 0].all() and white[label == 1].all()
    assert m.sampler_protocol()["train"]["init"].startswith("class_gaussian")
    assert cls.Config().chain_init == "uniform"
    with pytest.raises(ValueError, match="sample_source=replay_buffer"):
        dataclasses.replace(m.config, sample_source="fresh_rounds")

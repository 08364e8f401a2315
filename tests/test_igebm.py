"""igebm: honest capabilities per variant, energies and logits that agree, the reference's block, Langevin
step, replay buffer, optimizer and test_inception sampling written out from openai/ebm_code_release's
equations, spectral normalization after training, and failures that surface."""

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from bench.capabilities import Classifier, capabilities_of
from bench.config import load_config
from bench.data import load_dataset
from bench.data.base import Split
from bench.errors import ModelFailure, NonFiniteError
from bench.models import MODELS
from bench.models.base import DataInfo, TrainContext, no_progress
from bench.models.igebm import IGEBM, CondResBlock, EBMAdam, FIFOReplayBuffer, UnconditionalIGEBM
from bench.models.sngan import refine_spectral_norm, spectrally_normalized
from bench.models.training import TrainLoop
from bench.runner import run
from bench.scales import Scale

DIGITS = DataInfo((1, 8, 8), 10)
CPU = TrainContext(torch.device("cpu"), 0, no_progress)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _tiny(info=DIGITS, **changes):
    torch.manual_seed(0)
    return IGEBM(dataclasses.replace(IGEBM.recipe(Scale.tiny, info), **changes), info)


def _with_random_buffer(m):
    m.replay_buffer.copy_(torch.randint(0, 256, m.replay_buffer.shape, dtype=torch.uint8))
    m.replay_filled.fill_(m.replay_buffer.shape[0])
    return m


def _perturb(m, seed=1):
    """Move the conditioning and conv2 off their initial values (ones, zeros), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "bias1" in name or "bias2" in name or "scale2" in name or "conv2" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m


def test_conditional_is_the_default_and_classifies():
    m = _tiny()
    assert MODELS.get("igebm") is IGEBM and m.config.conditional
    assert capabilities_of(m) == ["Classifier", "Energy", "Sampler"]


def test_unconditional_variant_has_no_classifier():
    m = _tiny(conditional=False)
    assert type(m) is UnconditionalIGEBM and not hasattr(m, "logits")
    assert not isinstance(m, Classifier)
    assert capabilities_of(m) == ["Energy", "Sampler"]
    assert m.energy(torch.rand(3, 1, 8, 8)).shape == (3,)
    # the same options through the CLI path give the same class
    cfg = MODELS.get("igebm").configure(Scale.tiny, DIGITS, {"conditional": False})
    assert type(MODELS.get("igebm")(cfg, DIGITS)) is UnconditionalIGEBM


def test_logits_are_minus_energies_over_labels_and_energy_is_their_logsumexp():
    m = _perturb(_tiny()).eval()
    x = torch.rand(4, 1, 8, 8)
    logits = m.logits(x)
    one_at_a_time = torch.stack([-m.net(x, torch.full((4,), y)) for y in range(10)], dim=1)
    assert torch.allclose(logits, one_at_a_time, atol=1e-5)
    assert logits.std(dim=1).min() > 0  # the label matters
    assert torch.allclose(m.energy(x), -torch.logsumexp(logits, dim=1), atol=1e-5)


# --- the reference's network, written out (utils.py smart_res_block, models.py ResNet32) --------------------
def _normalized(conv, bounded: bool) -> torch.Tensor:
    """W/σ (or W/max(σ, 1) for their lower_bound weights) with σ the exact largest singular value."""
    w = conv.parametrizations.weight.original.detach()
    sigma = torch.linalg.svdvals(w.reshape(w.shape[0], -1).double())[0].float()
    return w / (sigma.clamp_min(1.0) if bounded else sigma)


def test_residual_block_is_the_references_post_activation_block():
    """c1 = conv(x + gb1[y]); c2 = conv(lrelu(c1) + gb2[y])·(g[y] + cb); out = lrelu(pool(c2 + bypass)),
    bypass the identity when the width stays, else a 3×3 conv; no conv biases."""
    torch.manual_seed(0)
    for ch_in, ch_out, down in ((4, 4, True), (4, 6, False)):
        block = _perturb(CondResBlock(ch_in, ch_out, down, n_labels=3, conditional=True, leak=0.2))
        refine_spectral_norm(block, 300)
        block.eval()
        x, y = torch.randn(5, ch_in, 6, 6), torch.tensor([0, 1, 2, 1, 0])
        w1, w2 = _normalized(block.conv1, False), _normalized(block.conv2, True)
        h = F.leaky_relu(F.conv2d(x + block.bias1.weight[y][:, :, None, None], w1, padding=1), 0.2)
        h = F.conv2d(h + block.bias2.weight[y][:, :, None, None], w2, padding=1)
        h = h * (block.scale2.weight[y] + block.scale2_offset)[:, :, None, None]
        bypass = x if ch_in == ch_out else F.conv2d(x, _normalized(block.shortcut, False), padding=1)
        out = h + bypass
        want = F.leaky_relu(F.avg_pool2d(out, 2) if down else out, 0.2)
        assert torch.allclose(block(x, y), want, atol=1e-4)
        assert (block.shortcut is None) == (ch_in == ch_out)
        assert all(mod.bias is None for mod in block.modules() if isinstance(mod, torch.nn.Conv2d))


def test_conv2_starts_at_zero_and_its_norm_is_bounded_not_set():
    m = _tiny()
    block = m.net.blocks[0]
    assert block.conv2.weight.abs().max() < 1e-8  # their zero=True init: N(0, 1e-10), not rescaled up to σ = 1
    assert (block.bias1.weight == 0).all() and (block.scale2.weight == 1).all()
    # an untrained net's blocks are the identity on the stem's output up to the shortcuts and activations
    with torch.no_grad():
        block.conv2.parametrizations.weight.original.mul_(1e12)  # now σ ≫ 1: normalized down to 1
    refine_spectral_norm(block, 300)
    w = block.conv2.weight.detach()
    assert torch.linalg.svdvals(w.reshape(w.shape[0], -1))[0].item() == pytest.approx(1.0, rel=1e-3)


# --- Langevin, buffer, optimizer and one training step against their equations ---------------------------
def _ref_langevin(net, x, y, n_steps, lr, noise, clip, g):
    """train.py / test_inception.py langevin_step: x += N(0, noise²); x -= lr·clip(∇E(x)); x = clip₀¹(x)."""
    for _ in range(n_steps):
        x = x + noise * torch.randn(x.shape, generator=g)
        xg = x.detach().requires_grad_(True)
        grad = torch.autograd.grad(net(xg, y).sum(), xg)[0]
        x = torch.clamp(x - lr * torch.clamp(grad, -clip, clip), 0.0, 1.0).detach()
    return x


def test_langevin_step_follows_the_reference_order_noise_then_clipped_gradient():
    m = _perturb(_tiny()).eval()
    x0, y = torch.rand(5, 1, 8, 8), torch.arange(5)
    got = m._train_langevin(x0, y, 2, torch.Generator().manual_seed(0))
    want = _ref_langevin(m.net, x0, y, 2, 10.0, 0.005, 0.01, torch.Generator().manual_seed(0))
    assert torch.allclose(got, want, atol=1e-6)
    noisy = dataclasses.replace(m.config, sgld_noise=5.0)
    m.config = noisy
    out = m._train_langevin(x0, y, 3, torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 1 and ((out == 0) | (out == 1)).any()


def test_langevin_computes_the_spectral_norms_once_per_chain_in_eval_mode_with_the_same_numbers():
    from bench.models.igebm import langevin

    m = _perturb(_tiny()).eval()
    x0, y = torch.rand(5, 1, 8, 8), torch.arange(5)
    calls = []
    hooks = [m_.parametrizations.weight[0].register_forward_hook(lambda *a: calls.append(1))
             for _, m_ in spectrally_normalized(m.net)]
    assert hooks
    got = langevin(m.net, x0, y, 4, 10.0, 0.005, 0.01, torch.Generator().manual_seed(0))
    assert len(calls) == len(hooks)  # once per layer for the whole chain, not once per step
    want = _ref_langevin(m.net, x0, y, 4, 10.0, 0.005, 0.01, torch.Generator().manual_seed(0))
    assert torch.equal(got, want)  # bit for bit: each step's W / σ is the same tensor
    # in training mode every forward runs its power iteration, which moves u: nothing is cached
    m.net.train()
    calls.clear()
    langevin(m.net, x0, y, 3, 10.0, 0.005, 0.01, torch.Generator().manual_seed(0))
    assert len(calls) == 3 * len(hooks)
    for h in hooks:
        h.remove()


def test_fifo_buffer_keeps_the_last_negatives_quantized():
    buf = FIFOReplayBuffer(torch.zeros(5, 1, 1, 1, dtype=torch.uint8))
    buf.add(torch.tensor([0.0, 0.5, 1.0, 1.5]).view(4, 1, 1, 1))
    assert len(buf) == 4 and buf.data.flatten().tolist() == [0, 127, 255, 255, 0]  # floor(255·clip(x))
    buf.add(torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1, 1))  # wraps: the two oldest are overwritten
    assert len(buf) == 5 and buf.data.flatten().tolist() == [51, 76, 255, 255, 25]
    s = buf.sample(1000, torch.Generator().manual_seed(0))
    k = torch.floor(s * 256)
    assert set(k.flatten().tolist()) <= {51.0, 76.0, 255.0, 25.0} and s.max() < 1  # q/256 + U[0, 1/256)


def _ebm_adam_reference(params, grads, state, lr, b1, b2, eps=1e-8):
    """custom_adam._apply_dense: clip g to ±(3·√(v/(1−β2^t)) + 0.1) with the v before the step, then
    TF Adam: lr_t = lr·√(1−β2^t)/(1−β1^t), m ← β1m + (1−β1)g, v ← β2v + (1−β2)g², θ −= lr_t·m/(√v + ε)."""
    state["t"] = state.get("t", 0) + 1
    t = state["t"]
    for i, (p, g) in enumerate(zip(params, grads)):
        m, v = state.get(("m", i), torch.zeros_like(p)), state.get(("v", i), torch.zeros_like(p))
        bound = 3 * torch.sqrt(v / (1 - b2**t)) + 0.1
        g = torch.max(torch.min(g, bound), -bound)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        state[("m", i)], state[("v", i)] = m, v
        with torch.no_grad():
            p -= lr * math.sqrt(1 - b2**t) / (1 - b1**t) * m / (torch.sqrt(v) + eps)


def test_two_training_steps_match_the_reference_iteration():
    """train.py, one iteration: x⁺ = (x + u)/256; chains from U(0, 1), 95% of them replaced by buffer samples
    q/256 + U[0, 1/256) once the buffer holds more than a batch; 60 (here 3) Langevin steps under the batch's
    labels; one power iteration per weight; loss E⁺ − E⁻ + (E⁺² + E⁻²); custom_adam(β1 0, β2 0.999)."""
    ours = _perturb(_tiny(sgld_steps=3, lr=1e-2))
    ref = copy.deepcopy(ours)
    g_data = torch.Generator().manual_seed(9)
    x = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8, generator=g_data)
    y = torch.randint(0, 10, (6,), generator=g_data)
    buf_ours = FIFOReplayBuffer(torch.zeros(20, 1, 8, 8, dtype=torch.uint8))
    buf_ours.add(torch.rand(9, 1, 8, 8, generator=g_data))  # more than a batch: the replay path runs
    buf_ref = copy.deepcopy(buf_ours)
    opt = EBMAdam(ours.net.parameters(), 1e-2, (0.0, 0.999))
    g = torch.Generator().manual_seed(4)
    # the step as `fit` takes it: step_loss, then the shared loop's update
    run = TrainLoop(ours, CPU, n=len(x), batch_size=len(x), steps=2, optimizer=opt)
    results = []
    for _ in run.iterations():
        loss, e_pos, e_neg, xq = ours.step_loss(x, y, buf_ours, g)
        run.step(loss)
        results.append((loss.detach(), e_pos, e_neg, xq))

    g, state, params = torch.Generator().manual_seed(4), {}, list(ref.net.parameters())
    for step in range(2):
        x_pos = (x.float() + torch.rand(x.shape, generator=g)) / 256
        x0 = torch.rand((6, 1, 8, 8), generator=g)
        idx = torch.randint(0, 9, (6,), generator=g)
        q = buf_ref.data[idx].float()
        replay = q / 256 + torch.rand(q.shape, generator=g) / 256
        keep = torch.rand(6, generator=g) > 0.05
        x0 = torch.where(keep[:, None, None, None], replay, x0)
        refine_spectral_norm(ref.net, 1)
        ref.net.eval()
        xq = _ref_langevin(ref.net, x0, y, 3, 10.0, 0.005, 0.01, g)
        e_pos, e_neg = ref.net(x_pos, y), ref.net(xq, y)
        loss = e_pos.mean() - e_neg.mean() + (e_pos**2).mean() + (e_neg**2).mean()
        grads = torch.autograd.grad(loss, params)
        _ebm_adam_reference(params, grads, state, 1e-2, 0.0, 0.999)
        assert results[step][0].item() == pytest.approx(loss.item(), rel=1e-5, abs=1e-6)
        assert torch.allclose(results[step][3], xq, atol=1e-6)
    for (name, a), b in zip(ours.net.named_parameters(), params):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), name


def test_fit_feeds_each_iterations_negatives_to_the_buffer_and_snapshots_the_ensemble(digits):
    train = Split(digits.train.x[:64], digits.train.y[:64])
    cfg = dict(batch_size=8, ensemble=3, ensemble_every=2, buffer_size=40, epochs=2)
    a = _tiny(**cfg)
    stats = a.fit(train, CPU)
    assert stats["steps"] == 16 and stats["ensemble_steps"] == [16, 14, 12]
    assert int(a.replay_filled) == 40  # 15 iterations' negatives added, the last 5 batches kept
    b = _tiny(**cfg)
    assert b.fit(train, TrainContext(torch.device("cpu"), 0, no_progress, max_steps=14))["steps"] == 14
    # the first ensemble member is the weights after 14 of the 16 updates
    for (name, p), q in zip(a.ensemble_nets[0].named_parameters(), b.net.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.net.stem.parametrizations.weight.original, b.net.stem.parametrizations.weight.original)


def test_sampling_is_deterministic_given_the_generator():
    m = _with_random_buffer(_tiny()).eval()
    a = m.sample(20, torch.Generator().manual_seed(3))
    assert a.dtype == torch.uint8 and a.shape == (20, 1, 8, 8)
    assert torch.equal(a, m.sample(20, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, m.sample(20, torch.Generator().manual_seed(4)))
    m.config = dataclasses.replace(m.config, sample_source="fresh")
    assert m.sample(6, torch.Generator().manual_seed(0)).shape == (6, 1, 8, 8)


def _literal_test_inception(run, rounds, c, n_labels, shape, g):
    """test_inception.py compute_inception, written out: per round a fresh buffer is filled with whole
    batches of chains from U(0, 1) under random labels; then each iteration draws a batch of entries with
    replacement, restarts a drawn chain (prob. eval_reinit) and relabels it (eval_label_reinit) except in the
    last eval_nomix iterations, runs it, and writes the batch back in order (set_elms); the first B entries
    are the round's images. ``run(i, x, y)``: iteration i's chains."""
    out, bs = [], c.eval_batch_size
    for _ in range(rounds):
        xs, ys, fills = [], [], 0
        while sum(len(v) for v in xs) < c.eval_buffer_size:
            y = torch.randint(0, n_labels, (bs,), generator=g)
            xs.append(run(fills, torch.rand((bs, *shape), generator=g), y))
            ys.append(y)
            fills += 1
        pool_x, pool_y = torch.cat(xs), torch.cat(ys)
        for i in range(fills, c.eval_iterations):
            idx = torch.randint(0, len(pool_x), (bs,), generator=g)
            x0, y = pool_x[idx].clone(), pool_y[idx].clone()
            restart = torch.rand(bs, generator=g) > 1 - c.eval_reinit
            relabel = torch.rand(bs, generator=g) > 1 - c.eval_label_reinit
            new_y, noise = torch.randint(0, n_labels, (bs,), generator=g), torch.rand((bs, *shape), generator=g)
            if i < c.eval_iterations - c.eval_nomix:
                x0[restart], y[relabel] = noise[restart], new_y[relabel]
            x = run(i, x0, y)
            for j in range(bs):
                pool_x[idx[j]], pool_y[idx[j]] = x[j], y[j]
        out.append(pool_x[:c.eval_buffer_size])
    return torch.cat(out)


def test_chain_by_chain_simulation_has_test_inceptions_per_image_distribution():
    """The literal procedure and `simulate_test_inception` give each image the same distribution: checked on
    a cheap deterministic stand-in for Langevin whose result depends on the iteration (the checkpoint used),
    the label and the chain's history, so a wrong fill split, update probability, restart, relabel, no-mix
    tail or checkpoint index moves the moments."""
    from bench.models.igebm import simulate_test_inception

    cfg = dataclasses.replace(IGEBM.recipe(Scale.paper, DIGITS), eval_buffer_size=40, eval_batch_size=16,
                              eval_iterations=20, eval_nomix=3, eval_reinit=0.2, eval_label_reinit=0.3)

    def run(i, x, y):
        return (0.8 * x + 0.05 * (1 + i % 3) + 0.02 * y.view(-1, 1)).clamp(0, 1)

    literal = _literal_test_inception(run, 500, cfg, 5, (1,), torch.Generator().manual_seed(0)).flatten()
    chains = simulate_test_inception(run, 20_000, (1,), 5, cfg, torch.Generator().manual_seed(1)).flatten()
    for f in (lambda v: v, lambda v: v**2, lambda v: (v == 1).float()):
        a, b = f(literal), f(chains)
        se = math.sqrt(a.var() / len(a) + b.var() / len(b))
        assert abs(a.mean() - b.mean()) < 4 * se, (a.mean(), b.mean(), se)
    # ... and the statistic can tell: ignoring the restarts moves it
    no_restart = dataclasses.replace(cfg, eval_reinit=0.0)
    other = simulate_test_inception(run, 20_000, (1,), 5, no_restart, torch.Generator().manual_seed(1)).flatten()
    assert abs(other.mean() - literal.mean()) > 8 * math.sqrt(literal.var() / len(literal))


def test_test_inception_sampler_runs_each_iterations_checkpoint_and_quantizes_like_rescale_im():
    """The model's sampler is `simulate_test_inception` with their Langevin step (λ 10, σ 0.005, clip 0.05)
    under the energy of checkpoint i mod K at iteration i, and images floor(256·x) clipped to 255."""
    from bench.models.igebm import simulate_test_inception

    m = _perturb(_tiny(sample_source="test_inception", eval_buffer_size=6, eval_batch_size=4, eval_iterations=5,
                       eval_steps=2, eval_nomix=1, eval_reinit=0.5, eval_label_reinit=0.5, ensemble=2))
    _perturb(m.ensemble_nets[0], seed=2)
    m.eval()
    got = m.sample(9, torch.Generator().manual_seed(1))
    nets = [m.net, m.ensemble_nets[0]]
    g = torch.Generator().manual_seed(1)

    def run(i, x, y):
        return _ref_langevin(nets[i % 2], x, y, 2, 10.0, 0.005, 0.05, g)

    want = simulate_test_inception(run, 9, (1, 8, 8), 10, m.config, g)
    assert torch.equal(got, torch.floor(256 * want).clamp(0, 255).to(torch.uint8))
    p = m.sampler_protocol()["eval"]
    assert (p["source"], p["n_steps"], p["grad_clip"], p["ensemble"]) == ("test_inception", 2, 0.05, 2)


def test_sampler_protocol_records_every_setting():
    m = _tiny()
    p = m.sampler_protocol()
    for phase in ("train", "eval"):
        for key in ("n_steps", "step_size", "noise", "grad_clip", "order"):
            assert key in p[phase], (phase, key)
    assert p["train"]["reinit_freq"] == m.config.reinit_freq and p["train"]["buffer_size"] == m.config.buffer_size
    assert p["eval"]["source"] == "replay_buffer" and p["eval"]["n_steps"] == m.config.sample_steps


def test_paper_recipe_is_du_and_mordatchs_setting():
    c = IGEBM.recipe(Scale.paper, DataInfo((3, 32, 32), 10))
    assert (c.sgld_steps, c.sgld_step_size, c.sgld_noise, c.grad_clip) == (60, 10.0, 0.005, 0.01)
    assert (c.buffer_size, c.reinit_freq, c.adam_clip) == (10000, 0.05, True)
    assert (c.l2_weight, c.batch_size, c.beta1, c.lr, c.conditional) == (1.0, 128, 0.0, 3e-4, True)
    assert (c.sample_source, c.eval_buffer_size, c.eval_batch_size, c.eval_iterations) == \
        ("test_inception", 1000, 512, 200)
    assert (c.eval_steps, c.eval_grad_clip, c.eval_reinit, c.eval_label_reinit, c.eval_nomix) == \
        (20, 0.05, 0.01, 0.1, 10)
    assert (c.ensemble, c.ensemble_every) == (10, 300)
    m = IGEBM(dataclasses.replace(c, ensemble=1), DataInfo((3, 32, 32), 10))
    # a stem and 6 residual blocks; every convolution normalized, the linear output not
    convs = [mod for mod in m.net.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert len(m.net.blocks) == 6 and len(spectrally_normalized(m.net)) == len(convs)
    # only the block that widens 128 → 256 has a learned shortcut
    assert [b.shortcut is not None for b in m.net.blocks] == [False, False, True, False, False, False]
    assert [b.down for b in m.net.blocks] == [True, False, True, False, True, False]
    assert m.net(torch.rand(2, 3, 32, 32), torch.tensor([0, 9])).shape == (2,)
    paper = m.deviations(Scale.paper)
    assert paper[0].startswith("ensemble=1 (paper: 10)") and any("train+test" in line for line in paper)


def test_training_normalizes_the_energy_net_and_it_classifies(digits):
    m = _tiny()
    stats = m.fit(digits.train, CPU)
    assert stats["steps"] == len(digits.train) // m.config.batch_size  # full batches only, as their loader
    assert int(m.replay_filled) > 0
    for name, layer in spectrally_normalized(m.net):
        w = layer.weight.detach()
        sigma = torch.linalg.svdvals(w.reshape(w.shape[0], -1).double())[0].item()
        if "conv2" in name:  # bounded by 1, not set to 1
            assert sigma < 1.0 + 0.05, f"{name}: largest singular value {sigma:.3f}"
        else:
            assert abs(sigma - 1.0) < 0.05, f"{name}: largest singular value {sigma:.3f}"
    with torch.no_grad():
        logits = m.logits(digits.test.x[:50].float() / 255)
    assert logits.shape == (50, 10) and torch.isfinite(logits).all()


def test_nonfinite_training_loss_is_a_model_failure(digits):
    with pytest.raises(ModelFailure, match="diverged"):
        _tiny(sgld_noise=float("nan")).fit(digits.train, CPU)


def test_diverging_sampler_raises_instead_of_returning_garbage():
    m = _with_random_buffer(_tiny(sgld_noise=float("nan"))).eval()
    with pytest.raises(NonFiniteError, match="non-finite"):
        m.sample(4, torch.Generator().manual_seed(0))
    m = _tiny(sample_source="test_inception", eval_noise=float("nan"), eval_buffer_size=4, eval_batch_size=4,
              eval_iterations=2, eval_steps=1, eval_nomix=0).eval()
    with pytest.raises(NonFiniteError, match="non-finite"):
        m.sample(4, torch.Generator().manual_seed(0))


def test_hybrid_suite_reports_accuracy_for_the_conditional_model(tmp_path):
    outcome = run(load_config(["scale=tiny", "model=igebm", f"out={tmp_path}"]))
    (record, _), = outcome.records
    assert record.status == "ok", record.reason
    assert 0 <= record.metrics["accuracy"].value <= 100 and record.metrics["fid"].value > 0
    assert record.protocol["samples"]["sampler"]["eval"]["n_steps"] == record.model_config["sample_steps"]

"""JEM's training step, bench against the reference code (wgrathwohl/JEM), side by side on one CPU.

Fetch the reference yourself (it is never vendored), then:

    git clone https://github.com/wgrathwohl/JEM /path/to/JEM
    python benchmarks/jem_reference.py --reference /path/to/JEM --threads 1 --iters 20
    python benchmarks/jem_reference.py --reference /path/to/JEM --threads 2 --iters 20

One iteration is what the reference's ``train_wrn_ebm.py`` main loop does per batch with its defaults
(p(x) and p(y|x) weights 1, CCF model, no batch norm): ``sample_q`` (SGLD from the replay buffer, written
back), f(x_data), f(x_q), f.classify(x_lab), cross-entropy, the divergence check, ``zero_grad``, backward and
an Adam step. The reference runs its own ``get_sample_q`` and ``CCF`` from the checkout; the loop body,
about ten lines of ``main``, is restated here because ``main`` also builds CIFAR-10 loaders that download.
bench runs `JEM.loss` and the Adam step of its training loop, in the configuration the model is given.
Data loading and augmentation are outside both timings: the reference does them in DataLoader workers.

The two alternate iteration by iteration (after warm-up), so load changes hit both alike; the script prints
the median seconds per iteration of each and the ratio reference / bench.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from bench.models.base import DataInfo
from bench.models.jem import JEM, JEMConfig
from bench.samplers.sgld import ReplayBuffer


def reference_step(ref, args, device):
    """The reference's per-batch training step, built from its own functions; returns a closure."""
    tw = importlib.import_module("train_wrn_ebm")
    sample_q = tw.get_sample_q(args, device)
    f = tw.CCF(args.depth, args.width, args.norm, dropout_rate=args.dropout_rate, n_classes=args.n_classes)
    replay_buffer = tw.init_random(args, args.buffer_size)
    optim = torch.optim.Adam(f.parameters(), lr=args.lr, betas=[.9, .999], weight_decay=args.weight_decay)
    ce = torch.nn.CrossEntropyLoss()

    def step(x_p_d, x_lab, y_lab):
        x_q = sample_q(f, replay_buffer)
        l_p_x = -(f(x_p_d).mean() - f(x_q).mean())
        L = args.p_x_weight * l_p_x + args.p_y_given_x_weight * ce(f.classify(x_lab), y_lab)
        if L.abs().item() > 1e8:
            raise RuntimeError("the reference diverged")
        optim.zero_grad()
        L.backward()
        optim.step()
    return step


def bench_step(cfg: JEMConfig, info: DataInfo, seed: int, device: str | torch.device = "cpu"):
    """bench's training step (`JEM.loss`, the divergence check, an Adam step) on ``device``; returns a closure."""
    torch.manual_seed(seed)
    model = JEM(cfg, info)
    g = torch.Generator().manual_seed(seed)
    model.replay_buffer.uniform_(-1, 1, generator=g)
    model.to(device).train()
    buf = ReplayBuffer(model.replay_buffer)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    def step(x_p_d, x_lab, y_lab):
        loss = model.loss(x_p_d, x_lab, y_lab, buf, g)
        if not torch.isfinite(loss) or loss.abs().item() > cfg.divergence_threshold:
            raise RuntimeError("bench diverged")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", type=Path, required=True, help="a checkout of wgrathwohl/JEM")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--iters", type=int, default=20, help="timed iterations of each (median reported)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--depth", type=int, default=10)
    ap.add_argument("--width", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--sgld-steps", type=int, default=20)
    ap.add_argument("--buffer-size", type=int, default=10_000)
    ap.add_argument("--image", type=int, nargs=3, default=(3, 32, 32), metavar=("C", "H", "W"))
    ap.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                    help="bench's memory format (auto: the model's own choice for this image size)")
    a = ap.parse_args()
    if not (a.reference / "train_wrn_ebm.py").is_file():
        print(f"jem_reference: {a.reference} has no train_wrn_ebm.py; give a checkout of wgrathwohl/JEM",
              file=sys.stderr)
        return 2
    if tuple(a.image) != (3, 32, 32):
        print("jem_reference: the reference's init_random draws 3×32×32 images; keep --image 3 32 32",
              file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    sys.path.insert(0, str(a.reference.resolve()))
    args = SimpleNamespace(depth=a.depth, width=a.width, norm=None, dropout_rate=0.0, n_classes=10, uncond=False,
                           batch_size=a.batch_size, n_steps=a.sgld_steps, sgld_lr=1.0, sgld_std=0.01,
                           reinit_freq=0.05, buffer_size=a.buffer_size, lr=1e-4, weight_decay=0.0,
                           p_x_weight=1.0, p_y_given_x_weight=1.0)
    info = DataInfo(tuple(a.image), 10)
    extra = {} if a.channels_last == "auto" else {"channels_last": a.channels_last == "on"}
    cfg = JEMConfig(depth=a.depth, width=a.width, norm="none", batch_size=a.batch_size, sgld_steps=a.sgld_steps,
                    buffer_size=a.buffer_size, lr=1e-4, **extra)
    torch.manual_seed(1)
    steps = {"reference": reference_step(a.reference, args, torch.device("cpu")), "bench": bench_step(cfg, info, 1)}
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(a.warmup + a.iters):
        x_p_d = torch.rand(a.batch_size, *a.image, generator=g) * 2 - 1
        x_lab = torch.rand(a.batch_size, *a.image, generator=g) * 2 - 1
        y_lab = torch.randint(0, 10, (a.batch_size,), generator=g)
        for name in (("reference", "bench") if i % 2 == 0 else ("bench", "reference")):
            t0 = time.perf_counter()
            steps[name](x_p_d, x_lab, y_lab)
            if i >= a.warmup:
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"WRN-{a.depth}-{a.width}, {'×'.join(map(str, a.image))}, batch {a.batch_size}, {a.sgld_steps} SGLD steps, "
          f"buffer {a.buffer_size}, {torch.get_num_threads()} thread(s), {a.iters} iterations each, interleaved; "
          f"bench channels_last={cfg.channels_last}")
    for k, v in med.items():
        print(f"  {k:9s} median {v:.3f} s/iteration (min {min(times[k]):.3f}, max {max(times[k]):.3f})")
    print(f"  ratio reference / bench: {med['reference'] / med['bench']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

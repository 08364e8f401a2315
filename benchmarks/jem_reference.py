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

Each runs in a process of its own, as each runs in practice: the reference as plain Python, bench as its
CLI sets up a process (`bench.allocator.keep_freed_memory`: glibc keeps freed memory for reuse), so neither
inherits the other's allocator state. The two alternate iteration by iteration (after warm-up), on the same
batches, so load changes hit both alike; the script prints the median seconds per iteration of each, the
ratio reference / bench, and each one's FLOP rate against the higher of this CPU's float32 matrix-product and
3×3-convolution rates (the ceiling that convolution-bound steps approach).

After the timed iterations each worker records every convolution (forward and backward) that one iteration
of its step calls, then times each distinct call by itself on fresh tensors of the same shapes and strides
(median of 5) and sums them: the iteration's convolutions alone. The reference's median over bench's sum is
the most any bench step that calls those convolutions could reach against this reference, all the rest
(activations, sums, the loss, Adam, autograd) taken as free.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import multiprocessing
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

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


def batch(i: int, a) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Iteration ``i``'s data, the same in both processes."""
    g = torch.Generator().manual_seed(1000 + i)
    x_p_d = torch.rand(a.batch_size, *a.image, generator=g) * 2 - 1
    x_lab = torch.rand(a.batch_size, *a.image, generator=g) * 2 - 1
    return x_p_d, x_lab, torch.randint(0, 10, (a.batch_size,), generator=g)


def worker(name: str, a, conn) -> None:
    """Build one side's step, then time one iteration per request; replies the seconds (or the error)."""
    try:
        if a.threads:
            torch.set_num_threads(a.threads)
        torch.manual_seed(1)
        if name == "reference":
            sys.path.insert(0, str(a.reference.resolve()))
            args = SimpleNamespace(depth=a.depth, width=a.width, norm=None, dropout_rate=0.0, n_classes=10,
                                   uncond=False, batch_size=a.batch_size, n_steps=a.sgld_steps, sgld_lr=1.0,
                                   sgld_std=0.01, reinit_freq=0.05, buffer_size=a.buffer_size, lr=1e-4,
                                   weight_decay=0.0, p_x_weight=1.0, p_y_given_x_weight=1.0)
            step = reference_step(a.reference, args, torch.device("cpu"))
            conn.send(("ready", {"threads": torch.get_num_threads()}))
        else:
            from bench.allocator import keep_freed_memory

            malloc = keep_freed_memory()
            cfg = bench_config(a)
            step = bench_step(cfg, DataInfo(tuple(a.image), 10), 1)
            conn.send(("ready", {"threads": torch.get_num_threads(), "malloc": malloc,
                                 "channels_last": cfg.channels_last}))
        while (i := conn.recv()) is not None:
            if i == "convolutions":
                conn.send(("ok", convolution_seconds(lambda: step(*batch(0, a)))))
                continue
            data = batch(i, a)
            t0 = time.perf_counter()
            step(*data)
            conn.send(("ok", time.perf_counter() - t0))
    except Exception as e:  # noqa: BLE001  (reported to the parent, which stops)
        conn.send(("error", f"{type(e).__name__}: {e}"))


def bench_config(a) -> JEMConfig:
    extra = {} if a.channels_last == "auto" else {"channels_last": a.channels_last == "on"}
    return JEMConfig(depth=a.depth, width=a.width, norm="none", batch_size=a.batch_size, sgld_steps=a.sgld_steps,
                     buffer_size=a.buffer_size, lr=1e-4, **extra)


def step_flops(cfg: JEMConfig, info: DataInfo, device: str | torch.device = "cpu") -> tuple[int, int]:
    """FLOPs of bench's JEM step (`torch.utils.flop_counter`: convolutions and matrix products): per SGLD
    image-step (forward and input gradient of one image) and per training step (``cfg.sgld_steps`` steps on
    ``cfg.batch_size`` chains, then `bench_step` without SGLD: three forwards and their backward with weight
    gradients). The reference computes the same. The counter's hooks refuse autograd.grad, which `sgld` calls:
    the input gradient is counted with backward(inputs=...), the same computation."""
    def count(fn) -> int:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    torch.manual_seed(0)
    m = JEM(cfg, info).to(device).eval()
    x1 = (torch.rand(1, *info.shape, device=device) * 2 - 1).requires_grad_(True)
    per_image_step = count(lambda: m._energy_net(x1).sum().backward(inputs=[x1]))
    step = bench_step(dataclasses.replace(cfg, sgld_steps=0), info, 1, device)
    xb = torch.rand(cfg.batch_size, *info.shape, device=device) * 2 - 1
    rest = count(lambda: step(xb, xb, torch.zeros(cfg.batch_size, dtype=torch.long, device=device)))
    return per_image_step, cfg.sgld_steps * cfg.batch_size * per_image_step + rest


CONVOLUTIONS = (torch.ops.aten.convolution.default, torch.ops.aten.convolution_backward.default)


@dataclasses.dataclass(frozen=True)
class _TensorSpec:
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype

    def make(self) -> torch.Tensor:
        """Random values in this layout (an expanded tensor, stride 0, stays expanded)."""
        size = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride, strict=True)) if all(self.shape) else 0
        return torch.empty(size, dtype=self.dtype).normal_().as_strided(self.shape, self.stride)


class _RecordConvolutions(TorchDispatchMode):
    """Counts each distinct convolution call: the op, its tensors' shapes and strides, its other arguments."""

    def __init__(self):
        super().__init__()
        self.calls: dict[tuple, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in CONVOLUTIONS:
            assert not kwargs, f"{func} called with keyword arguments, which the replay does not keep"
            spec = tuple(_TensorSpec(tuple(x.shape), x.stride(), x.dtype) if isinstance(x, torch.Tensor)
                         else tuple(x) if isinstance(x, list) else x for x in args)
            self.calls[(func, spec)] = self.calls.get((func, spec), 0) + 1
        return func(*args, **(kwargs or {}))


def convolution_seconds(fn, reps: int = 5) -> dict[str, float | int]:
    """``fn``'s convolutions alone: every convolution call it makes (forward, and backward with whatever
    gradients it asked for), each distinct one timed by itself on fresh random CPU tensors of the same shapes
    and strides (median of ``reps`` after a warm-up), times its count. Returns the seconds and the call count."""
    with _RecordConvolutions() as rec:
        fn()
    total = 0.0
    for (func, spec), count in rec.calls.items():
        args = [a.make() if isinstance(a, _TensorSpec) else list(a) if isinstance(a, tuple) else a for a in spec]
        with torch.no_grad():
            func(*args)  # warm-up
            total += count * median_s(lambda f=func, xs=args: f(*xs), torch.device("cpu"), reps)[0]
    return {"seconds": total, "calls": sum(rec.calls.values())}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_s(fn, device: torch.device, reps: int) -> tuple[float, list[float]]:
    """(median seconds, each call's seconds) of ``reps`` calls of ``fn``, the device synchronized around each."""
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def ceilings(threads: int | None, n: int = 2048) -> dict[str, float]:
    """This CPU's float32 rates (FLOP/s) at the workers' thread count, the ceilings that convolution-bound
    steps approach: a 2048³ matrix product (MKL), and the forward pass of WRN-10-2's widest 3×3 convolution
    on 3×32×32 at batch 64 (32 → 64 channels, oneDNN, NHWC). They can differ by 2×: MKL runs its AVX2 kernels
    on AMD CPUs where oneDNN uses AVX-512 (a 2-core AMD EPYC of family 26: 104 against 240 GFLOP/s)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        cpu = torch.device("cpu")
        a, b = torch.randn(n, n), torch.randn(n, n)
        nhwc = torch.channels_last
        x = torch.randn(64, 32, 32, 32).contiguous(memory_format=nhwc)
        w = torch.randn(64, 32, 3, 3).contiguous(memory_format=nhwc)
        rates = {}
        for name, flop, fn in (("matrix product", 2 * n**3, lambda: a @ b),
                               ("3×3 convolution", 2 * 64 * 64 * 32 * 32 * 32 * 9,
                                lambda: torch.nn.functional.conv2d(x, w, padding=1))):
            with torch.no_grad():
                fn()  # warm-up
                rates[name] = flop / median_s(fn, cpu, 7)[0]
    finally:
        torch.set_num_threads(before)
    return rates


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
    flops = step_flops(bench_config(a), DataInfo(tuple(a.image), 10))[1]
    rates = ceilings(a.threads)  # before the workers start, not beside them
    ceiling = max(rates.values())
    what = max(rates, key=rates.get)
    context = multiprocessing.get_context("spawn")
    conns, procs, info = {}, [], {}
    for name in ("reference", "bench"):
        parent, child = context.Pipe()
        proc = context.Process(target=worker, args=(name, a, child), daemon=True)
        proc.start()
        child.close()  # the worker's end lives in the worker: a worker that dies gives EOFError, never a hang
        conns[name], info[name] = parent, None
        procs.append(proc)
    def receive(name: str) -> tuple[str, object]:
        try:
            return conns[name].recv()
        except EOFError:
            return "error", "the worker process died"

    for name in conns:
        kind, value = receive(name)
        if kind != "ready":
            print(f"jem_reference: {name} failed to start: {value}", file=sys.stderr)
            return 1
        info[name] = value
    times: dict[str, list[float]] = {k: [] for k in conns}
    for i in range(a.warmup + a.iters):
        for name in (("reference", "bench") if i % 2 == 0 else ("bench", "reference")):
            conns[name].send(i)
            kind, value = receive(name)
            if kind != "ok":
                print(f"jem_reference: {name} failed at iteration {i}: {value}", file=sys.stderr)
                return 1
            if i >= a.warmup:
                times[name].append(value)
    convs = {}
    for name, conn in conns.items():  # one at a time, the other worker idle
        conn.send("convolutions")
        kind, value = receive(name)
        if kind != "ok":
            print(f"jem_reference: {name} failed timing its convolutions: {value}", file=sys.stderr)
            return 1
        convs[name] = value
    for conn in conns.values():
        conn.send(None)
    for proc in procs:
        proc.join()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"WRN-{a.depth}-{a.width}, {'×'.join(map(str, a.image))}, batch {a.batch_size}, {a.sgld_steps} SGLD steps, "
          f"buffer {a.buffer_size}, {info['reference']['threads']} thread(s), {a.iters} iterations each, "
          f"interleaved, one process each; bench channels_last={info['bench']['channels_last']}, "
          f"malloc: {info['bench']['malloc']}")
    print(f"  one iteration: {flops / 1e9:.1f} GFLOP; this CPU's float32 rates at that thread count: "
          + ", ".join(f"{k} {r / 1e9:.1f} GFLOP/s" for k, r in rates.items()))
    for k, v in med.items():
        print(f"  {k:9s} median {v:.3f} s/iteration (min {min(times[k]):.3f}, max {max(times[k]):.3f}), "
              f"{flops / v / 1e9:.1f} GFLOP/s = {flops / v / ceiling:.0%} of the {what}'s")
    for k, c in convs.items():
        print(f"  {k:9s} its {c['calls']} convolution calls alone, each re-timed by itself: {c['seconds']:.3f} s "
              f"({c['seconds'] / med[k]:.0%} of its iteration)")
    print(f"  ratio reference / bench: {med['reference'] / med['bench']:.2f}x; the most bench's convolutions "
          f"allow, all else free: {med['reference'] / convs['bench']['seconds']:.2f}x")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())

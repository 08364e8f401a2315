"""JEM's hot paths on a GPU at paper scale: SGLD image-steps/s and training steps/s with each speed option, and
the fraction of the card's bf16 peak they reach.

    python benchmarks/sgld_gpu.py --out sgld_gpu.json            # everything but torch.compile
    python benchmarks/sgld_gpu.py --only compile --out c.json    # torch.compile (minutes of compilation)

The network is the `paper` recipe's WRN-28-10 (no normalization) on 3×32×32 with 10 classes; one SGLD step is
bench's `sgld` on `JEM._energy_net` (a forward and the input gradient), the training step bench's `JEM.loss`, its
backward and an Adam step (`jem_reference.bench_step`), batch 64 with 20 SGLD steps as in JEM's
``train_wrn_ebm.py``. The options:

- ``fp32``: cuDNN's float32 convolutions in true fp32 (``ieee``); ``tf32``: torch's CUDA default, TF32
  convolutions (bench's training and sampling use it unless told otherwise);
- ``bf16``: `torch.autocast` to bfloat16 around the energy (``precision=bf16`` for sampling);
- ``nhwc``: channels_last activations (`JEMConfig.channels_last`, the default), ``nchw`` without;
- ``compile``: `torch.compile` of the model's modules (``compile=true``, `bench.acquire.compile_children`);
- ``gen=cuda``: the SGLD noise from a CUDA generator; bench draws it on the CPU (``gen=cpu``,
  `bench.samplers.noise_like`), so a seed gives the same chains on every device, and copies it over each step;
  ``gen=cpu-pinned`` draws it into pinned memory and copies it without blocking.

FLOPs per image-step and per training step are counted by `torch.utils.flop_counter` (convolutions, their
input gradients, matrix products; no elementwise work); the rate is FLOP/s over the bf16 peak measured here
(an 8192³ bf16 matrix product, median of 10) and over the datasheet's dense bf16 (989 TFLOP/s, H100/H200 SXM).
Times are medians of CUDA-synchronized repeats after warm-up; nothing here is a unit test.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jem_reference import bench_step, median_s, step_flops, sync  # noqa: E402

from bench.acquire import compile_children  # noqa: E402
from bench.models.base import DataInfo  # noqa: E402
from bench.models.jem import JEM, JEMConfig  # noqa: E402
from bench.numerics import cudnn_tf32  # noqa: E402
from bench.samplers import noise_like  # noqa: E402
from bench.samplers import sgld as sgld_module  # noqa: E402
from bench.samplers.sgld import sgld  # noqa: E402
from bench.scales import Scale  # noqa: E402

INFO = DataInfo((3, 32, 32), 10)
DATASHEET_BF16 = 989e12  # dense bf16, H100/H200 SXM


def bf16_peak(device: torch.device) -> float | None:
    """FLOP/s of an 8192³ bf16 matrix product on random data (median of 10 after 3 warm-ups)."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    t, _ = median_s(lambda: a @ b, device, 10)
    return 2 * 8192**3 / t


def config(a, channels_last: bool) -> JEMConfig:
    return dataclasses.replace(JEM.recipe(Scale.paper, INFO), depth=a.depth, width=a.width,
                               batch_size=a.batch, channels_last=channels_last)


def build(a, channels_last: bool, device: torch.device, compiled: bool) -> JEM:
    torch.manual_seed(0)
    m = JEM(config(a, channels_last), INFO).to(device).eval()
    return compile_children(m) if compiled else m


def numerics(precision: str, device: torch.device):
    """The case's float32 numerics on CUDA (TF32, IEEE fp32 or bf16 autocast); nothing to switch on a CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return cudnn_tf32(precision == "tf32")


def pinned_noise(x, generator):
    """`noise_like`'s values drawn into pinned memory and copied without blocking (tried: no faster)."""
    eps = torch.empty(x.shape, pin_memory=True).normal_(generator=generator)
    return eps.to(x.device, x.dtype, non_blocking=True)


def same_noise(device) -> bool:
    """`noise_like` gives exactly the values of torch.randn from the same CPU generator."""
    x = torch.zeros(64, *INFO.shape, device=device)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    return all(torch.equal(noise_like(x, g1).cpu(), torch.randn(x.shape, generator=g2)) for _ in range(3))


def sgld_case(a, device, precision, channels_last, compiled, gen, batch):
    m = build(a, channels_last, device, compiled)
    g = torch.Generator(device=device if gen == "cuda" else "cpu").manual_seed(0)
    sgld_module.noise_like = pinned_noise if gen == "cpu-pinned" else noise_like
    x0 = (torch.rand(batch, *INFO.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1).to(device)

    def run():
        with numerics(precision, device):
            return sgld(m._energy_net, x0, a.sgld_steps, 1.0, 0.01, g)

    t0 = time.perf_counter()
    run()  # warm-up (compilation, cuDNN's algorithm choice)
    sync(device)
    warm_s = time.perf_counter() - t0
    t, times = median_s(run, device, a.reps)
    sgld_module.noise_like = noise_like
    return {"batch": batch, "image_steps_per_s": batch * a.sgld_steps / t, "s_per_call": t,
            "calls": [round(x, 5) for x in times], "warmup_s": round(warm_s, 2)}


def train_case(a, device, precision, channels_last):
    cfg = dataclasses.replace(config(a, channels_last), sgld_steps=a.sgld_steps)
    step = bench_step(cfg, INFO, 1, device)
    g = torch.Generator().manual_seed(0)
    xs = [(torch.rand(a.batch, *INFO.shape, generator=g) * 2 - 1).to(device) for _ in range(2)]
    y = torch.randint(0, 10, (a.batch,), generator=g).to(device)

    def run():
        with numerics(precision, device):
            step(xs[0], xs[1], y)

    run()
    run()
    t, times = median_s(run, device, a.reps)
    return {"batch": a.batch, "steps_per_s": 1 / t, "s_per_step": t, "steps": [round(x, 4) for x in times]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only", choices=["all", "compile", "noise"], default="all",
                    help="all: every option but torch.compile; compile: the compiled cases; noise: the noise paths")
    ap.add_argument("--depth", type=int, default=28)
    ap.add_argument("--width", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--big-batch", type=int, default=256, help="a second batch size, to fill the chip")
    ap.add_argument("--sgld-steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sgld_gpu: no CUDA device here; run it on a GPU machine (or --device cpu to try it)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = bf16_peak(device)
    cfg = dataclasses.replace(config(a, True), sgld_steps=a.sgld_steps)
    per_image_step, per_train_step = step_flops(cfg, INFO, device)
    result = {"device": name, "torch": torch.__version__, "network": f"WRN-{a.depth}-{a.width}, 3x32x32",
              "sgld_steps": a.sgld_steps, "bf16_peak_measured_flops": peak, "bf16_peak_datasheet_flops":
              DATASHEET_BF16, "flops_per_image_step": per_image_step, "flops_per_train_step": per_train_step,
              "sgld": [], "train": []}

    def frac(rate_flops):
        return {"of_measured_bf16_peak": rate_flops / peak if peak else None,
                "of_datasheet_bf16": rate_flops / DATASHEET_BF16, "tflops": rate_flops / 1e12}

    def save():
        if a.out:
            a.out.write_text(json.dumps(result, indent=1))

    noise = [(p, True, False, gen, a.batch) for p in ("tf32", "bf16") for gen in ("cpu", "cpu-pinned", "cuda")]
    if a.only == "compile":
        sgld_cases, train_cases = [("bf16", True, True, "cpu", a.batch), ("tf32", True, True, "cpu", a.batch)], []
    elif a.only == "noise":
        sgld_cases, train_cases = noise, []
    else:
        sgld_cases = [(p, cl, False, "cpu", a.batch) for p in ("fp32", "tf32", "bf16") for cl in (False, True)]
        sgld_cases += noise + [("bf16", True, False, gen, a.big_batch) for gen in ("cpu", "cuda")]
        sgld_cases += [("tf32", True, False, "cuda", a.big_batch)]
        train_cases = [(p, cl) for p in ("fp32", "tf32") for cl in (False, True)]
    if device.type == "cuda":
        result["noise_like_equals_randn"] = same_noise(device)
        print(f"noise_like gives torch.randn's values: {result['noise_like_equals_randn']}", flush=True)
    print(f"{name}, torch {torch.__version__}, WRN-{a.depth}-{a.width}; {per_image_step / 1e9:.1f} GFLOP per "
          f"image-step, {per_train_step / 1e12:.2f} TFLOP per training step; bf16 peak measured "
          f"{(peak or 0) / 1e12:.0f} TFLOP/s", flush=True)
    for precision, cl, compiled, gen, batch in sgld_cases:
        label = f"sgld {precision} {'nhwc' if cl else 'nchw'}{' compile' if compiled else ''} gen={gen} batch={batch}"
        try:
            r = sgld_case(a, device, precision, cl, compiled, gen, batch)
        except Exception as e:  # noqa: BLE001  (a case that fails on this stack is reported, the rest still run)
            print(f"{label}: failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            continue
        r.update(precision=precision, channels_last=cl, compile=compiled, generator=gen,
                 **frac(r["image_steps_per_s"] * per_image_step))
        result["sgld"].append(r)
        save()
        print(f"{label}: {r['image_steps_per_s']:,.0f} image-steps/s, {r['tflops']:.1f} TFLOP/s, "
              f"{100 * (r['of_measured_bf16_peak'] or 0):.1f}% of measured bf16 peak (warm-up {r['warmup_s']} s)",
              flush=True)
    for precision, cl in train_cases:
        label = f"train {precision} {'nhwc' if cl else 'nchw'} batch={a.batch}"
        try:
            r = train_case(a, device, precision, cl)
        except Exception as e:  # noqa: BLE001
            print(f"{label}: failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            continue
        r.update(precision=precision, channels_last=cl, **frac(r["steps_per_s"] * per_train_step))
        result["train"].append(r)
        save()
        print(f"{label}: {r['steps_per_s']:.2f} steps/s ({r['s_per_step'] * 1e3:.0f} ms), {r['tflops']:.1f} TFLOP/s",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

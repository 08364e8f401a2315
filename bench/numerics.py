"""How bench computes float32.

On CUDA: TF32 (torch's default for cuDNN's convolutions, about 10 bits of mantissa) or IEEE fp32. Where a
computation needs full fp32 on a GPU whatever the run's setting (Inception's features, a flow's
fixed-point inverse), it runs under `ieee_fp32`; the run's own setting is recorded (`cuda_fp32_modes`, the
record's ``env.cuda_fp32``). On a CPU these settings change nothing.

On a CPU: `elu`, whose negative branch is float64's ``expm1`` rounded to float32, is correctly rounded and
several times faster than torch's own float32 ELU on AVX-512 CPUs (see `elu`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _flag(new_api, legacy_api, legacy_attr: str, enabled: bool) -> tuple[object, str, object]:
    """(object, attribute, value) for one TF32 switch: torch >= 2.9's ``fp32_precision`` ("tf32"/"ieee"),
    else the older ``allow_tf32`` (setting both is refused by torch >= 2.9)."""
    if new_api is not None and hasattr(new_api, "fp32_precision"):
        return new_api, "fp32_precision", "tf32" if enabled else "ieee"
    return legacy_api, legacy_attr, enabled


@contextmanager
def _switched(flags: list[tuple[object, str, object]]) -> Iterator[None]:
    before = [getattr(obj, attr) for obj, attr, _ in flags]
    for obj, attr, value in flags:
        setattr(obj, attr, value)
    try:
        yield
    finally:
        for (obj, attr, _), value in zip(flags, before):
            setattr(obj, attr, value)


def _conv(enabled: bool):
    return _flag(getattr(torch.backends.cudnn, "conv", None), torch.backends.cudnn, "allow_tf32", enabled)


def _matmul(enabled: bool):
    return _flag(getattr(torch.backends.cuda, "matmul", None), torch.backends.cuda.matmul, "allow_tf32", enabled)


def cudnn_tf32(enabled: bool):
    """cuDNN's float32 convolutions in TF32 (torch's default on CUDA) or in IEEE fp32 (``enabled=False``)."""
    return _switched([_conv(enabled)])


def ieee_fp32():
    """Float32 convolutions and matrix products in IEEE fp32 on CUDA, whatever the global setting."""
    return _switched([_conv(False), _matmul(False)])


def cuda_fp32_modes() -> dict[str, str]:
    """How CUDA computes float32 convolutions and matrix products here: "tf32" (cuDNN's convolutions by torch's
    default) or "ieee". TF32 changes numbers in the third or fourth digit and runs several times faster."""
    def mode(flag: tuple[object, str, object]) -> str:
        value = getattr(flag[0], flag[1])
        return value if isinstance(value, str) else "tf32" if value else "ieee"

    return {"conv": mode(_conv(True)), "matmul": mode(_matmul(True))}


class _CpuElu(torch.autograd.Function):
    """ELU (alpha 1) of a float32 CPU tensor: ``max(x, expm1(min(x, 0)))`` with ``expm1`` in float64 rounded
    to float32, which is exact for x > 0 (expm1(0) is 0) and the correctly rounded ELU for x <= 0 (expm1(x)
    >= x, so the maximum picks it; NaN propagates, -0.0 stays -0.0). The gradient is torch's own
    ``elu_backward`` of the input, the one `torch.nn.functional.elu` uses, so backward is bit for bit
    torch's."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.maximum(x, torch.expm1(x.clamp(max=0).double()).to(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return torch.ops.aten.elu_backward(grad, 1.0, 1.0, 1.0, False, x)


def elu(x: Tensor) -> Tensor:
    """``torch.nn.functional.elu(x)`` (alpha 1). On a CPU in float32 the negative branch is float64's
    ``expm1`` rounded to float32: correctly rounded, where torch's float32 kernel (SLEEF's ``expm1f``, within
    1 ulp) differs in the last bit for a few percent of the inputs in [-20, 0]. That kernel's AVX-512 build
    runs several times slower than its AVX2 build, so this form is the faster one on AVX-512 CPUs (figures in
    docs/performance.md), and it gives the same results on both. Other devices and dtypes use torch's own."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return F.elu(x)
    return _CpuElu.apply(x)


class ELU(nn.Module):
    """`elu` as a module, for ``nn.Sequential`` stacks."""

    def forward(self, x: Tensor) -> Tensor:
        return elu(x)

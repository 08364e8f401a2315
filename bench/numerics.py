"""How CUDA computes float32: TF32 (torch's default for cuDNN's convolutions, about 10 bits of mantissa) or
IEEE fp32. Where a computation needs full fp32 on a GPU whatever the run's setting (Inception's features, a
flow's fixed-point inverse), it runs under `ieee_fp32`; the run's own setting is recorded (`cuda_fp32_modes`,
the record's ``env.cuda_fp32``). On a CPU these settings change nothing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


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

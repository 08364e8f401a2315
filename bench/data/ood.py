"""Out-of-distribution sets for the `ood` suite.

Synthetic sets always exist and are built from the in-distribution test split's shape (and, for
`interp` and `flip`, its images), deterministically from a seed:
- `uniform`: every pixel uniform on {0..255};
- `gaussian`: every pixel N(0.5, 0.25²) on [0, 1], clipped and quantized;
- `constant`: every image a single random value per channel;
- `interp`: JEM's definition, the mean of two consecutive test images;
- `flip`: test images flipped upside down (a horizontal flip is an in-distribution augmentation on
  natural images, a vertical one is not).
Real sets (`mnist`, `cifar10`, `npz:...`, ...) use their test split, mapped to the in-distribution shape
by a declared, recorded transform: bilinear (antialiased) resize to H×W, and RGB→grey by ITU-R 601
luma or grey→RGB by repetition. Other channel counts cannot be mapped and are refused. A real set larger
than the in-distribution test split (or than MAX_OOD) is subsampled to that size, so in- and
out-of-distribution are balanced and scoring an OOD set never costs more than scoring the test split:
the recorded `subsample` gives n, the set's size and the rule.
"""

from __future__ import annotations

from pathlib import PurePath

import torch
import torch.nn.functional as F
from torch import Tensor

from bench.data.base import Dataset
from bench.errors import UserError

SYNTHETIC = ("uniform", "gaussian", "constant", "interp", "flip")
MAX_OOD = 10_000


def synthetic(name: str, data: Dataset, seed: int) -> Tensor:
    x = data.test.x
    n, shape = len(x), tuple(x.shape[1:])
    g = torch.Generator().manual_seed(seed)
    if name == "uniform":
        return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.int64).to(torch.uint8)
    if name == "gaussian":
        v = (0.5 + 0.25 * torch.randn((n, *shape), generator=g)).clamp(0, 1)
        return torch.round(v * 255).to(torch.uint8)
    if name == "constant":
        v = torch.randint(0, 256, (n, shape[0], 1, 1), generator=g, dtype=torch.int64)
        return v.expand(n, *shape).to(torch.uint8).contiguous()
    if name == "interp":
        a, b = x[:-1].float(), x[1:].float()
        return torch.round((a + b) / 2).to(torch.uint8)
    if name == "flip":
        return x.flip(-2).contiguous()
    raise ValueError(name)


def map_to_shape(x: Tensor, shape: tuple[int, int, int], name: str) -> tuple[Tensor, dict]:
    """Resize and recolour uint8 images to ``shape``; returns the images and the transform's description."""
    c, h, w = shape
    transform: dict = {}
    xc = x.shape[1]
    if xc != c:
        if xc == 3 and c == 1:
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = torch.round((x.float() * weights).sum(1, keepdim=True)).clamp(0, 255).to(torch.uint8)
            transform["colour"] = "rgb->grey (ITU-R 601 luma)"
        elif xc == 1 and c == 3:
            x = x.expand(-1, 3, -1, -1).contiguous()
            transform["colour"] = "grey->rgb (repeat)"
        else:
            raise UserError(f"OOD set '{name}' has {xc} channels and cannot be mapped to {c}; "
                            "only grey<->RGB is supported: convert it to 1 or 3 channels")
    if tuple(x.shape[-2:]) != (h, w):
        transform["resize"] = f"{tuple(x.shape[-2:])}->{(h, w)} bilinear antialias"
        x = F.interpolate(x.float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        x = torch.round(x).clamp(0, 255).to(torch.uint8)
    return x, transform


def base_key(name: str) -> str:
    """The part of a metric key that names OOD set ``name``, independent of where its file lies: a
    synthetic or registered set keeps its name, ``npz:/a/b/hidden.npz`` becomes ``npz:hidden.npz``."""
    kind, sep, arg = name.partition(":")
    if not sep:
        return name
    return f"{kind}:{PurePath(arg.rstrip('/')).name or arg}"


def set_keys(names: list[str], sha256: dict[str, str | None]) -> dict[str, str]:
    """Path-free metric keys for the sets ``names`` (``sha256``: each set's content hash, None if absent).

    Sets whose file names clash get their content hash appended (``npz:x.npz@1a2b3c4d``), which does not
    depend on the path or the order given; an absent set in a clash gets its position instead."""
    keys = {n: base_key(n) for n in names}
    for key in set(keys.values()):
        clash = [n for n in names if keys[n] == key]
        if len(clash) < 2:
            continue
        for pos, n in enumerate(clash, 1):
            keys[n] = f"{key}@{sha256[n][:8]}" if sha256.get(n) else f"{key}@absent{pos}"
    if len(set(keys.values())) < len(keys):
        dup = sorted(n for n in names if list(keys.values()).count(keys[n]) > 1)
        raise UserError(f"OOD sets {', '.join(dup)} hold the same images; give each set once")
    return keys


def load_ood_set(name: str, data: Dataset, seed: int, root: str | None) -> tuple[Tensor, dict, dict]:
    """The images of OOD set ``name`` in ``data``'s shape, what the protocol should say about them (the
    settings, the content hash), and what the record keeps beside it (the seed its draws used, the path)."""
    if name in SYNTHETIC:
        x = synthetic(name, data, seed)
        return x, {"kind": "synthetic", "n": len(x)}, {"seed": seed}
    from bench.data import load_dataset

    other = load_dataset(name, root)
    x = other.test.x
    info: dict = {"kind": "dataset", "data": base_key(other.name), "split": "test", "sha256": other.fingerprint()}
    draws: dict = {"source": next(iter(other.location.values()), other.name)} if ":" in name else {}
    cap = min(MAX_OOD, len(data.test))
    if len(x) > cap:
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:cap].sort().values
        x = x[idx]
        info["subsample"] = {"n": cap, "of": len(other.test),
                             "rule": f"sorted randperm from the set seed, at most the in-distribution test "
                                     f"split's size and {MAX_OOD}"}
        draws["subsample_seed"] = seed
    x, transform = map_to_shape(x, tuple(data.shape), name)  # type: ignore[arg-type]
    info.update(n=len(x), transform=transform or "none")
    return x, info, draws

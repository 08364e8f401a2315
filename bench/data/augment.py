"""Training-time data augmentation, shared by every recipe whose reference augments: pad, random crop
back to the original size, and horizontal flip — the torchvision pipeline
``Pad(p, padding_mode) → RandomCrop(H, W) → RandomHorizontalFlip()`` that JEM, Residual Flows and
NCSN's released code use on CIFAR-10, applied to a whole batch at once and drawn from an explicit
generator, so the same seed gives the same images.

A recipe holds an `Augment` in its config (so it is part of the model config in the record and of the
checkpoint cache key) and calls it on each float batch before any input noise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Augment:
    #: pixels padded on each side before a random crop back to H×W (0: no crop)
    pad: int = 0
    #: torchvision's padding_mode: JEM pads with "reflect"
    pad_mode: Literal["reflect", "constant", "replicate"] = "reflect"
    #: random horizontal flip with probability 1/2 (only for data whose classes survive a mirror: CIFAR
    #: yes, digits and SVHN no — see `DataInfo.hflip`)
    flip: bool = False

    def __post_init__(self):
        if self.pad < 0:
            raise ValueError(f"augmentation pad must be >= 0, got {self.pad}")
        if self.pad_mode not in ("reflect", "constant", "replicate"):
            raise ValueError(f"augmentation pad_mode must be reflect, constant or replicate, got {self.pad_mode!r}")

    def __bool__(self) -> bool:
        return self.pad > 0 or self.flip

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Augment a float batch N×C×H×W; each image gets its own crop offset and flip."""
        if not self:
            return x
        n, _, h, w = x.shape
        if self.pad > 0:
            p = self.pad
            xp = F.pad(x, (p, p, p, p), mode=self.pad_mode) if self.pad_mode != "constant" else F.pad(x, (p,) * 4)
            oy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
            ox = torch.randint(0, 2 * p + 1, (n,), generator=generator)
            rows = (oy[:, None] + torch.arange(h))[:, None, :, None].to(x.device)  # N×1×H×1
            cols = (ox[:, None] + torch.arange(w))[:, None, None, :].to(x.device)  # N×1×1×W
            batch = torch.arange(n, device=x.device)[:, None, None, None]
            chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
            x = xp[batch, chan, rows, cols]
        if self.flip:
            mirror = (torch.rand(n, generator=generator) < 0.5).to(x.device)
            x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
        return x

    def __str__(self) -> str:
        crop = [f"pad {self.pad} ({self.pad_mode}) + random crop"] if self.pad else []
        return ", ".join(crop + (["flip"] if self.flip else [])) or "none"

    def describe(self) -> dict:
        return {**asdict(self), "order": "pad, random crop, horizontal flip; per image, from the training generator"}


NONE = Augment()


def reference_augment(data_hflip: bool, pad: int = 4) -> Augment:
    """JEM's (and Residual Flows' and NCSN's) CIFAR augmentation: reflect-pad 4, crop, flip where the
    data allows it."""
    return Augment(pad=pad, pad_mode="reflect", flip=data_hflip)

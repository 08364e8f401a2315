"""`svhn`: the Street View House Numbers "format 2" files (cropped 32×32 digits), torchvision's layout.

Files: ``train_32x32.mat`` and ``test_32x32.mat`` (MATLAB v5, read with `scipy.io.loadmat`); the optional
``extra_32x32.mat`` is not used. Where, for each root of `data_roots` (``data.root=`` then ``$BENCH_DATA``):
``ROOT/svhn``, ``ROOT``.

Each file holds ``X``: uint8 32×32×3×N (H, W, C, N) and ``y``: N×1 labels 1..10, where 10 stands for the
digit 0; labels are mapped to 0..9 so that label = digit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bench.data.base import Dataset, Split, data_roots, find_first, sha256_file
from bench.data.registry import DATASETS
from bench.errors import UserError

FILES = ("train_32x32.mat", "test_32x32.mat")


def _read(path: Path) -> Split:
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        m = loadmat(path, variable_names=("X", "y"))
    except (MatReadError, ValueError, TypeError, OSError, NotImplementedError) as e:
        raise UserError(f"cannot read SVHN file {path} ({type(e).__name__}: {e}); download it again") from None
    if "X" not in m or "y" not in m:
        raise UserError(f"SVHN file {path} lacks the 'X' or 'y' variable; is it the right file?")
    x, y = m["X"], m["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise UserError(f"SVHN file {path}: 'X' must be uint8 32×32×3×N, got {x.dtype} {x.shape}; download it again")
    n = x.shape[3]
    y = np.asarray(y).reshape(-1)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or (n and not 1 <= y.min() <= y.max() <= 10):
        raise UserError(f"SVHN file {path}: 'y' must hold {n} labels in 1..10, got {y.dtype} {m['y'].shape}; "
                        f"download it again")
    y = y.astype(np.int64) % 10  # 10 is the digit 0
    return Split(torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1))), torch.from_numpy(y))


@DATASETS.register("svhn")
def load_svhn(root: str | None = None, arg: str | None = None) -> Dataset:
    candidates = [p for r in data_roots(root) for p in (r / "svhn", r)]
    d = find_first(candidates, FILES, "svhn", "the SVHN format-2 files (cropped digits)")
    return Dataset(
        name="svhn",
        train=_read(d / FILES[0]),
        test=_read(d / FILES[1]),
        n_classes=10,
        class_names=tuple(str(i) for i in range(10)),
        provenance={
            "source": "SVHN format 2, cropped 32x32 digits (Netzer et al., 2011)",
            "files": {f: sha256_file(d / f) for f in FILES},
            "split": "official train/test (extra not used)",
            "labels": "digit = y mod 10 (the files label 0 as 10)",
        },
        location={"dir": str(d.resolve())},
    )

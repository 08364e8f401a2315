"""The dataset abstraction every loader returns, and the helpers loaders share.

A dataset is held as uint8 tensors N×C×H×W (the canonical 8-bit form every metric convention starts
from) plus int64 labels. Loaders never download: they read local files and, when a file is missing,
raise `DataNotFoundError` naming every path they looked at and what belongs there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bench.errors import DataNotFoundError, UserError
from bench.fileio import sha256_file  # noqa: F401 - the loaders' import of it


@dataclass(frozen=True)
class Split:
    x: Tensor  # uint8, N×C×H×W
    y: Tensor  # int64, N; -1 where unlabeled

    def __post_init__(self):
        if self.x.dtype != torch.uint8 or self.x.dim() != 4:
            raise ValueError(f"images must be uint8 N×C×H×W, got {self.x.dtype} {tuple(self.x.shape)}")
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise ValueError(f"labels must be int64 of shape [{self.x.shape[0]}], "
                             f"got {self.y.dtype} {tuple(self.y.shape)}")

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class Dataset:
    name: str  # the canonical spec, e.g. "digits", "mnist", "npz:/abs/path.npz"
    train: Split
    test: Split
    n_classes: int
    class_names: tuple[str, ...] = ()
    #: how the data was obtained: files and their sha256, split definition; goes into every record
    provenance: dict = field(default_factory=dict)
    #: where the files were read from (directories, files): recorded beside the protocol, never in it, so
    #: the same data in two places is the same data
    location: dict = field(default_factory=dict)
    #: a horizontal mirror keeps every image's class (natural images like CIFAR: yes; digits, SVHN: no), so
    #: training may flip (JEM flips CIFAR-10 but not SVHN)
    hflip: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # type: ignore[return-value]

    def fingerprint(self) -> str:
        """sha256 over the exact bytes of both splits: keys checkpoint caches and records."""
        h = hashlib.sha256()
        for s in (self.train, self.test):
            h.update(str(tuple(s.x.shape)).encode())
            h.update(s.x.contiguous().numpy().tobytes())
            h.update(s.y.numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "n_classes": self.n_classes,
            "n_train": len(self.train),
            "n_test": len(self.test),
            "hflip": self.hflip,
            "sha256": self.fingerprint(),
            **self.provenance,
        }


def declare_hflip(data: Dataset, hflip: bool | None, generic: tuple[str, ...]) -> Dataset:
    """``data`` with ``data.hflip=`` applied. Only data of a ``generic`` kind (imagefolder:, npz:) takes it: a
    named dataset knows whether a mirror keeps its classes."""
    if hflip is None:
        return data
    kind = data.name.partition(":")[0]
    if kind not in generic:
        raise UserError(f"data.hflip= declares whether a mirror keeps the classes of {' or '.join(generic)} data; "
                        f"'{data.name}' already knows (hflip={str(data.hflip).lower()}): drop data.hflip")
    return dataclasses.replace(data, hflip=bool(hflip))

def check_classes(data: Dataset) -> None:
    """A run's data needs two classes or more: a classifier of one class, an IS over one class, a domain extractor
    trained on one label are meaningless. (Labels 0..K-1 with every class seen in training are the loaders' to
    check: `npz` and `imagefolder` take them from the user's files.)"""
    n = data.n_classes
    if n < 2:
        raise UserError(f"data '{data.name}' has {n} class{'' if n == 1 else 'es'}; bench's models and metrics need "
                        "at least 2 classes: label the images 0..K-1 with K >= 2")


def stratified_split(y: np.ndarray, test_size: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed stratified split (scikit-learn's), returned as sorted index arrays."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_size, stratify=y, random_state=seed)
    return np.sort(tr), np.sort(te)


#: the seed of the fixed order a class-grouped test split is put in (`mixed_test_order`)
TEST_ORDER_SEED = 0


def mixed_test_order(test: Split) -> tuple[Split, dict]:
    """A test split whose labels come grouped by class (non-decreasing, as an image folder's always are, class
    directory by class directory) in a fixed pseudo-random order instead, with what was done for the
    provenance. Metrics that evaluate "the first n test images" (robustness, AutoAttack, the SGLD defense)
    would otherwise see one or two classes only. A test split in any other order keeps its source's order
    (digits, MNIST, CIFAR), and so its numbers."""
    y = test.y.numpy()
    if len(y) < 2 or y.min() == y.max() or not (np.diff(y) >= 0).all():
        return test, {}
    perm = torch.from_numpy(np.random.default_rng(TEST_ORDER_SEED).permutation(len(y)))
    order = {"test_order": {"rule": "the class-grouped test split in a fixed permutation, "
                                    f"numpy.random.default_rng({TEST_ORDER_SEED}).permutation(n_test)",
                            "why": "the first n test images of a subset hold every class"}}
    return Split(test.x[perm].contiguous(), test.y[perm].contiguous()), order


def split_description(test_size: int | float, seed: int, test_idx: np.ndarray) -> dict:
    return {
        "split": {
            "method": "sklearn.model_selection.train_test_split(stratify=y)",
            "test_size": test_size,
            "random_state": seed,
            "test_indices_sha256": hashlib.sha256(np.asarray(test_idx, dtype=np.int64).tobytes()).hexdigest(),
        }
    }


def data_roots(root: str | None) -> list[Path]:
    """Where loaders look: ``data.root=`` first, then ``$BENCH_DATA``."""
    roots = []
    if root:
        roots.append(Path(root).expanduser())
    env = os.environ.get("BENCH_DATA")
    if env:
        roots.append(Path(env).expanduser())
    return roots


def find_first(candidates: Sequence[Path], required: Sequence[str], dataset: str, what: str) -> Path:
    """Return the first directory among ``candidates`` that holds every file in ``required``.

    Otherwise raise a one-line `DataNotFoundError` that lists every path looked at and what belongs there.
    """
    for d in candidates:
        if all((d / f).is_file() for f in required):
            return d
    looked = ", ".join(str(d) for d in candidates) or "(no directory: set data.root=DIR or BENCH_DATA)"
    raise DataNotFoundError(
        f"dataset '{dataset}' not found; looked in: {looked}; put {what} ({', '.join(required)}) "
        f"in one of them, or point data.root=DIR / BENCH_DATA at it"
    )


def to_nchw_uint8(x: np.ndarray, layout: str) -> Tensor:
    """Convert an array of images in ``layout`` ("NHWC", "NCHW" or "NHW") to a uint8 N×C×H×W tensor."""
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise UserError(f"images must be uint8 (0..255), got dtype {x.dtype}; convert them before loading")
    if layout == "NHW":
        x = x[:, None]
    elif layout == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    elif layout != "NCHW":
        raise ValueError(layout)
    return torch.from_numpy(np.ascontiguousarray(x))

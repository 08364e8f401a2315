"""`npz:<path>`: images and labels in one NumPy ``.npz`` file, for data that has no loader of its own.

Arrays: ``x`` uint8 N×H×W×C (C = 1 or 3) or N×H×W (grayscale), and ``y`` integer labels 0..K-1 of length N
(any integer dtype; stored as int64). With ``x_train, y_train, x_test, y_test`` those splits are used as
given; with only ``x, y`` a fixed stratified split holds out 20% for test (scikit-learn, random_state 0),
recorded in the provenance with the hash of the test indices. The file is loaded with
``allow_pickle=False``: object arrays are refused.

Where: ``<path>`` as given (absolute, or relative to the working directory); a relative path not found there
is also looked for under each root of `data_roots` (``data.root=`` then ``$BENCH_DATA``).
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from bench.data.base import (
    Dataset,
    Split,
    data_roots,
    mixed_test_order,
    sha256_file,
    split_description,
    stratified_split,
    to_nchw_uint8,
)
from bench.data.registry import DATASETS
from bench.errors import DataNotFoundError, UserError

TEST_FRACTION = 0.2
SPLIT_SEED = 0
EXPECTED = "x (uint8 N×H×W×C or N×H×W) and y (integer labels), or x_train, y_train, x_test, y_test"


def resolve_arg_path(arg: str, root: str | None, dataset: str, is_dir: bool, what: str) -> Path:
    """The file or directory named by a ``name:<path>`` spec, or `DataNotFoundError` naming where it looked."""
    p = Path(arg).expanduser()
    candidates = [p] if p.is_absolute() else [p, *(r / p for r in data_roots(root))]
    for c in candidates:
        if (c.is_dir() if is_dir else c.is_file()):
            return c.resolve()
    looked = ", ".join(str(c.absolute()) for c in candidates)
    raise DataNotFoundError(f"dataset '{dataset}:{arg}' not found; looked for a {'directory' if is_dir else 'file'} "
                            f"at: {looked}; give the path of {what}")


def fixed_split(y: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """The fixed stratified 80/20 split used when a dataset comes without a test set."""
    counts = np.bincount(y)
    if len(y) < 2 or counts[counts > 0].min() < 2:
        raise UserError(f"{name}: every class needs at least 2 examples to be split into train and test; "
                        f"add examples or provide a separate test set")
    try:
        tr, te = stratified_split(y, TEST_FRACTION, SPLIT_SEED)
    except ValueError as e:
        raise UserError(f"{name}: cannot make a stratified {TEST_FRACTION:.0%} test split ({e}); "
                        f"add examples or provide a separate test set") from None
    return tr, te, split_description(TEST_FRACTION, SPLIT_SEED, te)


def _images(x: np.ndarray, path: Path, key: str) -> torch.Tensor:
    if x.dtype != np.uint8:
        raise UserError(f"{path}: '{key}' must be uint8 (0..255), got {x.dtype}; convert it before saving")
    if x.ndim and x.shape[0] == 0:
        raise UserError(f"{path}: '{key}' holds no images; save at least one")
    if x.ndim == 3:
        return to_nchw_uint8(x, "NHW")
    if x.ndim == 4 and x.shape[3] in (1, 3):
        return to_nchw_uint8(x, "NHWC")
    hint = "; for N×C×H×W arrays save x.transpose(0, 2, 3, 1)" if x.ndim == 4 and x.shape[1] in (1, 3) else ""
    raise UserError(f"{path}: '{key}' must be N×H×W×C with C 1 or 3, or N×H×W, got shape {x.shape}{hint}")


def _labels(y: np.ndarray, n: int, path: Path, key: str) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (n,):
        raise UserError(f"{path}: '{key}' must be {n} integer labels (shape ({n},)), got {y.dtype} {y.shape}")
    if n and y.min() < 0:
        raise UserError(f"{path}: '{key}' has negative label {int(y.min())}; labels must be 0..K-1")
    return y


def _classes(path: Path, train: np.ndarray, test: np.ndarray | None = None) -> np.ndarray:
    """The labels as int64 once they are 0..K-1 with every class present, and no class only in ``test``: labels
    {0, 1000} would otherwise make 1001 classes, 999 of them empty (and label 2**40 a 2**40-bin count)."""
    labels = np.unique(np.concatenate([train, test]) if test is not None else train)
    if len(labels) and (labels[0] != 0 or labels[-1] != len(labels) - 1):
        raise UserError(f"{path}: labels must be 0..K-1 with every class present, but y has {len(labels)} distinct "
                        f"labels from {labels[0]} to {labels[-1]}; relabel them, e.g. with "
                        "numpy.unique(y, return_inverse=True)")
    if test is not None:
        unseen = np.setdiff1d(test, train)
        if len(unseen):
            raise UserError(f"{path}: class(es) {', '.join(map(str, unseen[:5]))} appear only in the test split "
                            "(y_test), so no model can learn them; add them to x_train/y_train or drop them")
    return labels


def _available_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _header(fp, path: Path, key: str) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, header bytes) of a .npy member, read from its header only."""
    try:
        version = np.lib.format.read_magic(fp)
    except ValueError:
        raise UserError(f"{path}: member '{key}' is not a .npy array; save the file with numpy.savez: "
                        f"{EXPECTED}") from None
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version in readers:
        shape, _, dtype = readers[version](fp)
    else:  # 3.0 (utf-8 field names) has no public reader
        shape, _, dtype = np.lib.format._read_array_header(fp, version)
    return shape, dtype, fp.tell()


def _member(z: zipfile.ZipFile, name: str, path: Path, key: str) -> np.ndarray:
    """One array, refused before any allocation when its header does not match the bytes the member holds."""
    info = z.getinfo(name)
    with z.open(info) as fp:
        shape, dtype, header = _header(fp, path, key)
    if dtype.hasobject:
        raise UserError(f"{path} holds object (pickled) arrays, which are not loaded; save plain numeric arrays: "
                        f"{EXPECTED}")
    declared = math.prod(shape) * dtype.itemsize
    if declared != info.file_size - header:
        raise UserError(f"{path}: array '{key}' declares shape {shape} of {dtype} ({declared} bytes) but holds "
                        f"{info.file_size - header} bytes; the file is corrupt")
    memory = _available_memory()
    if memory is not None and declared > memory:
        raise UserError(f"{path}: array '{key}' is {declared} bytes, more than this machine's memory ({memory})")
    with z.open(info) as fp:
        return np.lib.format.read_array(fp, allow_pickle=False)


def _read(path: Path) -> dict[str, np.ndarray]:
    # np.load takes any non-zip, non-.npy file for a pickle; say what the file really is instead.
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not an .npz (zip) file; save it with numpy.savez: {EXPECTED}")
    try:
        with zipfile.ZipFile(path) as z:
            members: dict[str, str] = {}
            for n in z.namelist():  # as numpy.load names them: "x.npy" is x, and wins over a member named "x"
                if n.endswith(".npy") or n not in members:
                    members[n.removesuffix(".npy")] = n
            keys = ("x_train", "y_train", "x_test", "y_test") if {"x_train", "x_test"} & set(members) else ("x", "y")
            missing = [k for k in keys if k not in members]
            if missing:
                has = ", ".join(sorted(members)) or "none"
                raise UserError(f"{path} lacks array(s) {', '.join(missing)} (has {has}); expected {EXPECTED}")
            return {k: _member(z, members[k], path, k) for k in keys}
    except UserError:
        raise
    except Exception as e:  # BadZipFile, a CRC error, an unsupported compression, a malformed header, ...
        why = (str(e).strip().splitlines() or [""])[0][:160]
        raise UserError(f"cannot read {path} as .npz ({type(e).__name__}: {why}); save it with numpy.savez: "
                        f"{EXPECTED}") from None


@DATASETS.register("npz")
def load_npz(root: str | None = None, arg: str | None = None) -> Dataset:
    if not arg:
        raise UserError("dataset 'npz' needs a path: use data=npz:/path/to/file.npz")
    path = resolve_arg_path(arg, root, "npz", is_dir=False, what=f"an .npz file with {EXPECTED}")
    a = _read(path)
    provenance: dict = {"files": {path.name: sha256_file(path)}}
    if "x" in a:
        x = _images(a["x"], path, "x")
        y = _labels(a["y"], x.shape[0], path, "y")
        _classes(path, y)
        y = y.astype(np.int64)
        tr, te, split = fixed_split(y, str(path))
        train = Split(x[tr].contiguous(), torch.from_numpy(y[tr]))
        test = Split(x[te].contiguous(), torch.from_numpy(y[te]))
        provenance.update(split)
    else:
        xs = {s: _images(a[f"x_{s}"], path, f"x_{s}") for s in ("train", "test")}
        ys = {s: _labels(a[f"y_{s}"], xs[s].shape[0], path, f"y_{s}") for s in ("train", "test")}
        _classes(path, ys["train"], ys["test"])
        train, test = (Split(xs[s], torch.from_numpy(ys[s].astype(np.int64))) for s in ("train", "test"))
        if train.x.shape[1:] != test.x.shape[1:]:
            raise UserError(f"{path}: x_train images are {tuple(train.x.shape[1:])} but x_test images are "
                            f"{tuple(test.x.shape[1:])} (C×H×W); both splits must have the same shape")
        provenance["split"] = "as given in the file (x_train/y_train, x_test/y_test)"
    test, order = mixed_test_order(test)  # only a test split grouped by class
    provenance.update(order)
    labels = torch.cat([train.y, test.y])
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    return Dataset(
        name=f"npz:{path.name}",  # the content hash, not the place, identifies it (see Dataset.location)
        train=train,
        test=test,
        n_classes=n_classes,
        class_names=tuple(str(i) for i in range(n_classes)),
        provenance=provenance,
        location={"file": str(path)},
    )

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

import zipfile
from pathlib import Path

import numpy as np
import torch

from bench.data.base import (
    Dataset,
    Split,
    data_roots,
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
    return y.astype(np.int64)


def _read(path: Path) -> dict[str, np.ndarray]:
    # np.load takes any non-zip, non-.npy file for a pickle; say what the file really is instead.
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not an .npz (zip) file; save it with numpy.savez: {EXPECTED}")
    try:
        with np.load(path, allow_pickle=False) as f:
            names = set(f.files)
            keys = ("x_train", "y_train", "x_test", "y_test") if {"x_train", "x_test"} & names else ("x", "y")
            missing = [k for k in keys if k not in names]
            if missing:
                has = ", ".join(sorted(names)) or "none"
                raise UserError(f"{path} lacks array(s) {', '.join(missing)} (has {has}); expected {EXPECTED}")
            return {k: f[k] for k in keys}
    except ValueError as e:
        if "pickle" in str(e):
            raise UserError(f"{path} holds object (pickled) arrays, which are not loaded; save plain numeric arrays: "
                            f"{EXPECTED}") from None
        raise UserError(f"cannot read {path} as .npz ({e}); save it with numpy.savez: {EXPECTED}") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"cannot read {path} as .npz ({type(e).__name__}: {e}); save it with numpy.savez: "
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
        tr, te, split = fixed_split(y, str(path))
        train = Split(x[tr].contiguous(), torch.from_numpy(y[tr]))
        test = Split(x[te].contiguous(), torch.from_numpy(y[te]))
        provenance.update(split)
    else:
        splits = []
        for s in ("train", "test"):
            x = _images(a[f"x_{s}"], path, f"x_{s}")
            splits.append(Split(x, torch.from_numpy(_labels(a[f"y_{s}"], x.shape[0], path, f"y_{s}"))))
        train, test = splits
        if train.x.shape[1:] != test.x.shape[1:]:
            raise UserError(f"{path}: x_train images are {tuple(train.x.shape[1:])} but x_test images are "
                            f"{tuple(test.x.shape[1:])} (C×H×W); both splits must have the same shape")
        provenance["split"] = "as given in the file (x_train/y_train, x_test/y_test)"
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

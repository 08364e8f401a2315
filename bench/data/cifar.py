"""`cifar10` and `cifar100`: the official "python version" archives, unpacked (torchvision's layout).

Files: ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}`` and
``cifar-100-python/{train, test, meta}``. Where, for each root of `data_roots` (``data.root=`` then
``$BENCH_DATA``): ``ROOT/cifar-10-batches-py``, ``ROOT/cifar10/cifar-10-batches-py``, ``ROOT/cifar10``
(likewise ``cifar-100-python`` / ``cifar100`` for CIFAR-100).

Each file is a Python 2 pickle of a dict: ``data`` (uint8 N×3072, rows channel-major R,G,B planes of 32×32),
``labels`` (CIFAR-10) or ``fine_labels``/``coarse_labels`` (CIFAR-100), ``filenames``, ``batch_label``.
Pickles can run code when loaded, so they are read with `SafeUnpickler`, which only lets through what a
numpy uint8 array needs; anything else is refused. CIFAR-100 uses the 100 fine labels.
"""

from __future__ import annotations

import codecs
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.data.base import Dataset, Split, data_roots, find_first, sha256_file, to_nchw_uint8
from bench.data.registry import DATASETS
from bench.errors import UserError

CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_FILES = (*CIFAR10_TRAIN, "test_batch", "batches.meta")
CIFAR100_DIR = "cifar-100-python"
CIFAR100_FILES = ("train", "test", "meta")


def _numpy_attr(name: str) -> Any:
    # numpy 2 moved numpy.core to numpy._core; pickles from either era name either module.
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return getattr(multiarray if name in ("_reconstruct", "scalar") else numeric, name)


class RefusedPickle(pickle.UnpicklingError):
    """The file asks for a global that a CIFAR data file never needs."""


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(str, "latin1"). Other codecs (zlib, base64,
    # rot13...) have no business in a data file, so only the one Python itself emits is allowed.
    if encoding not in ("latin1", "latin-1") or not isinstance(obj, str):
        raise RefusedPickle(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(obj, "latin1", errors)


_ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
    **{(m, n): (lambda n=n: _numpy_attr(n))
       for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")},
    # numpy's protocol-5 form of an array, in case a file was re-pickled with a newer Python.
    **{(m, "_frombuffer"): (lambda: _numpy_attr("_frombuffer")) for m in ("numpy.core.numeric", "numpy._core.numeric")},
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays; refuses every other global (functions, classes)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]()
        except KeyError:
            raise RefusedPickle(f"global {module}.{name} is not allowed") from None


def load_pickle(path: Path) -> dict:
    """Load one CIFAR pickle safely; keys are returned as str whether the file has bytes or str keys."""
    try:
        with open(path, "rb") as f:
            # latin1 is what numpy needs to rebuild arrays from Python 2 pickles (the official files).
            obj = SafeUnpickler(f, encoding="latin1").load()
    except RefusedPickle as e:
        raise UserError(f"refusing to unpickle {path}: {e}; it is not an official CIFAR file, replace it") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, AttributeError, OSError) as e:
        raise UserError(f"cannot read CIFAR file {path} ({type(e).__name__}: {e}); download it again") from None
    if not isinstance(obj, dict):
        raise UserError(f"CIFAR file {path} holds a {type(obj).__name__}, not a dict; download it again")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _batch(path: Path, label_key: str, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = load_pickle(path)
    if "data" not in d or label_key not in d:
        raise UserError(f"CIFAR file {path} lacks 'data' or '{label_key}' (has {sorted(map(str, d))}); "
                        f"is it the right file?")
    x, y = d["data"], np.asarray(d[label_key])
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise UserError(f"CIFAR file {path}: 'data' must be uint8 N×3072, got {got}; download it again")
    ok = y.shape == (x.shape[0],) and np.issubdtype(y.dtype, np.integer)
    if not ok or (y.size and not 0 <= y.min() <= y.max() < n_classes):
        raise UserError(f"CIFAR file {path}: '{label_key}' must be {x.shape[0]} integers in 0..{n_classes - 1}; "
                        f"download it again")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _split(paths: Sequence[Path], label_key: str, n_classes: int) -> Split:
    parts = [_batch(p, label_key, n_classes) for p in paths]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    return Split(to_nchw_uint8(x, "NCHW"), torch.from_numpy(y))


def _class_names(path: Path, key: str, n: int) -> tuple[str, ...]:
    names = load_pickle(path).get(key)
    if not isinstance(names, list) or len(names) != n:
        raise UserError(f"CIFAR meta file {path}: '{key}' must list {n} class names; download it again")
    return tuple(_text(s) for s in names)


def _candidates(root: str | None, dirname: str, short: str) -> list[Path]:
    return [p for r in data_roots(root) for p in (r / dirname, r / short / dirname, r / short)]


def _provenance(source: str, d: Path, files: Sequence[str]) -> dict:
    return {
        "source": source,
        "files": {f: sha256_file(d / f) for f in files},
        "split": "official train/test",
    }


@DATASETS.register("cifar10")
def load_cifar10(root: str | None = None, arg: str | None = None) -> Dataset:
    d = find_first(_candidates(root, CIFAR10_DIR, "cifar10"), CIFAR10_FILES, "cifar10",
                   "the unpacked CIFAR-10 python version (cifar-10-python.tar.gz)")
    return Dataset(
        name="cifar10",
        train=_split([d / f for f in CIFAR10_TRAIN], "labels", 10),
        test=_split([d / "test_batch"], "labels", 10),
        n_classes=10,
        class_names=_class_names(d / "batches.meta", "label_names", 10),
        provenance=_provenance("CIFAR-10 python version (Krizhevsky, 2009)", d, CIFAR10_FILES),
        hflip=True,
        location={"dir": str(d.resolve())},
    )


@DATASETS.register("cifar100")
def load_cifar100(root: str | None = None, arg: str | None = None) -> Dataset:
    d = find_first(_candidates(root, CIFAR100_DIR, "cifar100"), CIFAR100_FILES, "cifar100",
                   "the unpacked CIFAR-100 python version (cifar-100-python.tar.gz)")
    return Dataset(
        name="cifar100",
        train=_split([d / "train"], "fine_labels", 100),
        test=_split([d / "test"], "fine_labels", 100),
        n_classes=100,
        class_names=_class_names(d / "meta", "fine_label_names", 100),
        provenance={**_provenance("CIFAR-100 python version (Krizhevsky, 2009)", d, CIFAR100_FILES),
                    "labels": "fine (100 classes)"},
        hflip=True,
        location={"dir": str(d.resolve())},
    )

"""Writers of small datasets in the exact official file formats, for the loader tests.

Each writer takes a directory and a numpy Generator, writes the files the way the dataset's publishers did,
and returns the arrays it wrote in the loaders' form (uint8 N×C×H×W images, int64 labels) so that tests
can compare pixel for pixel.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

IDX_NAMES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def idx_bytes(a: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic 00 00 08 NDIM, big-endian uint32 sizes, row-major data."""
    assert a.dtype == np.uint8
    return bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()


def write_idx_dataset(d: Path, rng: np.random.Generator, n_train: int = 12, n_test: int = 5,
                      gz: bool = True) -> dict[str, np.ndarray]:
    """The four MNIST-style IDX files (gzip-compressed like the official ones unless ``gz=False``)."""
    d.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for key, name in IDX_NAMES.items():
        data = idx_bytes(arrays[key])
        if gz:
            (d / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (d / name).write_bytes(data)
    return arrays


def py2_pickle(obj: object) -> bytes:
    """Pickle ``obj`` as Python 2's cPickle (protocol 2) with numpy 1.x did for the official CIFAR files.

    Python 3 cannot produce these streams itself: its ``str`` is unicode, while the originals store keys and
    array bytes as Python 2 byte strings (SHORT_BINSTRING/BINSTRING) and name ``numpy.core.multiarray``.
    Handles None, bool, int, str, bytes, tuple, list, dict and uint8 numpy arrays.
    """
    out = bytearray(b"\x80\x02")

    def put(o: object) -> None:
        if o is None:
            out.extend(b"N")
        elif o is True or o is False:
            out.extend(b"\x88" if o else b"\x89")
        elif isinstance(o, int):
            if 0 <= o < 256:
                out.extend(b"K" + bytes([o]))
            elif 0 <= o < 65536:
                out.extend(b"M" + struct.pack("<H", o))
            else:
                out.extend(b"J" + struct.pack("<i", o))
        elif isinstance(o, (str, bytes)):
            b = o.encode("latin1") if isinstance(o, str) else o
            out.extend((b"U" + bytes([len(b)])) if len(b) < 256 else (b"T" + struct.pack("<i", len(b))))
            out.extend(b)
        elif isinstance(o, tuple):
            if 1 <= len(o) <= 3:
                for e in o:
                    put(e)
                out.extend((b"\x85", b"\x86", b"\x87")[len(o) - 1])
            else:
                out.extend(b"(")
                for e in o:
                    put(e)
                out.extend(b"t")
        elif isinstance(o, list):
            out.extend(b"](")
            for e in o:
                put(e)
            out.extend(b"e")
        elif isinstance(o, dict):
            out.extend(b"}(")
            for k, v in o.items():
                put(k)
                put(v)
            out.extend(b"u")
        elif isinstance(o, np.dtype):
            assert o == np.uint8
            out.extend(b"cnumpy\ndtype\n")
            put(("u1", 0, 1))
            out.extend(b"R")
            put((3, "|", None, None, None, -1, -1, 0))
            out.extend(b"b")
        elif isinstance(o, np.ndarray):
            out.extend(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            put((0,))
            put(b"b")
            out.extend(b"\x87R")
            put((1, o.shape, o.dtype, False, np.ascontiguousarray(o).tobytes()))
            out.extend(b"b")
        else:
            raise TypeError(type(o))

    put(obj)
    out.extend(b".")
    return bytes(out)


def _dump(path: Path, obj: dict, py2: bool) -> None:
    if py2:
        path.write_bytes(py2_pickle(obj))
    else:  # what Python 3 writes for the same structure: bytes keys, protocol 2
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)


def _key(k: str, py2: bool) -> str | bytes:
    return k if py2 else k.encode()


def _cifar_batch(x: np.ndarray, labels: dict[str, np.ndarray], label: str, py2: bool) -> dict:
    n = len(x)
    d: dict = {
        _key("batch_label", py2): _key(label, py2),
        **{_key(k, py2): [int(v) for v in y] for k, y in labels.items()},
        _key("data", py2): x.reshape(n, 3 * 32 * 32),  # channel-major rows: R plane, G plane, B plane
        _key("filenames", py2): [_key(f"img_{i:05d}.png", py2) for i in range(n)],
    }
    return d


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(d: Path, rng: np.random.Generator, per_batch: int = 4, n_test: int = 6,
                  py2: bool = False) -> dict[str, np.ndarray]:
    """``cifar-10-batches-py``: data_batch_1..5, test_batch, batches.meta."""
    d.mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = rng.integers(0, 256, (per_batch, 3, 32, 32), dtype=np.uint8)
        y = rng.integers(0, 10, per_batch)
        _dump(d / f"data_batch_{i}", _cifar_batch(x, {"labels": y}, f"training batch {i} of 5", py2), py2)
        xs.append(x)
        ys.append(y)
    tx = rng.integers(0, 256, (n_test, 3, 32, 32), dtype=np.uint8)
    ty = rng.integers(0, 10, n_test)
    _dump(d / "test_batch", _cifar_batch(tx, {"labels": ty}, "testing batch 1 of 1", py2), py2)
    meta = {_key("num_cases_per_batch", py2): 10000, _key("label_names", py2): [_key(s, py2) for s in CIFAR10_NAMES],
            _key("num_vis", py2): 3072}
    _dump(d / "batches.meta", meta, py2)
    return {"train_x": np.concatenate(xs), "train_y": np.concatenate(ys).astype(np.int64),
            "test_x": tx, "test_y": ty.astype(np.int64)}


def write_cifar100(d: Path, rng: np.random.Generator, n_train: int = 20, n_test: int = 7,
                   py2: bool = False) -> dict[str, np.ndarray]:
    """``cifar-100-python``: train, test, meta; fine labels 0..99, coarse labels 0..19."""
    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, np.ndarray] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        fine = rng.integers(0, 100, n)
        coarse = fine // 5  # any 0..19 will do; the loader must not use them
        _dump(d / split, _cifar_batch(x, {"fine_labels": fine, "coarse_labels": coarse}, split, py2), py2)
        out[f"{split}_x"], out[f"{split}_y"] = x, fine.astype(np.int64)
    meta = {_key("fine_label_names", py2): [_key(f"fine_{i:02d}", py2) for i in range(100)],
            _key("coarse_label_names", py2): [_key(f"coarse_{i:02d}", py2) for i in range(20)]}
    _dump(d / "meta", meta, py2)
    return out


def write_svhn(d: Path, rng: np.random.Generator, n_train: int = 9, n_test: int = 4) -> dict[str, np.ndarray]:
    """``train_32x32.mat`` / ``test_32x32.mat``: X uint8 32×32×3×N, y uint8 N×1 in 1..10 (10 = digit 0)."""
    from scipy.io import savemat

    d.mkdir(parents=True, exist_ok=True)
    out: dict[str, np.ndarray] = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        digits = np.arange(n) % 10  # every digit, 0 included, when n >= 10
        y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(n, 1)
        savemat(d / f"{split}_32x32.mat", {"X": x, "y": y})
        out[f"{split}_X"], out[f"{split}_y"] = x, y
        out[f"{split}_x"], out[f"{split}_digits"] = x.transpose(3, 2, 0, 1), digits.astype(np.int64)
    return out


def write_png(path: Path, pixels: np.ndarray) -> None:
    """A PNG of ``pixels``: H×W (mode L) or H×W×3 (RGB)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)

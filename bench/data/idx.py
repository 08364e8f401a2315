"""`mnist` and `fashion_mnist`: the four official IDX files, as LeCun's and Zalando's sites distribute them.

Files: ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``,
``t10k-labels-idx1-ubyte.gz`` (the same names without ``.gz``, as torchvision leaves them in ``MNIST/raw``,
are read too). Where, for each root of `data_roots` (``data.root=`` then ``$BENCH_DATA``):

- mnist: ``ROOT/mnist``, ``ROOT/MNIST/raw``, ``ROOT``
- fashion_mnist: ``ROOT/fashion-mnist``, ``ROOT/fashion_mnist``, ``ROOT/FashionMNIST/raw``, ``ROOT``, and last
  ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package, official .gz files).

The IDX header is parsed here (no torchvision): magic ``00 00 08 NDIM`` (unsigned bytes), then NDIM big-endian
uint32 sizes, then the data; a bad magic number or a size that disagrees with the file's length is reported
as a corrupt file. Images are 1×28×28 uint8, labels 0..9; the official train/test split is used as is.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from bench.data.base import Dataset, Split, data_roots, find_first, sha256_file, to_nchw_uint8
from bench.data.registry import DATASETS
from bench.errors import UserError

GZ_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
RAW_FILES = tuple(f.removesuffix(".gz") for f in GZ_FILES)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read one IDX file of unsigned bytes with ``ndim`` dimensions, gzip-compressed or not."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        # Decide by content, not by name: some mirrors serve decompressed files under the .gz names.
        if raw[:2] == _GZIP_MAGIC:
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"corrupt IDX file {path}: cannot decompress ({e}); download it again") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"corrupt IDX file {path}: only {len(raw)} bytes, shorter than its header; download it again")
    magic = raw[:4]
    if magic[0] != 0 or magic[1] != 0 or magic[2] != _UBYTE or magic[3] != ndim:
        raise UserError(
            f"corrupt IDX file {path}: magic number {magic.hex()} is not {_UBYTE << 8 | ndim:08x} "
            f"(unsigned bytes, {ndim} dims); is it the right file? download it again"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise UserError(
            f"corrupt IDX file {path}: header says {'×'.join(map(str, dims))} ({expected} bytes) but the file has "
            f"{len(raw)} bytes (truncated?); download it again"
        )
    # A copy, because arrays over the immutable bytes are read-only and torch warns about those.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _locate(candidates: Sequence[Path], dataset: str, what: str) -> tuple[Path, tuple[str, ...]]:
    for d in candidates:
        for names in (GZ_FILES, RAW_FILES):
            if all((d / f).is_file() for f in names):
                return d, names
    return find_first(candidates, GZ_FILES, dataset, what), GZ_FILES  # raises, naming the official .gz files


def _split(d: Path, images: str, labels: str) -> Split:
    x = read_idx(d / images, 3)
    y = read_idx(d / labels, 1)
    if x.shape[0] != y.shape[0]:
        raise UserError(f"{d / images} has {x.shape[0]} images but {d / labels} has {y.shape[0]} labels; "
                        f"the files do not belong together, download them again")
    if x.shape[1:] != (28, 28):
        raise UserError(f"{d / images} holds {x.shape[1]}×{x.shape[2]} images, not 28×28; is it the right file?")
    if y.size and int(y.max()) > 9:
        raise UserError(f"{d / labels} has label {int(y.max())} outside 0..9; is it the right file?")
    return Split(to_nchw_uint8(x, "NHW"), torch.from_numpy(y.astype(np.int64)))


def _load(name: str, d: Path, files: tuple[str, ...], class_names: Sequence[str], source: str) -> Dataset:
    tr_x, tr_y, te_x, te_y = files
    return Dataset(
        name=name,
        train=_split(d, tr_x, tr_y),
        test=_split(d, te_x, te_y),
        n_classes=10,
        class_names=tuple(class_names),
        provenance={
            "source": source,
            "files": {f: sha256_file(d / f) for f in files},
            "split": "official train/test",
        },
        location={"dir": str(d.resolve())},
    )


@DATASETS.register("mnist")
def load_mnist(root: str | None = None, arg: str | None = None) -> Dataset:
    candidates = [p for r in data_roots(root) for p in (r / "mnist", r / "MNIST" / "raw", r)]
    d, files = _locate(candidates, "mnist", "the four official MNIST IDX files")
    return _load("mnist", d, files, [str(i) for i in range(10)], "MNIST IDX files (LeCun, Cortes, Burges)")


@DATASETS.register("fashion_mnist")
def load_fashion_mnist(root: str | None = None, arg: str | None = None) -> Dataset:
    candidates = [
        p
        for r in data_roots(root)
        for p in (r / "fashion-mnist", r / "fashion_mnist", r / "FashionMNIST" / "raw", r)
    ]
    candidates.append(DEBIAN_FASHION_MNIST)
    d, files = _locate(
        candidates,
        "fashion_mnist",
        "the four official Fashion-MNIST IDX files (on Debian/Ubuntu: apt-get install dataset-fashion-mnist)",
    )
    return _load("fashion_mnist", d, files, FASHION_CLASSES, "Fashion-MNIST IDX files (Zalando Research)")

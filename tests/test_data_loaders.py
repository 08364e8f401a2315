"""The local file loaders (idx, cifar, svhn, npz, imagefolder) on fixtures written in the official formats,
and on the real datasets where this machine has them (skipped otherwise)."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.data import idx, load_dataset
from bench.data.base import sha256_file
from bench.data.cifar import load_cifar10, load_cifar100
from bench.data.idx import load_fashion_mnist, load_mnist, read_idx
from bench.data.imagefolder import load_imagefolder
from bench.data.npz import load_npz
from bench.data.svhn import load_svhn
from bench.errors import DataNotFoundError, UserError

try:
    from data_fixtures import (
        CIFAR10_NAMES,
        IDX_NAMES,
        idx_bytes,
        write_cifar10,
        write_cifar100,
        write_idx_dataset,
        write_png,
        write_svhn,
    )
except ImportError:  # tests/ is a package in some runners' layouts
    from tests.data_fixtures import (
        CIFAR10_NAMES,
        IDX_NAMES,
        idx_bytes,
        write_cifar10,
        write_cifar100,
        write_idx_dataset,
        write_png,
        write_svhn,
    )


# CI points $BENCH_DATA at its copy of shared/datasets; read it before the fixture below hides it from loaders.
_BENCH_DATA_AT_IMPORT = os.environ.get("BENCH_DATA")


@pytest.fixture(autouse=True)
def _no_bench_data(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's $BENCH_DATA would add search roots and change what "not found" means.
    monkeypatch.delenv("BENCH_DATA", raising=False)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def assert_split(split, x: np.ndarray, y: np.ndarray) -> None:
    assert split.x.dtype == torch.uint8 and split.y.dtype == torch.int64
    assert split.x.shape == x.shape
    np.testing.assert_array_equal(split.x.numpy(), x)
    np.testing.assert_array_equal(split.y.numpy(), y)


# --- IDX: mnist, fashion_mnist ---------------------------------------------------------------------------


def test_mnist_gz_round_trip(tmp_path: Path, rng: np.random.Generator) -> None:
    a = write_idx_dataset(tmp_path / "mnist", rng)
    ds = load_mnist(str(tmp_path))
    assert ds.name == "mnist" and ds.shape == (1, 28, 28) and ds.n_classes == 10
    assert ds.class_names == tuple("0123456789")
    assert_split(ds.train, a["train_x"][:, None], a["train_y"].astype(np.int64))
    assert_split(ds.test, a["test_x"][:, None], a["test_y"].astype(np.int64))
    # the IDX pixel order is row-major: byte 16 + i*784 + h*28 + w is image i at row h, column w
    raw = gzip.decompress((tmp_path / "mnist" / "train-images-idx3-ubyte.gz").read_bytes())
    assert ds.train.x[3, 0, 5, 17] == raw[16 + 3 * 784 + 5 * 28 + 17]
    files = ds.provenance["files"]
    assert set(files) == {f"{n}.gz" for n in IDX_NAMES.values()}
    assert files["t10k-images-idx3-ubyte.gz"] == sha256_file(tmp_path / "mnist" / "t10k-images-idx3-ubyte.gz")
    assert "dir" not in ds.provenance and ds.location["dir"] == str((tmp_path / "mnist").resolve())


def test_mnist_uncompressed_torchvision_layout(tmp_path: Path, rng: np.random.Generator) -> None:
    a = write_idx_dataset(tmp_path / "MNIST" / "raw", rng, gz=False)
    ds = load_mnist(str(tmp_path))
    assert_split(ds.test, a["test_x"][:, None], a["test_y"].astype(np.int64))
    assert set(ds.provenance["files"]) == set(IDX_NAMES.values())


def test_fashion_mnist_round_trip_via_bench_data(tmp_path: Path, rng: np.random.Generator,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    a = write_idx_dataset(tmp_path / "fashion-mnist", rng)
    monkeypatch.setenv("BENCH_DATA", str(tmp_path))
    ds = load_dataset("fashion_mnist")
    assert ds.name == "fashion_mnist"
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    assert_split(ds.train, a["train_x"][:, None], a["train_y"].astype(np.int64))


def test_mnist_missing_names_every_path(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as e:
        load_mnist(str(tmp_path))
    msg = one_line(e)
    for p in (tmp_path / "mnist", tmp_path / "MNIST" / "raw", tmp_path):
        assert f"{p}," in msg or f"{p};" in msg
    assert "train-images-idx3-ubyte.gz" in msg


def test_mnist_without_any_root_says_how_to_point_at_data() -> None:
    with pytest.raises(DataNotFoundError, match=r"data\.root=DIR or BENCH_DATA"):
        load_mnist(None)


def test_fashion_mnist_missing_mentions_debian_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idx, "DEBIAN_FASHION_MNIST", tmp_path / "usr-share-datasets-fashion-mnist")
    with pytest.raises(DataNotFoundError) as e:
        load_fashion_mnist(str(tmp_path / "data"))
    msg = one_line(e)
    assert "apt-get install dataset-fashion-mnist" in msg
    for p in ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"):
        assert str(tmp_path / "data" / p) in msg
    assert str(tmp_path / "usr-share-datasets-fashion-mnist") in msg
    assert msg.index(str(tmp_path / "data" / "fashion-mnist")) < msg.index("usr-share-datasets-fashion-mnist")


@pytest.mark.parametrize("damage", ["truncated gzip", "truncated data", "bad magic", "wrong dims"])
def test_corrupt_idx_is_a_user_error_naming_the_file(tmp_path: Path, rng: np.random.Generator, damage: str) -> None:
    d = tmp_path / "mnist"
    write_idx_dataset(d, rng)
    f = d / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(f.read_bytes())
    if damage == "truncated gzip":
        f.write_bytes(f.read_bytes()[:-100])
    elif damage == "truncated data":
        f.write_bytes(gzip.compress(data[:-1]))
    elif damage == "bad magic":  # a labels file (idx1) where images belong
        f.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + data[4:]))
    else:
        f.write_bytes(gzip.compress(idx_bytes(rng.integers(0, 256, (12, 28, 27), dtype=np.uint8))))
    with pytest.raises(UserError) as e:
        load_mnist(str(tmp_path))
    assert str(f) in one_line(e)


def test_read_idx_accepts_plain_bytes_under_gz_name(tmp_path: Path) -> None:
    a = np.arange(2 * 28 * 28, dtype=np.int64).astype(np.uint8).reshape(2, 28, 28)
    (tmp_path / "x.gz").write_bytes(idx_bytes(a))  # some mirrors serve decompressed files under .gz names
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz", 3), a)


# --- CIFAR -----------------------------------------------------------------------------------------------


def test_cifar10_through_load_dataset(tmp_path: Path, rng: np.random.Generator) -> None:
    a = write_cifar10(tmp_path / "cifar-10-batches-py", rng)
    ds = load_dataset("cifar10", root=str(tmp_path))
    assert ds.name == "cifar10" and ds.shape == (3, 32, 32) and ds.n_classes == 10
    assert ds.class_names == tuple(CIFAR10_NAMES)
    assert_split(ds.train, a["train_x"], a["train_y"])
    assert_split(ds.test, a["test_x"], a["test_y"])
    assert set(ds.provenance["files"]) == {*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"}


def test_cifar10_rows_are_channel_major(tmp_path: Path) -> None:
    d = tmp_path / "cifar10"
    write_cifar10(d, np.random.default_rng(1))
    with open(d / "test_batch", "rb") as f:
        batch = pickle.load(f)
    row = np.zeros(3072, dtype=np.uint8)
    row[1 * 1024 + 2 * 32 + 5] = 200  # green plane, row 2, column 5
    batch[b"data"][0] = row
    with open(d / "test_batch", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    x = load_cifar10(str(tmp_path)).test.x[0]
    assert x[1, 2, 5] == 200 and int(x.sum()) == 200


def test_cifar10_python2_pickles(tmp_path: Path, rng: np.random.Generator) -> None:
    # byte strings and numpy.core names, as in the files from the CIFAR site
    a = write_cifar10(tmp_path / "cifar10" / "cifar-10-batches-py", rng, py2=True)
    ds = load_cifar10(str(tmp_path))
    assert ds.class_names == tuple(CIFAR10_NAMES)
    assert_split(ds.train, a["train_x"], a["train_y"])
    assert_split(ds.test, a["test_x"], a["test_y"])


@pytest.mark.parametrize("py2", [False, True])
def test_cifar100_fine_labels(tmp_path: Path, rng: np.random.Generator, py2: bool) -> None:
    a = write_cifar100(tmp_path / "cifar100", rng, py2=py2)
    ds = load_cifar100(str(tmp_path))
    assert ds.name == "cifar100" and ds.n_classes == 100 and ds.shape == (3, 32, 32)
    assert len(ds.class_names) == 100 and ds.class_names[7] == "fine_07"
    assert_split(ds.train, a["train_x"], a["train_y"])
    assert_split(ds.test, a["test_x"], a["test_y"])


class _RunsCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evals:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


class _ZlibCodec:
    def __reduce__(self):
        import codecs

        return (codecs.encode, (b"x", "zlib_codec"))


@pytest.mark.parametrize("payload", ["os.system", "eval", "codecs"])
def test_malicious_cifar_pickle_is_refused_and_not_run(tmp_path: Path, rng: np.random.Generator,
                                                       payload: str) -> None:
    d = tmp_path / "cifar-10-batches-py"
    write_cifar10(d, rng)
    marker = tmp_path / "pwned"
    evil = {"os.system": _RunsCommand(marker), "eval": _Evals(marker), "codecs": _ZlibCodec()}[payload]
    with open(d / "data_batch_1", "wb") as f:
        pickle.dump({b"data": evil, b"labels": [0]}, f, protocol=2)
    with pytest.raises(UserError) as e:
        load_cifar10(str(tmp_path))
    msg = one_line(e)
    assert msg.startswith("refusing to unpickle") and str(d / "data_batch_1") in msg
    assert not marker.exists()


def test_truncated_cifar_pickle_is_a_read_error_not_a_refusal(tmp_path: Path, rng: np.random.Generator) -> None:
    d = tmp_path / "cifar-10-batches-py"
    write_cifar10(d, rng)
    (d / "test_batch").write_bytes((d / "test_batch").read_bytes()[:1000])
    with pytest.raises(UserError) as e:
        load_cifar10(str(tmp_path))
    msg = one_line(e)
    assert msg.startswith("cannot read CIFAR file") and str(d / "test_batch") in msg


def test_cifar_missing_names_every_path(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("cifar100", root=str(tmp_path / "nowhere"))
    msg = one_line(e)
    r = tmp_path / "nowhere"
    for p in (r / "cifar-100-python", r / "cifar100" / "cifar-100-python", r / "cifar100"):
        assert str(p) in msg
    assert "meta" in msg


# --- SVHN ------------------------------------------------------------------------------------------------


def test_svhn_round_trip_and_label_ten_is_zero(tmp_path: Path, rng: np.random.Generator) -> None:
    a = write_svhn(tmp_path / "svhn", rng, n_train=12)
    ds = load_svhn(str(tmp_path))
    assert ds.name == "svhn" and ds.shape == (3, 32, 32) and ds.n_classes == 10
    assert_split(ds.train, a["train_x"], a["train_digits"])
    assert_split(ds.test, a["test_x"], a["test_digits"])
    # X is H×W×C×N: X[h, w, c, n] is image n, channel c, row h, column w
    assert ds.train.x[4, 2, 3, 7] == a["train_X"][3, 7, 2, 4]
    assert (a["train_y"][ds.train.y.numpy() == 0] == 10).all() and (ds.train.y == 0).any()
    assert ds.train.y.max() <= 9


def test_svhn_missing(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as e:
        load_svhn(str(tmp_path))
    msg = one_line(e)
    assert str(tmp_path / "svhn") in msg and "train_32x32.mat" in msg


# --- npz -------------------------------------------------------------------------------------------------


def test_npz_with_splits_grayscale_and_int32_labels(tmp_path: Path, rng: np.random.Generator) -> None:
    xtr = rng.integers(0, 256, (10, 6, 5), dtype=np.uint8)
    xte = rng.integers(0, 256, (4, 6, 5), dtype=np.uint8)
    ytr = np.array([0, 1, 2, 3, 0, 1, 2, 3, 0, 1], dtype=np.int32)
    yte = np.array([3, 0, 1, 2], dtype=np.uint8)  # a class only in the test split is refused (issue 14)
    np.savez(tmp_path / "d.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    ds = load_npz(None, str(tmp_path / "d.npz"))
    assert ds.name == "npz:d.npz" and ds.location["file"] == str((tmp_path / "d.npz").resolve())
    assert ds.shape == (1, 6, 5) and ds.n_classes == 4
    assert_split(ds.train, xtr[:, None], ytr.astype(np.int64))
    assert_split(ds.test, xte[:, None], yte.astype(np.int64))
    assert "split" in ds.provenance and ds.provenance["files"]["d.npz"] == sha256_file(tmp_path / "d.npz")


def test_npz_x_y_gets_a_recorded_stratified_split(tmp_path: Path, rng: np.random.Generator) -> None:
    x = rng.integers(0, 256, (50, 4, 4, 3), dtype=np.uint8)
    y = np.repeat(np.arange(5), 10).astype(np.int16)
    np.savez_compressed(tmp_path / "xy.npz", x=x, y=y)
    ds = load_dataset(f"npz:{tmp_path / 'xy.npz'}")
    assert ds.shape == (3, 4, 4) and ds.n_classes == 5 and (len(ds.train), len(ds.test)) == (40, 10)
    assert ds.test.y.bincount().tolist() == [2] * 5  # stratified
    split = ds.provenance["split"]
    assert split["test_size"] == 0.2 and split["random_state"] == 0 and len(split["test_indices_sha256"]) == 64
    # the two splits are exactly the examples of the file, each once
    both = torch.cat([ds.train.x, ds.test.x]).numpy().transpose(0, 2, 3, 1)
    assert sorted(map(bytes, both.reshape(50, -1))) == sorted(map(bytes, x.reshape(50, -1)))
    test_x = ds.test.x.numpy().transpose(0, 2, 3, 1)
    idx = np.array([int(np.flatnonzero((x == im).all(axis=(1, 2, 3)))[0]) for im in test_x])
    np.testing.assert_array_equal(ds.test.y.numpy(), y[idx])
    assert split["test_indices_sha256"] == hashlib.sha256(np.sort(idx).astype(np.int64).tobytes()).hexdigest()
    again = load_npz(None, str(tmp_path / "xy.npz"))
    assert torch.equal(again.test.x, ds.test.x)


def test_npz_relative_path_under_root(tmp_path: Path, rng: np.random.Generator) -> None:
    np.savez(tmp_path / "r.npz", x=rng.integers(0, 256, (10, 2, 2), dtype=np.uint8), y=np.arange(10) % 2)
    ds = load_npz(str(tmp_path), "r.npz")
    assert ds.name == "npz:r.npz" and ds.location["file"] == str((tmp_path / "r.npz").resolve())


def test_npz_object_array_is_refused(tmp_path: Path) -> None:
    x = np.empty(3, dtype=object)
    x[:] = [np.zeros((2, 2), np.uint8)] * 3
    np.savez(tmp_path / "o.npz", x=x, y=np.arange(3))
    with pytest.raises(UserError) as e:
        load_npz(None, str(tmp_path / "o.npz"))
    msg = one_line(e)
    assert "x_train" in msg and "y (integer labels)" in msg


def test_npz_missing_array(tmp_path: Path) -> None:
    np.savez(tmp_path / "m.npz", x=np.zeros((4, 2, 2), np.uint8))
    with pytest.raises(UserError) as e:
        load_npz(None, str(tmp_path / "m.npz"))
    assert "lacks array(s) y" in one_line(e)


def test_npz_bad_dtype_and_missing_file(tmp_path: Path) -> None:
    np.savez(tmp_path / "f.npz", x=np.zeros((4, 2, 2), np.float32), y=np.arange(4))
    with pytest.raises(UserError, match="uint8"):
        load_npz(None, str(tmp_path / "f.npz"))
    with pytest.raises(DataNotFoundError) as e:
        load_npz(None, str(tmp_path / "absent.npz"))
    assert str(tmp_path / "absent.npz") in one_line(e)


# --- imagefolder -----------------------------------------------------------------------------------------


def test_imagefolder_train_test_rgb(tmp_path: Path, rng: np.random.Generator) -> None:
    pix = {}
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("zebra", "ant", "moth"):  # sorted by name: ant=0, moth=1, zebra=2
            for i in range(n):
                pix[split, cls, i] = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
                write_png(tmp_path / split / cls / f"{i:03d}.png", pix[split, cls, i])
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    ds = load_imagefolder(None, str(tmp_path))
    assert ds.name == f"imagefolder:{tmp_path.resolve().name}" and ds.location["dir"] == str(tmp_path.resolve())
    assert ds.class_names == ("ant", "moth", "zebra") and ds.n_classes == 3 and ds.shape == (3, 5, 7)
    for split, n in (("train", 3), ("test", 2)):
        want_x = np.stack([pix[split, c, i].transpose(2, 0, 1) for c in ds.class_names for i in range(n)])
        want_y = np.repeat(np.arange(3), n)
        if split == "test":  # read class by class, so put in a fixed mixed order (first n images: every class)
            perm = np.random.default_rng(0).permutation(len(want_y))
            want_x, want_y = want_x[perm], want_y[perm]
        assert_split(getattr(ds, split), want_x, want_y)
    p = ds.provenance
    assert p["n_files"] == 15 and p["lossy"] is False and p["formats"] == ["PNG"] and "split" not in p
    assert len(p["files_sha256"]) == 64 and "permutation" in p["test_order"]["rule"]


def test_a_class_grouped_test_split_gets_a_fixed_mixed_order_any_other_keeps_its_own() -> None:
    from bench.data.base import Split, mixed_test_order

    x = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1)
    grouped = Split(x, torch.arange(4).repeat_interleave(10))
    mixed, order = mixed_test_order(grouped)
    assert "test_order" in order and not torch.equal(mixed.y, grouped.y)
    assert torch.equal(mixed.y, grouped.y[mixed.x.flatten().long()])  # images keep their labels
    assert sorted(mixed.x.flatten().tolist()) == list(range(40))  # each image once
    assert len(set(mixed.y[:8].tolist())) == 4  # the first few hold every class
    again, _ = mixed_test_order(grouped)
    assert torch.equal(again.x, mixed.x)  # a fixed order, not a random one
    for y in (torch.tensor([1, 0] * 20), torch.zeros(40, dtype=torch.long)):  # already mixed; a single class
        kept, none = mixed_test_order(Split(x, y))
        assert kept.x is x and none == {}
    digits = load_dataset("digits")
    assert mixed_test_order(digits.test)[1] == {}  # digits (like MNIST and CIFAR) keeps its own order


def test_imagefolder_flat_grayscale_split(tmp_path: Path, rng: np.random.Generator) -> None:
    for cls in ("a", "b"):
        for i in range(10):
            write_png(tmp_path / "flat" / cls / f"{i}.png", rng.integers(0, 256, (4, 4), dtype=np.uint8))
    ds = load_dataset(f"imagefolder:{tmp_path / 'flat'}")
    assert ds.shape == (1, 4, 4) and (len(ds.train), len(ds.test)) == (16, 4)
    assert ds.test.y.bincount().tolist() == [2, 2]
    assert ds.provenance["split"]["test_size"] == 0.2


def test_imagefolder_test_only_mixed_modes_become_rgb(tmp_path: Path, rng: np.random.Generator) -> None:
    gray = rng.integers(0, 256, (3, 3), dtype=np.uint8)
    for cls in ("c0", "c1"):
        for i in range(5):
            write_png(tmp_path / "test" / cls / f"{i}.png", rng.integers(0, 256, (3, 3, 3), dtype=np.uint8))
    write_png(tmp_path / "test" / "c0" / "9_gray.png", gray)
    ds = load_imagefolder(None, str(tmp_path))
    assert ds.shape == (3, 3, 3) and len(ds.train) + len(ds.test) == 11
    assert "test/<class> only" in ds.provenance["layout"]
    all_x = torch.cat([ds.train.x, ds.test.x])
    assert any(torch.equal(im, torch.from_numpy(np.stack([gray] * 3))) for im in all_x)


def test_imagefolder_jpeg_is_marked_lossy(tmp_path: Path, rng: np.random.Generator) -> None:
    from PIL import Image

    for cls in ("x", "y"):
        for i in range(5):
            (tmp_path / cls).mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.JPG")
    ds = load_imagefolder(None, str(tmp_path))
    assert ds.provenance["lossy"] is True and ds.provenance["formats"] == ["JPEG"]


def test_imagefolder_sizes_must_agree(tmp_path: Path, rng: np.random.Generator) -> None:
    for i in range(3):
        write_png(tmp_path / "a" / f"{i}.png", rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        write_png(tmp_path / "b" / f"{i}.png", rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    write_png(tmp_path / "b" / "odd.png", rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    with pytest.raises(UserError) as e:
        load_imagefolder(None, str(tmp_path))
    msg = one_line(e)
    assert str(tmp_path / "b" / "odd.png") in msg and "resize" in msg


def test_imagefolder_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as e:
        load_imagefolder(None, str(tmp_path / "absent"))
    assert str(tmp_path / "absent") in one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="no class directories"):
        load_imagefolder(None, str(tmp_path / "empty"))


# --- real data, where present ----------------------------------------------------------------------------


def shared_dataset(sub: str) -> Path:
    """``<sub>`` under $BENCH_DATA or the ``shared/datasets`` folder beside the checkout; skip if absent."""
    roots = [Path(_BENCH_DATA_AT_IMPORT)] if _BENCH_DATA_AT_IMPORT else []
    roots.append(Path(__file__).resolve().parents[2] / "shared" / "datasets")
    for r in roots:
        if (r / sub).is_dir():
            return r / sub
    pytest.skip(f"real dataset {sub}/ not on this machine (looked in {', '.join(map(str, roots))})")


def test_real_mnist() -> None:
    d = shared_dataset("mnist")
    ds = load_dataset("mnist", root=str(d))
    assert (len(ds.train), len(ds.test)) == (60000, 10000) and ds.shape == (1, 28, 28)
    assert ds.train.y.bincount().tolist()[:2] == [5923, 6742]


def test_real_fashion_mnist_from_debian_package() -> None:
    if not idx.DEBIAN_FASHION_MNIST.is_dir():
        pytest.skip(f"{idx.DEBIAN_FASHION_MNIST} absent: apt-get install dataset-fashion-mnist")
    ds = load_dataset("fashion_mnist")
    assert ds.location["dir"] == str(idx.DEBIAN_FASHION_MNIST)
    assert (len(ds.train), len(ds.test)) == (60000, 10000) and ds.shape == (1, 28, 28)
    assert ds.train.y.bincount().tolist() == [6000] * 10


def test_real_cifar10_jpeg_imagefolder() -> None:
    d = shared_dataset("cifar10-jpeg")
    ds = load_dataset(f"imagefolder:{d}")
    assert len(ds.train) + len(ds.test) == 10000 and len(ds.test) == 2000
    assert ds.n_classes == 10 and ds.shape == (3, 32, 32)
    assert ds.class_names == tuple(CIFAR10_NAMES)
    assert ds.provenance["lossy"] is True and ds.provenance["n_files"] == 10000
    # the robustness suite's first 50 (AutoAttack, the SGLD defense) hold every class, not airplanes only
    assert len(set(ds.test.y[:50].tolist())) == 10 and ds.test.y.bincount().tolist() == [200] * 10

"""Issue 14, the data side: hostile and careless files given as `npz:` and `imagefolder:` data.

Each is read correctly or refused with one line (`UserError`, exit 2); none may exhaust memory, print a
warning, or silently become a different dataset (saturated pixels, 1001 classes from labels {0, 1000})."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.cli import main
from bench.data.imagefolder import load_imagefolder
from bench.data.npz import load_npz
from bench.errors import UserError


def refused(fn, *args) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning on the way is a failure too (PIL's decompression-bomb one)
        with pytest.raises(UserError) as e:
            fn(*args)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written chunk by chunk, so that its header can claim any size (PIL reads the header only)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def png16(values: np.ndarray) -> bytes:
    """A 16-bit PNG of H×W (grey) or H×W×3 (RGB) big-endian samples, encoded independently of PIL's writer."""
    h, w = values.shape[:2]
    colour_type = 2 if values.ndim == 3 else 0
    rows = b"".join(b"\x00" + values[i].astype(">u2").tobytes() for i in range(h))
    return png_bytes(w, h, 16, colour_type, rows)


# --- item 4: 16-bit PNGs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_pngs_are_read_by_their_high_byte_not_saturated(tmp_path, channels):
    rng = np.random.default_rng(0)
    shape = (6, 5, 3) if channels == 3 else (6, 5)
    written = {}
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(5):
            v = rng.integers(0, 65536, shape, dtype=np.uint16)
            (tmp_path / c / f"{i}.png").write_bytes(png16(v))
            written[f"{c}/{i}.png"] = v
    d = load_imagefolder(None, str(tmp_path))
    pixels = np.concatenate([d.train.x.numpy(), d.test.x.numpy()])
    assert pixels.shape[1] == channels and pixels.max() < 255 + 1 and pixels.min() >= 0
    assert (pixels == 255).mean() < 0.05  # the bug: every pixel 255
    expected = sorted((v >> 8).astype(np.uint8).tobytes() for v in written.values())  # 16 → 8 bits: the high byte
    got = sorted(np.ascontiguousarray(p.transpose(1, 2, 0) if channels == 3 else p[0]).tobytes() for p in pixels)
    assert got == expected


# --- item 5: labels -----------------------------------------------------------------------------------------------
def _x(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 4, 4), dtype=np.uint8)


def test_npz_labels_with_gaps_are_refused_not_padded_with_empty_classes(tmp_path):
    np.savez(tmp_path / "d.npz", x=_x(10), y=np.array([0, 1000] * 5))
    msg = refused(load_npz, None, str(tmp_path / "d.npz"))
    assert "0..K-1" in msg and "1000" in msg and "2 distinct" in msg


def test_npz_classes_only_in_test_are_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x_train=_x(10), y_train=np.array([0, 1] * 5), x_test=_x(4),
             y_test=np.array([0, 1, 2, 2]))
    assert "only in the test split" in refused(load_npz, None, str(tmp_path / "d.npz"))


@pytest.mark.parametrize("kind", ["npz", "imagefolder"])
def test_a_single_class_is_one_line_exit_2(tmp_path, capsys, kind):
    if kind == "npz":
        np.savez(tmp_path / "d.npz", x=_x(10), y=np.zeros(10, dtype=np.int64))
        spec = f"npz:{tmp_path / 'd.npz'}"
    else:
        for i in range(6):
            (tmp_path / "img" / "only").mkdir(parents=True, exist_ok=True)
            Image.fromarray(_x(1)[0]).save(tmp_path / "img" / "only" / f"{i}.png")
        spec = f"imagefolder:{tmp_path / 'img'}"
    out = tmp_path / "out"
    assert main(["run", "suite=calibration", "scale=tiny", "model=wrn", f"data={spec}", f"out={out}"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "1 class" in line and "at least 2" in line
    assert not out.exists()


# --- item 10: npz files that would exhaust memory or are not npz inside -------------------------------------------
def test_npz_label_two_to_the_40_is_refused_without_allocating(tmp_path):
    np.savez(tmp_path / "d.npz", x=_x(10), y=np.array([0, 1] * 4 + [2 ** 40, 0]))
    assert "1099511627776" in refused(load_npz, None, str(tmp_path / "d.npz"))


def _npy_header(shape, descr="|u1") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_npz_header_claiming_26_pib_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "d.npz", "w") as z:
        z.writestr("x.npy", _npy_header((2 ** 25, 2 ** 25, 25)) + b"\0" * 64)
        z.writestr("y.npy", _npy_header((2 ** 25,), "<i8") + b"\0" * 64)
    msg = refused(load_npz, None, str(tmp_path / "d.npz"))
    assert "'x'" in msg and "declares" in msg


def test_npz_whose_members_are_not_npy_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "d.npz", "w") as z:
        z.writestr("x", b"hello")
        z.writestr("y", b"world")
    assert "not a .npy array" in refused(load_npz, None, str(tmp_path / "d.npz"))


# --- item 10: decompression bombs ----------------------------------------------------------------------------------
def _folder_with(tmp_path: Path, big: bytes) -> Path:
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.fromarray(_x(1)[0]).save(tmp_path / c / f"{i}.png")
    (tmp_path / "a" / "big.png").write_bytes(big)
    return tmp_path


@pytest.mark.parametrize("side", [20000, 10000])  # beyond PIL's error limit; between its warning and error limits
def test_a_decompression_bomb_png_is_refused_without_a_warning(tmp_path, side):
    d = _folder_with(tmp_path, png_bytes(side, side, 8, 0, b""))
    msg = refused(load_imagefolder, None, str(d))
    assert "big.png" in msg and f"{side * side} pixels" in msg


def test_a_decompression_bomb_is_one_line_on_a_real_stderr(tmp_path):
    (tmp_path / "img").mkdir()
    d = _folder_with(tmp_path / "img", png_bytes(20000, 20000, 8, 0, b""))
    env = {**os.environ, "BENCH_QUIET": "1"}
    res = subprocess.run([sys.executable, "-m", "bench", "run", "suite=calibration", "scale=tiny", "model=wrn",
                          f"data=imagefolder:{d}", f"out={tmp_path / 'out'}"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "decompression" in res.stderr and not (tmp_path / "out").exists()

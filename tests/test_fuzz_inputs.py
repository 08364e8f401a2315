"""Fuzzing of everything a user hands `bench run`: npz files, image folders, checkpoints (bench's safetensors
with their metadata, and torch.save files) and command-line values.

The property is the project's promise for bad input: each case is either accepted as something sane, or refused
with a one-line `UserError` (exit 2 at the CLI); never another exception (a traceback), never a file written.
Hypothesis runs derandomized (the same examples on every run) with a small budget, so this stays a few seconds
per test in CI; `BENCH_FUZZ_EXAMPLES=1000` digs deeper locally.
"""

from __future__ import annotations

import io
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import warnings
import zipfile
import zlib
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from safetensors.torch import save_file

from bench import checkpoints
from bench.data.imagefolder import load_imagefolder
from bench.data.npz import load_npz
from bench.errors import UserError
from bench.models.base import DataInfo
from bench.models.wrn import WRN
from bench.scales import Scale

EXAMPLES = int(os.environ.get("BENCH_FUZZ_EXAMPLES", "0"))


def budget(n: int):
    return settings(max_examples=EXAMPLES or n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@contextmanager
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def snapshot(d: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(d)), p.stat().st_size) for p in d.rglob("*"))


def accept_or_refuse(fn, *args, where: Path):
    """``fn(*args)``'s result, or None when it refused with one line; anything else fails the test."""
    before = snapshot(where)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning printed on the way (PIL, numpy) is not one line either
        try:
            return fn(*args)
        except UserError as e:
            assert "\n" not in str(e) and str(e), repr(str(e))
            return None
        finally:
            assert snapshot(where) == before, "the loader wrote something"


def assert_sane(d) -> None:
    for split in (d.train, d.test):
        assert split.x.dtype == torch.uint8 and split.x.dim() == 4 and split.x.shape[1] in (1, 3)
        assert split.y.dtype == torch.int64 and len(split.y) == len(split.x)
    labels = torch.cat([d.train.y, d.test.y]).unique().tolist()
    assert labels == list(range(d.n_classes)), (labels, d.n_classes)  # every class 0..K-1 present, no other
    assert set(d.test.y.tolist()) <= set(d.train.y.tolist())
    assert len(d.train) > 0 and len(d.test) > 0


def mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    b = bytearray(data)
    for pos, value in edits:
        if b:
            b[pos % len(b)] = value
    return bytes(b)


EDITS = st.lists(st.tuples(st.integers(0, 2 ** 20), st.integers(0, 255)), max_size=6)


# --- npz ------------------------------------------------------------------------------------------------------
DTYPES = st.sampled_from(["u1", "u1", "u1", "i8", "i4", "u8", "i2", "f4", "b1", "c8", "U2"])
ARRAYS = DTYPES.flatmap(lambda dt: hnp.arrays(np.dtype(dt), hnp.array_shapes(min_dims=0, max_dims=4, min_side=0,
                                                                              max_side=5)))


@st.composite
def npz_files(draw) -> bytes:
    n = draw(st.integers(0, 12))
    arrays: dict[str, np.ndarray] = {}
    if draw(st.booleans()):  # near-valid x, y
        arrays["x"] = draw(hnp.arrays(np.uint8, (n, 3, 3)))
        arrays["y"] = draw(hnp.arrays(np.int64, (n,), elements=st.one_of(st.integers(0, 3),
                                                                            st.integers(-2 ** 63, 2 ** 63 - 1))))
    if draw(st.booleans()):  # near-valid splits
        for s in ("train", "test"):
            m = draw(st.integers(0, 8))
            arrays[f"x_{s}"] = draw(hnp.arrays(np.uint8, (m, 2, 2, draw(st.sampled_from([1, 3, 4])))))
            arrays[f"y_{s}"] = draw(hnp.arrays(np.int64, (m,), elements=st.integers(0, 4)))
    keys = st.sampled_from(["x", "y", "x_train", "y_train", "x_test", "y_test", "z"])
    arrays.update(draw(st.dictionaries(keys, ARRAYS, max_size=3)))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return mutate(buf.getvalue(), draw(EDITS))


@budget(150)
@given(npz_files())
def test_fuzz_npz(data):
    with scratch() as d:
        (d / "f.npz").write_bytes(data)
        ds = accept_or_refuse(load_npz, None, str(d / "f.npz"), where=d)
        if ds is not None:
            assert_sane(ds)


MEMBER_NAMES = st.sampled_from(["x", "y", "x.npy", "y.npy", "x_train", "y_test.npy"]) | st.text(min_size=1, max_size=8)


@budget(40)
@given(st.lists(st.tuples(MEMBER_NAMES, st.binary(max_size=200)), max_size=4), EDITS)
def test_fuzz_npz_zip_members_that_are_not_npy(members, edits):
    with scratch() as d:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate names it is asked to write
            for name, payload in members:
                z.writestr(name, payload)
        (d / "f.npz").write_bytes(mutate(buf.getvalue(), edits))
        assert accept_or_refuse(load_npz, None, str(d / "f.npz"), where=d) is None


# --- image folders ------------------------------------------------------------------------------------------------
MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "F", "CMYK"]


@st.composite
def images(draw) -> tuple[str, bytes]:
    if draw(st.integers(0, 14)) == 0:  # a PNG header claiming any size, up to PNG's 2**31-1 per side
        side = st.integers(1, 2 ** 31 - 1)
        return ".png", png_header_only(draw(side), draw(side), draw(st.sampled_from([(8, 0), (16, 0), (8, 2)])))
    mode, fmt = draw(st.sampled_from(MODES)), draw(st.sampled_from(["PNG", "BMP", "WEBP", "JPEG"]))
    w, h = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    raw = Image.frombytes("L", (w * 16, h), rng.integers(0, 256, w * h * 16, dtype=np.uint8).tobytes())
    wide = {"I;16": np.uint16, "I": np.int32, "F": np.float32}
    if mode in wide:
        im = Image.fromarray(rng.integers(0, 65536, (h, w)).astype(wide[mode]))
    else:
        im = raw.convert("RGB").resize((w, h)).convert(mode)
    buf = io.BytesIO()
    try:
        im.save(buf, format=fmt)
    except (OSError, ValueError, KeyError):
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format=fmt)
    ext = {"PNG": ".png", "BMP": ".bmp", "WEBP": ".webp", "JPEG": ".jpg"}[fmt]
    data = buf.getvalue()
    if draw(st.integers(0, 4)) == 0:
        data = mutate(data, draw(EDITS))
    if draw(st.integers(0, 9)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return ext, data


def png_header_only(width: int, height: int, depth_and_colour: tuple[int, int]) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, *depth_and_colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@st.composite
def image_folders(draw) -> dict[str, bytes]:
    classes = draw(st.lists(st.sampled_from(["a", "b", "c", ".hidden"]), min_size=1, max_size=3, unique=True))
    splits = draw(st.sampled_from([[""], ["train/", "test/"], ["test/"]]))
    files = {}
    for s in splits:
        for c in classes:
            for i in range(draw(st.integers(0 if draw(st.integers(0, 9)) == 0 else 1, 3))):
                ext, data = draw(images())
                files[f"{s}{c}/{i}{ext}"] = data
    return files


@budget(60)
@given(image_folders())
def test_fuzz_imagefolder(files):
    with scratch() as d:
        for rel, data in files.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_bytes(data)
        ds = accept_or_refuse(load_imagefolder, None, str(d), where=d)
        if ds is not None:
            assert ds.n_classes == len(ds.class_names) >= 1
            assert set(torch.cat([ds.train.y, ds.test.y]).tolist()) <= set(range(ds.n_classes))


# --- checkpoints -----------------------------------------------------------------------------------------------------
DIGITS = DataInfo((1, 8, 8), 10)
CONFIG = WRN.recipe(Scale.tiny, DIGITS)


def _model() -> WRN:
    torch.manual_seed(0)
    return WRN(CONFIG, DIGITS)


@lru_cache(maxsize=1)
def saved_checkpoint() -> tuple[bytes, dict[str, torch.Tensor]]:
    """A bench checkpoint (with its checksum) of a tiny WRN, and the weights it holds (not a fixture: Hypothesis
    would print it with every failing example)."""
    model = _model()
    with scratch() as d:
        checkpoints.save(model, d / "w.safetensors", {"train": {"steps": 1}})
        return (d / "w.safetensors").read_bytes(), {k: v.clone() for k, v in model.state_dict().items()}


def _header_edits(data: bytes):
    end = 8 + int.from_bytes(data[:8], "little")
    return st.lists(st.tuples(st.integers(0, end - 1), st.integers(0, 255)), min_size=1, max_size=4)


@budget(120)
@given(st.data())
def test_fuzz_bench_checkpoint_bytes_never_load_wrong_weights(data):
    """Any edit anywhere (header, metadata, tensor bytes): refused, or loaded with exactly the saved weights."""
    original, state = saved_checkpoint()
    edits = data.draw(st.one_of(EDITS, _header_edits(original)))
    with scratch() as d:
        path = d / "w.safetensors"
        path.write_bytes(mutate(original, edits))
        for load in (checkpoints.load_checkpoint, checkpoints.load_cached):
            model = _model()
            for p in model.parameters():
                p.data.zero_()
            if accept_or_refuse(load, model, path, where=d) is not None:
                for k, v in model.state_dict().items():
                    assert torch.equal(v, state[k]), k


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)
META_KEYS = st.sampled_from(["model", "config", "train", "data", "scale", "seed", "cache_key"])


@st.composite
def metadata(draw) -> dict[str, str]:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        bench = draw(st.text(max_size=30))
    elif kind == 1:
        bench = json.dumps(draw(JSON))
    else:
        meta = draw(st.dictionaries(META_KEYS, JSON, max_size=4))
        if kind == 3:
            meta["model"] = "wrn"
        bench = json.dumps(meta)
    extra = draw(st.dictionaries(st.sampled_from(["bench_sha256", "format", "x"]), st.text(max_size=70), max_size=2))
    return {"bench": bench, **extra}


@budget(80)
@given(metadata())
def test_fuzz_checkpoint_metadata(meta):
    with scratch() as d:
        path = d / "w.safetensors"
        save_file({k: v.contiguous() for k, v in _model().state_dict().items()}, str(path), metadata=meta)

        def as_given():  # checkpoint=PATH: read, fit the config, check against the model (plan), then load
            ckpt = checkpoints.read_checkpoint(path)
            config = checkpoints.configure_for(WRN, CONFIG, DIGITS, ckpt)
            return checkpoints.apply_checkpoint(WRN(config, DIGITS), ckpt)

        accept_or_refuse(as_given, where=d)
        assert accept_or_refuse(checkpoints.load_cached, _model(), path, where=d) is None  # no valid checksum


LEAVES = st.one_of(st.none(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=5),
                   st.sampled_from(["u1", "i4", "f2", "f4", "f8", "b1"]).map(
                       lambda dt: torch.from_numpy(np.zeros((2, 3), dtype=dt))))
OBJECTS = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
                       | st.dictionaries(st.text(max_size=12) | st.sampled_from(["model_state_dict", "replay_buffer",
                                                                                   "class_output.bias"]), inner,
                                         max_size=3), max_leaves=6)


@budget(60)
@given(OBJECTS, EDITS, st.sampled_from(["bench", "jem"]))
def test_fuzz_torch_save_checkpoints(obj, edits, fmt):
    with scratch() as d:
        buf = io.BytesIO()
        torch.save(obj, buf)
        path = d / "w.pt"
        path.write_bytes(mutate(buf.getvalue(), edits))

        def as_given():
            ckpt = checkpoints.read_checkpoint(path, fmt)
            return checkpoints.configure_for(WRN, CONFIG, DIGITS, ckpt)

        accept_or_refuse(as_given, where=d)


# --- command-line values ------------------------------------------------------------------------------------------
NAMES = st.sampled_from(["wrn", "jem", "pixel_independent", "nope", "", "all"])
VALUES = st.one_of(
    st.integers(-2 ** 70, 2 ** 70).map(str),
    st.floats().map(repr),
    st.sampled_from(["", "nan", "inf", "-inf", "null", "true", "[]", "{}", "0", "-1", "1e400", "'a b'"]),
    st.text(st.characters(codec="ascii", exclude_characters="\n\r\x00"), max_size=10),
    st.lists(NAMES, max_size=3).map(lambda v: "[" + ",".join(v) + "]"),
    st.lists(st.integers(-3, 3), max_size=3).map(lambda v: "[" + ",".join(map(str, v)) + "]"),
)
KEYS = st.sampled_from(["seed", "out", "model", "models", "opts.width", "opts.depth", "opts.epochs", "opts.lr",
                        "opts.batch_size", "opts.norm", "opts.decay_epochs", "opts.leak", "n_samples", "ece_bins",
                        "scale", "device", "data", "precision", "retrain", "checkpoint",
                        "metrics.inception_weights", "opts.nope"])


@budget(20)  # each example composes a Hydra config (0.1-0.2 s)
@given(st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=3))
@example([("seed", str(2 ** 63))]).via("issue 14")
@example([("opts.width", "0")]).via("issue 14")
@example([("opts.epochs", "-1")]).via("issue 14")
@example([("opts.lr", "nan")]).via("issue 14")
@example([("out", "")]).via("issue 14")
@example([("models", "[]")]).via("issue 14")
@example([("models", "[wrn,wrn]")]).via("issue 14")
def test_fuzz_run_values(pairs):
    from bench.config import load_config
    from bench.plan import plan

    overrides = [f"{k}={v}" for k, v in pairs]
    if not any(k in ("model", "models") for k, _ in pairs):
        overrides.insert(0, "model=wrn")
    with scratch() as d:
        cwd = os.getcwd()
        os.chdir(d)
        old = os.environ.get("BENCH_CACHE")
        os.environ["BENCH_CACHE"] = str(d / "cache")
        try:
            (d / "cache").mkdir()

            def configure_and_plan():
                return plan(load_config(["suite=calibration", "scale=tiny", "device=cpu", *overrides]))

            before = snapshot(d)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    p = configure_and_plan()
            except UserError as e:
                assert "\n" not in str(e) and str(e)
                assert snapshot(d) == before, "a refused run wrote something"
                return
            assert 0 <= p.cfg.seed < 2 ** 32 and str(p.cfg.out).strip()
            assert p.models and len(set(p.models)) == len(p.models)
            for config in p.configs.values():  # what a model is built and trained with
                for v in vars(config).values():
                    assert not isinstance(v, float) or math.isfinite(v), config
                    assert not isinstance(v, int) or v >= 0, config
        finally:
            os.chdir(cwd)
            if old is None:
                os.environ.pop("BENCH_CACHE", None)
            else:
                os.environ["BENCH_CACHE"] = old


def test_a_hostile_value_through_the_real_command(tmp_path):
    env = {**os.environ, "BENCH_QUIET": "1", "BENCH_CACHE": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-m", "bench", "run", "suite=calibration", "scale=tiny", "model=wrn",
                          "opts.lr=nan", f"out={tmp_path / 'out'}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert sorted(tmp_path.iterdir()) == []

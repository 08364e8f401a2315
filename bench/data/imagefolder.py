"""`imagefolder:<path>`: a directory of image files, one sub-directory per class.

Layouts, tried in this order:

- ``<path>/train/<class>/*`` and ``<path>/test/<class>/*``: the two splits as given (same class directories);
- only ``<path>/test/<class>/*`` (or only ``<path>/train/<class>/*``), or ``<path>/<class>/*``: one pool, split
  by a fixed stratified 80/20 split (scikit-learn, random_state 0) recorded in the provenance, as for `npz`.

Classes are the sub-directory names sorted (label = index); files directly inside a class directory with
extension png, jpg, jpeg, bmp or webp (any case) are read in sorted order. Images are kept as 1 channel when
every one is grayscale (PIL mode "L"), otherwise all are converted to RGB; all must have the same size.
The provenance has the file count, a sha256 over the sorted relative paths and each file's bytes, and
``"lossy": true`` when any file is a JPEG (decoded pixels then differ from the original dataset's).

Where: ``<path>`` as given (absolute, or relative to the working directory); a relative path not found there
is also looked for under each root of `data_roots` (``data.root=`` then ``$BENCH_DATA``).
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bench.data.base import Dataset, Split, mixed_test_order
from bench.data.npz import fixed_split, resolve_arg_path
from bench.data.registry import DATASETS
from bench.errors import DataNotFoundError, UserError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
LAYOUT_HELP = "<path>/train/<class>/* and <path>/test/<class>/*, or <path>/<class>/* (png, jpg, jpeg, bmp, webp)"


@dataclass(frozen=True)
class _Image:
    path: Path
    digest: bytes  # sha256 of the file's bytes
    pixels: np.ndarray  # H×W (mode L) or H×W×3 (RGB)
    format: str  # PIL's name of the file format, e.g. "PNG", "JPEG"


def _class_dirs(d: Path) -> list[Path]:
    return sorted((p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _files(class_dir: Path) -> list[Path]:
    files = sorted((p for p in class_dir.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file()),
                   key=lambda p: p.name)
    if not files:
        raise UserError(f"class directory {class_dir} has no image files ({', '.join(EXTENSIONS)}); "
                        f"add images or remove the directory")
    return files


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def _pixels(im, path: Path) -> np.ndarray:
    """H×W (grey) or H×W×3 uint8. 16-bit images keep their high byte (as PIL does for 16-bit RGB), instead of
    PIL's convert(), which saturates every value above 255."""
    if im.mode == "L":  # stays L so that an all-grayscale folder keeps 1 channel; L→RGB later is exact replication
        return np.asarray(im)
    if im.mode in _SIXTEEN_BIT or (im.mode == "I" and im.format == "PNG"):  # PNG's 16-bit grey is mode I or I;16*
        return (np.asarray(im).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
    if im.mode in ("I", "F") or im.mode.startswith("I;"):
        raise UserError(f"image {path} has {'floating-point' if im.mode == 'F' else '32-bit integer'} pixels (PIL "
                        f"mode {im.mode}), which have no faithful 8-bit reading; save it as 8-bit")
    return np.asarray(im.convert("RGB"))


def _read(path: Path) -> _Image:
    from PIL import Image, UnidentifiedImageError

    data = path.read_bytes()
    try:
        with warnings.catch_warnings():
            # PIL only warns between its two limits: one line and exit 2 here too, not a warning and a decode
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                fmt = im.format or "unknown"
                pixels = _pixels(im, path)
    except UserError:
        raise
    except UnidentifiedImageError:
        raise UserError(f"cannot decode image {path}: not an image PIL can read; remove or re-save it") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        n = re.search(r"\((\d+) pixels\)", str(e))
        raise UserError(f"image {path} has {n.group(1) if n else 'too many'} pixels, beyond the decompression-bomb "
                        f"limit of {Image.MAX_IMAGE_PIXELS} pixels; resize it (or remove it)") from None
    except Exception as e:  # PIL's decoders raise OSError, SyntaxError, EOFError, struct.error, ... on bad files
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"cannot decode image {path} ({why}); remove or re-save it") from None
    return _Image(path, hashlib.sha256(data).digest(), pixels, fmt)


def _layout(d: Path) -> tuple[str, dict[str, list[Path]]]:
    """(layout description, {split or "pool": class directories})."""
    sub = {s: _class_dirs(d / s) for s in ("train", "test") if (d / s).is_dir()}
    sub = {s: dirs for s, dirs in sub.items() if dirs}
    if "train" in sub and "test" in sub:
        tr, te = [p.name for p in sub["train"]], [p.name for p in sub["test"]]
        if tr != te:
            diff = sorted(set(tr) ^ set(te))
            raise UserError(f"{d}: train/ and test/ must have the same class directories; they differ in "
                            f"{', '.join(diff[:5])}{' ...' if len(diff) > 5 else ''}; add or remove directories")
        return "train/<class>, test/<class>", sub
    if sub:
        (s, dirs), = sub.items()
        return f"{s}/<class> only, split 80/20", {"pool": dirs}
    dirs = _class_dirs(d)
    if not dirs:
        raise DataNotFoundError(f"no class directories in {d}; expected {LAYOUT_HELP}")
    return "<class>/, split 80/20", {"pool": dirs}


def _stack(images: list[_Image], rgb: bool, size: tuple[int, int]) -> torch.Tensor:
    out = np.empty((len(images), 3 if rgb else 1, *size), dtype=np.uint8)
    for i, im in enumerate(images):
        if im.pixels.shape[:2] != size:
            h, w = im.pixels.shape[:2]
            raise UserError(f"image {im.path} is {w}x{h} but the others are {size[1]}x{size[0]}; "
                            f"resize all images to one size before loading")
        out[i] = im.pixels.transpose(2, 0, 1) if im.pixels.ndim == 3 else im.pixels[None]
    return torch.from_numpy(out)


@DATASETS.register("imagefolder")
def load_imagefolder(root: str | None = None, arg: str | None = None) -> Dataset:
    if not arg:
        raise UserError("dataset 'imagefolder' needs a path: use data=imagefolder:/path/to/dir")
    d = resolve_arg_path(arg, root, "imagefolder", is_dir=True, what=f"a directory laid out as {LAYOUT_HELP}")
    layout, groups = _layout(d)
    class_names = tuple(p.name for p in next(iter(groups.values())))

    paths: dict[str, list[Path]] = {}
    labels: dict[str, np.ndarray] = {}
    for g, dirs in groups.items():
        per_class = [_files(c) for c in dirs]
        paths[g] = [p for files in per_class for p in files]
        labels[g] = np.repeat(np.arange(len(dirs), dtype=np.int64), [len(f) for f in per_class])
    # Serial on purpose: small images cost mostly Python overhead, and threads measured slower (GIL contention).
    images = {g: [_read(p) for p in ps] for g, ps in paths.items()}

    everything = [im for ims in images.values() for im in ims]
    rgb = any(im.pixels.ndim == 3 for im in everything)
    size = everything[0].pixels.shape[:2]
    x = {g: _stack(ims, rgb, size) for g, ims in images.items()}

    h = hashlib.sha256()
    for rel, digest in sorted((im.path.relative_to(d).as_posix(), im.digest) for im in everything):
        h.update(rel.encode() + b"\0" + digest)
    formats = sorted({im.format for im in everything})
    provenance: dict = {
        "layout": layout,
        "n_files": len(everything),
        "files_sha256": h.hexdigest(),
        "files_sha256_method": "sha256 over files sorted by relative path of (path utf-8, NUL, sha256 of bytes)",
        "formats": formats,
        "channels": "RGB" if rgb else "L (every image grayscale)",
        "lossy": "JPEG" in formats,
    }

    if "pool" in x:
        y = labels["pool"]
        tr, te, split = fixed_split(y, str(d))
        xt, yt = x["pool"], torch.from_numpy(y)
        train, test = Split(xt[tr].contiguous(), yt[tr].contiguous()), Split(xt[te].contiguous(), yt[te].contiguous())
        provenance.update(split)
    else:
        train = Split(x["train"], torch.from_numpy(labels["train"]))
        test = Split(x["test"], torch.from_numpy(labels["test"]))
    test, order = mixed_test_order(test)  # read class directory by class directory: grouped by class
    provenance.update(order)
    return Dataset(
        name=f"imagefolder:{d.name}",  # the content hash, not the place, identifies it (see Dataset.location)
        train=train,
        test=test,
        n_classes=len(class_names),
        class_names=class_names,
        provenance=provenance,
        location={"dir": str(d)},
    )

"""Where bench keeps checkpoints, extractor weights, features and samples: ``$BENCH_CACHE`` or
``~/.cache/bench``; and the checked read and write of its tensor files."""

from __future__ import annotations

import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from bench import fileio


def cache_root() -> Path:
    return Path(os.environ.get("BENCH_CACHE") or Path.home() / ".cache" / "bench").expanduser()


def cache_dir(*parts: str) -> Path:
    path = cache_root().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_verified(path: Path) -> dict[str, Tensor] | None:
    """The tensors of a cache file written by `save_verified`, or None when it is absent, does not match its
    ``.sha256`` sidecar, or does not parse."""
    sidecar = path.with_suffix(".sha256")
    if not (path.is_file() and sidecar.is_file()) or fileio.sha256_file(path) != sidecar.read_text().strip():
        return None
    try:
        return load_file(str(path))
    except (SafetensorError, OSError):
        return None


def save_verified(path: Path, tensors: dict[str, Tensor]) -> None:
    """Write ``tensors`` atomically, then their sha256 sidecar (`fileio.write_with_sidecar`)."""
    fileio.write_with_sidecar(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))

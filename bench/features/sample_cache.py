"""A model's evaluation samples, as the features the metrics read and the record's grid, cached on disk.

Sampling is most of a warm run's time (an SGLD or Langevin chain per image), and it is a pure function of
what the key holds: the model's weights (a digest of its state as loaded, so a checkpoint format's
conversion is in it, and a retrain to the same weights hits), the model's code and configuration, the
evaluation sampler's settings, the sample count, batch size and seed, the extractor (protocol and weights'
sha256), the numerics (device type, bf16, channels_last, compile) and the stack that computes them (torch,
CUDA, torchvision and torch-fidelity versions, the device's name, the machine's architecture). bench's own
evaluation code and the features code are in the key too, so an edit to either recomputes.

Only a run that loaded its checkpoint reads the cache: a model trained in this run samples afresh (and
writes what it drew), so a cold run always measures. Float sums can differ in the last bits between thread
counts, and over a long SGLD or Langevin chain such bits can grow into other images: a hit reproduces the
samples of the run that drew them rather than drawing at this run's thread count. So the entry keeps the
thread count it was drawn with, and a record whose samples came from the cache says so in its ``draws``
(``samples.from_cache``, ``samples.num_threads``). ``BENCH_SAMPLE_CACHE=0``
turns the cache off (the test suite does, so that two runs it compares each draw their own samples)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Callable

import torch
from safetensors import SafetensorError
from torch import Tensor

from bench import console
from bench.cache import cache_dir, load_verified, save_verified
from bench.models.base import code_hash
from bench.results.records import device_name, package_version

#: the grid's images and the thread count they were drawn with, among the cached tensors (no feature is
#: named so: feature names are identifiers)
GRID, THREADS = "__grid__", "__num_threads__"


def enabled() -> bool:
    return os.environ.get("BENCH_SAMPLE_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def _stack(device: torch.device) -> dict:
    """The software and hardware that draw and extract: another of them may round differently."""
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "torchvision": package_version("torchvision"),
            "torch_fidelity": package_version("torch-fidelity"), "device_name": device_name(device),
            "machine": platform.machine()}


def key(content: dict, device: torch.device) -> str:
    content = {**content, "evaluation_code": code_hash("bench.evaluation"), "stack": _stack(device)}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _path(model: str, k: str):
    return cache_dir("samples", model) / f"{k}.safetensors"


def load(model: str, k: str) -> tuple[dict[str, Tensor], Tensor, int] | None:
    """(features, grid, the thread count they were drawn with), or None when absent or not intact."""
    tensors = load_verified(_path(model, k))
    if (tensors is None or GRID not in tensors or THREADS not in tensors or len(tensors) < 3
            or tensors[THREADS].numel() != 1 or tensors[GRID].dtype != torch.uint8):
        return None
    return tensors, tensors.pop(GRID), int(tensors.pop(THREADS))


def save(model: str, k: str, features: dict[str, Tensor], grid: Tensor) -> None:
    """Write the entry atomically; a cache that cannot be written is skipped with a note, never an error."""
    tensors = {**features, GRID: grid, THREADS: torch.tensor(torch.get_num_threads())}
    try:
        save_verified(_path(model, k), tensors)
    except (OSError, SafetensorError) as e:  # safetensors reports a failed write as its own error
        console.info(f"[dim]{model}: samples not cached ({getattr(e, 'strerror', None) or e})[/dim]")


def cached(model: str, content: dict | None, device: torch.device, read: bool,
           compute: Callable[[], tuple[dict[str, Tensor], Tensor]]) -> tuple[dict[str, Tensor], Tensor, int | None]:
    """``compute()``'s (features, grid), from the cache when ``read`` and an intact entry for ``content``
    exists; the third item is the cached entry's thread count, None when computed here. ``content`` None:
    not cacheable (no checkpoint hash, a sharded run), always computed."""
    if content is None or not enabled():
        return (*compute(), None)
    k = key(content, device)
    if read:
        hit = load(model, k)
        if hit is not None:
            console.info(f"[dim]{model}: using cached samples (drawn at {hit[2]} thread(s))[/dim]")
            return hit
    features, grid = compute()
    save(model, k, features, grid)
    return features, grid, None

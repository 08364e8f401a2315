"""Saving, loading and caching model weights without ever unpickling arbitrary objects.

bench's own format is safetensors with the model's name, config and training stats in the metadata.
Released checkpoints of other projects come in through the `CHECKPOINT_FORMATS` registry: a format is a
function that reads a file into a state dict for a given model (loading with
``torch.load(weights_only=True)`` at most) and returns what the record should say about its origin.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from bench.cache import cache_dir
from bench.data.base import Dataset, sha256_file
from bench.errors import CheckpointError
from bench.models.base import BenchModel
from bench.registry import Registry
from bench.scales import Scale

#: reads a checkpoint file for ``model``: returns (state dict, origin description for the record)
FormatReader = Callable[[Path, BenchModel], tuple[dict[str, Tensor], dict[str, Any]]]
CHECKPOINT_FORMATS: Registry[FormatReader] = Registry("checkpoint format", entry_point_group="bench.checkpoint_formats")


def cache_key(model_cls: type[BenchModel], config: Any, data: Dataset, scale: Scale, seed: int) -> str:
    payload = {
        "model": model_cls.name,
        "config": dataclasses.asdict(config),
        "data": data.fingerprint(),
        "scale": scale.value,
        "seed": seed,
        "code": model_cls.code_version(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cached_path(model_cls: type[BenchModel], key: str) -> Path:
    return cache_dir("checkpoints", model_cls.name) / f"{key}.safetensors"


def save(model: BenchModel, path: Path, meta: dict[str, Any]) -> str:
    """Write atomically; return the file's sha256."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {"bench": json.dumps({"model": model.name, "config": model.config_dict(), **meta}, default=str)}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    return sha256_file(path)


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({e}); pass a file saved by bench "
                              "or name its format with checkpoint_format=") from None


def torch_load_weights_only(path: Path) -> Any:
    """``torch.load`` restricted to tensors and containers; anything else is refused, never executed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported [^.\n]*?(GLOBAL|global:?) ?([\w.]+)", str(e))
        what = f"it references {found.group(2)}" if found else "it holds objects other than tensors and dicts"
        raise CheckpointError(f"refusing to load {path}: {what}; only tensors and dicts are accepted, nothing is "
                              "unpickled beyond that") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({str(e).splitlines()[0][:160]})") from None


def check_state_dict(model: BenchModel, state: dict[str, Tensor], path: Path,
                     allowed_extra: tuple[str, ...] = ()) -> None:
    """Refuse missing keys, unexpected keys and shape mismatches, naming the first of each."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected and not k.startswith(allowed_extra)]
    if missing:
        raise CheckpointError(f"checkpoint {path} does not fit model '{model.name}': missing {len(missing)} key(s), "
                              f"first '{missing[0]}'; was it saved for another model, scale or dataset?")
    if extra:
        raise CheckpointError(f"checkpoint {path} does not fit model '{model.name}': unexpected {len(extra)} key(s), "
                              f"first '{extra[0]}'")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(f"checkpoint {path} does not fit model '{model.name}': '{k}' has shape "
                                  f"{tuple(state[k].shape)}, the model needs {tuple(v.shape)} (check scale= and data=)")


@CHECKPOINT_FORMATS.register("bench")
def read_bench(path: Path, model: BenchModel) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """bench's own safetensors files; a ``.pt`` holding a plain state dict is accepted too."""
    if path.suffix == ".safetensors":
        state, metadata = read_safetensors(path)
        meta = json.loads(metadata.get("bench", "{}"))
        if meta.get("model") not in (None, model.name):
            raise CheckpointError(f"checkpoint {path} was saved for model '{meta['model']}', not '{model.name}'; "
                                  f"use model={meta['model']}")
    else:
        state = torch_load_weights_only(path)
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(f"{path} is not a state dict (a dict of tensors); for a released checkpoint "
                                  f"name its format with checkpoint_format= ({', '.join(CHECKPOINT_FORMATS.names())})")
        meta = {}
    return state, {"format": "bench", "saved_meta": meta}


def load_checkpoint(model: BenchModel, path: Path, fmt: str = "bench") -> dict[str, Any]:
    """Load ``path`` into ``model`` after validating it; returns the record's checkpoint entry."""
    reader = CHECKPOINT_FORMATS.get(fmt)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; give checkpoint=PATH of an existing file")
    state, origin = reader(path, model)
    check_state_dict(model, state, path, allowed_extra=tuple(origin.pop("ignored_prefixes", ())))
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})
    for k, v in model.state_dict().items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"checkpoint {path} holds non-finite values in '{k}'; it is corrupt")
    return {"path": str(path), "sha256": sha256_file(path), **origin}

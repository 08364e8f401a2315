"""Saving, loading and caching model weights without ever unpickling arbitrary objects.

bench's own format is safetensors with the model's name, config and training stats in the metadata.
Released checkpoints of other projects come in through the `CHECKPOINT_FORMATS` registry (one module per
format in `bench.checkpoint_formats`, or a third-party ``bench.checkpoint_formats`` entry point). A format is
a `CheckpointFormat` subclass that

- ``read``s a file into tensors under bench's key names, loading with ``torch.load(weights_only=True)`` at
  most (`torch_load_weights_only`), and says what the record should know about the file's origin;
- ``configure``s the model from the tensors: a released checkpoint decides its own architecture, whatever
  ``scale=`` says;
- names the ``protocol`` entries (format, sha256, preprocessing) that keep numbers from foreign weights
  from being compared silently with numbers from bench's own training.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import json
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from bench.cache import cache_dir
from bench.data.base import Dataset, sha256_file
from bench.discovery import import_submodules
from bench.errors import CheckpointError
from bench.models.base import BenchModel, DataInfo
from bench.registry import Registry
from bench.scales import Scale


@dataclass
class Checkpoint:
    """A checkpoint file read into tensors named the way bench's models name them."""

    state: dict[str, Tensor]
    #: what the record's checkpoint entry says about the file besides its path and sha256
    origin: dict[str, Any] = field(default_factory=dict)
    #: key prefixes the file holds that a model may leave unused (heads it lacks, a buffer it has no use for)
    optional: tuple[str, ...] = ()
    # filled in by `read_checkpoint`
    path: Path = Path()
    sha256: str = ""
    format: str = ""

    def entry(self, model: BenchModel) -> dict[str, Any]:
        """The record's ``checkpoint`` entry once loaded into ``model``."""
        unused = sorted(k for k in self.state if k not in model.state_dict())
        return {"path": str(self.path), "sha256": self.sha256, "format": self.format, **self.origin,
                **({"unused_keys": unused} if unused else {})}


class CheckpointFormat(abc.ABC):
    """How one project's checkpoint files become a bench model; subclass, then `register_format`."""

    name: ClassVar[str] = ""

    @abc.abstractmethod
    def read(self, path: Path) -> Checkpoint:
        """Read ``path`` (never unpickling more than tensors and containers) and validate its layout."""

    def configure(self, model_cls: type[BenchModel], config: Any, data: DataInfo, ckpt: Checkpoint) -> Any:
        """The model config the checkpoint needs, starting from the scale's ``config``; refuse models it can't fill."""
        return config

    def protocol(self, ckpt: Checkpoint, config: Any) -> dict[str, Any]:
        """Entries for the run's protocol (and so its fingerprint); empty for weights bench trained itself."""
        return {}


CHECKPOINT_FORMATS: Registry[type[CheckpointFormat]] = Registry(
    "checkpoint format", base=CheckpointFormat, entry_point_group="bench.checkpoint_formats")


def register_format(name: str):
    def deco(cls: type[CheckpointFormat]) -> type[CheckpointFormat]:
        cls.name = name
        CHECKPOINT_FORMATS.add(name, cls)
        return cls

    return deco


def get_format(name: str) -> CheckpointFormat:
    return CHECKPOINT_FORMATS.get(name)()


# --- bench's own files and its cache -------------------------------------------------------------
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
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]  # an empty file raises a bare EOFError
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({why})") from None
    except Exception as e:  # the restricted unpickler fails on garbage with KeyError, IndexError, ...
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (a {type(e).__name__} while unpickling: "
                              "the file is truncated or not a torch.save file)") from None


@register_format("bench")
class BenchFormat(CheckpointFormat):
    """bench's own safetensors files; a ``.pt`` holding a plain state dict is accepted too."""

    def read(self, path: Path) -> Checkpoint:
        if path.suffix == ".safetensors":
            state, metadata = read_safetensors(path)
            meta = json.loads(metadata.get("bench", "{}"))
        else:
            state = torch_load_weights_only(path)
            if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
                raise CheckpointError(f"{path} is not a state dict (a dict of tensors); for a released checkpoint name "
                                      f"its format with checkpoint_format= ({', '.join(CHECKPOINT_FORMATS.names())})")
            meta = {}
        return Checkpoint(state, {"saved_meta": meta})

    def configure(self, model_cls: type[BenchModel], config: Any, data: DataInfo, ckpt: Checkpoint) -> Any:
        saved_for = ckpt.origin["saved_meta"].get("model")
        if saved_for not in (None, model_cls.name):
            raise CheckpointError(f"checkpoint {ckpt.path} was saved for model '{saved_for}', not '{model_cls.name}'; "
                                  f"use model={saved_for}")
        return config


# --- reading, validating, loading ----------------------------------------------------------------
def read_checkpoint(path: Path, fmt: str = "bench") -> Checkpoint:
    """Read and validate ``path`` in format ``fmt``; nothing is loaded into a model yet."""
    reader = get_format(fmt)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; give checkpoint=PATH of an existing file")
    ckpt = reader.read(path)
    return dataclasses.replace(ckpt, path=path, sha256=sha256_file(path), format=fmt)


def check_state_dict(model: BenchModel, state: dict[str, Tensor], path: Path,
                     allowed_extra: tuple[str, ...] = ()) -> None:
    """Refuse missing keys, unexpected keys, shape mismatches and non-finite values, naming the first of each.

    ``model`` may live on the meta device: only its keys and shapes are used.
    """
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
    for k in expected:
        if state[k].is_floating_point() and not torch.isfinite(state[k]).all():
            raise CheckpointError(f"checkpoint {path} holds non-finite values in '{k}'; it is corrupt")


def shell_model(model_cls: type[BenchModel], config: Any, data: DataInfo) -> BenchModel:
    """The model's key and shape layout without its memory (meta device), to validate a checkpoint cheaply."""
    try:
        with torch.device("meta"):
            return model_cls(config, data)
    except (NotImplementedError, RuntimeError):  # a model whose constructor computes on tensors
        return model_cls(config, data)


def configure_for(model_cls: type[BenchModel], config: Any, data: DataInfo, ckpt: Checkpoint) -> Any:
    """The config ``ckpt`` needs, validated against the model it builds; raises `CheckpointError`."""
    config = get_format(ckpt.format).configure(model_cls, config, data, ckpt)
    check_state_dict(shell_model(model_cls, config, data), ckpt.state, ckpt.path, ckpt.optional)
    return config


def apply_checkpoint(model: BenchModel, ckpt: Checkpoint) -> dict[str, Any]:
    """Load ``ckpt`` into ``model`` after validating it; returns the record's checkpoint entry."""
    check_state_dict(model, ckpt.state, ckpt.path, ckpt.optional)
    expected = model.state_dict()
    model.load_state_dict({k: v for k, v in ckpt.state.items() if k in expected})
    return ckpt.entry(model)


def load_checkpoint(model: BenchModel, path: Path, fmt: str = "bench") -> dict[str, Any]:
    """Load ``path`` into an already built ``model``; returns the record's checkpoint entry."""
    ckpt = read_checkpoint(path, fmt)
    needed = get_format(fmt).configure(type(model), model.config, model.data_info, ckpt)
    if needed != model.config:
        diff = {k: v for k, v in dataclasses.asdict(needed).items() if getattr(model.config, k) != v}
        raise CheckpointError(f"checkpoint {path} needs model '{model.name}' built with {diff}")
    return apply_checkpoint(model, ckpt)


# the released formats live one per module; importing them registers them
import_submodules("bench.checkpoint_formats")

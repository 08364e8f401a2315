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
import errno
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
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from bench import fileio
from bench.cache import cache_dir
from bench.data.base import Dataset, sha256_file
from bench.discovery import import_submodules
from bench.errors import CheckpointError
from bench.fileio import tmp_path
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


#: safetensors metadata key of the checksum bench writes: sha256 over the "bench" metadata and every tensor
CHECKSUM_KEY = "bench_sha256"
_NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV)


def tensors_digest(tensors: dict[str, Tensor], meta_json: str) -> str:
    """sha256 over ``meta_json`` and each tensor's name, dtype, shape and bytes, in name order: it catches a
    flipped bit anywhere a value is read from, which the file's own layout does not."""
    h = hashlib.sha256(meta_json.encode("utf-8", "surrogatepass"))
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"\0{k}\0{t.dtype}\0{tuple(t.shape)}\0".encode("utf-8", "surrogatepass"))
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _serialize(model: BenchModel, meta: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, str]]:
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta_json = json.dumps({"model": model.name, "config": model.config_dict(), **meta}, default=str)
    return tensors, {"bench": meta_json, CHECKSUM_KEY: tensors_digest(tensors, meta_json)}


def save(model: BenchModel, path: Path, meta: dict[str, Any]) -> str:
    """Write atomically, with a checksum; return the file's sha256. A failed write leaves no temporary file."""
    tensors, metadata = _serialize(model, meta)
    return fileio.atomic_write_hashed(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def file_id(path: Path) -> tuple[int, int, int] | None:
    """Which file is at ``path`` now (inode, size, mtime), or None."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _verifies(path: Path) -> bool:
    try:
        return read_checkpoint(path).origin.get("checksum") == "verified"
    except CheckpointError:
        return False


def save_to_cache(model: BenchModel, path: Path, meta: dict[str, Any], seen: tuple[int, int, int] | None) -> str | None:
    """Cache ``model``'s weights at ``path``, replacing only the file this run saw there before training
    (``seen``: `file_id`, None if none): when an identical run cached a valid checkpoint meanwhile, that file
    stays (its record names its sha256) and None is returned, so that this run evaluates that file too.
    Otherwise returns the sha256 of the file written."""
    tensors, metadata = _serialize(model, meta)
    tmp = tmp_path(path)
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        sha = sha256_file(tmp)
        try:
            os.link(tmp, path)  # creates the file only if there is none: never clobbers a concurrent writer's
            return sha
        except FileExistsError:
            pass
        except OSError as e:
            if e.errno not in _NO_HARD_LINKS:
                raise
        if file_id(path) not in (None, seen) and _verifies(path):
            return None
        tmp.replace(path)  # the corrupt or outdated file this run set out to replace (retrain=true)
        return sha
    finally:
        tmp.unlink(missing_ok=True)


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except Exception as e:  # SafetensorError, OSError, and whatever a hostile header makes torch raise
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file ({why}); pass a file saved by "
                              "bench or name its format with checkpoint_format=") from None


def _saved_meta(text: str | None, path: Path) -> dict[str, Any]:
    """bench's metadata of a safetensors file, validated: a JSON object whose known fields have their types."""
    if text is None:
        return {}
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {path}: its 'bench' metadata is not valid JSON ({e.msg} at character "
                              f"{e.pos}); the file is corrupt: re-save it (or delete it from the cache)") from None
    except (ValueError, RecursionError) as e:  # an int too long to parse, nesting too deep
        raise CheckpointError(f"checkpoint {path}: its 'bench' metadata is not usable JSON "
                              f"({type(e).__name__}); the file is corrupt") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: its 'bench' metadata is not a JSON object (it is a "
                              f"{type(meta).__name__}); the file is corrupt or was not saved by bench")
    for key, kind in (("model", str), ("config", dict), ("train", dict)):
        if key in meta and not isinstance(meta[key], kind):
            raise CheckpointError(f"checkpoint {path}: '{key}' in its 'bench' metadata is a "
                                  f"{type(meta[key]).__name__}, not a {'string' if kind is str else 'JSON object'}; "
                                  "the file is corrupt")
    return meta


def _checksum(state: dict[str, Tensor], metadata: dict[str, str], path: Path) -> str:
    """"verified" when the file's checksum matches its tensors and metadata, "absent" when it has none."""
    saved = metadata.get(CHECKSUM_KEY)
    if saved is None:
        return "absent"
    if saved != tensors_digest(state, metadata.get("bench", "")):
        raise CheckpointError(f"checkpoint {path} is corrupt: its tensors or metadata no longer match the sha256 "
                              "saved with them; re-save it, or delete it if it is a cached one")
    return "verified"


def torch_load_weights_only(path: Path) -> Any:
    """``torch.load`` restricted to tensors and containers; anything else is refused, never executed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before refusing
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch says "... unsupported GLOBAL posix.system ..." or "Unsupported global: GLOBAL mod.Name ..."
        found = re.search(r"GLOBAL\s+([\w.]+)", str(e)) or re.search(r"[Uu]nsupported global:?\s+([\w.]+)", str(e))
        what = f"it references {found.group(1)}" if found else "it holds objects other than tensors and dicts"
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
            meta = _saved_meta(metadata.get("bench"), path)
            return Checkpoint(state, {"saved_meta": meta, "checksum": _checksum(state, metadata, path)})
        else:
            state = torch_load_weights_only(path)
            if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                      for k, v in state.items()):
                raise CheckpointError(f"{path} is not a state dict (tensors by name); for a released checkpoint name "
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
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; give checkpoint=PATH of an existing file")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; give checkpoint=PATH of a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file (a device, pipe or socket); give "
                              "checkpoint=PATH of a checkpoint file")
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
        if _kind(state[k].dtype) != _kind(v.dtype):  # load_state_dict would cast: int32 weights truncated, silently
            got, need = (str(d).removeprefix("torch.") for d in (state[k].dtype, v.dtype))
            raise CheckpointError(f"checkpoint {path} does not fit model '{model.name}': '{k}' holds {got} values, "
                                  f"the model needs {need}; save the weights in their own dtype")
    for k in expected:
        if state[k].is_floating_point() and not torch.isfinite(state[k]).all():
            raise CheckpointError(f"checkpoint {path} holds non-finite values in '{k}'; it is corrupt")


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "float" if dtype.is_floating_point else "complex" if dtype.is_complex else "integer"


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
    return _load_into(model, read_checkpoint(path, fmt))


def load_cached(model: BenchModel, path: Path) -> dict[str, Any]:
    """`load_checkpoint` for the cache: only a file whose checksum verifies is used (`CheckpointError` otherwise,
    and the caller retrains)."""
    ckpt = read_checkpoint(path, "bench")
    if ckpt.origin.get("checksum") != "verified":
        raise CheckpointError(f"checkpoint {path} has no checksum (an older bench wrote it), so it cannot be verified")
    return _load_into(model, ckpt)


def _load_into(model: BenchModel, ckpt: Checkpoint) -> dict[str, Any]:
    needed = get_format(ckpt.format).configure(type(model), model.config, model.data_info, ckpt)
    if needed != model.config:
        diff = {k: v for k, v in dataclasses.asdict(needed).items() if getattr(model.config, k) != v}
        raise CheckpointError(f"checkpoint {ckpt.path} needs model '{model.name}' built with {diff}")
    return apply_checkpoint(model, ckpt)


# the released formats live one per module; importing them registers them
import_submodules("bench.checkpoint_formats")

"""What every registered model shares: its config, its recipes per scale, how it trains and how it is
saved. Capabilities (Classifier, Energy, LogProb, Sampler) are *not* declared here: a model has a
capability by having the method (see `bench.capabilities`).
"""

from __future__ import annotations

import abc
import ast
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import math
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bench import console
from bench.data.base import Dataset, Split
from bench.errors import NonFiniteError, UserError
from bench.registry import Registry
from bench.scales import Scale


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about its data to be built."""

    shape: tuple[int, int, int]  # C, H, W
    n_classes: int
    #: horizontal flips keep the class (see `Dataset.hflip`): recipes that augment may flip
    hflip: bool = False
    #: images in the training split: the small recipes size their step budget by it (0: unknown)
    n_train: int = 0

    @classmethod
    def of(cls, data: Dataset) -> DataInfo:
        return cls(tuple(data.shape), data.n_classes, data.hflip, len(data.train))  # type: ignore[arg-type]


@dataclass
class TrainContext:
    """Everything a training recipe may use besides the data."""

    device: torch.device
    seed: int
    #: progress(description, total) -> update(n=1, **fields); a no-op outside the CLI
    progress: Callable[..., Any]
    #: stop after this many optimizer steps (a paper-scale smoke runs the exact recipe for a handful of
    #: steps); None: the recipe's full schedule. Every ``fit`` honours it.
    max_steps: int | None = None

    def generator(self, offset: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + offset)


#: test images per evaluation batch; also the unit of sharding under torchrun (digits' 360 test images split 4 ways)
EVAL_BATCH = 100


no_progress = console.no_progress  # a `TrainContext` progress that shows nothing (tests, library use)


class BenchModel(nn.Module, abc.ABC):
    """Base class for the registry's models.

    Subclasses define ``Config`` (a dataclass), ``family``, ``recipe(scale, data)`` and ``fit``; they may
    override ``sampler_protocol`` to put their sampler's settings into records.
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = ""
    Config: ClassVar[type]
    #: False where log p(x) is piecewise constant in x (discrete likelihoods on 8-bit bins): no grad_norm
    density_is_differentiable: ClassVar[bool] = True

    def __init__(self, config: Any, data: DataInfo):
        super().__init__()
        self.config = config
        self.data_info = data

    # --- recipes -------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def recipe(cls, scale: Scale, data: DataInfo) -> Any:
        """The config for ``scale`` on data of this shape."""

    @classmethod
    def configure(cls, scale: Scale, data: DataInfo, options: dict[str, Any] | None = None) -> Any:
        """The scale's recipe with user options (``opts.<field>=value``) applied and type-checked."""
        config = cls.recipe(scale, data)
        if not options:
            return config
        fields = {f.name: f for f in dataclasses.fields(config)}
        changes = {}
        for key, value in options.items():
            if key not in fields:
                raise UserError(f"unknown option '{key}' for model '{cls.name}'; "
                                f"valid options: {', '.join(sorted(fields))}")
            current = getattr(config, key)
            if isinstance(current, bool):
                ok = isinstance(value, bool)
            elif isinstance(current, float):
                ok = isinstance(value, int | float) and not isinstance(value, bool)
                value = float(value) if ok else value
            elif isinstance(current, int):
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif isinstance(current, tuple):
                ok = isinstance(value, list | tuple)
                value = tuple(value) if ok else value
            else:
                ok = current is None or isinstance(value, type(current))
            if not ok:
                raise UserError(f"option '{key}' of model '{cls.name}' must be {type(current).__name__}, got {value!r}")
            check_option_value(cls.name, key, value, current, _option_hints(type(config)).get(key))
            changes[key] = value
        return dataclasses.replace(config, **changes)

    # --- training ------------------------------------------------------------------------------
    @abc.abstractmethod
    def fit(self, train: Split, ctx: TrainContext) -> dict[str, Any]:
        """Train on ``train``; return training statistics (at least ``steps``). A model that trains in steps
        builds a `bench.models.training.TrainLoop` and plugs its step into it."""

    # --- records -------------------------------------------------------------------------------
    #: the model's reference (paper and released code) that the ``paper`` recipe follows
    reference: ClassVar[str] = ""

    def deviations(self, scale: Scale) -> list[str]:
        """Where this config departs from the reference's method, one short string each: the decisions a
        reader of a table must know. Recorded in ``model_config["deviations"]`` and shown as footnotes on
        the model's rows. The ``tiny`` and ``small`` recipes list what they cut to stay fast; ``paper`` lists
        what is kept different on purpose. Override to derive them from the config (an ``opts.`` change to
        a paper recipe is a deviation too)."""
        return []

    #: what ``smoke=N`` (a paper-scale smoke: the ``paper`` recipe for N optimizer steps) shrinks so that the
    #: recipe runs on a CPU: config field -> smoke value. A field the user set with ``opts.`` is kept. The
    #: runner records each change under the record's ``smoke`` (and its protocol).
    smoke_overrides: ClassVar[dict[str, Any]] = {}

    # --- optional hooks: the defaults say "nothing to add"; a model overrides what applies to it -------
    #: what to try when training diverges: the end of the shared loop's "training diverged" message
    #: (`bench.models.training.TrainLoop.check`)
    divergence_hint: ClassVar[str] = "lower lr"
    #: True: ``fit`` trains step by step through `bench.models.training.TrainLoop` (every model with a loss);
    #: False: a closed-form fit (counting, moments) with no loss to diverge
    trains_in_steps: ClassVar[bool] = True

    def sampler_protocol(self) -> dict[str, Any]:
        """Every sampler setting that changes a sample-based number."""
        return {}

    def log_prob_protocol(self) -> dict[str, Any]:
        """Every setting of ``log_prob`` that changes its value (e.g. the VAE's importance samples k)."""
        return {}

    def nfe_per_sample(self) -> int | None:
        """Network evaluations per sample (throughput reports it); None where it is not a fixed count."""
        return None

    @property
    def eval_noise(self) -> float:
        """σ of the Gaussian noise added to inputs at test time (JEM's eval noise); 0: a deterministic classifier."""
        return float(getattr(self.config, "eval_noise", 0.0) or 0.0)

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    @classmethod
    def code_version(cls) -> str:
        """sha256 over the source of every bench module this model's module imports, directly or through
        another (`bench_imports`): what decides its trained weights. It keys the checkpoint cache, so an edit
        to any of them retrains instead of reusing a stale checkpoint."""
        return code_hash(cls.__module__)


def code_hash(mod_name: str) -> str:
    """sha256 over the source of ``mod_name`` and every bench module it imports, transitively."""
    h = hashlib.sha256()
    for name in bench_imports(mod_name):
        h.update(name.encode() + b"\0" + _module_source(name) + b"\0")
    return h.hexdigest()[:16]


def _module_source(mod_name: str) -> bytes:
    spec = importlib.util.find_spec(mod_name)
    if spec is None or not spec.origin or not spec.has_location:
        return b""
    with open(spec.origin, "rb") as f:
        return f.read()


def _is_package(mod_name: str) -> bool:
    spec = importlib.util.find_spec(mod_name)
    return spec is not None and spec.submodule_search_locations is not None


def _direct_bench_imports(mod_name: str) -> set[str]:
    """The ``bench.*`` modules that ``mod_name``'s source imports anywhere (top level or inside functions)."""
    tree = ast.parse(_module_source(mod_name))
    package = mod_name if _is_package(mod_name) else mod_name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "bench")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "bench":
                continue
            found.add(base)
            if _is_package(base):  # from bench.samplers import sgld: the submodule
                found.update(f"{base}.{a.name}" for a in node.names
                             if importlib.util.find_spec(f"{base}.{a.name}") is not None)
    return found


@functools.cache
def bench_imports(mod_name: str) -> tuple[str, ...]:
    """``mod_name`` and every bench module it imports, transitively, sorted."""
    seen: set[str] = set()
    todo = [mod_name]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(_direct_bench_imports(m) - seen)
    return tuple(sorted(seen))


def recipe_differences(config: Any, paper: Any, reasons: dict[str, str] | None = None) -> list[str]:
    """One deviation string per field where ``config`` differs from the ``paper`` recipe,
    "epochs=25 (paper: 200): why", the reason from ``reasons`` where it has one. Covers the cuts of the
    tiny and small recipes and any ``opts.`` change to a paper recipe alike."""
    out = []
    for f in dataclasses.fields(config):
        have, want = getattr(config, f.name), getattr(paper, f.name)
        if have != want:
            why = (reasons or {}).get(f.name)
            out.append(f"{f.name}={have} (paper: {want})" + (f": {why}" if why else ""))
    return out

#: integer options that may be 0; every other integer option counts or sizes something and must be at least 1.
#: No integer option may be negative, no float option NaN or infinite.
ZERO_OK_OPTIONS = frozenset({"warmup_iters", "kl_warmup_steps", "cpu_threads", "eval_seed", "sample_steps",
                             "sn_refine_iterations", "n_exact_terms", "eval_exact_terms", "power_iters", "threshold",
                             "decay_epochs", "hidden_layers", "n_res_blocks", "res_blocks", "fc_blocks"})
POSITIVE_OPTIONS = frozenset({"epochs", "lr", "temperature", "sigma_begin", "sigma_end"})
UNIT_INTERVAL_OPTIONS = frozenset({"dropout", "reinit_freq", "beta1", "beta2", "ema", "momentum", "geometric_p"})


def _option_hints(config_cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(config_cls)
    except Exception:  # an annotation that does not resolve: types were already checked against the recipe
        return {}


def check_option_value(model: str, key: str, value: Any, current: Any, hint: Any = None) -> None:
    """Refuse an ``opts.`` value that type-checks but means nothing (``epochs=-1``, ``width=0``, ``lr=nan``,
    an unknown choice), before any work: it would otherwise train a broken model and record it as ok."""
    where = f"opts.{key}={value!r} for model '{model}'"
    if typing.get_origin(hint) is typing.Literal and value not in typing.get_args(hint):
        raise UserError(f"{where} is not a valid choice; valid choices: {', '.join(map(str, typing.get_args(hint)))}")
    if isinstance(current, tuple):
        elem = next((a for a in typing.get_args(hint) if a is not Ellipsis), None) or \
            (type(current[0]) if current else None)
        if elem in (int, float) and not all(isinstance(v, int | float) and not isinstance(v, bool)
                                            and (elem is float or isinstance(v, int)) for v in value):
            raise UserError(f"{where} must be a list of {elem.__name__}")
        for v in value:
            check_option_value(model, key, v, elem(0) if elem in (int, float) else v)
        return
    if isinstance(value, bool):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where} must be a finite number")
    if isinstance(value, int) and isinstance(current, int) and not isinstance(current, bool):
        low = 0 if key in ZERO_OK_OPTIONS else 1
        if value < low:
            raise UserError(f"{where} must be {'0 or more' if low == 0 else 'at least 1'}")
    if key in POSITIVE_OPTIONS and isinstance(value, int | float) and not value > 0:
        raise UserError(f"{where} must be greater than 0")
    if key in UNIT_INTERVAL_OPTIONS and isinstance(value, int | float) and not 0 <= value <= 1:
        raise UserError(f"{where} must be between 0 and 1")


MODELS: Registry[type[BenchModel]] = Registry("model", base=BenchModel, entry_point_group="bench.models")


def register(name: str):
    def deco(cls: type[BenchModel]) -> type[BenchModel]:
        cls.name = name
        MODELS.add(name, cls)
        return cls

    return deco


def to_uint8(x: Tensor, low: float = 0.0, high: float = 1.0, what: str = "samples") -> Tensor:
    """Map float images in [low, high] to uint8, refusing non-finite values instead of hiding them."""
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise NonFiniteError(f"{what} contain {bad} non-finite values (NaN/Inf): the sampler diverged")
    x = (x.clamp(low, high) - low) / (high - low)
    return torch.round(x * 255.0).to(torch.uint8)


def planned_steps(epochs: int | float, per_epoch: int, max_steps: int | None) -> int:
    """Optimizer steps of ``epochs`` passes (fractional ones too, see `bench.scales.epochs_within`) of
    ``per_epoch`` steps, capped by a smoke's ``max_steps``; at least one."""
    total = max(1, round(epochs * per_epoch))
    return total if max_steps is None else min(total, max_steps)


def passes(steps: int, per_epoch: int) -> int | float:
    """The epochs that ``steps`` steps of ``per_epoch`` make, for the record: whole ones as an int."""
    e = steps / max(1, per_epoch)
    return int(e) if e.is_integer() else round(e, 4)


def batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield start, min(start + batch_size, n)


def as_float01(x: Tensor) -> Tensor:
    return x.float() / 255.0


@contextmanager
def cpu_threads(device: torch.device, n: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``n`` on a CPU (n = 0: left alone), restored afterwards."""
    if device.type != "cpu" or n <= 0:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

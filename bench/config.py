"""The typed configuration of `bench run`, composed by Hydra from ``key=value`` overrides.

Two conveniences on top of Hydra's grammar: ``data=NAME`` means ``data.name=NAME`` (so ``data=mnist``
and ``data.root=DIR`` both work), and ``opts.FIELD=V`` sets a model option (Hydra's ``+opts.FIELD=V``).
Unknown keys and bad values become one-line `UserError`s naming the valid choices.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra import compose, initialize
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import MISSING, OmegaConf  # noqa: F401
from omegaconf.errors import OmegaConfBaseException

from bench.errors import UserError
from bench.scales import SCALES


@dataclass
class DataConfig:
    name: str = ""  # empty: the suite's default data
    root: str | None = None
    #: imagefolder:/npz: data only: a horizontal mirror keeps every class, so recipes that augment may flip
    #: (named datasets know: CIFAR yes, digits, MNIST and SVHN no)
    hflip: bool | None = None


@dataclass
class MetricsConfig:
    extractor: str = "auto"  # auto | inception | domain (bench.features.select)
    inception_weights: str | None = None


@dataclass
class RunConfig:
    suite: str = "hybrid"
    model: str | None = None
    models: list[str] | None = None
    data: DataConfig = field(default_factory=DataConfig)
    scale: str = "small"
    seed: int = 0
    device: str = "auto"
    out: str = "results"
    checkpoint: str | None = None
    checkpoint_format: str = "bench"
    retrain: bool = False
    opts: dict[str, Any] = field(default_factory=dict)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # suite settings; None means the suite YAML's default
    ood_sets: list[str] | None = None
    ood_scores: list[str] | None = None
    eps: list[float] | None = None
    norms: list[str] | None = None
    ece_bins: int | None = None
    # sampling size and speed options (all recorded in the protocol)
    n_samples: int | None = None  # None: the suite's count for the scale
    precision: str = "fp32"  # fp32 | bf16 (autocast for sampling and feature extraction)
    channels_last: bool = False  # channels_last memory format for the model and the feature extractor
    compile: bool = False  # torch.compile the model's modules (the SGLD step's network)
    #: a paper-scale smoke: the paper recipe for this many optimizer steps, CPU cuts recorded (bench.smoke)
    smoke: int | None = None
    #: start a run estimated above 30 min on a CPU without asking (bench.estimate); required without a terminal
    yes: bool = False
    #: CPU threads per model: auto (the cores other processes leave free), all, or a count (bench.threads)
    threads: str | None = None
    #: models at a time on a CPU, each in its own process: auto (one a core, one thread each, whatever the
    #: load) or a count (bench.jobs)
    jobs: str | None = None


_STORE_NAME = "bench_run"
ConfigStore.instance().store(name=_STORE_NAME, node=RunConfig)


def _valid_keys() -> list[str]:
    keys = []
    for f in dataclasses.fields(RunConfig):
        if f.name == "data":
            keys += ["data", "data.name", "data.root", "data.hflip"]
        elif f.name == "metrics":
            keys += [f"metrics.{g.name}" for g in dataclasses.fields(MetricsConfig)]
        elif f.name == "opts":
            keys.append("opts.<option>")
        else:
            keys.append(f.name)
    return keys


def _rewrite(override: str) -> str:
    key, sep, value = override.partition("=")
    if not sep:
        raise UserError(f"override '{override}' must look like key=value; valid keys: {', '.join(_valid_keys())}")
    bare = key.lstrip("+~")
    if bare == "launcher" or bare.startswith(("launcher.", "hydra.", "hydra/")):
        raise UserError(f"'{bare}' configures a sweep's launcher (Hydra); add -m: bench run -m {override} ...")
    if bare == "data":
        return f"data.name={value}"
    if bare.startswith("opts."):
        return f"+{bare}={value}"
    top = bare.split(".")[0]
    names = {f.name for f in dataclasses.fields(RunConfig)}
    if top not in names or (top not in ("data", "metrics", "opts") and "." in bare):
        raise UserError(f"unknown key '{bare}'; valid keys: {', '.join(_valid_keys())}")
    return override


def load_config(overrides: list[str]) -> RunConfig:
    rewritten = [_rewrite(o) for o in overrides]
    try:
        with initialize(version_base=None, config_path=None):
            cfg = compose(config_name=_STORE_NAME, overrides=rewritten)
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "Ambiguous value" in msg or "requires --multirun" in msg:
            hint = "a list is key=[a,b]; to sweep over a,b use bench run -m ..."
            raise UserError(f"bad override ({msg}): {hint}") from None
        raise UserError(f"bad override ({msg}); valid keys: {', '.join(_valid_keys())}") from None
    return run_config_from(cfg)


def run_config_from(cfg: Any) -> RunConfig:
    """The typed `RunConfig` of a composed config (``load_config``, or a job of a ``bench run -m`` sweep)."""
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, RunConfig)
    if obj.scale not in SCALES:
        raise UserError(f"unknown scale '{obj.scale}'; valid choices: {', '.join(SCALES)}")
    if obj.precision not in ("fp32", "bf16"):
        raise UserError(f"unknown precision '{obj.precision}'; valid choices: fp32, bf16")
    if obj.n_samples is not None and obj.n_samples < 10:
        raise UserError(f"n_samples={obj.n_samples} is too few; IS and FID need at least 10 (e.g. n_samples=2000)")
    if obj.smoke is not None and (isinstance(obj.smoke, bool) or obj.smoke < 1):
        raise UserError(f"smoke={obj.smoke} must be a number of training steps >= 1 (e.g. smoke=2)")
    if obj.smoke is not None and obj.scale != "paper":
        raise UserError(f"smoke= runs the paper recipe for a few steps; add scale=paper (got scale={obj.scale})")
    if obj.model is not None:
        obj.model = str(obj.model)
    if obj.models is not None:
        obj.models = [str(m) for m in obj.models]
    if obj.data.name and not isinstance(obj.data.name, str):
        obj.data.name = str(obj.data.name)
    check_values(obj)
    return obj


MAX_SEED = 2**32 - 1  # numpy's and most libraries' seed range; the seed streams add offsets to it


def check_values(c: RunConfig) -> None:
    """Values that compose but mean nothing, refused before any work (issue 14)."""
    if not 0 <= c.seed <= MAX_SEED:
        raise UserError(f"seed={c.seed} is out of range; give an integer from 0 to {MAX_SEED}")
    if not str(c.out).strip():
        raise UserError("out= is empty; give the directory for the records, e.g. out=results")
    if c.model is not None and not c.model.strip():
        raise UserError("model= is empty; give a model (bench list models), or leave it unset for the suite's models")
    if c.models is not None:
        if not c.models:
            raise UserError("models=[] names no model; give models=[A,B], or leave it unset for the suite's models")
        twice = next((m for i, m in enumerate(c.models) if m in c.models[:i]), None)
        if twice is not None:
            raise UserError(f"models= lists '{twice}' twice; list each model once")

"""`bench run -m`: sweeps with Hydra's multirun, on Hydra's launchers (joblib, submitit local and Slurm).

    bench run -m models=jem,wrn seed=0,1,2                 # 6 jobs, one after another in this process
    bench run -m launcher=joblib models=jem,wrn seed=0,1   # 4 jobs in parallel local processes
    bench run -m launcher=submitit_slurm launcher.partition=gpu models=jem,wrn seed=0,1,2 scale=paper

Hydra does the sweeping: its BasicSweeper expands the overrides into jobs, the launcher plugin runs them
and every job composes its own `RunConfig` and calls `bench.runner.run`, which writes that job's records
into the shared ``out`` dir. Before anything is launched, every job's config is composed and planned
(names, data, options, checkpoint) in this process, so a bad override anywhere in the sweep is still one
line and exit 2 with nothing written. Hydra's own per-job outputs (``.hydra/*.yaml``, the job's log,
submitit's pickles) go to ``<out>/.multirun/<sweep id>/<job number>/``; the record readers skip hidden
directories.

Beyond `bench.config`'s conveniences: ``models=a,b`` (no brackets) sweeps over single models (it is
``model=a,b``), while ``models=[a,b]`` stays one job with two models; ``launcher=NAME`` selects bench's
launcher config ``hydra/launcher=bench_NAME`` (``bench/conf/hydra/launcher/``) and ``launcher.KEY=V`` is
``hydra.launcher.KEY=V``. Hydra's own spelling (``hydra/launcher=joblib``, ``hydra.sweep.dir=...``) works
too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import BenchError, UnknownNameError, UserError

log = logging.getLogger(__name__)

CONFIG_MODULE = "bench.conf"  # holds hydra/launcher/bench_*.yaml


@dataclass(frozen=True)
class Launcher:
    config: str  # the hydra/launcher config
    plugin: str | None  # the module Hydra discovers the plugin by
    package: str | None  # what to pip install when it is missing
    remote: bool = False  # jobs run elsewhere: this machine's devices say nothing about theirs


_JOBLIB = ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher")
_SUBMITIT = ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher")

#: ``launcher=NAME`` → bench's config for it
LAUNCHERS: dict[str, Launcher] = {
    "basic": Launcher("basic", None, None),  # Hydra's default: the jobs one after another, in this process
    "joblib": Launcher("bench_joblib", *_JOBLIB),
    "submitit_local": Launcher("bench_submitit_local", *_SUBMITIT),
    "submitit_slurm": Launcher("bench_submitit_slurm", *_SUBMITIT, remote=True),
}
#: ``hydra/launcher=NAME`` (the plugins' own configs, and bench's) → the launcher it needs
_BY_CONFIG: dict[str, Launcher] = {
    **{lc.config: lc for lc in LAUNCHERS.values()},
    "joblib": Launcher("joblib", *_JOBLIB),
    "submitit_local": Launcher("submitit_local", *_SUBMITIT),
    "submitit_slurm": Launcher("submitit_slurm", *_SUBMITIT, remote=True),
}


class SweepFailure(BenchError):
    """The launcher failed (a worker died, a submission was refused): the jobs' fate is unknown."""

    exit_code = 1


@dataclass
class SweepArgs:
    """The command line of a sweep, split: `RunConfig` overrides (rewritten), Hydra's, and the launcher."""

    bench: list[str] = field(default_factory=list)
    hydra: list[str] = field(default_factory=list)
    launcher: str = "basic"  # a hydra/launcher config name

    @property
    def hydra_keys(self) -> set[str]:
        return {o.partition("=")[0].lstrip("+~") for o in self.hydra}


@dataclass
class JobResult:
    """What one job sends back to the sweep's process (pickled by joblib and submitit)."""

    records: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    error: str | None = None


# --- the command line ---------------------------------------------------------------------------------
def translate(overrides: list[str]) -> SweepArgs:
    from bench.config import _rewrite

    args = SweepArgs()
    for o in overrides:
        key, sep, value = o.partition("=")
        bare = key.lstrip("+~")
        prefix = key[: len(key) - len(bare)]
        if not sep:
            _rewrite(o)  # raises the usual one-line error
        if bare == "launcher":
            if value not in LAUNCHERS:
                raise UnknownNameError("launcher", value, LAUNCHERS)
            args.launcher = LAUNCHERS[value].config
        elif bare.startswith("launcher."):
            args.hydra.append(f"{prefix}hydra.{bare}={value}")
        elif bare == "hydra/launcher":
            args.launcher = value
        elif bare == "hydra" or bare.startswith(("hydra.", "hydra/")):
            args.hydra.append(o)
        elif bare == "models" and "[" not in value:
            # a sweep over single models; models=[a,b] stays one job that runs both
            args.bench.append(_rewrite(f"{prefix}model={value}"))
        else:
            args.bench.append(_rewrite(o))
    return args


def check_launcher_installed(config: str) -> Launcher | None:
    launcher = _BY_CONFIG.get(config)
    if launcher is not None and launcher.plugin is not None and importlib.util.find_spec(launcher.plugin) is None:
        name = next((k for k, v in LAUNCHERS.items() if v.config == config), config)
        raise UserError(f"launcher '{name}' needs the Hydra plugin {launcher.package}, which is not installed: "
                        f"pip install {launcher.package} (or bench's extra: pip install -e '.[sweep]')")
    return launcher


def expand(bench_overrides: list[str]) -> list[list[str]]:
    """The jobs of the sweep, each as its list of overrides, expanded by Hydra's own BasicSweeper."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(bench_overrides)
        (jobs,) = BasicSweeper.split_arguments(parsed, None)
    except HydraException as e:
        raise UserError(f"bad override ({_first_line(e)})") from None
    return jobs


def compose(jobs: list[list[str]]) -> list[Any]:
    """Every job's `RunConfig`, or the first job's mistake as one line."""
    from bench.config import load_config

    configs = []
    for job in jobs:
        try:
            configs.append(load_config(job))
        except UserError as e:
            raise UserError(f"sweep job '{' '.join(job)}': {e}") from None
    outs = sorted({c.out for c in configs})
    if len(outs) > 1:
        raise UserError(f"out= cannot be swept ({', '.join(outs)}): every job of a sweep writes its records "
                        "into one out dir")
    return configs


def validate(jobs: list[list[str]], configs: list[Any], remote: bool) -> None:
    """Plan every job (names, data, options, checkpoint, out) before any starts, as `bench run` does.

    Seeds change no name, file or option, so one job per config that differs otherwise is planned."""
    from bench.runner import plan

    planned: set[str] = set()
    for job, cfg in zip(jobs, configs):
        key = repr(dataclasses.replace(cfg, seed=0))
        if key in planned:
            continue
        planned.add(key)
        if remote and cfg.device in ("auto", "cuda"):
            cfg = dataclasses.replace(cfg, device="cpu")  # the nodes have the GPUs, not this machine
        try:
            plan(cfg)
        except UserError as e:
            raise UserError(f"sweep job '{' '.join(job)}': {e}") from None


def _first_line(e: BaseException) -> str:
    """The gist of an exception on one line: its first line, and Hydra's 'Key ... not in ...' detail."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    cause = [ln.strip() for ln in str(e.__cause__ or "").splitlines()]
    detail = next((ln for ln in lines[1:] + cause if ln.startswith("Key '")), None)
    return f"{lines[0]} {detail}" if detail else lines[0]


def _quote(value: str) -> str:
    """A Hydra override value that any path survives (spaces, commas, '=')."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def hydra_overrides(args: SweepArgs, sweep_dir: Path) -> list[str]:
    """Hydra's settings for the sweep; the user's own ``hydra.`` overrides win."""
    given = args.hydra_keys
    defaults = {
        "hydra.sweep.dir": _quote(str(sweep_dir)),
        # stdout is for the result table; Hydra's log lines (and the jobs' log records) go to stderr
        "hydra.hydra_logging.handlers.console.stream": "ext://sys.stderr",
        "hydra.job_logging.handlers.console.stream": "ext://sys.stderr",
    }
    out = [f"hydra/launcher={args.launcher}", "hydra.mode=MULTIRUN"]
    out += [f"{k}={v}" for k, v in defaults.items() if k not in given]
    if args.launcher in ("joblib", LAUNCHERS["joblib"].config):
        # parallel jobs on one terminal: one progress bar per job would garble it
        out.append("++hydra.job.env_set.BENCH_QUIET='1'")
    return out + args.hydra


# --- the jobs -----------------------------------------------------------------------------------------
def job(cfg: Any) -> JobResult:
    """Hydra's task function: one job of the sweep. Never raises, so one failed job doesn't hide the others'
    results (Hydra's sweeper would re-raise the first failure and drop the rest); the error goes into the
    job's log and back to the sweep's process."""
    from bench.config import run_config_from
    from bench.runner import run

    try:
        outcome = run(run_config_from(cfg))
    except Exception as e:
        log.error("job failed", exc_info=True)
        message = str(e) if isinstance(e, BenchError) else f"{type(e).__name__}: {_first_line(e)}"
        return JobResult(error=message)
    return JobResult(records=[(r, str(p)) for r, p in outcome.records])


# --- the sweep ----------------------------------------------------------------------------------------
def run_sweep(overrides: list[str]) -> int:
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from bench.records import new_run_id

    args = translate(overrides)
    launcher = check_launcher_installed(args.launcher)
    jobs = expand(args.bench)
    configs = compose(jobs)
    out = Path(configs[0].out).expanduser()
    existed = out.exists()
    sweep_dir = out.resolve() / ".multirun" / new_run_id()
    try:
        validate(jobs, configs, remote=launcher is not None and launcher.remote)
        with initialize_config_module(CONFIG_MODULE, job_name="bench", version_base=None):
            hydra = GlobalHydra.instance().hydra
            assert hydra is not None
            batches = hydra.multirun(config_name="bench_run", task_function=job,
                                     overrides=args.bench + hydra_overrides(args, sweep_dir))
    except (HydraException, OmegaConfBaseException) as e:
        # the composition of Hydra's config and the launcher's: found before any job starts
        _remove_if_empty(out, existed)
        raise UserError(f"bad sweep override ({_first_line(e)})") from None
    except UserError:
        _remove_if_empty(out, existed)
        raise
    except Exception as e:
        raise SweepFailure(f"the launcher failed ({type(e).__name__}: {_first_line(e)}); records of finished "
                           f"jobs are in {out}, Hydra's and the launcher's logs in {sweep_dir}") from None
    return report([r for batch in batches for r in batch], sweep_dir)


def _remove_if_empty(out: Path, existed: bool) -> None:
    """A refused sweep leaves nothing behind, not even the out dir that planning checked."""
    if not existed and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def report(returns: list, sweep_dir: Path) -> int:
    import sys

    from hydra.core.utils import JobStatus

    from bench import console

    records: list[tuple[dict, str]] = []
    failures: list[str] = []
    for i, ret in enumerate(returns):
        result = ret._return_value
        if ret.status == JobStatus.COMPLETED and isinstance(result, JobResult) and result.error is None:
            records += result.records
            continue
        message = result.error if isinstance(result, JobResult) else f"{type(result).__name__}: {result}"
        where = Path(ret.hydra_cfg.hydra.runtime.output_dir) if ret.hydra_cfg is not None else sweep_dir
        failures.append(f"sweep job #{i} ({' '.join(ret.overrides or [])}) failed: {message}; "
                        f"log: {where / 'bench.log'}")
    print_sweep_table([r for r, _ in records])
    for _, path in records:
        console.info(f"[dim]record: {path}[/dim]")
    if returns and returns[0].hydra_cfg is not None:  # the user may have chosen it: hydra.sweep.dir=DIR
        sweep_dir = Path(str(returns[0].hydra_cfg.hydra.sweep.dir))
    console.info(f"[dim]sweep: {len(returns)} jobs; Hydra's per-job configs and logs: {sweep_dir}[/dim]")
    for line in failures:
        sys.stderr.write(f"bench: error: {line}\n")
    failed_records = [r for r, _ in records if r.get("status") == "failed"]
    return 1 if failures or failed_records else 0


def print_sweep_table(records: list[dict]) -> None:
    """One row per job's record, with its seed (`bench table OUT` aggregates the seeds)."""
    from bench.tables import print_terminal_tables, terminal_tables

    if not records:
        return
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["suite"], r["data"], r["scale"]), []).append(r)
    for (suite, data, scale), group in groups.items():
        title = f"sweep · {suite} · data={data} · scale={scale}"
        print_terminal_tables(terminal_tables(group), title, drop=("suite", "data", "scale"))

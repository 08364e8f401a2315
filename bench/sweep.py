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
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.errors import BenchError, UnknownNameError, UserError
from bench.results.record import Record

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

    records: list[tuple[Record, str]] = field(default_factory=list)
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
    from bench.plan import plan

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
        return _with_status(JobResult(error=message))
    lost = "; ".join(outcome.unwritten) or None  # a record or figure that could not be written
    return _with_status(JobResult(records=[(r, str(p)) for r, p in outcome.records], error=lost))


STATUS_FILE = "bench_job.json"  # in the job's Hydra dir: what became of it, should the launcher fail after it


def _with_status(result: JobResult) -> JobResult:
    from hydra.core.hydra_config import HydraConfig

    from bench.fileio import atomic_write_text

    try:
        final = Path(HydraConfig.get().runtime.output_dir) / STATUS_FILE
        atomic_write_text(final, json.dumps({"records": [p for _, p in result.records], "error": result.error}))
    except (OSError, ValueError, UserError):  # only for a failed launcher's report; the result goes back regardless
        log.warning("could not write %s", STATUS_FILE, exc_info=True)
    return result


# --- the sweep ----------------------------------------------------------------------------------------
def run_sweep(overrides: list[str]) -> int:
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.types import RunMode
    from omegaconf.errors import OmegaConfBaseException

    from bench.results.records import new_run_id

    args = translate(overrides)
    launcher = check_launcher_installed(args.launcher)
    jobs = expand(args.bench)
    configs = compose(jobs)
    out = Path(configs[0].out).expanduser()
    existed = out.exists()
    sweep_dir = out.resolve() / ".multirun" / new_run_id()
    launched = False
    try:
        validate(jobs, configs, remote=launcher is not None and launcher.remote)
        with initialize_config_module(CONFIG_MODULE, job_name="bench", version_base=None):
            hydra = GlobalHydra.instance().hydra
            assert hydra is not None
            all_overrides = args.bench + hydra_overrides(args, sweep_dir)
            composed = hydra.compose_config("bench_run", all_overrides, run_mode=RunMode.MULTIRUN,
                                            with_log_configuration=False)
            check_launcher_settings(composed.hydra.launcher)
            sweep_dir = Path(str(composed.hydra.sweep.dir))  # the user may have chosen it: hydra.sweep.dir=DIR
            launched = True
            batches = hydra.multirun(config_name="bench_run", task_function=job, overrides=all_overrides)
    except (HydraException, OmegaConfBaseException) as e:
        if launched:
            return launcher_failed(e, jobs, sweep_dir, out)
        # the composition of Hydra's config and the launcher's: found before any job starts
        _remove_if_empty(out, existed)
        raise UserError(f"bad sweep override ({_first_line(e)})") from None
    except UserError:
        if not launched:
            _remove_if_empty(out, existed)
        raise
    except Exception as e:
        return launcher_failed(e, jobs, sweep_dir, out)
    return report([r for batch in batches for r in batch], sweep_dir)


#: launcher settings that must be at least this (a launcher would take 0 or -1, then run nothing or kill every job)
LAUNCHER_MINIMUM = {"n_jobs": None, "timeout_min": 1, "cpus_per_task": 1, "gpus_per_node": 0, "tasks_per_node": 1,
                    "nodes": 1, "mem_gb": 1, "array_parallelism": 1, "cpus_per_gpu": 1, "gpus_per_task": 0,
                    "signal_delay_s": 0, "max_num_timeout": 0}


def check_launcher_settings(launcher: Any) -> None:
    """Numbers a launcher accepts but that mean nothing, refused before any job starts (one line, exit 2)."""
    for key, low in LAUNCHER_MINIMUM.items():
        value = launcher.get(key) if hasattr(launcher, "get") else None
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if key == "n_jobs" and value == 0:
            raise UserError("launcher.n_jobs=0 runs no job; give the number of parallel jobs (or -1: one per core)")
        if low is not None and value < low:
            raise UserError(f"launcher.{key}={value} must be at least {low}")


def launcher_failed(error: BaseException, jobs: list[list[str]], sweep_dir: Path, out: Path) -> int:
    """The launcher raised (a worker lost, a job killed, a submission refused): say, one line each, what became
    of every job, naming only files that exist. Exit code 1."""
    import sys

    fates = [job_fate(i, job, sweep_dir) for i, job in enumerate(jobs)]
    finished = sum(done for done, _ in fates)
    where = [f"records of finished jobs in {out}" if any(out.glob("*.json")) else "",
             f"Hydra's and the launcher's logs in {sweep_dir}" if sweep_dir.is_dir() else ""]
    head = f"the launcher failed ({type(error).__name__}: {_first_line(error)}) after {finished} of {len(jobs)} " \
           f"jobs finished" + "".join(f"; {w}" for w in where if w)
    sys.stderr.write(f"bench: error: {head}\n")
    for _, line in fates:
        sys.stderr.write(f"bench: {line}\n")
    return SweepFailure.exit_code


def job_fate(i: int, overrides: list[str], sweep_dir: Path) -> tuple[bool, str]:
    """(finished, one line) for job ``i``, from what it left in its Hydra dir."""
    name = f"sweep job #{i} ({' '.join(overrides)})"
    job_dir = sweep_dir / str(i)
    log_file = job_dir / "bench.log"
    where = f"log: {log_file}" if log_file.is_file() else f"its dir: {job_dir}"
    try:
        status = json.loads((job_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        if job_dir.is_dir():
            return False, f"{name} started but did not finish (killed, out of memory or out of time?); {where}"
        return False, f"{name} never started"
    records = [p for p in status.get("records", []) if Path(p).is_file()]
    if status.get("error"):
        return False, f"{name} failed: {status['error']}; {where}"
    return True, f"{name} finished: {len(records)} record(s){': ' + ', '.join(records) if records else ''}"


def _remove_if_empty(out: Path, existed: bool) -> None:
    """A refused sweep leaves nothing behind, not even the out dir that planning checked."""
    if not existed and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def report(returns: list, sweep_dir: Path) -> int:
    import sys

    from hydra.core.utils import JobStatus

    from bench import console

    records: list[tuple[Record, str]] = []
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
    failed_records = [r for r, _ in records if not r.ok]
    return 1 if failures or failed_records else 0


def print_sweep_table(records: list[Record]) -> None:
    """One row per job's record, with its seed (`bench table OUT` aggregates the seeds)."""
    from bench.results.tables import print_terminal_tables, terminal_tables

    if not records:
        return
    groups: dict[tuple, list[Record]] = {}
    for r in records:
        groups.setdefault((r.suite, r.data, r.scale), []).append(r)
    for (suite, data, scale), group in groups.items():
        title = f"sweep · {suite} · data={data} · scale={scale}"
        print_terminal_tables(terminal_tables(group), title, drop=("suite", "data", "scale"))

"""The plan before any training: per model, its training iterations and the time they will take here.

Each estimate is either

* **recorded**: an earlier training of the same model, config, data, device and thread count on this
  machine took this long (kept in the cache under ``rates/``; evaluation seconds of the same suite too), or
* **calibrated**: the model's own ``fit`` runs until a few optimizer steps have been timed, and stops. The
  fits report each step through ``TrainContext.progress``, whose ``total`` is the planned step count, so
  setup + the first step + (total - 1) × the median time of the steps after it is the estimate. The model
  and its optimizer are thrown away; the real run starts from its seed as if nothing had happened.

A suite's evaluation time is recorded per model and data. On data where it was not measured yet, it is
**scaled** from the same model, suite, scale, device and thread count on other data measured here: that
evaluation's seconds × the ratio of the two trainings' seconds per optimizer step (evaluation runs the same
network on the same kind of batches, so it costs what a step costs, times a count that the suite fixes).
What the suite's count depends on, such as the test split's size, is not scaled, so this is a rough figure
and is labelled as one; with no measurement on any data the plan says evaluation is not yet measured.

A run estimated above `CONFIRM_ABOVE_S` on a CPU asks before it starts: on a terminal a y/N prompt, and
without one it stops (exit 2) unless ``yes=true`` is given. Either way the message says what is faster.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from bench import checkpoints, console, threads
from bench.cache import cache_dir
from bench.capabilities import class_capabilities
from bench.errors import UserError
from bench.features import domain, select
from bench.fileio import atomic_write_text
from bench.models import MODELS
from bench.models.base import DataInfo, TrainContext

CONFIRM_ABOVE_S = 30 * 60.0
CALIBRATION_STEPS = 3  # timed steps after the first
CALIBRATION_SAMPLES = 10  # images a calibration draws from its barely trained model to time the sampler
RATES_VERSION = 1


@dataclass
class Estimate:
    model: str
    steps: int | None  # planned optimizer steps; None: nothing to train (cached, a checkpoint)
    train_s: float  # 0 when nothing trains
    how: str  # "cached" | "checkpoint" | "recorded" | "calibrated" | "no training loop"
    eval_s: float | None = None  # evaluation seconds of this suite, when known
    eval_how: str = "recorded"  # or "scaled from DATA": measured on other data, scaled by the step time;
    # or "calibrated sampling": the suite's samples timed on a few from the calibration's model

    @property
    def total_s(self) -> float:
        return self.train_s + (self.eval_s or 0.0)


class _Calibrated(BaseException):
    """Stops a calibration fit (a BaseException, so no model's own ``except Exception`` swallows it)."""


def rate_key(p, name: str, n_threads: int | None = None) -> str:
    """The cache key of the model's checkpoint at seed 0, with the device and thread count: what the time
    of a training depends on (the seed does not)."""
    key = checkpoints.cache_key(MODELS.get(name), p.configs[name], p.data, p.scale, 0)
    return f"{name}-{key}-{p.device.type}-{_threads(p, n_threads)}"


def _threads(p, n_threads: int | None) -> int:
    """The thread count a rate is measured at: the model's on a CPU (``n_threads``, else the current), 0 on a GPU."""
    return (n_threads or torch.get_num_threads()) if p.device.type == "cpu" else 0


def rate_fields(p, name: str, n_threads: int | None = None) -> dict[str, Any]:
    """What a recorded rate was measured on, beside its key: lets an evaluation measured on one data set be
    scaled to another (`scaled_eval`)."""
    return {"model": name, "data": p.data.name, "scale": p.scale.value, "device": p.device.type,
            "threads": _threads(p, n_threads)}


def record_rate(p, name: str, n_threads: int | None = None, **fields: Any) -> None:
    """Record ``fields`` (``train_s``/``steps``, or ``eval_s.<suite>``) of model ``name`` in this plan."""
    write_rate(rate_key(p, name, n_threads), **rate_fields(p, name, n_threads), **fields)


def _per_step(rate: dict[str, Any]) -> float | None:
    """Seconds per training step of a recorded rate; a fit that reports no steps is one step, its whole time."""
    steps, train_s = rate.get("steps"), rate.get("train_s")
    return train_s / (steps or 1) if train_s else None


def scaled_eval(p, name: str, per_step: float | None) -> tuple[float, str] | None:
    """(seconds, the data it was measured on): this suite's evaluation of ``name`` measured here on other
    data, times the ratio of this plan's seconds per training step (``per_step``) to that run's. Of several
    such runs, the one whose step time is nearest this plan's (the most alike workload, the least scaled).
    A fit that reports no steps counts as one step, its whole time. None when there is none."""
    if not per_step:
        return None
    me, suite = rate_fields(p, name), f"eval_s.{p.suite.name}"
    found = []
    for path in cache_dir("rates").glob(f"{name}-*.json"):
        got = read_rate(path.stem)
        ref = _per_step(got)
        if (suite not in got or not ref or got.get("data") == me["data"] or not isinstance(got.get("data"), str)
                or any(got.get(k) != me[k] for k in ("model", "scale", "device", "threads"))):
            continue
        seconds = got[suite] * per_step / ref
        if math.isfinite(seconds):  # a hostile file's tiny step time must not make an infinite estimate
            found.append((abs(math.log(per_step / ref)), path.stem, seconds, got["data"]))
    if not found:
        return None
    _, _, seconds, data = min(found)
    return seconds, data


def _rate_path(key: str):
    return cache_dir("rates") / f"{key}.json"


def _seconds(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def read_rate(key: str) -> dict[str, Any]:
    """The recorded rate, or {} when there is none or the file is not one this version wrote (unreadable,
    not JSON, or a value of the wrong type: an estimate is never worth failing a run for)."""
    try:
        got = json.loads(_rate_path(key).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(got, dict) or got.get("version") != RATES_VERSION:
        return {}
    steps = got.get("steps")
    fine = (all(_seconds(v) for k, v in got.items() if k == "train_s" or k.startswith("eval_s."))
            and (steps is None or (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0)))
    return got if fine else {}


def write_rate(key: str, **fields: Any) -> None:
    """Merge ``fields`` (``train_s``/``steps``, or ``eval_s.<suite>``) into the recorded rate; best effort:
    an estimate is never worth failing a run for."""
    got = read_rate(key) or {"version": RATES_VERSION}
    got.update(fields)
    try:
        atomic_write_text(_rate_path(key), json.dumps(got, sort_keys=True))
    except (UserError, OSError):
        pass


def calibrate(p, name: str) -> tuple[int | None, float, float | None]:
    """(planned steps, estimated training seconds, estimated sampling seconds) from a fit stopped after
    ``1 + CALIBRATION_STEPS`` steps. The sampling seconds (None when the suite draws no samples or the model
    cannot draw them yet) time `CALIBRATION_SAMPLES` images from that barely trained model, scaled to the
    suite's count: a sampler's cost is its number of network passes, not what the weights are, and on a CPU
    it can be most of a model's time (ncsn's annealed Langevin chains), which a cold plan must know to put
    the model early."""
    cls = MODELS.get(name)
    seen: dict[str, Any] = {"total": None, "times": []}

    @contextmanager
    def progress(description: str, total: int):
        if seen["total"] is None:
            seen["total"] = int(total)

        def update(n: int = 1, **fields):
            seen["times"].append(time.perf_counter())
            if len(seen["times"]) > CALIBRATION_STEPS:
                raise _Calibrated

        yield update

    fork = torch.random.fork_rng(devices=[])  # the real run's global RNG state is left as it was
    with fork:
        torch.manual_seed(p.cfg.seed)
        model = cls(p.configs[name], DataInfo.of(p.data))
        ctx = TrainContext(device=p.device, seed=p.cfg.seed, progress=progress)
        t0 = time.perf_counter()
        try:
            model.fit(p.data.train, ctx)
        except _Calibrated:
            pass
        elapsed = time.perf_counter() - t0
        sampling = _sampling_seconds(p, model)
    times, total = seen["times"], seen["total"]
    if not times or not total:  # no loop to time: the fit ran whole
        return None, elapsed, sampling
    first = times[0] - t0
    per_step = statistics.median(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else first
    return total, first + max(total - 1, 0) * per_step, sampling


def _sampling_seconds(p, model) -> float | None:
    """The suite's samples' seconds, from `CALIBRATION_SAMPLES` drawn as the evaluation draws them (gradients
    on, the run's precision); None when the suite draws none, the model is no sampler, or the draw fails (the
    run itself will say why)."""
    if not p.suite.n_samples or "Sampler" not in class_capabilities(type(model)):
        return None
    n = p.n_samples or p.suite.n_samples[p.scale.value]
    k = min(CALIBRATION_SAMPLES, n)
    try:
        model.to(p.device).eval()
        t0 = time.perf_counter()
        with torch.enable_grad(), torch.autocast(p.device.type, dtype=torch.bfloat16,
                                                 enabled=p.cfg.precision == "bf16"):
            model.sample(k, torch.Generator().manual_seed(p.cfg.seed))
        return (time.perf_counter() - t0) * n / k
    except Exception:  # noqa: BLE001 - an estimate is never worth failing a run for
        return None


def trains(p, name: str) -> bool:
    """Whether this run trains the model (no checkpoint given, none cached, or ``retrain=true``)."""
    if p.checkpoint is not None:
        return False
    cls = MODELS.get(name)
    cached = checkpoints.cached_path(cls, checkpoints.cache_key(cls, p.configs[name], p.data, p.scale, p.cfg.seed))
    return p.cfg.retrain or not cached.is_file()


def estimate_model(p, name: str) -> Estimate:
    if p.checkpoint is not None:
        return Estimate(name, None, 0.0, "checkpoint")
    key = rate_key(p, name)
    rate = read_rate(key)
    eval_s = rate.get(f"eval_s.{p.suite.name}")
    per_step, sampling = _per_step(rate), None
    if not trains(p, name):
        e = Estimate(name, None, 0.0, "cached", eval_s)
    elif "train_s" in rate:
        e = Estimate(name, rate.get("steps"), float(rate["train_s"]), "recorded", eval_s)
    else:
        try:
            steps, seconds, sampling = calibrate(p, name)
        except Exception:  # noqa: BLE001 - a model that cannot train fails in the run itself, with its record
            return Estimate(name, None, 0.0, "calibration failed: the run will say why", eval_s)
        e = Estimate(name, steps, seconds, "calibrated" if steps else "no training loop", eval_s)
        per_step = _per_step({"steps": steps, "train_s": seconds})
    if e.eval_s is None and (scaled := scaled_eval(p, name, per_step)) is not None:
        e.eval_s, e.eval_how = scaled[0], f"scaled from {scaled[1]}"  # a whole evaluation, measured
    elif e.eval_s is None and sampling is not None:
        e.eval_s, e.eval_how = sampling, "calibrated sampling"
    return e


def plan_estimates(p, per_job: int | None = None) -> list[Estimate]:
    """Every model's estimate (none for a smoke, whose steps are given, or under torchrun); ``per_job``: the
    threads each model gets when models run side by side (`bench.jobs`), else the thread policy's."""
    out = []
    for n in p.models:
        with threads.using(p.device, per_job or p.cfg.threads):  # the thread count the model will train with
            out.append(estimate_model(p, n))
    return out


def costly_for(p, name: str) -> int:
    """How many of the suite's setting sections name ``name`` among their ``models`` (a costly metric's own
    model list, e.g. the robustness suite's autoattack and refine)."""
    return sum(isinstance(v, dict) and name in (v.get("models") or ()) for v in p.suite.settings.values())


def longest_first(p, estimates: list[Estimate]) -> list[str]:
    """The plan's models, the longest first, for models side by side (`bench.jobs`): by recorded training +
    evaluation seconds when every evaluation was measured here before; else (a cold run knows the training,
    and of the evaluation only the samplers' sampling) the models the suite's costly metrics name first, then
    by the seconds known."""
    by = {e.model: e for e in estimates}
    if by and all(by.get(n) is not None and by[n].eval_s is not None for n in p.models):
        return sorted(p.models, key=lambda n: -by[n].total_s)
    return sorted(p.models, key=lambda n: (-costly_for(p, n), -(by[n].total_s if n in by else 0.0)))


def makespan(seconds: list[float], jobs: int, first: float = 0.0) -> float:
    """Wall time of these tasks on ``jobs`` workers, longest first, each to the worker free soonest (what
    `bench.jobs` does); ``first``: a task one worker runs before them all (the feature extractor's training)."""
    free = [0.0] * max(1, jobs)
    free[0] = first
    for s in sorted(seconds, reverse=True):
        free[free.index(min(free))] += s
    return max(free)


@dataclass
class Extra:
    """What a run costs besides its models: a plan line and its seconds. ``own_job``: with models side by
    side it runs as a job of its own, first (the domain feature extractor), so it overlaps the models."""

    line: str
    seconds: float
    own_job: bool = False


def extra_costs(p, estimates: list[Estimate]) -> list[Extra]:
    """The domain feature extractor's training on new data, and the Inception features on a CPU."""
    out = []
    steps, seconds = extractor_seconds(p)
    if steps:
        out.append(Extra(f"  feature extractor    {steps:>8,} steps  train ~{console.duration(seconds):>7}  "
                         f"(calibrated; the FID/IS features of {p.data.name}, trained once, then cached)",
                         seconds, own_job=True))
    features = inception_seconds(p, estimates)
    if features:
        out.append(Extra(f"  Inception features on the CPU ~{console.duration(features)} "
                         f"(~{select.cpu_images_per_s():.0f} images/s; the reference split once, then cached)",
                         features))
    return out


def total_s(estimates: list[Estimate], extras: list[Extra], jobs: int = 1) -> float:
    """The run's estimated wall time: the models ``jobs`` at a time, the extras' own jobs first among them,
    the other extras after."""
    if jobs > 1:
        first = sum(x.seconds for x in extras if x.own_job)
        return (makespan([e.total_s for e in estimates], jobs, first)
                + sum(x.seconds for x in extras if not x.own_job))
    return sum(e.total_s for e in estimates) + sum(x.seconds for x in extras)


def report(p, estimates: list[Estimate], extras: list[Extra] | None = None, jobs: int = 1,
           jobs_policy: str = "") -> str:
    policy = f", threads={threads.setting(p.cfg.threads)}" if p.device.type == "cpu" else ""
    if jobs > 1:
        policy = f", {jobs_policy}"
    lines = [f"plan: suite={p.suite.name} data={p.data.name} scale={p.scale.value} on {p.device.type}{policy}"]
    for e in estimates:
        steps = f"{e.steps:,} steps" if e.steps else "-"
        train = console.duration(e.train_s) if e.train_s >= 0.5 or e.how == "calibrated" else "0s"
        ev = f" + eval ~{console.duration(e.eval_s)}" if e.eval_s is not None else ""
        how = e.how if e.eval_s is None or e.eval_how == "recorded" else f"{e.how}; eval {e.eval_how}"
        lines.append(f"  {e.model:<18} {steps:>14}  train ~{train:>7}{ev}  ({how})")
    extras = extra_costs(p, estimates) if extras is None else extras
    lines.extend(x.line for x in extras)
    total = total_s(estimates, extras, jobs)
    unknown = sum(e.eval_s is None for e in estimates)
    side = f", {jobs} at a time" if jobs > 1 else ""
    lines.append(f"  total ~{console.duration(total)}{side}"
                 + (f" (+ evaluation of {unknown} model(s), not yet measured here)" if unknown else ""))
    return "\n".join(lines)


def extractor_seconds(p) -> tuple[int, float]:
    """(steps, seconds) of the domain feature extractor this run trains before its first FID/IS, timed like a
    model's calibration: its own training loop, stopped after a few steps; (0, 0) when it ships or is cached."""
    if p.inception is not None or not p.suite.n_samples:
        return 0, 0.0
    config = domain.pending_training(p.data)
    if config is None:
        return 0, 0.0
    seen: dict[str, Any] = {"total": 0, "times": []}

    @contextmanager
    def progress(description: str, total: int):
        seen["total"] = int(total)

        def update(n: int = 1, **fields):
            seen["times"].append(time.perf_counter())
            if len(seen["times"]) > 4 * CALIBRATION_STEPS:
                raise _Calibrated

        yield update

    with torch.random.fork_rng(devices=[]):
        t0 = time.perf_counter()
        try:
            domain.train_domain_net(p.data, config, progress)
        except _Calibrated:
            pass
    times = seen["times"]
    if len(times) < 2:
        return seen["total"], time.perf_counter() - t0
    per_step = statistics.median(b - a for a, b in zip(times, times[1:]))
    return seen["total"], (times[0] - t0) + (seen["total"] - 1) * per_step


def inception_seconds(p, estimates: list[Estimate]) -> float:
    """What the Inception features of this run cost on a CPU (0 on a GPU or with the domain extractor): the
    samples of every sampling model whose evaluation time is not recorded on this data, and the reference
    split."""
    if p.inception is None or p.device.type != "cpu" or not p.suite.n_samples:
        return 0.0
    n = p.n_samples or p.suite.n_samples[p.scale.value]
    samplers = sum(1 for e in estimates if (e.eval_s is None or e.eval_how != "recorded")
                   and "Sampler" in class_capabilities(MODELS.get(e.model)))
    n_reference = len(getattr(p.data, p.suite.reference.get(p.scale.value, "test")))
    return (samplers * n + (n_reference if samplers else 0)) / select.cpu_images_per_s()


def faster(p) -> str:
    """What would be faster than this run, said in bench's terms."""
    tips = []
    if p.scale.value == "paper":
        tips.append("scale=small (minutes per model on a CPU)")
    elif p.scale.value == "small":
        tips.append("scale=tiny (a smoke test: seconds per model, numbers mean little)")
    if p.device.type == "cpu":
        tips.append("device=cuda on a machine with a GPU" + (" (one is available here)"
                                                             if torch.cuda.is_available() else ""))
    return "; ".join(tips) or "fewer models (model=NAME)"


def confirm(p, estimates: list[Estimate], assume_yes: bool, extras: list[Extra] | None = None,
            jobs: int = 1) -> None:
    """Ask before a long CPU run; without a terminal, stop unless ``yes=true``. ``extras``: what the run
    costs besides the models (the feature extractor's training, Inception features); ``jobs``: models at a
    time."""
    total = total_s(estimates, extras or [], jobs)
    if p.device.type != "cpu" or total <= CONFIRM_ABOVE_S or assume_yes:
        return
    what = f"this run is estimated at {console.duration(total)} on this CPU (over {console.duration(CONFIRM_ABOVE_S)})"
    if sys.stdin.isatty() and sys.stderr.isatty():
        console.err.print(f"{what}. Faster: {faster(p)}.", highlight=False)
        answer = input("Start it? [y/N] ").strip().lower()
        if answer in ("y", "yes"):
            return
        raise UserError("not started; " + f"faster: {faster(p)}")
    raise UserError(f"{what}; add yes=true to run it anyway, or faster: {faster(p)}")

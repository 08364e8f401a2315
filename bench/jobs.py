"""Models side by side on a CPU (``jobs=``): each in its own worker process with a share of the cores.

A model's training and evaluation on a few cores is a long chain of small operations (8×8 to 32×32
images, narrow networks), and PyTorch's intra-op threads spend much of it meeting at barriers. Two models
on one thread each get more done than one model on two threads: on 2 cores, 1.26× for jem's training
step, 1.22× for igebm's, 1.75× for wrn's (docs/performance.md). So on a CPU ``jobs=auto`` (the default)
runs as many models at a time as there are cores, one thread each (whatever the load), longest first by the
plan's estimates, when at least two of them train (a warm run's evaluations gain less than the workers'
start-up costs: 62 s side by side against 52 s one after another, warm hybrid suite on 2 cores);
``jobs=1`` runs them one after another as before.

Every model still computes exactly what it computes alone at that thread count: each runs in a fresh
worker with the validated plan, seeds its own generators, and writes its own record (atomically) and
figures. Its ``env`` says how many threads it had and why. The worker processes are spawned, never
forked, since a forked OpenMP runtime can hang. Work that two models would share (the domain feature
extractor, the real split's cached features) is made by the first that needs it while the others wait
for it (`bench.fileio.one_at_a_time`). The domain feature extractor that a cold run on new data trains goes
first, as a job of its own: it then overlaps the longest model's training instead of holding up the first
evaluation (a cold MNIST hybrid run had jem wait about 2 minutes for it).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from bench import distributed, threads
from bench.allocator import keep_freed_memory, release_free_memory
from bench.errors import UserError


def parse(value: str | int | None) -> int | None:
    """``jobs=``: None for auto, else a positive count."""
    if value is None or value == "auto":
        return None
    n = threads.positive_count(value)
    if n is None:
        raise UserError(f"jobs={value} is not a number of models at a time; use jobs=auto or a positive integer "
                        "like jobs=1 (one model after another)")
    return n


def choose(p, n_models: int) -> tuple[int, int | None, str]:
    """(jobs, threads per job or None for the thread policy's own choice, why) for this run."""
    asked = parse(p.cfg.jobs)
    if p.device.type != "cpu" or distributed.env_world_size() > 1:
        if asked not in (None, 1):
            raise UserError(f"jobs={asked} runs models side by side on a CPU; with device={p.device.type} or "
                            "torchrun give jobs=1 (or leave it unset)")
        return 1, None, "one model at a time (not a CPU run)"
    timed = [m.key for m in p.metrics if m.timed]
    if timed:
        if asked not in (None, 1):
            raise UserError(f"jobs={asked}: {', '.join(timed)} is timed, so its models run one at a time; give "
                            "jobs=1 (or leave it unset)")
        return 1, None, f"one model at a time ({', '.join(timed)} is timed)"
    fixed = threads.parse(threads.setting(p.cfg.threads))
    if asked is None:
        # Every core, whatever the load: a one-thread worker never waits at a barrier, so under load the
        # scheduler shares the cores between it and the other processes fairly, and two workers get twice
        # the share of one (the load decides the threads of a model that runs alone).
        per = fixed or 1
        jobs = max(1, min(n_models, threads.available() // per))
        if jobs == 1:
            return 1, None, "one model at a time"
        if fixed is None:
            others = threads.other_runnable()
            why = "the run queue cannot be read here" if others is None else f"{others:g} other runnable"
        else:
            why = f"threads={fixed}"
        return jobs, per, f"jobs=auto: {jobs} models at a time, {per} thread(s) each, one a core whatever " \
                          f"the load ({why})"
    if fixed is None:
        free, why = threads.choose(p.cfg.threads)
    else:
        free, why = threads.available(), f"threads={fixed}"
    jobs = min(asked, max(n_models, 1))
    if jobs == 1:
        return 1, None, "jobs=1: one model at a time"
    per = fixed or max(1, free // jobs)
    return jobs, per, f"jobs={asked}: {jobs} models at a time, {per} thread(s) each ({why})"


# --- the workers ---------------------------------------------------------------------------------
def _init() -> None:
    # several models print at once: plain progress lines (each names its model), never live bars
    os.environ["BENCH_PROGRESS"] = "lines"
    keep_freed_memory()  # as the parent's bench.runner.run does


def _one(plan_bytes: bytes, policy: str, name: str) -> tuple[Any, Any, list[str]]:
    # the plan travels with the task (through the executor's queue, which notices a dead worker), never through
    # the spawn pipe: a worker killed while starting would leave the parent blocked writing to it
    from bench.evaluate import make_extractor_resolver
    from bench.runner import evaluate_and_write

    p = pickle.loads(plan_bytes)
    try:
        return evaluate_and_write(p, name, make_extractor_resolver(p), {}, policy)
    finally:
        release_free_memory()  # the next model in this worker starts from a small heap


def _extractor(plan_bytes: bytes) -> None:
    """Train and cache the plan's domain feature extractor. A failure is left to the models, whose evaluation
    resolves the extractor again and records why it failed."""
    from bench.evaluate import make_extractor_resolver

    try:
        make_extractor_resolver(pickle.loads(plan_bytes))()
    except Exception:  # noqa: BLE001 - see above
        pass


def run_side_by_side(p, order: list[str], jobs: int, per_job: int, policy: str,
                     extractor_first: bool = False) -> dict[str, tuple]:
    """Each model of ``order`` in a worker, ``jobs`` at a time, at ``per_job`` threads, after the feature
    extractor's training when ``extractor_first``; returns name -> (record, path or None, unwritten), each
    record written. A worker that dies (killed, out of memory) fails its model's record."""
    from dataclasses import replace

    from bench.evaluate import failure_record
    from bench.runner import write

    worker_plan = replace(p, cfg=replace(p.cfg, threads=str(per_job)))
    results: dict[str, tuple] = {}
    context = multiprocessing.get_context("spawn")
    plan_bytes = pickle.dumps(worker_plan)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init) as pool:
        pending: dict[Future, str | None] = {}
        if extractor_first:
            pending[pool.submit(_extractor, plan_bytes)] = None
        pending.update({pool.submit(_one, plan_bytes, policy, name): name for name in order})
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    name = pending.pop(future)
                    if name is None:  # the extractor: its models say if it failed
                        continue
                    try:
                        results[name] = future.result()
                    except BrokenProcessPool:  # written here, as the worker would have
                        reason = "its worker process died (killed, or out of memory?); run it alone with jobs=1"
                        results[name] = write(p, name, failure_record(p, name, reason), {})
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return results

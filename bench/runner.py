"""suite × models → plan (`bench.plan`) → acquire: train or load (`bench.acquire`) → evaluate
(`bench.evaluate`) → record.

Every failure that is the user's input (unknown names, missing data, a bad checkpoint, an unknown
option) is found before the first model runs and raised as `UserError`; nothing is written. A model
that fails while training or evaluating gets a ``failed`` record with the reason, and the others go on.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich.markup import escape

from bench import console, distributed, estimate, fileio, jobs
from bench.allocator import keep_freed_memory
from bench.cache import cache_dir
from bench.config import RunConfig
from bench.errors import ModelFailure, WriteFailure
from bench.evaluate import Artifacts, evaluate_model, make_extractor_resolver
from bench.features import domain
from bench.models import MODELS
from bench.plan import Plan, plan
from bench.results.record import Record
from bench.results.records import write_record


@dataclass
class Outcome:
    records: list[tuple[Record, Path]] = field(default_factory=list)
    #: what could not be written (a record, a figure), one line each
    unwritten: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[Record]:
        return [r for r, _ in self.records if not r.ok]


def run(cfg: RunConfig) -> Outcome:
    keep_freed_memory()  # every run, sweep job and torchrun rank (bench.allocator)
    p = plan(cfg)
    # one at a time on a GPU or under torchrun; auto: side by side only while two or more models train (a
    # warm run's evaluations gain less than the workers' start-up costs)
    n_jobs, per_job, policy = jobs.choose(p, len(p.models) if jobs.parse(p.cfg.jobs) else
                                          sum(estimate.trains(p, n) for n in p.models))
    estimates: list = []
    extras: list = []
    if cfg.smoke is None and distributed.env_world_size() <= 1:  # a smoke's steps are given; torchrun: a GPU
        estimates = estimate.plan_estimates(p, per_job)
        extras = estimate.extra_costs(p, estimates)
        console.info(escape(estimate.report(p, estimates, extras, n_jobs, policy)))
        estimate.confirm(p, estimates, cfg.yes, extras, n_jobs)
    distributed.init(p.device)
    if not distributed.is_main():
        os.environ["BENCH_QUIET"] = "1"  # one rank talks
    out_dir = Path(cfg.out).expanduser()
    if distributed.is_main():
        clean_leftovers(p, out_dir)
    outcome = Outcome()
    if n_jobs > 1:
        done = jobs.run_side_by_side(p, estimate.longest_first(p, estimates), n_jobs, per_job, policy,
                                     extractor_first=any(x.own_job for x in extras))
        for name in p.models:  # the records in the plan's order
            _collect(outcome, *done[name])
        return outcome
    extractor = make_extractor_resolver(p)
    reference_cache: dict = {}
    for name in p.models:
        record, path, unwritten = evaluate_and_write(p, name, extractor, reference_cache)
        if distributed.is_main():
            _collect(outcome, record, path, unwritten)
    return outcome


def _collect(outcome: Outcome, record: Record, path: Path | None, unwritten: list[str]) -> None:
    outcome.unwritten.extend(unwritten)
    if path is not None:
        outcome.records.append((record, path))


def evaluate_and_write(p: Plan, name: str, extractor, reference_cache: dict, thread_policy: str | None = None
                       ) -> tuple[Record, Path | None, list[str]]:
    """One model: its record and figures written (rank 0), its evaluation time kept for the next plan;
    returns the record, where it went (None: not written) and what could not be written."""
    extractor_before = domain.seconds_obtaining
    record, artifacts = evaluate_model(p, name, extractor, reference_cache, thread_policy)
    # (not when the samples came from the cache: that time is not what sampling costs)
    if (record.ok and p.checkpoint is None and p.cfg.smoke is None and distributed.is_main()
            and not (record.draws or {}).get("samples", {}).get("from_cache")):
        train = record.train or {}
        trained = train.get("seconds") or 0 if train.get("source") == "trained" else 0
        extractor_s = domain.seconds_obtaining - extractor_before  # the plan's own line, not this model's
        estimate.record_rate(p, name, record.env.get("num_threads"),
                             **{f"eval_s.{p.suite.name}": round(max(0.0, record.seconds - trained - extractor_s), 2)})
    if not distributed.is_main():
        return record, None, []  # rank 0 writes the one record
    return write(p, name, record, artifacts)


def write(p: Plan, name: str, record: Record, artifacts: Artifacts) -> tuple[Record, Path | None, list[str]]:
    if not record.ok:
        console.info(f"[red]{name} failed:[/red] {escape(one_line(record.reason))}")
    try:
        path = write_record(record, Path(p.cfg.out).expanduser())
    except WriteFailure as e:  # a full disk costs this record, not the models after it
        sys.stderr.write(f"bench: error: {e}\n")
        return record, None, [str(e)]
    unwritten: list[str] = []
    write_artifacts(path, artifacts, unwritten)
    return record, path, unwritten


def one_line(reason: str, limit: int = 300) -> str:
    """A failure reason for the terminal: its first line, cut short; the record keeps all of it."""
    lines = reason.strip().splitlines() or [""]
    line = lines[0] if len(lines[0]) <= limit else lines[0][:limit] + "..."
    return line + (f" (+{len(lines) - 1} more lines in the record)" if len(lines) > 1 else "")


def write_artifacts(path: Path, artifacts: Artifacts, unwritten: list[str]) -> None:
    """The sample grid and the metrics' figures beside the record; one that cannot be written is named and left
    out (the record stands)."""
    for suffix, writer in artifacts.items():
        target = path.with_suffix(f".{suffix}")
        try:
            writer(target)
        except OSError as e:
            target.unlink(missing_ok=True)
            message = f"cannot write {target}: {e.strerror or e}"
            sys.stderr.write(f"bench: error: {message}\n")
            unwritten.append(message)


def clean_leftovers(p: Plan, out_dir: Path) -> None:
    """Temporary files that killed runs left (in out= and in the cache dirs this run uses), if their writers are
    gone; a live concurrent writer's are kept (see `bench.fileio`)."""
    fileio.clean_stale(out_dir, (".json",))
    for name in p.models:
        fileio.clean_stale(cache_dir("checkpoints", MODELS.get(name).name), (".safetensors",))
        fileio.clean_stale(cache_dir("samples", MODELS.get(name).name), (".safetensors", ".sha256"))
    fileio.clean_stale(cache_dir("extractors"), (".safetensors", ".sha256"))


__all__ = ["ModelFailure", "Outcome", "plan", "run"]

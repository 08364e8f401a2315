"""Distributed evaluation with torch.distributed, launched by ``torchrun``.

Work that is a map over batches (sampling, feature extraction, per-example logits and scores) is
sharded by batch index: rank r computes batches r, r + W, r + 2W, ... Every batch is computed exactly
as a single process would compute it (same boundaries, the sampler's seed derived from the batch
index, not from the rank), then the results are gathered and put back in batch order. So a W-rank
run gives the same numbers as a 1-rank run wherever the computation is deterministic. Metrics are
then computed from the gathered arrays, and only rank 0 writes records, artifacts and tables.

Without torchrun (no WORLD_SIZE in the environment) every function here is the identity.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from bench.errors import BenchError, DistributedFailure, ModelFailure, UserError

T = TypeVar("T")


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; launch with torchrun") from None


def init(device: torch.device) -> None:
    """Join the process group torchrun set up (gloo on CPU, nccl on CUDA); a no-op for one process."""
    if env_world_size() <= 1 or dist.is_initialized():
        return
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UserError(f"WORLD_SIZE is set but {', '.join(missing)} are not; launch with "
                        "'torchrun --nproc_per_node=N -m bench run ...'")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(minutes=int(os.environ.get("BENCH_DIST_TIMEOUT_MIN", "30"))))


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def main_first(fn: Callable[[], T]) -> tuple[T | None, BaseException | None]:
    """Run ``fn`` on rank 0, then (after a barrier) on the other ranks, e.g. so that rank 0 trains and
    caches a model the others then load. Returns (result, error) of this rank's call; every rank reaches
    both barriers even when its call fails. Without torchrun: just ``fn()``."""
    if not active():
        return fn(), None
    result, error = None, None
    for turn in ("main", "others"):
        if (turn == "main") == is_main():
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001  (handed to the caller, who agrees on it across ranks)
                error = e
        barrier()
    return result, error


def check_shards(n_batches: int, what: str) -> None:
    """Every rank needs at least one batch: fewer batches than ranks is refused with the fix."""
    w = world_size()
    if w > 1 and n_batches < w:
        raise UserError(f"{what} has {n_batches} batch(es) for {w} ranks; use at most {n_batches} ranks "
                        "(torchrun --nproc_per_node) or more samples")


def _gather(obj, what: str) -> list:
    out: list = [None] * world_size()
    try:
        dist.all_gather_object(out, obj)
    except Exception as e:  # a rank died or the group timed out: nothing more can be trusted
        raise DistributedFailure(f"rank {rank()} lost the other ranks while gathering {what} "
                                 f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                 "the run is abandoned and no record is written") from None
    return out


def map_batches(bounds: list[tuple[int, int]], fn: Callable[[int, int, int], T], what: str = "work") -> list[T]:
    """[fn(i, a, b) for i, (a, b) in enumerate(bounds)], sharded over the ranks and gathered in order.

    An error on one rank is gathered with the results and raised on every rank, so the ranks stay in
    step (a model failure becomes the same failed record everywhere)."""
    if not active():
        return [fn(i, a, b) for i, (a, b) in enumerate(bounds)]
    check_shards(len(bounds), what)
    r, w = rank(), world_size()
    mine: list = []
    error: tuple[str, str] | None = None
    try:
        for i, (a, b) in enumerate(bounds):
            if i % w == r:
                mine.append((i, fn(i, a, b)))
    except BenchError as e:
        error = (type(e).__name__, str(e))
    except Exception as e:  # noqa: BLE001  (re-raised on every rank below)
        error = (type(e).__name__, str(e).splitlines()[0] if str(e) else "")
    gathered = _gather((error, mine if error is None else []), what)
    errors = [(k, e) for k, (e, _) in enumerate(gathered) if e is not None]
    if errors:
        k, (kind, msg) = errors[0]
        if kind == "UserError":
            raise UserError(msg)
        raise ModelFailure(f"rank {k}: {kind}: {msg}" if kind not in ("ModelFailure", "NonFiniteError") else msg)
    ordered = sorted((item for _, part in gathered for item in part), key=lambda t: t[0])
    if [i for i, _ in ordered] != list(range(len(bounds))):
        raise DistributedFailure(f"the gather of {what} lost or duplicated a batch; no record is written")
    return [v for _, v in ordered]


def all_ok(ok: bool) -> bool:
    """True only when every rank says ok (so a failure anywhere fails the record everywhere)."""
    if not active():
        return ok
    return all(_gather(bool(ok), "the record status"))


def describe() -> dict:
    return {"world_size": world_size(), "backend": dist.get_backend() if active() else None,
            "sharding": "batch i on rank i mod world_size; gathered in batch order" if active() else None}

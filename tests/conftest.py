from __future__ import annotations

import os

# The test models are tiny: intra-op threads only add synchronization (measured 4-20x slower per step
# with 2 threads on a loaded 2-core machine). Subprocesses (the CLI tests) inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# every model gets those threads, whatever else runs (bench.threads' auto would read the run queue): a
# test's numbers never depend on the load
os.environ.setdefault("BENCH_THREADS", "all")
# two runs a test compares each draw their own samples (bench.features.sample_cache; its own tests turn it on)
os.environ.setdefault("BENCH_SAMPLE_CACHE", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tests never touch ~/.cache/bench; trained tiny checkpoints are shared within the session."""
    old = {k: os.environ.get(k) for k in ("BENCH_CACHE", "BENCH_QUIET")}
    os.environ["BENCH_CACHE"] = str(tmp_path_factory.mktemp("bench-cache"))
    os.environ["BENCH_QUIET"] = "1"
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared is absent ({SHARED}); it holds the real datasets and fixtures")
    return SHARED

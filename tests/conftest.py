from __future__ import annotations

import os
from pathlib import Path

import pytest

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

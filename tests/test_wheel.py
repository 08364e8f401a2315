"""bench runs from a wheel, not only from an editable checkout: the suites (bench/suite_specs/) and the
published tables (bench/published_tables/) are package data. The wheel is built from a copy of the package
sources, installed into a scratch directory, and run from another directory with only that install on
PYTHONPATH, so nothing is read from this checkout.

It needs pip and setuptools (with bdist_wheel) in this environment, since it builds offline
(``--no-build-isolation --no-index``); without them it skips, saying why.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DATA = ("bench/suite_specs/hybrid.yaml", "bench/published_tables/jem_table1_cifar10.yaml",
                "bench/features/pinned/digits-net.safetensors")


def _build_tooling_missing() -> str | None:
    """Why the wheel cannot be built offline here, or None."""
    if importlib.util.find_spec("pip") is None:
        return "pip is not installed"
    if importlib.util.find_spec("setuptools") is None:
        return "setuptools is not installed (the build backend, used without build isolation)"
    from importlib.metadata import version

    major, minor = (int(p) for p in re.match(r"(\d+)\.(\d+)", version("setuptools") + ".0").groups())
    if (major, minor) < (68, 0):
        return f"setuptools {version('setuptools')} is older than pyproject.toml's build requirement (>=68)"
    if (major, minor) < (70, 1) and importlib.util.find_spec("wheel") is None:
        return "setuptools < 70.1 needs the 'wheel' package to build wheels, and it is not installed"
    return None


def _run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(args)} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """(the scratch install directory, an environment that imports bench from it only)."""
    why = _build_tooling_missing()
    if why:
        pytest.skip(f"cannot build the wheel offline: {why}")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    # only what the build reads: a stray build/ or *.egg-info of the checkout cannot leak into the wheel
    shutil.copytree(ROOT / "bench", src / "bench", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / f, src / f)
    pip_env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONPATH": ""}
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--wheel-dir", str(dist), str(src)], cwd=tmp, env=pip_env)
    (wheel,) = dist.glob("bench-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in PACKAGE_DATA if f not in names]
    assert not missing, f"the wheel lacks {missing}: declare them under [tool.setuptools.package-data]"
    site = tmp / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
         cwd=tmp, env=pip_env)
    env = {k: v for k, v in os.environ.items() if k != "BENCH_DATA"}
    env.update(PYTHONPATH=str(site), BENCH_QUIET="1", BENCH_CACHE=str(tmp / "cache"))
    return site, env


def test_the_wheel_lists_suites_and_runs_from_another_directory(wheel_install, tmp_path):
    site, env = wheel_install
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([sys.executable, "-c", "import bench; print(bench.__file__)"], cwd=elsewhere, env=env).stdout
    assert Path(where.strip()).is_relative_to(site), f"bench imported from {where.strip()}, not the wheel's install"

    listed = _run([sys.executable, "-m", "bench", "list", "suites"], cwd=elsewhere, env=env).stdout
    for suite in ("hybrid", "likelihood", "samples", "calibration", "ood", "robustness", "throughput"):
        assert suite in listed, listed

    out = tmp_path / "out"
    _run([sys.executable, "-m", "bench", "run", "suite=hybrid", "scale=tiny", "model=pixel_independent",
          f"out={out}"], cwd=elsewhere, env=env)
    (path,) = out.glob("*.json")
    record = json.loads(path.read_text())
    assert record["status"] == "ok" and record["suite"] == "hybrid" and record["model"] == "pixel_independent"
    assert set(record["metrics"]) == {"is", "fid"}, record["metrics"]

    # the published tables are package data too
    table = _run([sys.executable, "-m", "bench", "table", "cifar10", "--results", str(out), "--format", "csv"],
                 cwd=elsewhere, env=env).stdout
    assert "JEM (Ours)" in table and "Wide-Resnet" in table, table[:2000]

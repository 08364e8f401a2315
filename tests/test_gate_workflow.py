"""The PR gate works as committed: the workflow's own `run:` steps, taken from its YAML in order, run in a
scratch copy of this checkout against the committed baselines, for an unchanged branch (exit 0), a planted
regression in a model (exit 1, the metric named in the Markdown report) and an incomparable protocol
(exit 2).

The steps that are GitHub actions (`uses:`: checkout, setup-python, the PR comment, the artifact upload)
are not shell steps and are skipped, and so is `Install`: this test's environment is installed already,
and pip-installing the scratch copy would repoint it. The copy's code is what runs (PYTHONPATH).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = Path(".github/workflows/bench-gate.yml")
SKIPPED_RUN_STEPS = {"Install"}


def scratch_copy(dest: Path) -> Path:
    """The working tree as git sees it (tracked and untracked-not-ignored files), copied."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / f)
    return dest


_OUTPUT = re.compile(r"\$\{\{\s*steps\.([\w-]+)\.outputs\.([\w-]+)\s*\}\}")
_CONDITION = re.compile(r"^steps\.([\w-]+)\.outputs\.([\w-]+)\s*(==|!=)\s*'([^']*)'$")


def condition_holds(expr: str, outputs: dict, failed: bool) -> bool:
    """The `if:` expressions this workflow uses; anything else fails the test rather than guess."""
    expr = expr.strip()
    if expr == "always()":
        return True
    m = _CONDITION.match(expr)
    assert m, f"the workflow test does not understand `if: {expr}`; teach condition_holds"
    value = outputs.get(m[1], {}).get(m[2], "")
    return not failed and ((value == m[4]) == (m[3] == "=="))


def run_workflow(copy: Path, tmp: Path) -> tuple[int, list[str]]:
    """Run the job's shell steps as GitHub does (bash -eo pipefail, GITHUB_OUTPUT); the job's exit code."""
    job = next(iter(yaml.safe_load((copy / WORKFLOW).read_text())["jobs"].values()))
    env = {k: v for k, v in os.environ.items() if k != "BENCH_DATA"}
    env.update(PYTHONPATH=str(copy), PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    outputs: dict[str, dict[str, str]] = {}
    ran, code = [], 0
    for i, step in enumerate(job["steps"]):
        if "run" not in step or step.get("name") in SKIPPED_RUN_STEPS:
            continue
        # a step without `if:` runs only while every earlier step succeeded (GitHub's implicit success())
        if not (condition_holds(step["if"], outputs, failed=code != 0) if "if" in step else code == 0):
            continue
        script = _OUTPUT.sub(lambda m: outputs.get(m[1], {}).get(m[2], ""), step["run"])
        gh_output = tmp / f"github_output_{i}"
        gh_output.write_text("")
        res = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script], cwd=copy,
                             env={**env, **{k: str(v) for k, v in step.get("env", {}).items()},
                                  "GITHUB_OUTPUT": str(gh_output)},
                             capture_output=True, text=True, timeout=1800)
        assert "Traceback" not in res.stderr, res.stderr[-3000:]
        if "id" in step:
            outputs[step["id"]] = dict(line.split("=", 1) for line in gh_output.read_text().splitlines() if "=" in line)
        ran.append(step.get("name", f"step {i}"))
        code = code or res.returncode
    return code, ran


def _plant(copy: Path, path: str, old: str, new: str) -> None:
    p = copy / path
    text = p.read_text()
    assert old in text, f"{path} no longer has {old!r}: update the planted change"
    p.write_text(text.replace(old, new, 1))


@pytest.fixture(scope="module")
def baselines_present():
    if not (ROOT / "baselines" / "hybrid").is_dir():
        pytest.fail("baselines/hybrid is missing: the workflow compares against it (see the README's gate section)")


# unchanged: the committed baselines still gate this code (every run); the planted cases are slow
@pytest.mark.parametrize("case, expected", [("unchanged", 0), pytest.param("regression", 1, marks=pytest.mark.slow),
                                            pytest.param("incomparable", 2, marks=pytest.mark.slow)])
def test_the_committed_workflow_gates(tmp_path, baselines_present, case, expected):
    copy = scratch_copy(tmp_path / "repo")
    if case == "regression":  # a real bug in a model: WRN's classifier inverts its scores
        _plant(copy, "bench/models/wrn.py", "        return self._net_logits(self.preprocess(x))",
               "        return -self._net_logits(self.preprocess(x))")
    elif case == "incomparable":  # the suite draws fewer samples at this scale: another protocol
        _plant(copy, "bench/suite_specs/hybrid.yaml", "tiny: 200,", "tiny: 100,")
    code, ran = run_workflow(copy, tmp_path)
    report = (copy / "gate-report.md").read_text() if (copy / "gate-report.md").exists() else ""
    assert code == expected, (ran, report[:3000])
    assert ran[-2:] == (["Compare with the approved baselines", "Fail on regression"] if expected
                        else ["Run the gated suite", "Compare with the approved baselines"])
    if case == "regression":
        assert re.search(r"\| wrn .*\| accuracy ↑ .*❌ regressed", report), report[:3000]
    if case == "incomparable":
        assert "incomparable" in report and "samples.n: 200 vs 100" in report, report[:3000]

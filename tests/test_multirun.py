"""`bench run -m`: sweeps with Hydra multirun on the joblib and submitit launchers.

The joblib sweep is the acceptance test (2 models × 2 seeds → 4 records, one `bench table` over them).
Slurm is tested without a cluster: a dry-run `sbatch` on PATH keeps the submission file that submitit
wrote, and the pickled jobs beside it are read back. submitit's local executor runs one real job.
"""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import sweep
from bench.cli import main


def bench(*args, env=None, cwd=None):
    e = {**os.environ, "BENCH_QUIET": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    e.pop("BENCH_DATA", None)
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, env=e, cwd=cwd,
                          timeout=600)


def records_in(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]


def one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr and lines[0].startswith("bench: error: ")
    return lines[0]


@pytest.fixture
def restore_logging():
    """An in-process sweep lets Hydra configure logging (root handlers); give the other tests theirs back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


# --- the command line ---------------------------------------------------------------------------------
def test_translate_keeps_bench_conveniences_and_adds_the_sweep_ones():
    args = sweep.translate(["models=jem,wrn", "seed=0,1", "data=digits", "opts.sgld_steps=2,4",
                            "launcher=joblib", "launcher.n_jobs=2", "hydra.verbose=true"])
    assert args.bench == ["model=jem,wrn", "seed=0,1", "data.name=digits", "+opts.sgld_steps=2,4"]
    assert args.launcher == "bench_joblib"
    assert args.hydra == ["hydra.launcher.n_jobs=2", "hydra.verbose=true"]
    # brackets: one job with two models; Hydra's own spelling of the launcher works too
    args = sweep.translate(["models=[jem,wrn]", "hydra/launcher=submitit_slurm"])
    assert args.bench == ["models=[jem,wrn]"] and args.launcher == "submitit_slurm"


def test_expand_uses_hydras_sweeper():
    jobs = sweep.expand(sweep.translate(["models=jem,wrn", "seed=0,1,2", "scale=tiny"]).bench)
    assert len(jobs) == 6 and jobs[0] == ["model=jem", "seed=0", "scale=tiny"] and jobs[-1][:2] == ["model=wrn",
                                                                                                   "seed=2"]
    jobs = sweep.expand(sweep.translate(["models=[jem,wrn]", "seed=range(0,2)"]).bench)
    assert jobs == [["models=[jem,wrn]", "seed=0"], ["models=[jem,wrn]", "seed=1"]]


# --- joblib: the acceptance test ----------------------------------------------------------------------
@pytest.mark.slow  # ~30 s warm, ~70 s with a cold cache on 2 loaded cores (it trains the FID extractor)
def test_joblib_sweep_2_models_x_2_seeds_gives_4_records_and_one_table(tmp_path):
    out, cwd = tmp_path / "sweep", tmp_path / "cwd"
    cwd.mkdir()
    res = bench("run", "-m", "launcher=joblib", "launcher.n_jobs=2", "models=pixel_independent,wrn", "seed=0,1",
                "data=digits", "scale=tiny", f"out={out}", cwd=cwd)
    assert res.returncode == 0, res.stderr
    records = records_in(out)
    assert len(records) == 4
    assert {(r["model"], r["seed"]) for r in records} == {(m, s) for m in ("pixel_independent", "wrn") for s in (0, 1)}
    assert all(r["status"] == "ok" and r["scale"] == "tiny" and r["data"] == "digits" for r in records)
    assert "Launching 4 jobs" in res.stderr or "launching 4 jobs" in res.stderr
    # the sweep's own table: a row per job
    assert res.stdout.count("│ wrn ") == 2 and res.stdout.count("│ pixel_independent ") == 2
    # Hydra's per-job outputs under out/.multirun/<sweep>/<job>/, none in the working directory
    (sweep_dir,) = (out / ".multirun").iterdir()
    assert (sweep_dir / "multirun.yaml").is_file()
    for n in range(4):
        assert (sweep_dir / str(n) / ".hydra" / "overrides.yaml").is_file()
        assert (sweep_dir / str(n) / "bench.log").is_file()
    assert not any(cwd.iterdir())
    # a stray JSON among Hydra's outputs (a callback's, say) is not a record
    (sweep_dir / "0" / "callback.json").write_text('{"not": "a record"}')
    table = bench("table", str(out))
    assert table.returncode == 0, table.stderr
    assert table.stdout.count("│ wrn ") == 2 and table.stdout.count("│ pixel_independent ") == 2
    gate = bench("compare", str(out), str(out))
    assert gate.returncode == 0, gate.stderr
    assert "pass" in gate.stdout and "(n=2)" in gate.stdout  # the two seeds of each model, pooled


# --- submitit -------------------------------------------------------------------------------------------
DRY_SBATCH = """#!/bin/sh
# a dry-run sbatch: keep the submission file, submit nothing
cp "$1" "$SBATCH_COPY"
echo "sbatch: error: dry run, nothing submitted" >&2
exit 1
"""


def test_submitit_slurm_submission_is_correct_without_a_cluster(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text(DRY_SBATCH)
    (fake / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit only checks that it exists
    for f in fake.iterdir():
        f.chmod(0o755)
    out, copy = tmp_path / "out", tmp_path / "submission.sh"
    res = bench("run", "-m", "launcher=submitit_slurm", "launcher.partition=gpu", "launcher.timeout_min=30",
                "models=wrn,jem", "seed=0,1", "scale=tiny", "device=cuda", f"out={out}",
                env={"PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "SBATCH_COPY": str(copy)})
    # device=cuda is not refused here: the jobs run on the nodes
    assert res.returncode == 1, res.stderr
    assert "the launcher failed (FailedJobError: sbatch: error: dry run" in res.stderr
    assert not records_in(out)
    (sweep_dir,) = (out / ".multirun").iterdir()
    submitit_dir = sweep_dir / ".submitit"
    text = copy.read_text()
    sbatch = {line.split("=", 1)[0]: line.split("=", 1)[1] for line in text.splitlines() if line.startswith("#SBATCH")}
    assert sbatch["#SBATCH --array"] == "0-3%4"  # one array job, 4 tasks, all may run at once
    assert sbatch["#SBATCH --partition"] == "gpu"
    assert sbatch["#SBATCH --time"] == "30"
    assert sbatch["#SBATCH --gpus-per-node"] == "1" and sbatch["#SBATCH --cpus-per-task"] == "8"
    assert sbatch["#SBATCH --nodes"] == "1" and sbatch["#SBATCH --ntasks-per-node"] == "1"
    assert sbatch["#SBATCH --mem"] == "32GB" and sbatch["#SBATCH --job-name"] == "bench"
    assert sbatch["#SBATCH --output"] == f"{submitit_dir}/%A_%a/%A_%a_0_log.out"
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert f"{sys.executable} -u -m submitit.core._submit {submitit_dir}/%j" in srun
    # the pickled jobs the array's tasks would run: the launcher and each job's overrides
    from submitit.core.utils import DelayedSubmission

    jobs = [DelayedSubmission.load(p) for p in submitit_dir.glob("*.pkl")]
    overrides = sorted(" ".join(j.args[0][:2]) for j in jobs)
    assert overrides == ["model=jem seed=0", "model=jem seed=1", "model=wrn seed=0", "model=wrn seed=1"]
    launcher = jobs[0].function
    assert type(launcher).__name__ == "SlurmLauncher"
    assert launcher.params["partition"] == "gpu" and launcher.params["timeout_min"] == 30


def test_submitit_local_runs_a_job(tmp_path):
    out = tmp_path / "out"
    res = bench("run", "-m", "launcher=submitit_local", "model=pixel_independent", "seed=0", "data=digits",
                "scale=tiny", f"out={out}")
    assert res.returncode == 0, res.stderr
    (record,) = records_in(out)
    assert record["model"] == "pixel_independent" and record["status"] == "ok"
    (sweep_dir,) = (out / ".multirun").iterdir()
    assert list((sweep_dir / ".submitit").glob("*/*_result.pkl"))  # it went through submitit


# --- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, package", [
    (["launcher=joblib"], "hydra-joblib-launcher"),
    (["hydra/launcher=joblib"], "hydra-joblib-launcher"),
    (["launcher=submitit_slurm"], "hydra-submitit-launcher"),
    (["launcher=submitit_local"], "hydra-submitit-launcher"),
])
def test_a_launcher_that_is_not_installed_is_one_line_exit_2(tmp_path, monkeypatch, capsys, args, package):
    plugin_module = next(lc.plugin for lc in sweep.LAUNCHERS.values() if lc.package == package)
    monkeypatch.setitem(sys.modules, plugin_module, None)  # what an absent plugin looks like to importlib
    out = tmp_path / "out"
    assert main(["run", "-m", *args, "model=wrn", "seed=0,1", "scale=tiny", f"out={out}"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert f"needs the Hydra plugin {package}" in line and f"pip install {package}" in line
    assert not out.exists()


@pytest.mark.parametrize("args, fragments", [
    (["model=wrn,nope", "seed=0,1"], ["sweep job", "model=nope", "unknown model 'nope'", "pixel_independent"]),
    (["models=[wrn,nope],[wrn]"], ["models=[wrn,nope]", "unknown model 'nope'"]),
    (["model=wrn", "seed=0,abc"], ["seed=abc", "bad override"]),
    (["model=wrn", "scale=tiny,huge"], ["unknown scale 'huge'"]),
    (["model=wrn", "foo=1,2"], ["unknown key 'foo'"]),
    (["model=wrn", "data=digits,nope"], ["unknown dataset 'nope'"]),
    (["model=wrn", "launcher=nope"], ["unknown launcher 'nope'", "joblib", "submitit_slurm"]),
    (["model=wrn", "launcher=joblib", "launcher.n_jbos=2"], ["hydra.launcher.n_jbos", "JobLibLauncherConf"]),
    (["model=wrn", "hydra/launcher=nope"], ["hydra/launcher/nope"]),
    (["model=wrn", "out=a,b"], ["out= cannot be swept"]),
])
def test_a_bad_override_in_a_sweep_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys,
                                                                          restore_logging, args, fragments):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = [a if not a.startswith("out=") else "out=" + ",".join(str(tmp_path / p) for p in a[4:].split(","))
            for a in args]
    if not any(a.startswith("out=") for a in args):
        argv.append(f"out={out}")
    assert main(["run", "-m", "scale=tiny", *argv]) == 2
    line = one_line_error(capsys.readouterr().err)
    for f in fragments:
        assert f in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no out dir, no Hydra outputs in the cwd


def test_outside_a_sweep_sweep_syntax_points_to_m(tmp_path, capsys):
    assert main(["run", "launcher=joblib", f"out={tmp_path}"]) == 2
    assert "add -m" in one_line_error(capsys.readouterr().err)
    assert main(["run", "seed=0,1", f"out={tmp_path}"]) == 2
    assert "bench run -m" in one_line_error(capsys.readouterr().err)
    assert not any(tmp_path.iterdir())


def test_a_job_that_fails_is_named_and_the_others_still_report(tmp_path, monkeypatch, capsys, restore_logging):
    """One job raising (after the sweep was validated) gives exit 1 and a line naming the job and its log;
    Hydra's sweeper alone would re-raise the first failure and drop every other job's result."""
    import bench.runner

    def fake_run(cfg):
        if cfg.seed == 1:
            raise RuntimeError("boom on seed 1")
        return bench.runner.Outcome()

    monkeypatch.setattr(bench.runner, "run", fake_run)
    monkeypatch.delenv("BENCH_QUIET", raising=False)
    out = tmp_path / "out"
    assert main(["run", "-m", "model=wrn", "seed=0,1,2", "scale=tiny", f"out={out}"]) == 1
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("bench: error:")]
    assert "sweep job #1 (model=wrn seed=1 " in line and "failed: RuntimeError: boom on seed 1" in line
    log = Path(line.rsplit("log: ", 1)[1])
    assert log.is_file() and "boom on seed 1" in log.read_text() and log.parent.name == "1"
    assert "sweep: 3 jobs" in err

"""Issue 14 item 14: sweeps with bad input. Nonsense launcher settings are one line and exit 2 before any job
starts; when the launcher itself fails, every job is named with what became of it, and only paths that
exist are named."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from hydra.core.plugins import Plugins

from bench.cli import main


def wrap_launcher(monkeypatch, wrap):
    """Wrap the launch method of the launcher Hydra instantiates (its plugin classes are loaded by Hydra itself)."""
    instantiate = Plugins.instantiate_launcher

    def instantiate_wrapped(self, *args, **kwargs):
        launcher = instantiate(self, *args, **kwargs)
        launcher.launch = wrap(launcher.launch)
        return launcher

    monkeypatch.setattr(Plugins, "instantiate_launcher", instantiate_wrapped)


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("args, fragment", [
    (["launcher=joblib", "launcher.n_jobs=0"], "launcher.n_jobs=0"),
    (["launcher=submitit_local", "launcher.timeout_min=-1"], "launcher.timeout_min=-1"),
    (["launcher=submitit_local", "launcher.timeout_min=0"], "launcher.timeout_min=0"),
    (["launcher=submitit_local", "launcher.gpus_per_node=-3"], "launcher.gpus_per_node=-3"),
    (["launcher=submitit_local", "launcher.nodes=0"], "launcher.nodes=0"),
    (["launcher=submitit_slurm", "launcher.mem_gb=0"], "launcher.mem_gb=0"),
    (["launcher=submitit_slurm", "launcher.array_parallelism=0"], "launcher.array_parallelism=0"),
])
def test_nonsense_launcher_settings_are_one_line_exit_2_and_write_nothing(tmp_path, monkeypatch, capsys,
                                                                         restore_logging, args, fragment):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "-m", "suite=calibration", "scale=tiny", "model=wrn", "seed=0,1", *args,
                 f"out={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    (line,) = err.strip().splitlines()
    assert line.startswith("bench: error: ") and fragment in line and "Traceback" not in err
    assert sorted(tmp_path.iterdir()) == []


def test_a_launcher_failure_says_what_became_of_each_job(tmp_path, monkeypatch, capsys, restore_logging):
    """The launcher runs job #0, then dies (a worker lost, a submission refused): #0's record is named, #1 and #2
    are said never to have started, and no directory that does not exist is named."""
    def one_then_die(launch):
        def launch_one_then_die(job_overrides, initial_job_idx):
            launch(job_overrides[:1], initial_job_idx)
            raise RuntimeError("worker lost\nwith a second line")

        return launch_one_then_die

    wrap_launcher(monkeypatch, one_then_die)
    out = tmp_path / "out"
    assert main(["run", "-m", "suite=calibration", "scale=tiny", "model=wrn", "seed=0,1,2", f"out={out}"]) == 1
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("bench: ")]
    assert "Traceback" not in err and len(lines) == 4 and lines[0].startswith("bench: error: "), err
    assert "the launcher failed (RuntimeError: worker lost)" in lines[0] and "1 of 3 jobs finished" in lines[0]
    assert "sweep job #0 (" in lines[1] and "finished" in lines[1] and "seed=0" in lines[1]
    assert "sweep job #1 (" in lines[2] and "never started" in lines[2] and "seed=1" in lines[2]
    assert "sweep job #2 (" in lines[3] and "never started" in lines[3]
    for path in re.findall(r"(/[^\s;,()]+)", "\n".join(lines)):
        assert Path(path).exists(), f"names {path}, which does not exist"
    assert len(list(out.glob("*.json"))) == 1


def test_a_job_that_started_but_never_reported_is_named_with_its_log(tmp_path, monkeypatch, capsys, restore_logging):
    """A job killed mid-run (kill -9, out of memory, a wall-time limit) leaves its Hydra dir and no result."""
    import bench.runner

    def killed(cfg):
        raise SystemExit(137)  # not an Exception: what the sweep's job sees of a process that is going away

    def report_loss(launch):
        def launch_and_report_loss(job_overrides, initial_job_idx):
            try:
                return launch(job_overrides, initial_job_idx)
            except SystemExit:
                raise RuntimeError("job process exited with code 137") from None

        return launch_and_report_loss

    monkeypatch.setattr(bench.runner, "run", killed)
    wrap_launcher(monkeypatch, report_loss)
    out = tmp_path / "out"
    assert main(["run", "-m", "suite=calibration", "scale=tiny", "model=wrn", "seed=0,1", f"out={out}"]) == 1
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("bench: ")]
    assert len(lines) == 3 and "0 of 2 jobs finished" in lines[0]
    assert "records" not in lines[0]  # there is no records dir to point at
    assert "sweep job #0 (" in lines[1] and "started but did not finish" in lines[1] and "bench.log" in lines[1]
    assert "sweep job #1 (" in lines[2] and "never started" in lines[2]
    for path in re.findall(r"(/[^\s;,()]+)", "\n".join(lines)):
        assert Path(path).exists(), f"names {path}, which does not exist"

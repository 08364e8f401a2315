"""Issue 14, the run side: what a careless or hostile user can hand `bench run`, and what the run then does.

User mistakes are one line on stderr, exit code 2, before any work (no training, nothing written). Cached
checkpoints carry a checksum and a corrupt one is retrained, never used. A full or unwritable disk at record
time costs that record only, cleanly. The source checkout is never touched.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import bench.results.records
from bench.cli import main
from bench.config import load_config
from bench.data.base import sha256_file
from bench.models.base import DataInfo
from bench.models.wrn import WRN
from bench.runner import run
from bench.scales import Scale

TINY = ["suite=calibration", "scale=tiny"]  # wrn trains in about a second here, and the suite needs no extractor
DIGITS = DataInfo((1, 8, 8), 10)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A private, empty checkpoint cache for the test."""
    c = tmp_path / "cache"
    monkeypatch.setenv("BENCH_CACHE", str(c))
    return c


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def assert_one_line(code: int, err: str, *fragments: str) -> str:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("bench: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


def files_under(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file()) if d.exists() else []


def wrn_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.contiguous() for k, v in WRN(WRN.recipe(Scale.tiny, DIGITS), DIGITS).state_dict().items()}


# --- items 5, 13, 17: nonsense values are refused before any work -----------------------------------------------
@pytest.mark.parametrize("args, fragments", [
    (["model=wrn", "opts.epochs=-1"], ["opts.epochs=-1", "at least 1"]),
    (["model=wrn", "opts.epochs=0"], ["opts.epochs=0", "at least 1"]),
    (["model=wrn", "opts.width=0"], ["opts.width=0", "at least 1"]),
    (["model=wrn", "opts.batch_size=-64"], ["opts.batch_size=-64"]),
    (["model=wrn", "opts.warmup_iters=-1"], ["opts.warmup_iters=-1", "0 or more"]),
    (["model=wrn", "opts.lr=nan"], ["opts.lr=nan", "finite"]),
    (["model=wrn", "opts.lr=inf"], ["opts.lr=inf", "finite"]),
    (["model=wrn", "opts.lr=0"], ["opts.lr=0.0", "greater than 0"]),
    (["model=wrn", "opts.leak=-inf"], ["opts.leak=-inf", "finite"]),
    (["model=wrn", "opts.decay_epochs=[a,b]"], ["opts.decay_epochs", "float"]),
    (["model=wrn", "opts.norm=nope"], ["opts.norm='nope'", "none, batch"]),
    (["model=wrn", "seed=9223372036854775808"], ["seed=9223372036854775808", "0 to 4294967295"]),
    (["model=wrn", "seed=-1"], ["seed=-1", "0 to 4294967295"]),
    (["model=wrn", "out="], ["out= is empty"]),
    (["models=[]"], ["models=[] names no model"]),
    (["models=[wrn,wrn]"], ["'wrn' twice"]),
    (["model="], ["model= is empty"]),
])
def test_nonsense_values_are_one_line_exit_2_before_any_work(tmp_path, cache, capsys, monkeypatch, args, fragments):
    monkeypatch.chdir(tmp_path)
    out = [] if any(a.startswith("out=") for a in args) else [f"out={tmp_path / 'out'}"]
    assert_one_line(*cli(capsys, "run", *TINY, *out, *args), *fragments)
    assert not (tmp_path / "out").exists()
    assert files_under(tmp_path) == []  # nothing trained into the cache, nothing written into the cwd


@pytest.mark.parametrize("path, fragments", [("/etc/passwd", ["/etc/passwd", "not a readable PyTorch checkpoint"]),
                                             ("/dev/zero", ["/dev/zero", "is not a file"]),
                                             ("/tmp", ["/tmp", "is not a file"])])
def test_a_weights_file_that_is_not_one_is_one_line_exit_2_before_any_work(tmp_path, cache, capsys, monkeypatch,
                                                                            path, fragments):
    """The hybrid suite uses a feature extractor, so metrics.inception_weights= applies and is checked first."""
    monkeypatch.chdir(tmp_path)
    assert_one_line(*cli(capsys, "run", "scale=tiny", "model=wrn", f"out={tmp_path / 'out'}",
                         f"metrics.inception_weights={path}"), *fragments)
    assert not (tmp_path / "out").exists() and files_under(tmp_path) == []


@pytest.mark.parametrize("where", ["/sys/kernel", "/sys/kernel/bench-cache", "file"])
def test_an_unwritable_cache_is_one_line_exit_2_before_any_work(tmp_path, capsys, monkeypatch, where):
    if where.startswith("/sys") and not Path("/sys/kernel").is_dir():
        pytest.skip("no /sys/kernel here")
    if where == "file":
        where = str(tmp_path / "a-file")
        Path(where).write_text("x")
    monkeypatch.setenv("BENCH_CACHE", where)
    out = tmp_path / "out"
    assert_one_line(*cli(capsys, "run", *TINY, "model=wrn", f"out={out}"), "BENCH_CACHE", where)
    assert not out.exists()


def test_an_unwritable_out_dir_that_passes_os_access_is_refused_before_training(tmp_path, cache, capsys):
    """/sys/kernel exists and root passes os.access(W_OK) on it, but no file can be created there."""
    if not Path("/sys/kernel").is_dir():
        pytest.skip("no /sys/kernel here")
    assert_one_line(*cli(capsys, "run", *TINY, "model=wrn", "out=/sys/kernel"), "out=/sys/kernel", "not writable")
    assert files_under(cache) == []


# --- item 5: int32 weights; items 11 and 18: user-given checkpoints ------------------------------------------
def test_integer_weights_are_refused_not_truncated(tmp_path, cache, capsys):
    path = tmp_path / "int.safetensors"
    save_file({k: v.to(torch.int32) if v.is_floating_point() else v for k, v in wrn_state().items()}, str(path))
    assert_one_line(*cli(capsys, "run", *TINY, "model=wrn", f"checkpoint={path}", f"out={tmp_path / 'o'}"),
                    str(path), "int32", "float32")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("meta, fragment", [
    ("{not json", "not valid JSON"),
    ('"a string"', "not a JSON object"),
    ("[1, 2]", "not a JSON object"),
    ('{"model": "wrn", "train": [1]}', "'train'"),
    ('{"model": 7}', "'model'"),
])
def test_bad_metadata_in_a_given_checkpoint_is_one_line_exit_2(tmp_path, cache, capsys, meta, fragment):
    path = tmp_path / "w.safetensors"
    save_file(wrn_state(), str(path), metadata={"bench": meta})
    assert_one_line(*cli(capsys, "run", *TINY, "model=wrn", f"checkpoint={path}", f"out={tmp_path / 'o'}"),
                    str(path), fragment)
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_that_is_not_a_regular_file_says_so(tmp_path, capsys):
    line = assert_one_line(*cli(capsys, "run", *TINY, "model=wrn", "checkpoint=/dev/zero", f"out={tmp_path}/o"),
                           "/dev/zero", "not a regular file")
    assert "does not exist" not in line
    assert_one_line(*cli(capsys, "run", *TINY, "model=wrn", f"checkpoint={tmp_path}", f"out={tmp_path}/o"),
                    "is a directory")


class _System:
    def __reduce__(self):
        return (os.system, ("true",))


class _Plain:
    pass


@pytest.mark.parametrize("obj, callable_name", [({"w": _System()}, "system"), ({"w": _Plain()}, "_Plain")])
def test_a_refused_pickle_names_the_callable(tmp_path, capsys, obj, callable_name):
    path = tmp_path / "evil.pt"
    torch.save(obj, path)
    line = assert_one_line(*cli(capsys, "run", *TINY, "model=wrn", f"checkpoint={path}", f"out={tmp_path}/o"),
                           "refusing to load", callable_name)
    assert "GLOBAL" not in line


# --- items 3 and 9: corrupt cached checkpoints are retrained -----------------------------------------------------
def _tensor_region(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def test_a_bit_flipped_cached_checkpoint_is_retrained_not_used(tmp_path, cache):
    (clean, _), = run(load_config([*TINY, "model=wrn", f"out={tmp_path / 'a'}"])).records
    path = Path(clean.checkpoint["path"])
    data = bytearray(path.read_bytes())
    start = _tensor_region(path)
    data[start + 64: start + 64 + 4096] = b"\x3f" * 4096  # finite float32s (0.747): no NaN check catches them
    path.write_bytes(bytes(data))
    (again, _), = run(load_config([*TINY, "model=wrn", f"out={tmp_path / 'b'}"])).records
    assert again.status == "ok" and again.train["source"] == "trained"
    assert again.metrics["accuracy"].value == clean.metrics["accuracy"].value
    assert sha256_file(path) == again.checkpoint["sha256"]
    (third, _), = run(load_config([*TINY, "model=wrn", f"out={tmp_path / 'c'}"])).records
    assert third.train["source"] == "cache"  # the repaired file verifies


def test_a_cached_checkpoint_without_a_checksum_is_retrained(tmp_path, cache):
    (clean, _), = run(load_config([*TINY, "model=wrn", f"out={tmp_path / 'a'}"])).records
    path = Path(clean.checkpoint["path"])
    with safe_open(str(path), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, str(path), metadata={"bench": meta["bench"]})  # what bench wrote before checksums
    (again, _), = run(load_config([*TINY, "model=wrn", f"out={tmp_path / 'b'}"])).records
    assert again.train["source"] == "trained"


@pytest.mark.parametrize("meta", ["{not json", '"a string"', "[1, 2]", '{"train": "x"}'])
def test_corrupt_metadata_in_a_cached_checkpoint_is_retrained(tmp_path, cache, meta):
    (clean, _), = run(load_config([*TINY, "model=wrn", f"out={tmp_path / 'a'}"])).records
    path = Path(clean.checkpoint["path"])
    with safe_open(str(path), framework="pt") as f:
        tensors, saved = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file(tensors, str(path), metadata={**saved, "bench": meta})
    outcome = run(load_config([*TINY, "model=wrn", f"out={tmp_path / 'b'}"]))
    (again, _), = outcome.records
    assert again.status == "ok" and again.train["source"] == "trained"
    assert again.metrics["accuracy"].value == clean.metrics["accuracy"].value


# --- item 15: a checkpoint written concurrently by an identical run is adopted, not clobbered ------------------
def test_a_concurrent_identical_run_keeps_every_records_checkpoint_sha256_true(tmp_path, cache, monkeypatch):
    """While this run trains, an identical run finishes first and caches its checkpoint (and records its sha256).
    This run must not replace that file: it evaluates the cached weights, so both records name the file at
    the path."""
    from bench import checkpoints
    from bench.plan import plan

    cfg = load_config([*TINY, "model=wrn", f"out={tmp_path / 'a'}"])
    p = plan(cfg)
    path = checkpoints.cached_path(WRN, checkpoints.cache_key(WRN, p.configs["wrn"], p.data, p.scale, cfg.seed))
    fit = WRN.fit
    recorded_by_the_other_run = []

    def fit_while_another_run_finishes(self, train, ctx):
        stats = fit(self, train, ctx)
        other = WRN(self.config, self.data_info)
        other.load_state_dict({k: v + 0.01 if v.is_floating_point() else v for k, v in self.state_dict().items()})
        recorded_by_the_other_run.append(checkpoints.save(other, path, {"train": {"steps": 1, "seconds": 0.0}}))
        return stats

    monkeypatch.setattr(WRN, "fit", fit_while_another_run_finishes)
    (rec, _), = run(cfg).records
    theirs, = recorded_by_the_other_run
    assert sha256_file(path) == theirs  # the other run's record still names the file at its path
    assert rec.checkpoint["sha256"] == theirs and rec.checkpoint["path"] == str(path)
    monkeypatch.setattr(WRN, "fit", fit)
    (cached, _), = run(load_config([*TINY, "model=wrn", f"out={tmp_path / 'b'}"])).records
    assert cached.train["source"] == "cache" and cached.checkpoint["sha256"] == theirs
    assert cached.metrics == rec.metrics  # the adopted weights are the ones that were evaluated


# --- items 7 and 15: a full disk at record time; leftovers of killed runs ---------------------------------------
def test_a_full_disk_at_record_time_costs_that_record_only(tmp_path, cache, capsys, monkeypatch):
    out = tmp_path / "out"
    real_open = open
    calls = []

    def full_disk_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        if "w" in mode and Path(file).parent == out and not calls:
            calls.append(file)

            class Full:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    f.close()

                def write(self, _):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

                def __getattr__(self, name):
                    return getattr(f, name)

            return Full()
        return f

    monkeypatch.setattr(bench.results.records, "open", full_disk_open, raising=False)
    monkeypatch.delenv("BENCH_QUIET", raising=False)
    code = main(["run", *TINY, "models=[wrn,pixel_independent]", f"out={out}"])
    err = capsys.readouterr().err
    assert calls, "the record was not written through open()"
    assert code == 1 and "Traceback" not in err
    (line,) = [ln for ln in err.splitlines() if "No space left on device" in ln]
    assert "wrn" in line and str(out) in line
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.endswith(".tmp")], names  # no hidden 0-byte temporary file
    (record,) = [n for n in names if n.endswith(".json")]
    assert "pixel_independent" in record  # the next model ran and its record was written


def test_a_file_size_limit_at_record_time_is_clean_in_a_real_process(tmp_path, cache):
    """RLIMIT_FSIZE makes every write past 1 KB fail (EFBIG) for real, as a full disk does: no traceback,
    no temporary file, every model still runs and each lost record is named on one line."""
    run(load_config([*TINY, "models=[wrn,pixel_independent]", f"out={tmp_path / 'warm'}"]))  # cache both

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))

    out = tmp_path / "out"
    env = {**os.environ, "BENCH_CACHE": str(cache), "BENCH_QUIET": "1"}
    res = subprocess.run([sys.executable, "-m", "bench", "run", *TINY, "models=[wrn,pixel_independent]",
                          f"out={out}"], capture_output=True, text=True, env=env, preexec_fn=limit, timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    lost = [ln for ln in res.stderr.splitlines() if ln.startswith("bench: error: ")]
    assert len(lost) == 2 and "wrn" in lost[0] and "pixel_independent" in lost[1], res.stderr
    assert [p.name for p in out.iterdir() if p.suffix == ".tmp" or p.name.startswith(".")] == []


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftover_temporary_files_of_dead_writers_are_cleaned_and_live_ones_kept(tmp_path, cache):
    from bench import fileio

    out = tmp_path / "out"
    out.mkdir()
    ckpt_dir = cache / "checkpoints" / "wrn"
    ckpt_dir.mkdir(parents=True)
    dead, old = _dead_pid(), time.time() - 3600
    stale = [out / f".hybrid_wrn_digits_s0_x.json.{dead}.tmp",  # what today's writers leave after kill -9
             ckpt_dir / f"0123.safetensors.tmp{dead}",
             fileio.tmp_path(out / "a.json", hidden=True, pid=dead),
             fileio.tmp_path(ckpt_dir / "b.safetensors", pid=dead)]
    live = [fileio.tmp_path(out / "c.json", hidden=True),  # this process: a live writer
            fileio.tmp_path(ckpt_dir / "d.safetensors", pid=dead)]  # a dead pid, but written just now
    for f in stale + live:
        f.write_bytes(b"")
    for f in stale:
        os.utime(f, (old, old))
    run(load_config([*TINY, "model=wrn", f"out={out}"]))
    assert [f for f in stale if f.exists()] == []
    assert all(f.exists() for f in live)


# --- item 18: a long failure reason is one line on stderr and whole in the record --------------------------------
def test_a_long_failure_reason_is_one_line_on_stderr_and_whole_in_the_record(tmp_path, cache, capsys, monkeypatch):
    reason = "\n".join(f"line {i} of a very long [bold]failure[/bold]" for i in range(261))

    def fail(self, train, ctx):
        raise RuntimeError(reason)

    monkeypatch.setattr(WRN, "fit", fail)
    monkeypatch.delenv("BENCH_QUIET", raising=False)
    out = tmp_path / "out"
    assert main(["run", *TINY, "models=[wrn,pixel_independent]", f"out={out}"]) == 1
    err = capsys.readouterr().err
    about = [ln for ln in err.splitlines() if "line " in ln]
    assert len(about) == 1 and "wrn failed" in about[0] and "line 0 of" in about[0]
    assert "[bold]failure[/bold]" in about[0]  # shown as written, not taken for rich markup
    (rec,) = [json.loads(p.read_text()) for p in out.glob("*wrn*.json")]
    assert rec["status"] == "failed" and reason in rec["reason"]


# --- item 19: provenance without git's index lock -----------------------------------------------------------------
def test_provenance_does_not_rewrite_the_source_checkouts_index(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    (repo / "f").write_text("a\n")
    subprocess.run([*git, "add", "f"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=repo, check=True)
    index = repo / ".git" / "index"
    later = time.time() + 5
    os.utime(repo / "f", (later, later))  # stat data changed: a locking `git status` rewrites the index
    before = os.stat(index)
    info = bench.results.records.git_info(repo)
    after = os.stat(index)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert info["git_commit"] and info["git_dirty"] is False
    (repo / "f").write_text("b\n")
    bench.results.records.git_info.cache_clear()  # read once per process; here the checkout changed on purpose
    assert bench.results.records.git_info(repo)["git_dirty"] is True
    assert not (repo / ".git" / "index.lock").exists()


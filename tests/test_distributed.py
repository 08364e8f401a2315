"""torchrun with 2 CPU ranks (gloo) gives the 1-rank numbers; too few batches for the ranks, and a rank
that dies, fail cleanly without a record."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_cli import bench

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def torchrun(nproc: int, *args, **kw):
    e = {**os.environ, "BENCH_QUIET": "1", "OMP_NUM_THREADS": "1"}
    e.pop("BENCH_DATA", None)  # as test_cli.bench: the 1-rank runs it is compared with see no shared data
    return subprocess.Popen([*TORCHRUN, f"--nproc_per_node={nproc}", "-m", "bench", "run", *args], env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def records(d: Path) -> dict[str, dict]:
    return {r["model"]: r for r in (json.loads(p.read_text()) for p in d.glob("*.json"))}


def assert_same_numbers(a: dict, b: dict) -> int:
    compared = 0
    for model, ra in a.items():
        rb = b[model]
        assert ra["status"] == rb["status"] == "ok", (ra.get("reason"), rb.get("reason"))
        assert ra["protocol"]["fingerprint"] == rb["protocol"]["fingerprint"]
        assert set(ra["metrics"]) == set(rb["metrics"])
        for k, m in ra["metrics"].items():
            v, w = m["value"], rb["metrics"][k]["value"]
            assert abs(v - w) <= 1e-6 * max(abs(v), 1e-12), (model, k, v, w)
            compared += 1
    return compared


@pytest.mark.slow
@pytest.mark.parametrize("suite, models, keys", [
    ("hybrid", "[wrn,jem]", ("accuracy", "is", "fid")),
    ("ood", "[jem]", ("ood.log_px.uniform.auroc", "ood.max_softmax.interp.auroc")),
])
def test_two_ranks_equal_one_rank(tmp_path, suite, models, keys):
    common = [f"suite={suite}", f"models={models}", "scale=tiny"]
    if suite == "ood":
        common.append("ood_sets=[uniform,interp]")
    one = bench("run", *common, f"out={tmp_path / 'one'}")
    assert one.returncode == 0, one.stderr
    proc = torchrun(2, *common, f"out={tmp_path / 'two'}")
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    a, b = records(tmp_path / "one"), records(tmp_path / "two")
    assert set(a) == set(b) and len(list((tmp_path / "two").glob("*.json"))) == len(a)  # one record per model
    assert assert_same_numbers(a, b) >= len(keys)
    for k in keys:
        assert any(k in r["metrics"] for r in b.values()), k
    assert all(r["env"]["distributed"]["world_size"] == 2 for r in b.values())


def test_more_ranks_than_batches_is_refused_before_any_work(tmp_path):
    # tiny hybrid draws 200 samples in batches of 100: 2 batches cannot feed 3 ranks
    proc = torchrun(3, "model=jem", "scale=tiny", f"out={tmp_path}")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "fewer than the 3 ranks" in err and "--nproc_per_node=2" in err
    assert not list(tmp_path.glob("*.json"))


def _rank_pids(parent: int) -> dict[int, int]:
    """rank → pid of the bench processes torchrun started (read from their environments)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text().split()
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat[3]) != parent:
            continue
        for kv in env:
            if kv.startswith(b"RANK="):
                found[int(kv[5:])] = int(d.name)
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc to find the rank processes")
def test_a_dying_rank_fails_the_run_without_a_record(tmp_path):
    proc = torchrun(2, "models=[jem]", "scale=tiny", "retrain=true", f"out={tmp_path}")
    deadline = time.time() + 120
    pids: dict[int, int] = {}
    while time.time() < deadline and 1 not in pids:
        time.sleep(0.5)
        pids = _rank_pids(proc.pid)
    assert 1 in pids, "rank 1 never started"
    time.sleep(2)
    os.kill(pids[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert not list(tmp_path.glob("*.json")), "a record was written although a rank died"

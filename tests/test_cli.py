"""The command line as a user meets it: one-line errors with exit code 2 and nothing written; an
end-to-end tiny run; determinism."""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from bench.results.records import fingerprint


def bench(*args, env=None, cwd=None):
    e = {**os.environ, "BENCH_QUIET": "1", **(env or {})}
    e.pop("BENCH_DATA", None) if env is None or "BENCH_DATA" not in env else None
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, env=e, cwd=cwd,
                          timeout=600)


def assert_user_error(res, *fragments):
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["suite=nope"], ["unknown suite 'nope'", "hybrid"]),
        (["model=nope"], ["unknown model 'nope'", "jem", "pixel_independent", "wrn"]),
        (["models=[jem,nope]"], ["unknown model 'nope'"]),
        (["data=nope"], ["unknown dataset 'nope'", "digits", "mnist"]),
        (["foo=1"], ["unknown key 'foo'", "suite", "scale"]),
        (["scale=huge"], ["unknown scale 'huge'", "tiny, small, paper"]),
        (["device=tpu"], ["unknown device 'tpu'"]),
        (["seed=abc"], ["bad override"]),
        (["model=jem", "opts.nope=1"], ["unknown option 'nope' for model 'jem'"]),
        (["data=mnist", "data.root=/nonexistent/dir"], ["dataset 'mnist' not found", "/nonexistent/dir"]),
        (["data=npz:/nonexistent/x.npz"], ["/nonexistent/x.npz"]),
        (["model=jem", "checkpoint=/nonexistent.safetensors"], ["does not exist"]),
        (["checkpoint=/x.safetensors"], ["evaluates one model"]),
        (["metrics.inception_weights=/nonexistent.pth"], ["does not exist"]),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, args, fragments):
    out = tmp_path / "out"
    res = bench("run", "scale=tiny", f"out={out}", *args)
    assert_user_error(res, *fragments)
    assert not out.exists() or not any(out.iterdir())


def test_bad_subcommand_and_list(tmp_path):
    assert_user_error(bench("frobnicate"), "invalid choice")
    assert_user_error(bench("list", "things"), "invalid choice")
    res = bench("list", "models")
    assert res.returncode == 0
    assert "jem" in res.stdout and "Sampler" in res.stdout
    for what in ("suites", "datasets", "metrics"):
        assert bench("list", what).returncode == 0


def test_bad_checkpoints_are_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a checkpoint at all")
    assert_user_error(bench("run", "scale=tiny", "model=wrn", f"checkpoint={corrupt}", f"out={out}"),
                      "not a readable safetensors")
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_Evil(str(marker))))
    assert_user_error(bench("run", "scale=tiny", "model=wrn", f"checkpoint={evil}", f"out={out}"), "refusing to load")
    assert not marker.exists()
    assert not out.exists()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _metrics(out: Path) -> dict:
    recs = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    return {r["model"]: r["metrics"] for r in recs}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run1")
    res = bench("run", "scale=tiny", f"out={out}")
    assert res.returncode == 0, res.stderr
    return out, res


def test_end_to_end_tiny_run(tiny_run):
    out, res = tiny_run
    records = {json.loads(p.read_text())["model"]: json.loads(p.read_text()) for p in out.glob("*.json")}
    # the hybrid default: every JEM Table 1 system, and the floor
    assert set(records) == {"resflow", "glow_hybrid", "igebm", "jem_factored", "jem", "wrn", "sngan", "ncsn",
                            "pixel_independent"}
    for r in records.values():
        assert r["status"] == "ok" and r["schema_version"] == 2 and r["suite"] == "hybrid"
        assert r["data"] == "digits" and r["scale"] == "tiny" and r["seed"] == 0
        assert r["protocol"]["fingerprint"] == fingerprint(r["protocol"])
        assert r["env"]["torch"] and r["env"]["device"] == "cpu" and r["env"]["device_name"]
        assert r["checkpoint"]["sha256"] and r["train"]["source"] in ("trained", "cache")
    assert set(records["jem"]["metrics"]) == {"accuracy", "is", "fid"}
    assert records["wrn"]["skipped"] == {"is": "model has no Sampler", "fid": "model has no Sampler"}
    assert records["pixel_independent"]["skipped"] == {"accuracy": "model has no Classifier"}
    p = records["jem"]["protocol"]
    assert p["feature_extractor"]["name"].startswith("digits-net@") and len(p["feature_extractor"]["sha256"]) == 64
    assert p["samples"]["n"] == 200 and p["reference"]["split"] == "test"
    assert p["samples"]["sampler"]["eval"]["source"] == "replay_buffer"
    # the training sampler is the recipe (model_config), not the evaluation protocol
    assert "train" not in p["samples"]["sampler"] and records["jem"]["model_config"]["sgld_steps"] == 2
    assert len(list(out.glob("*.samples.png"))) == 8  # every model but wrn samples
    assert "Accuracy" in res.stdout and "FID" in res.stdout and "N/A" in res.stdout
    # the table command reads the same records
    table = bench("table", str(out))
    assert table.returncode == 0 and "jem" in table.stdout


def test_same_seed_same_numbers_cold_and_warm(tiny_run, tmp_path):
    out1, _ = tiny_run
    cold = tmp_path / "cold"
    res = bench("run", "scale=tiny", f"out={cold}", env={"BENCH_CACHE": str(tmp_path / "fresh-cache")})
    assert res.returncode == 0, res.stderr
    assert _metrics(cold) == _metrics(out1)
    warm = tmp_path / "warm"
    assert bench("run", "scale=tiny", f"out={warm}").returncode == 0
    assert _metrics(warm) == _metrics(out1)
    # the gate passes a re-run of the same code and seeds (real records, not synthetic ones)
    gate = bench("compare", str(out1), str(warm))
    assert gate.returncode == 0, gate.stdout + gate.stderr
    other = tmp_path / "seed1"
    assert bench("run", "scale=tiny", "seed=1", "model=jem", f"out={other}").returncode == 0
    assert _metrics(other)["jem"] != _metrics(out1)["jem"]


def test_diverging_model_gives_failed_record_and_others_continue(tmp_path):
    out = tmp_path / "out"
    res = bench("run", "scale=tiny", "models=[jem]", "opts.sgld_step_size=1e38", f"out={out}")
    assert res.returncode == 1
    (rec,) = [json.loads(p.read_text()) for p in out.glob("*.json")]
    assert rec["status"] == "failed" and rec["metrics"] == {}
    assert "diverged" in rec["reason"] or "non-finite" in rec["reason"]
    assert "Traceback" not in res.stderr

"""The GPU-path options (bf16 autocast, channels_last) and the sample-count override: they run on the CPU
too, are recorded in the protocol and change its fingerprint, so their numbers are never mixed with fp32
ones; bad values are one-line errors."""

import json

import pytest
from test_cli import assert_user_error, bench


def _record(d):
    (path,) = d.glob("*.json")
    return json.loads(path.read_text())


@pytest.mark.slow
def test_bf16_channels_last_and_n_samples_are_recorded(tmp_path):
    base = ["model=jem", "scale=tiny", "n_samples=100"]
    a = bench("run", *base, f"out={tmp_path / 'fp32'}")
    b = bench("run", *base, "precision=bf16", "channels_last=true", f"out={tmp_path / 'bf16'}")
    assert a.returncode == 0 and b.returncode == 0, (a.stderr, b.stderr)
    ra, rb = _record(tmp_path / "fp32"), _record(tmp_path / "bf16")
    assert ra["protocol"]["samples"]["n"] == rb["protocol"]["samples"]["n"] == 100
    assert rb["protocol"]["precision"] == "bf16" and rb["protocol"]["speed_options"]["channels_last"] is True
    assert ra["protocol"]["fingerprint"] != rb["protocol"]["fingerprint"]
    assert ra["metrics"]["accuracy"]["value"] == rb["metrics"]["accuracy"]["value"]  # logits stay fp32
    assert rb["metrics"]["fid"]["value"] > 0


@pytest.mark.parametrize("args, fragment", [
    (["precision=fp8"], "unknown precision 'fp8'"),
    (["n_samples=5"], "n_samples=5 is too few"),
    (["suite=likelihood", "n_samples=100"], "n_samples= does not apply to suite 'likelihood'"),
])
def test_bad_speed_options(tmp_path, args, fragment):
    res = bench("run", "model=jem", "scale=tiny", f"out={tmp_path}", *args)
    assert_user_error(res, fragment)
    assert not list(tmp_path.iterdir())


def test_device_auto_picks_cuda_when_there_is_one(monkeypatch):
    import torch

    from bench.errors import UserError
    from bench.plan import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda" and resolve_device("cuda").type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(UserError, match="no CUDA device"):
        resolve_device("cuda")

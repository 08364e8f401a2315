"""The fingerprint is the evaluation protocol and only that: the same data in two places, another seed,
another CPU thread count give the same fingerprint; what the run drew is recorded beside it."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from bench.data import load_dataset
from bench.features import domain
from bench.results.records import load_records


def bench(*args):
    env = {k: v for k, v in os.environ.items() if k != "BENCH_DATA"}
    env["BENCH_QUIET"] = "1"
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, env=env,
                          timeout=900)


def _small_npz(path):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = (rng.random((120, 8, 8, 1)) * 60 + y[:, None, None, None] * 60).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y)
    return path


def test_the_same_data_in_two_places_is_the_same_protocol(tmp_path):
    a = _small_npz(tmp_path / "one" / "set.npz")
    b = tmp_path / "two" / "elsewhere" / "set.npz"
    b.parent.mkdir(parents=True)
    shutil.copy(a, b)
    for src, out in ((a, "ra"), (b, "rb")):
        res = bench("run", "model=pixel_independent", "scale=tiny", f"data=npz:{src}", f"out={tmp_path / out}")
        assert res.returncode == 0, res.stderr
    (ra,), (rb,) = load_records(tmp_path / "ra"), load_records(tmp_path / "rb")
    assert ra.protocol["fingerprint"] == rb.protocol["fingerprint"]
    assert ra.data == rb.data == "npz:set.npz"
    assert str(tmp_path) not in json.dumps(ra.protocol)  # no path anywhere in the protocol
    assert ra.data_location == {"file": str(a)} and rb.data_location == {"file": str(b)}
    assert ra.draws["feature_extractor"]["weights_sha256"]  # a recipe-trained extractor: its bytes beside
    res = bench("compare", str(tmp_path / "ra"), str(tmp_path / "rb"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_domain_extractor_does_not_depend_on_the_thread_count(monkeypatch):
    data = load_dataset("digits", None)
    config = domain.DomainNetConfig(in_channels=1, n_classes=10, epochs=1)
    before = torch.get_num_threads()
    digests = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            net = domain.train_domain_net(data, config)
            digests.append([p.detach().clone() for p in net.parameters()])
            assert torch.get_num_threads() == threads  # restored after training
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(p, q) for p, q in zip(*digests))


def test_digits_uses_the_shipped_extractor_whose_bytes_are_its_identity():
    ext = domain.domain_extractor(load_dataset("digits", None))
    assert ext.pinned and ext.weights_path.parent == domain.PINNED_DIR
    proto = ext.protocol()
    assert proto["sha256"] == ext.sha256 and ext.draws() == {}
    assert proto["name"] == f"digits-net@{ext.sha256[:12]}"


def test_a_recipe_trained_extractor_is_named_by_its_recipe(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    data = load_dataset(f"npz:{_small_npz(tmp_path / 's.npz')}", None)
    monkeypatch.setattr(domain, "DomainNetConfig", functools.partial(domain.DomainNetConfig, epochs=1))
    ext = domain.domain_extractor(data)
    proto = ext.protocol()
    assert not ext.pinned and "sha256" not in proto and ext.draws() == {"weights_sha256": ext.sha256}
    assert proto["name"] == f"npz-net@recipe-{domain.recipe_code_hash()}"


@pytest.mark.parametrize("suite", ["likelihood"])
def test_two_seeds_share_one_fingerprint_and_record_their_draws(tmp_path, suite):
    for seed in (0, 1):
        res = bench("run", f"suite={suite}", "model=pixel_independent", "scale=tiny", f"seed={seed}",
                    f"out={tmp_path}")
        assert res.returncode == 0, res.stderr
    r0, r1 = sorted(load_records(tmp_path), key=lambda r: r.seed)
    assert r0.protocol["fingerprint"] == r1.protocol["fingerprint"]
    assert r0.draws["bits_per_dim"] == {"seed": 0} and r1.draws["bits_per_dim"] == {"seed": 1}
    res = bench("compare", str(tmp_path), str(tmp_path))
    assert res.returncode == 0, res.stdout + res.stderr

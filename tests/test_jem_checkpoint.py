"""checkpoint_format=jem: JEM's released checkpoints (wgrathwohl/JEM) in `jem` and `wrn`.

The fidelity reference is a test vector made with JEM's own model code (WRN-10-1, seeded weights plus
noise): its logits and energy must be reproduced within 1e-5 from the state dict alone. The released
WRN-28-10 layout comes from the key list of the real checkpoint; a file in that layout with random weights
must run through suite=hybrid; bad files must stop the run with one line and exit code 2.
"""

import dataclasses
import hashlib
import json
import math
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bench import checkpoints
from bench.checkpoint_formats import jem as jem_format
from bench.cli import main
from bench.config import load_config
from bench.errors import CheckpointError
from bench.models import MODELS
from bench.models.base import DataInfo, to_uint8
from bench.plan import plan
from bench.scales import Scale

try:
    from data_fixtures import write_cifar10
except ImportError:  # tests/ is a package in some runners' layouts
    from tests.data_fixtures import write_cifar10

FIXTURES = Path(__file__).parent / "fixtures"
VECTOR = "jem_ccf_wrn10x1.safetensors"
KEYS = "jem_ccf_wrn28x10_keys.json"
PREFIX = "model_state_dict."
CIFAR = DataInfo((3, 32, 32), 10)
TOL = 1e-5


def read_vector(path: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    t = load_file(str(path))
    state = {k[len(PREFIX):]: v for k, v in t.items() if k.startswith(PREFIX)}
    return state, t["input"], t["logits"], t["energy"]


def save_jem(path: Path, state: dict[str, torch.Tensor], buffer: torch.Tensor, **more) -> Path:
    """What JEM's ``checkpoint()`` writes: torch.save of {'model_state_dict': f.state_dict(), 'replay_buffer': ...}."""
    torch.save({"model_state_dict": OrderedDict(state), "replay_buffer": buffer, **more}, path)
    return path


def uniform_buffer(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((n, 3, 32, 32), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- fidelity against JEM's own code -------------------------------------------------------------
def check_fidelity(vector: Path, model_name: str, scale: Scale, tmp_path: Path) -> None:
    state, x, ref_logits, ref_energy = read_vector(vector)
    path = save_jem(tmp_path / "ccf.pt", state, uniform_buffer(16))
    ckpt = checkpoints.read_checkpoint(path, "jem")
    cls = MODELS.get(model_name)
    # the scale's recipe has another depth, width or norm: the checkpoint's tensors must override them
    config = checkpoints.configure_for(cls, cls.recipe(scale, CIFAR), CIFAR, ckpt)
    assert (config.depth, config.width, config.norm, config.leak) == (10, 1, "none", 0.2)
    # the test vector is JEM's network on noise-free inputs; the paper recipe's σ=0.03 test noise is tested apart
    model = cls(dataclasses.replace(config, eval_noise=0.0), CIFAR).eval()
    entry = checkpoints.apply_checkpoint(model, ckpt)
    assert entry["format"] == "jem" and entry["sha256"] == sha256(path)
    with torch.no_grad():
        direct = model.class_output(model.f(x))  # the network fed JEM's [-1, 1] input as it is
        logits = model.logits((x + 1) / 2)  # the capability, which maps [0, 1] to [-1, 1] itself
    for got in (direct, logits):
        assert (got - ref_logits).abs().max().item() <= TOL
        assert (-torch.logsumexp(got, dim=1) - ref_energy).abs().max().item() <= TOL
    if hasattr(model, "energy"):
        with torch.no_grad():
            assert (model.energy((x + 1) / 2) - ref_energy).abs().max().item() <= TOL


@pytest.mark.parametrize("model_name, scale", [("jem", Scale.paper), ("wrn", Scale.small)])
def test_reproduces_jems_logits_and_energy(tmp_path, model_name, scale):
    check_fidelity(FIXTURES / VECTOR, model_name, scale, tmp_path)


@pytest.mark.parametrize("model_name", ["jem", "wrn"])
def test_reproduces_the_shared_test_vector(shared_dir, tmp_path, model_name):
    shared = shared_dir / "fixtures" / VECTOR
    assert sha256(shared) == sha256(FIXTURES / VECTOR), "tests/fixtures holds a stale copy of the test vector"
    check_fidelity(shared, model_name, Scale.tiny, tmp_path)


def test_perturbed_weights_do_not_reproduce(tmp_path):
    """The tolerance is tight enough to notice one wrong weight (the fidelity test can fail)."""
    state, x, ref_logits, _ = read_vector(FIXTURES / VECTOR)
    state["f.layer2.0.conv1.bias"] = state["f.layer2.0.conv1.bias"] + 1e-3
    ckpt = checkpoints.read_checkpoint(save_jem(tmp_path / "p.pt", state, uniform_buffer(4)), "jem")
    config = checkpoints.configure_for(MODELS.get("wrn"), MODELS.get("wrn").recipe(Scale.tiny, CIFAR), CIFAR, ckpt)
    model = MODELS.get("wrn")(config, CIFAR).eval()
    checkpoints.apply_checkpoint(model, ckpt)
    with torch.no_grad():
        assert (model.logits((x + 1) / 2) - ref_logits).abs().max().item() > TOL


# --- the released layout ------------------------------------------------------------------------
def released_layout(path: Path) -> tuple[dict[str, tuple[int, ...]], dict]:
    spec = json.loads(path.read_text())
    return {k: tuple(v) for k, v in spec["model_state_dict"].items()}, spec


@pytest.mark.parametrize("where", ["tests", "shared"])
def test_layout_is_the_released_wrn28x10_key_list(where, request):
    base = FIXTURES if where == "tests" else request.getfixturevalue("shared_dir") / "fixtures"
    assert (base / KEYS).read_bytes() == (FIXTURES / KEYS).read_bytes(), "tests/fixtures holds a stale key list"
    keys, spec = released_layout(base / KEYS)
    arch = jem_format.Architecture(depth=28, width=10, norm="none", in_channels=3, n_classes=10)
    assert jem_format.layout(arch) == keys
    assert sum(math.prod(s) for s in keys.values()) == spec["n_params"]
    # the 10×1 test vector has the same layout at its own size
    state, *_ = read_vector(FIXTURES / VECTOR)
    small = jem_format.Architecture(depth=10, width=1, norm="none", in_channels=3, n_classes=10)
    assert jem_format.layout(small) == {k: tuple(v.shape) for k, v in state.items()}


def test_batch_norm_checkpoints_are_recognised(tmp_path):
    """JEM's --norm batch adds bn1/bn2 and the final f.bn1, with running statistics, under bench's names."""
    arch = jem_format.Architecture(depth=10, width=1, norm="batch", in_channels=3, n_classes=10)
    g = torch.Generator().manual_seed(1)
    state = {k: (torch.zeros((), dtype=torch.long) if k.endswith("num_batches_tracked")
                 else torch.rand(s, generator=g) * 0.1 + 0.5)
             for k, s in jem_format.layout(arch).items()}
    ckpt = checkpoints.read_checkpoint(save_jem(tmp_path / "bn.pt", state, uniform_buffer(4)), "jem")
    config = checkpoints.configure_for(MODELS.get("wrn"), MODELS.get("wrn").recipe(Scale.paper, CIFAR), CIFAR, ckpt)
    assert (config.depth, config.width, config.norm) == (10, 1, "batch")
    model = MODELS.get("wrn")(config, CIFAR).eval()
    checkpoints.apply_checkpoint(model, ckpt)
    assert torch.equal(model.f.layer1[0].bn1.running_var, state["f.layer1.0.bn1.running_var"])


# --- sampling uses the loaded replay buffer -----------------------------------------------------
def test_sampling_starts_from_the_checkpoints_replay_buffer(tmp_path):
    state, *_ = read_vector(FIXTURES / VECTOR)
    buffer = uniform_buffer(24, seed=7)
    ckpt = checkpoints.read_checkpoint(save_jem(tmp_path / "b.pt", state, buffer), "jem")
    jem = MODELS.get("jem")
    config = checkpoints.configure_for(jem, jem.configure(Scale.tiny, CIFAR, {"sample_steps": 0}), CIFAR, ckpt)
    assert config.buffer_size == 24
    model = jem(config, CIFAR).eval()
    entry = checkpoints.apply_checkpoint(model, ckpt)
    assert "replay_buffer" not in entry.get("unused_keys", [])
    assert torch.equal(model.replay_buffer, buffer)
    # with no SGLD steps a sample is a buffer entry, quantized
    entries = {bytes(row) for row in to_uint8(buffer, -1.0, 1.0).reshape(24, -1).numpy()}
    samples = model.sample(10, torch.Generator().manual_seed(0))
    assert all(bytes(row) in entries for row in samples.reshape(10, -1).numpy())
    # `wrn` has no sampler: the buffer is read, checked and recorded as unused
    wrn = MODELS.get("wrn")
    model = wrn(checkpoints.configure_for(wrn, wrn.recipe(Scale.tiny, CIFAR), CIFAR, ckpt), CIFAR)
    assert "replay_buffer" in checkpoints.apply_checkpoint(model, ckpt)["unused_keys"]


# --- a released-format WRN-28-10 through suite=hybrid -----------------------------------------------
@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root / "cifar-10-batches-py", np.random.default_rng(0), per_batch=4, n_test=20)  # 20 train, 20 test
    return root


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Path:
    """Random weights in the exact layout of JEM's released CIFAR-10 checkpoint; a 64-chain buffer (JEM's
    --buffer_size is free; the release has 10,000)."""
    keys, _ = released_layout(FIXTURES / KEYS)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) * 0.01 for k, s in keys.items()}
    return save_jem(tmp_path_factory.mktemp("released") / "CIFAR10_MODEL.pt", state, uniform_buffer(64))


def test_released_checkpoint_builds_wrn28x10_at_any_scale(released, cifar_root):
    for model in ("jem", "wrn"):
        p = plan(load_config(["scale=tiny", f"model={model}", "data=cifar10", f"data.root={cifar_root}",
                              f"checkpoint={released}", "checkpoint_format=jem"]))
        c = p.configs[model]
        assert (c.depth, c.width, c.norm, c.leak) == (28, 10, "none", 0.2)
        if model == "jem":
            assert c.buffer_size == 64


def test_released_checkpoint_runs_through_the_hybrid_suite(released, cifar_root, tmp_path, capsys):
    out = tmp_path / "out"
    # WRN-28-10's SGLD takes minutes on a CPU: sample the loaded buffer as it is (SGLD from it is tested above)
    rc = main(["run", "suite=hybrid", "model=jem", "data=cifar10", f"data.root={cifar_root}", f"checkpoint={released}",
               "checkpoint_format=jem", "scale=tiny", f"out={out}", "opts.sample_steps=0"])
    assert rc == 0, capsys.readouterr().err
    (path,) = out.glob("*.json")
    r = json.loads(path.read_text())
    assert r["status"] == "ok" and r["train"]["source"] == "checkpoint"
    assert r["checkpoint"]["format"] == "jem" and r["checkpoint"]["sha256"] == sha256(released)
    assert r["checkpoint"]["architecture"]["depth"] == 28 and r["checkpoint"]["replay_buffer"] == [64, 3, 32, 32]
    assert sorted(r["checkpoint"]["unused_keys"]) == ["energy_output.bias", "energy_output.weight",
                                                      "f.linear.bias", "f.linear.weight"]
    p = r["protocol"]
    assert p["checkpoint_format"] == "jem" and p["checkpoint_sha256"] == sha256(released)
    assert p["preprocessing"]["eval_noise"] == 0.0 and p["preprocessing"]["train_noise"] == 0.03
    assert p["samples"]["sampler"]["eval"]["buffer_size"] == 64
    assert r["model_config"]["depth"] == 28 and r["model_config"]["width"] == 10
    assert r["model_config"]["norm"] == "none" and r["model_config"]["buffer_size"] == 64
    assert set(r["metrics"]) == {"accuracy", "is", "fid"} and r["metrics"]["accuracy"]["n"] == 20
    assert path.with_suffix(".samples.png").is_file()


def test_eval_noise_is_an_option_that_changes_the_protocol(released, cifar_root):
    args = ["scale=tiny", "model=wrn", "data=cifar10", f"data.root={cifar_root}", f"checkpoint={released}",
            "checkpoint_format=jem"]
    plain = plan(load_config(args))
    noisy = plan(load_config([*args, "opts.eval_noise=0.03"]))
    assert noisy.configs["wrn"].eval_noise == 0.03
    assert noisy.checkpoint_protocol["preprocessing"]["eval_noise"] == 0.03
    assert plain.checkpoint_protocol["preprocessing"]["eval_noise"] == 0.0


# --- bad input: one line, exit 2, nothing written ------------------------------------------------
class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["EVIL_MARKER"],))


def _bad_files(d: Path) -> dict[str, Path]:
    state, *_ = read_vector(FIXTURES / VECTOR)
    buf = uniform_buffer(8)
    files = {
        "missing_key": save_jem(d / "missing.pt", {k: v for k, v in state.items() if k != "f.layer2.0.conv2.bias"},
                                buf),
        "extra_key": save_jem(d / "extra.pt", {**state, "f.layer1.0.attention.weight": torch.zeros(3)}, buf),
        "extra_top": save_jem(d / "extra_top.pt", state, buf, optimizer_state_dict={"lr": torch.zeros(1)}),
        "no_buffer": d / "no_buffer.pt",
        "shape": save_jem(d / "shape.pt", {**state, "f.layer2.0.conv1.weight": torch.zeros(32, 16, 5, 5)}, buf),
        "buffer_shape": save_jem(d / "buffer_shape.pt", state, torch.zeros(8, 1, 32, 32)),
        "nan": save_jem(d / "nan.pt", {**state, "class_output.bias": torch.full((10,), float("nan"))}, buf),
        "text": d / "notes.txt",
        "list": d / "list.pt",
        "good": save_jem(d / "good.pt", state, buf),
    }
    torch.save({"model_state_dict": OrderedDict(state)}, files["no_buffer"])
    files["text"].write_text("JEM checkpoint: see the README\n")
    torch.save([torch.zeros(1)], files["list"])
    with open(d / "evil.pkl", "wb") as f:  # a plain pickle, as torch.load's legacy format reads it
        pickle.dump({"model_state_dict": {"f.conv1.weight": Evil()}, "replay_buffer": buf}, f)
    files["evil_pickle"] = d / "evil.pkl"
    torch.save({"model_state_dict": OrderedDict(state), "replay_buffer": Evil()}, d / "evil.pt")  # in the zip
    files["evil_zip"] = d / "evil.pt"
    return files


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    marker = tmp_path_factory.mktemp("marker") / "pwned"
    os.environ["EVIL_MARKER"] = str(marker)  # only read if a pickle's code ran, which it must not
    files = _bad_files(tmp_path_factory.mktemp("bad"))
    yield files
    assert not marker.exists(), "a checkpoint's pickled code was executed"
    os.environ.pop("EVIL_MARKER", None)


CIFAR_ARGS = ["model=jem", "data=cifar10", "checkpoint_format=jem"]


@pytest.mark.parametrize(
    "file, extra, fragments",
    [
        ("missing_key", [], ["misses 1 key(s), first 'f.layer2.0.conv2.bias'"]),
        ("extra_key", [], ["unexpected key(s), first 'f.layer1.0.attention.weight'"]),
        ("extra_top", [], ["unexpected top-level key 'optimizer_state_dict'"]),
        ("no_buffer", [], ["lacks 'replay_buffer'"]),
        ("shape", [], ["'f.layer2.0.conv1.weight' has shape (32, 16, 5, 5), expected (32, 16, 3, 3)"]),
        ("buffer_shape", [], ["replay_buffer must be", "(8, 1, 32, 32)"]),
        ("nan", [], ["non-finite values in 'class_output.bias'"]),
        ("text", [], ["not a readable PyTorch checkpoint"]),
        ("list", [], ["not a JEM checkpoint: it holds a list"]),
        ("evil_pickle", [], ["refusing to load"]),
        ("evil_zip", [], ["refusing to load"]),
        ("good", ["data=digits"], ["takes 3×32×32 images", "1×8×8"]),
        ("good", ["model=pixel_independent"], ["loads into model=jem or model=wrn"]),
        ("good", ["opts.width=2"], ["opts.width=2 conflicts with checkpoint", "width=1"]),
        ("good", ["checkpoint_format=nope"], ["unknown checkpoint format 'nope'", "bench, jem"]),
    ],
)
def test_bad_checkpoints_are_one_line_exit_2_and_write_nothing(bad_files, cifar_root, tmp_path, capsys,
                                                               file, extra, fragments):
    out = tmp_path / "out"
    rc = main(["run", "scale=tiny", *CIFAR_ARGS, f"data.root={cifar_root}", f"checkpoint={bad_files[file]}",
               f"out={out}", *extra])
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out.exists()


def test_format_without_checkpoint_is_refused(capsys, tmp_path):
    assert main(["run", "scale=tiny", "model=jem", "checkpoint_format=jem", f"out={tmp_path / 'o'}"]) == 2
    assert "checkpoint_format= needs checkpoint=PATH" in capsys.readouterr().err


# --- the registry: a new format is one class ----------------------------------------------------
@checkpoints.register_format("test_prefixed")
class PrefixedFormat(checkpoints.CheckpointFormat):
    """A toy released format: a torch.save of {'net': state dict}, keys prefixed 'module.' (DataParallel)."""

    def read(self, path: Path) -> checkpoints.Checkpoint:
        obj = checkpoints.torch_load_weights_only(path)
        if not isinstance(obj, dict) or "net" not in obj:
            raise CheckpointError(f"{path} has no 'net' entry")
        return checkpoints.Checkpoint({k.removeprefix("module."): v for k, v in obj["net"].items()},
                                      {"source": "test"})


def test_a_registered_format_loads_through_load_checkpoint(tmp_path):
    assert {"bench", "jem", "test_prefixed"} <= set(checkpoints.CHECKPOINT_FORMATS.names())
    info = DataInfo((1, 8, 8), 10)
    wrn = MODELS.get("wrn")
    torch.manual_seed(0)
    src = wrn(wrn.recipe(Scale.tiny, info), info)
    path = tmp_path / "dp.pt"
    torch.save({"net": {f"module.{k}": v for k, v in src.state_dict().items()}}, path)
    dst = wrn(wrn.recipe(Scale.tiny, info), info)
    entry = checkpoints.load_checkpoint(dst, path, "test_prefixed")
    assert entry["format"] == "test_prefixed" and entry["source"] == "test"
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k

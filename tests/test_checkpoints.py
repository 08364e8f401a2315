import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from bench import checkpoints
from bench.errors import CheckpointError
from bench.models.base import DataInfo
from bench.models.wrn import WRN
from bench.scales import Scale

INFO = DataInfo((1, 8, 8), 10)


def _model():
    torch.manual_seed(0)
    return WRN(WRN.recipe(Scale.tiny, INFO), INFO)


def test_round_trip(tmp_path):
    m = _model()
    path = tmp_path / "w.safetensors"
    sha = checkpoints.save(m, path, {"train": {"steps": 1}})
    m2 = _model()
    for p in m2.parameters():
        p.data.zero_()
    info = checkpoints.load_checkpoint(m2, path)
    assert info["sha256"] == sha and info["saved_meta"]["train"]["steps"] == 1
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k


class Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["EVIL_MARKER"],))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"f.conv1.weight": Evil()}, f)
    with pytest.raises(CheckpointError, match="refusing to load"):
        checkpoints.load_checkpoint(_model(), path)
    assert not marker.exists()
    # also inside torch.save's zip container
    path2 = tmp_path / "evil2.pt"
    torch.save({"x": Evil()}, path2)
    with pytest.raises(CheckpointError, match="refusing to load"):
        checkpoints.load_checkpoint(_model(), path2)
    assert not marker.exists()


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    m = _model()
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        checkpoints.load_checkpoint(m, garbage)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    missing = dict(state)
    missing.pop("class_output.bias")
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1 key"):
        checkpoints.load_checkpoint(m, tmp_path / "missing.safetensors")
    extra = {**state, "bogus": torch.zeros(1)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected 1 key"):
        checkpoints.load_checkpoint(m, tmp_path / "extra.safetensors")
    wrong = {**state, "class_output.bias": torch.zeros(3)}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(CheckpointError, match="has shape"):
        checkpoints.load_checkpoint(m, tmp_path / "wrong.safetensors")
    nan = {**state, "class_output.bias": torch.full((10,), float("nan"))}
    save_file(nan, str(tmp_path / "nan.safetensors"))
    with pytest.raises(CheckpointError, match="non-finite"):
        checkpoints.load_checkpoint(m, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoints.load_checkpoint(m, tmp_path / "nope.safetensors")
    torch.save({k: v for k, v in state.items()}, tmp_path / "plain.pt")
    checkpoints.load_checkpoint(m, tmp_path / "plain.pt")  # a plain state dict through weights_only is fine

"""The contract every registered model keeps, checked for each one in `MODELS` (a new model is covered as soon
as it registers): at ``tiny`` scale on a small digits subset, for a few steps,

- ``fit`` trains through the shared loop (`bench.models.training.TrainLoop`) unless the model declares a
  closed-form fit (``trains_in_steps = False``), and reports JSON-serialisable statistics with ``steps``;
- a diverging loss is a `ModelFailure` with the loop's one message (model, step, loss, the model's hint);
- every capability it offers is callable and gives the documented shapes and dtypes;
- a checkpoint written and read back by `bench.checkpoints` gives the same outputs;
- the same seed gives the same weights.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from bench import checkpoints
from bench.capabilities import capabilities_of
from bench.data import load_dataset
from bench.data.base import Split
from bench.errors import ModelFailure
from bench.models import MODELS
from bench.models.base import BenchModel, DataInfo, TrainContext, no_progress
from bench.models.training import TrainLoop
from bench.scales import Scale

MAX_STEPS = 3
N_TRAIN = 160  # a digits subset: a few batches of every tiny recipe
N = 4  # images per capability call


@pytest.fixture(scope="module")
def data() -> tuple[Split, DataInfo, torch.Tensor]:
    d = load_dataset("digits")
    train = Split(d.train.x[:N_TRAIN], d.train.y[:N_TRAIN])
    return train, DataInfo.of(d), d.test.x[:N]


def _fit(name: str, data, seed: int = 0) -> tuple[BenchModel, dict]:
    train, info, _ = data
    cls = MODELS.get(name)
    torch.manual_seed(seed)
    model = cls(cls.recipe(Scale.tiny, info), info)
    stats = model.fit(train, TrainContext(torch.device("cpu"), seed, no_progress, max_steps=MAX_STEPS))
    return model, stats


_TRAINED: dict[str, tuple[BenchModel, dict, list[TrainLoop]]] = {}


@pytest.fixture
def trained(request, data, monkeypatch):
    """The model fitted once per module (seed 0), with the loops its fit built."""
    name = request.param
    if name not in _TRAINED:
        loops: list[TrainLoop] = []
        init = TrainLoop.__init__

        def spy(self, *args, **kwargs):
            init(self, *args, **kwargs)
            loops.append(self)

        with monkeypatch.context() as m:
            m.setattr(TrainLoop, "__init__", spy)
            model, stats = _fit(name, data)
        _TRAINED[name] = (model, stats, loops)
    return _TRAINED[name]


#: every registered model but the test doubles other test modules register in the same registry
NAMES = [n for n in MODELS.names() if not MODELS.get(n).__module__.rpartition(".")[2].startswith("test_")]
by_name = pytest.mark.parametrize("trained", NAMES, indirect=True)


@by_name
def test_fit_reports_serialisable_stats_through_the_shared_loop(trained):
    model, stats, loops = trained
    assert isinstance(stats["steps"], int) and 1 <= stats["steps"] <= MAX_STEPS
    json.dumps(stats)
    json.dumps(model.config_dict())
    json.dumps(model.deviations(Scale.tiny))
    json.dumps(model.sampler_protocol())
    json.dumps(model.log_prob_protocol())
    if type(model).trains_in_steps:
        assert len(loops) == 1, f"{model.name}.fit trains in steps but not through TrainLoop"
        assert stats["steps"] == loops[0].steps and "epochs" in stats
        assert not model.training  # the loop's finish leaves the model in evaluation mode
    else:
        assert not loops


@pytest.mark.parametrize("name", NAMES)
def test_a_diverging_loss_is_a_model_failure_with_the_shared_message(name, data, monkeypatch):
    cls = MODELS.get(name)
    if not cls.trains_in_steps:
        pytest.skip(f"{name} fits in closed form: no loss to diverge")
    check = TrainLoop.check
    nan = torch.tensor(float("nan"))

    def diverged(self, loss=None, /, **losses):  # whatever the model's losses, they come out NaN
        check(self, None if loss is None else nan, **{k: nan for k in losses})

    monkeypatch.setattr(TrainLoop, "check", diverged)
    with pytest.raises(ModelFailure) as e:
        _fit(name, data)
    assert re.fullmatch(rf"{re.escape(name)} training diverged at step 0 \(\w+=nan(, \w+=nan)*\); "
                        rf"{re.escape(cls.divergence_hint)}", str(e.value)), str(e.value)


def _outputs(model: BenchModel, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every capability's output on the same inputs and random numbers."""
    out = {}
    shape = tuple(model.data_info.shape)
    y = (x.double() + 0.5) / 256.0  # dequantized, deterministically
    for cap in capabilities_of(model):
        torch.manual_seed(0)  # for a capability that draws from torch's global generator (the VAE's bound)
        if cap == "Classifier":
            out[cap] = model.logits(x.float() / 255.0)
        elif cap == "Energy":
            out[cap] = model.energy(x.float() / 255.0)
        elif cap == "LogProb":
            out[cap] = model.log_prob(y.to(torch.get_default_dtype()))
        elif cap == "Sampler":  # EBMs' samplers differentiate the energy: no torch.no_grad here
            out[cap] = model.sample(N, torch.Generator().manual_seed(0))
        elif cap == "Features":
            out[cap] = model.features(x.float() / 255.0)
        out[cap] = out[cap].detach()
    assert set(out) == set(capabilities_of(model))
    for cap, v in out.items():
        if cap == "Sampler":
            assert v.dtype == torch.uint8 and tuple(v.shape) == (N, *shape), (cap, v.dtype, v.shape)
            continue
        assert v.is_floating_point() and torch.isfinite(v).all(), (cap, v)
        if cap == "Classifier":
            assert tuple(v.shape) == (N, model.data_info.n_classes)
        elif cap == "Features":
            assert v.dim() == 2 and v.shape[0] == N
        else:
            assert tuple(v.shape) == (N,), (cap, v.shape)
    return out


@by_name
def test_capabilities_give_the_documented_shapes(trained, data):
    model, _, _ = trained
    _outputs(model.eval(), data[2])


@by_name
def test_a_checkpoint_round_trip_gives_identical_outputs(trained, data, tmp_path):
    model, _, _ = trained
    _, info, x = data
    path = tmp_path / f"{model.name}.safetensors"
    checkpoints.save(model, path, {})
    torch.manual_seed(1)  # other initial weights: everything must come from the file
    fresh = type(model)(model.config, info)
    checkpoints.load_checkpoint(fresh, path)
    fresh.eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    for cap, v in _outputs(model.eval(), x).items():
        assert torch.equal(v, _outputs(fresh, x)[cap]), cap


@by_name
def test_the_same_seed_gives_the_same_weights(trained, data):
    model, stats, _ = trained
    again, stats_again = _fit(model.name, data)
    assert json.dumps(stats) == json.dumps(stats_again)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k

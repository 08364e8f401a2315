"""benchmarks/jem_reference.py's convolution replay: it must see every convolution a step calls, forward and
backward, with the gradients that call asked for, and re-time each on tensors laid out as the step's were."""

import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "jem_reference.py"
_spec = importlib.util.spec_from_file_location("jem_reference", _PATH)
jr = sys.modules.setdefault("jem_reference", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(jr)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(8, 4, 3, stride=2, padding=1))


def _recorded(fn) -> dict[tuple, int]:
    with jr._RecordConvolutions() as rec:
        fn()
    counts: dict[tuple, int] = {}
    for (func, spec), n in rec.calls.items():  # summed over shapes: the op and, for a backward, its mask
        key = (func, spec[-1] if func is jr.CONVOLUTIONS[1] else None)
        counts[key] = counts.get(key, 0) + n
    return counts


def test_an_input_gradient_records_forwards_and_input_only_backwards():
    net = _net()
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    calls = _recorded(lambda: torch.autograd.grad(net(x).sum(), x))
    fwd, bwd = jr.CONVOLUTIONS
    # two layers, each once forward and once backward; the first layer's weights get no gradient
    assert sum(n for (f, _), n in calls.items() if f is fwd) == 2
    masks = sorted(m for (f, m), n in calls.items() if f is bwd for _ in range(n))
    assert masks == [(True, False, False), (True, False, False)]


def test_a_training_backward_records_its_weight_gradients_and_repeats_are_counted():
    net = _net()
    x = torch.rand(2, 3, 8, 8)

    def two_steps():
        for _ in range(2):
            net(x).sum().backward()

    calls = _recorded(two_steps)
    fwd, bwd = jr.CONVOLUTIONS
    assert calls[(fwd, None)] == 4  # both layers, twice, the same shapes: one key each, counted
    # the first layer's input needs no gradient; the second's does (it feeds back to the first)
    assert calls[(bwd, (False, True, True))] == 2 and calls[(bwd, (True, True, True))] == 2


def test_the_replay_keeps_the_recorded_layout_and_times_every_call():
    net = _net().to(memory_format=torch.channels_last)
    x = torch.rand(4, 3, 16, 16).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with jr._RecordConvolutions() as rec:
        torch.autograd.grad(net(x).sum(), x)
    specs = [s for (_, spec) in rec.calls for s in spec if isinstance(s, jr._TensorSpec)]
    assert any(s.make().is_contiguous(memory_format=torch.channels_last) and s.shape[1] > 1 for s in specs)
    assert all(s.make().stride() == s.stride for s in specs)
    out = jr.convolution_seconds(lambda: torch.autograd.grad(net(x).sum(), x), reps=2)
    assert out["calls"] == 4 and out["seconds"] > 0

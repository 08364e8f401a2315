"""bench.numerics: the float32 switches set what they say inside and restore the run's own afterwards (they
are torch's global flags, read on any machine; what they change only shows on a GPU, tests/test_cuda.py).
bench's CPU ELU is numpy's float64 expm1 rounded to float32, with torch's own gradient."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.numerics import ELU, cuda_fp32_modes, cudnn_tf32, elu, ieee_fp32


def test_ieee_fp32_turns_tf32_off_and_restores_the_run_setting():
    with cudnn_tf32(True):
        before = cuda_fp32_modes()
        assert before["conv"] == "tf32"
        with ieee_fp32():
            assert cuda_fp32_modes() == {"conv": "ieee", "matmul": "ieee"}
        assert cuda_fp32_modes() == before


def test_the_switches_restore_after_an_exception():
    before = cuda_fp32_modes()
    with pytest.raises(RuntimeError), ieee_fp32():
        raise RuntimeError("boom")
    assert cuda_fp32_modes() == before
    with pytest.raises(RuntimeError), cudnn_tf32(before["conv"] != "tf32"):
        assert cuda_fp32_modes()["conv"] != before["conv"]
        raise RuntimeError("boom")
    assert cuda_fp32_modes() == before


def _numpy_elu(x: torch.Tensor) -> np.ndarray:
    a = x.numpy().astype(np.float64)
    with np.errstate(over="ignore"):  # expm1 of the large positives, which np.where drops
        return np.where(a > 0, a, np.expm1(a)).astype(np.float32)


EDGES = [float("nan"), -0.0, 0.0, float("-inf"), float("inf"), -1e-45, 1e-45, -1e-30, -1e-8, -0.5, -1.0,
         -16.6, -17.0, -88.0, -104.0, 88.0, 89.0, 1e38, 3.4e38]


def test_elu_is_numpys_float64_expm1_rounded_to_float32_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.tensor(EDGES), -20 * torch.rand(200_000, generator=g), torch.randn(50_000, generator=g),
                   -torch.rand(10_000, generator=g) * 1e-6])
    got = elu(x)
    want = torch.from_numpy(_numpy_elu(x))
    nan = torch.isnan(x)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))  # signed zeros, every bit
    torch_own = F.elu(x)
    finite = torch.isfinite(x)
    ulps = (got[finite].view(torch.int32).long() - torch_own[finite].view(torch.int32).long()).abs()
    assert ulps.max() <= 1  # within torch's own kernel's 1 ulp


def test_elu_gradient_is_torchs_own_bit_for_bit():
    g = torch.Generator().manual_seed(1)
    edges = torch.tensor([0.0, -0.0, -1e-45, 1e-45, -30.0, 30.0, float("nan")])
    x = torch.cat([edges, torch.randn(5_000, generator=g) * 4])
    up = torch.randn(x.shape, generator=g)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    (ga,) = torch.autograd.grad(elu(a), a, up)
    (gb,) = torch.autograd.grad(F.elu(b), b, up)
    assert torch.equal(ga.view(torch.int32), gb.view(torch.int32))


def test_elu_does_not_depend_on_layout_or_batch_and_defers_to_torch_elsewhere():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 5, 7, 6, generator=g) * 3
    whole = elu(x)
    assert torch.equal(elu(x.permute(0, 2, 3, 1)), whole.permute(0, 2, 3, 1))  # a strided view
    assert torch.equal(elu(x.contiguous(memory_format=torch.channels_last)), whole)
    assert torch.equal(torch.cat([elu(x[:3]), elu(x[3:])]), whole)
    assert torch.equal(ELU()(x), whole)
    x64 = x.double()
    assert torch.equal(elu(x64), F.elu(x64))

"""bench.numerics: the float32 switches set what they say inside and restore the run's own afterwards (they
are torch's global flags, read on any machine; what they change only shows on a GPU, tests/test_cuda.py)."""

import pytest

from bench.numerics import cuda_fp32_modes, cudnn_tf32, ieee_fp32


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

"""What needs a CUDA device (skipped without one; CI has none, so run it where a GPU is, e.g. with
benchmarks/gpu_check.sh): every sampler runs on CUDA, the chains' noise is the CPU generator's, and an SGLD
chain on the GPU follows the CPU's within float tolerance."""

from __future__ import annotations

import pytest
import torch

from bench.models import MODELS
from bench.models.base import DataInfo
from bench.models.jem import JEM, JEMConfig
from bench.numerics import cudnn_tf32
from bench.results.records import env_info
from bench.samplers import noise_like
from bench.samplers.sgld import sgld
from bench.scales import Scale

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
INFO = DataInfo((1, 8, 8), 10)


def test_noise_like_on_cuda_is_the_cpu_generators_randn():
    x = torch.zeros(64, 3, 32, 32, device=CUDA)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(3):
        eps = noise_like(x, g1)
        assert eps.device.type == "cuda" and eps.dtype == torch.float32
        assert torch.equal(eps.cpu(), torch.randn(x.shape, generator=g2))
    assert noise_like(x.half(), g1).dtype == torch.float16


def test_sgld_on_cuda_follows_the_cpu_chain():
    torch.manual_seed(0)
    cpu = JEM(JEMConfig(depth=10, width=1, buffer_size=8), DataInfo((3, 32, 32), 10)).eval()
    gpu = JEM(cpu.config, cpu.data_info).to(CUDA).eval()
    gpu.load_state_dict(cpu.state_dict())
    x0 = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    a = sgld(cpu._energy_net, x0, 5, 1.0, 0.01, torch.Generator().manual_seed(2))
    with cudnn_tf32(False):  # true fp32 convolutions: TF32 would differ in the third digit
        b = sgld(gpu._energy_net, x0.to(CUDA), 5, 1.0, 0.01, torch.Generator().manual_seed(2)).cpu()
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", [n for n, cls in MODELS.items() if hasattr(cls, "sample")])
def test_every_sampler_runs_on_cuda(name):
    torch.manual_seed(0)
    cls = MODELS.get(name)
    model = cls(cls.recipe(Scale.tiny, INFO), INFO).to(CUDA).eval()
    out = model.sample(4, torch.Generator().manual_seed(0))
    assert out.shape == (4, *INFO.shape) and out.dtype == torch.uint8


def test_the_record_says_how_cuda_computes_float32():
    env = env_info(CUDA)
    assert env["device"] == "cuda" and set(env["cuda_fp32"]) == {"conv", "matmul"}
    with cudnn_tf32(False):
        assert env_info(CUDA)["cuda_fp32"]["conv"] in ("ieee", "fp32")


def test_resflow_inverse_on_cuda_converges_under_the_default_tf32_and_matches_the_cpu():
    """The fixed-point inverse runs in IEEE fp32 whatever the run's TF32 setting: under TF32 it never met its
    tolerance and ran every block to inverse_max_iters."""
    from bench.models.resflow import ResFlow, ResidualBlock

    torch.manual_seed(0)
    info = DataInfo((1, 8, 8), 10)
    cpu = ResFlow(ResFlow.recipe(Scale.tiny, info), info).eval()
    gpu = ResFlow(cpu.config, info).to(CUDA).eval()
    gpu.load_state_dict(cpu.state_dict())
    calls = []
    for block in (m for m in gpu.modules() if isinstance(m, ResidualBlock)):
        block.g.register_forward_hook(lambda *_: calls.append(1))
    z = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    with cudnn_tf32(True):
        back = gpu.flow.inverse(z.to(CUDA)).cpu()
    n_blocks = sum(isinstance(m, ResidualBlock) for m in gpu.modules())
    assert len(calls) < n_blocks * 100
    torch.testing.assert_close(back, cpu.flow.inverse(z), rtol=1e-5, atol=1e-5)

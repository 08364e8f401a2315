"""`resflow`: Residual Flow (Chen, Behrmann, Duvenaud & Jacobsen, "Residual Flows for Invertible
Generative Modeling", NeurIPS 2019, arXiv:1906.02735), as a hybrid model with a classifier head.

Each block is y = x + g(x) with g a spectrally normalized network (every linear map scaled to operator
norm ≤ `coeff` < 1, the norm of a convolution estimated by power iteration on the convolution itself;
LipSwish activations, Lipschitz 1), so Lip(g) < 1 and the block is invertible: x is recovered by the
fixed-point iteration x ← y − g(x) (Banach). log|det(I + J_g)| = Σ_k (−1)^{k+1} tr(J_g^k)/k; training
uses the paper's unbiased estimator: Hutchinson's trace estimator and a Russian-roulette truncation of
the series (the first `n_exact_terms` terms always, the rest weighted by 1/P(N ≥ k)), with the Neumann
series gradient of §3.2 (`neumann_grad`). The architecture follows rtqichen/residual-flows
(`train_img.py --task hybrid` on CIFAR-10, the `paper` recipe): the input normalized with CIFAR-10's channel
means and standard deviations (their hybrid `init_layer`, with its log-det; the density task's logit
transform otherwise), an actnorm, then scales of pre-activation conv blocks (3×3 → 1×1 → 3×3, 512
channels) with an actnorm after each block and a squeeze between scales, 4 fully connected blocks at the
end, no factoring out. Their actnorm floors the initial variance at 0.2. Spectral norms are re-estimated
after every step by power iteration until the vectors move less than `sn_tol` (their `--sn-tol 1e-3`).
Training: reflect-pad-4 crops and flips of CIFAR-10 (the shared `Augment`), Adam(β = (0.9, 0.99)) lr 1e-3,
batch 64, 1000 warm-up steps, gradient norm clipped at 1, and an exponential moving average of the weights
(decay 0.999) that is what gets evaluated. The classifier is the paper's hybrid head (§6.3): conv3×3 →
actnorm → ReLU → average pooling on every scale's output, one linear layer, trained on
(`nll_weight`·(−log p(x)) + cross-entropy)/ln 2, i.e. in bits (λ = 1: the "Residual Flow" row of JEM's
Table 1), and evaluated on test images dequantized as in training, as their test transform (`eval_dequantize`;
the noise seeded by the images' own bytes).

log_prob: with D ≤ `exact_logdet_max_dim` (default 256: 8×8 digits) every block's log-det is computed
exactly from its full Jacobian, and `log_prob_kind` is "exact". Above it (MNIST's 784, CIFAR-10's 3072:
a D×D Jacobian per block per image is too costly) log_prob uses the paper's evaluation estimator
(20 exact terms, then Russian roulette; unbiased for log p(x), as the paper reports it) and
`log_prob_kind` is "estimate"; its random draws come from a generator seeded with `eval_seed`, so
repeated calls agree. Sampling inverts every block by fixed-point iteration (`inverse_tol`,
`inverse_max_iters`; recorded in the sampler protocol).

As in the released defaults, every spectral norm is the 2-norm (`--vnorms 2222`; the learned induced mixed
norms are an option there, off by default) and one Poisson draw of N is shared by the whole batch. The
log-det is backpropagated directly rather than in the forward pass (`mem_eff`): the same gradient, more
memory.

The `small` and `tiny` recipes (not `paper`) put `_flows.ValueWarp` in front of the logit: a learned,
data-initialized monotone warp with one bin per 8-bit value, shared by every pixel. It is not in the paper;
it lets a few-minute run on 8×8 digits (17 of 256 values used) spend its capacity on the images rather
than on carving the unused values out of a smooth density. `value_warp` in the record says which it was.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.data.augment import Augment, reference_augment
from bench.data.base import Split
from bench.errors import NonFiniteError
from bench.models._deviations import config_deviations
from bench.models._flows import (
    ActNorm,
    ClassifierHeads,
    Flatten,
    FlowLayer,
    FlowModel,
    FlowSequence,
    Shape,
    Squeeze,
    classifier_input,
    hybrid_objective,
    input_layers,
)
from bench.models.base import DataInfo, TrainContext, register
from bench.numerics import ieee_fp32
from bench.scales import Scale, small_epochs

LogdetMode = Literal["estimate", "exact", "none"]
#: CIFAR-10's channel statistics, as Residual Flows' hybrid task normalizes with them (train_img.py)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


@dataclass(frozen=True)
class ResFlowConfig:
    blocks: tuple[int, ...] = (16, 16, 16)  # residual blocks per scale; a squeeze between scales
    hidden: int = 512  # channels inside each block's g
    kernels: tuple[int, ...] = (3, 1, 3)
    fc_blocks: int = 4  # fully connected blocks at the end
    fc_hidden: int = 128
    coeff: float = 0.98  # spectral norm bound of every linear map in g
    power_iters: int = 20_000  # the most power iterations per optimizer step (more at init and after training)
    sn_tol: float = 1e-3  # ... stopping when u, v move less than this (their --sn-tol); 0: always power_iters
    n_dist: Literal["poisson", "geometric"] = "poisson"
    poisson_lambda: float = 2.0
    geometric_p: float = 0.5
    n_exact_terms: int = 2  # series terms always computed while training
    eval_exact_terms: int = 20  # ... while estimating log p for evaluation (the paper's code)
    neumann_grad: bool = True
    exact_logdet_max_dim: int = 256  # log_prob computes exact log-dets up to this many dimensions
    eval_seed: int = 0
    inverse_tol: float = 1e-6  # fixed-point iteration stops when max |Δx| < tol·(1 + max |y|)
    inverse_max_iters: int = 500
    logit_alpha: float = 0.05
    value_warp: bool = False  # learned per-value warp before the logit (see _flows.ValueWarp)
    # the hybrid task's input layer: (y − mean)/std per channel instead of the logit ((): the logit)
    normalize_mean: tuple[float, ...] = ()
    normalize_std: tuple[float, ...] = ()
    # hybrid
    nll_weight: float = 1.0  # λ on −log p(x) in nats; cross-entropy has weight 1
    classifier_hidden: int = 256
    eval_dequantize: bool = True  # the classifier reads dequantized test images (content-seeded), as their test
    # transform; False: the bin centres
    # optimization
    augment: Augment = Augment()
    epochs: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    beta2: float = 0.99  # Adam's β2 in their train_img.py
    warmup_iters: int = 1000
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    ema: float = 0.999  # decay of the weight average that is evaluated (their ExponentialMovingAverage); 0: none

    def __post_init__(self):
        if not 0.0 < self.coeff < 1.0:
            raise ValueError(f"coeff must be in (0, 1) for the blocks to be invertible, got {self.coeff}")
        if not self.blocks or min(self.blocks) < 1:
            raise ValueError(f"blocks must list at least one block per scale, got {self.blocks}")
        if len(self.kernels) < 2 or any(k % 2 == 0 for k in self.kernels):
            raise ValueError(f"kernels must be >= 2 odd sizes, got {self.kernels}")
        if len(self.normalize_mean) != len(self.normalize_std):
            raise ValueError("normalize_mean and normalize_std need one value per channel each")


# --- Lipschitz-constrained layers -------------------------------------------------------------
class _SpectralNormed(nn.Module, abc.ABC):
    """A linear map W scaled to W / max(1, σ(W)/coeff), σ the operator norm estimated by power
    iteration on the map itself (persistent u, v: σ ≈ uᵀWv, differentiable in W)."""

    def __init__(self, coeff: float, in_shape: Shape, out_shape: Shape):
        super().__init__()
        self.coeff = coeff
        self.register_buffer("u", F.normalize(torch.randn(1, *out_shape).flatten(), dim=0).view(1, *out_shape))
        self.register_buffer("v", F.normalize(torch.randn(1, *in_shape).flatten(), dim=0).view(1, *in_shape))

    weight: nn.Parameter

    @abc.abstractmethod
    def _map(self, x: Tensor, w: Tensor) -> Tensor:
        """W x (no bias)."""

    @abc.abstractmethod
    def _adjoint(self, u: Tensor, w: Tensor) -> Tensor:
        """Wᵀ u."""

    @torch.no_grad()
    def power_iteration(self, n: int, tol: float = 0.0) -> None:
        """Up to ``n`` power iterations; with ``tol`` > 0 stop once both vectors move less than
        tol + tol·max(entry) in root-mean-square (Residual Flows' atol = rtol = sn_tol test)."""
        w = self.weight.detach()
        u, v = self.u, self.v
        for _ in range(n):
            old_u, old_v = u, v
            v = self._adjoint(u, w)
            v = v / v.norm().clamp_min(1e-12)
            u = self._map(v, w)
            u = u / u.norm().clamp_min(1e-12)
            if tol > 0 and all(((new - old).norm() / new.numel() ** 0.5).item() < tol + tol * new.max().item()
                               for new, old in ((u, old_u), (v, old_v))):
                break
        self.u.copy_(u)
        self.v.copy_(v)

    def sigma(self) -> Tensor:
        return (self.u * self._map(self.v, self.weight)).sum()

    def scaled_weight(self) -> Tensor:
        return self.weight / torch.clamp(self.sigma() / self.coeff, min=1.0)


class SNConv2d(_SpectralNormed):
    def __init__(self, cin: int, cout: int, kernel: int, hw: tuple[int, int], coeff: float):
        super().__init__(coeff, (cin, *hw), (cout, *hw))
        conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
        self.weight, self.bias = conv.weight, conv.bias
        self.padding = kernel // 2

    def _map(self, x: Tensor, w: Tensor) -> Tensor:
        return F.conv2d(x, w, padding=self.padding)

    def _adjoint(self, u: Tensor, w: Tensor) -> Tensor:
        return F.conv_transpose2d(u, w, padding=self.padding)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.scaled_weight(), self.bias, padding=self.padding)


class SNLinear(_SpectralNormed):
    def __init__(self, din: int, dout: int, coeff: float):
        super().__init__(coeff, (din,), (dout,))
        lin = nn.Linear(din, dout)
        self.weight, self.bias = lin.weight, lin.bias

    def _map(self, x: Tensor, w: Tensor) -> Tensor:
        return x @ w.T

    def _adjoint(self, u: Tensor, w: Tensor) -> Tensor:
        return u @ w

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.scaled_weight(), self.bias)


class LipSwish(nn.Module):
    """x·sigmoid(βx)/1.1 with β = softplus(b) learned: Lipschitz ≤ 1 for every β (Chen et al. §4)."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.tensor(0.5))

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(x * F.softplus(self.b)) / 1.1


# --- the invertible residual block ----------------------------------------------------------------
@dataclass
class LogdetSettings:
    """How every block of one model computes its log-det right now (set by the model per call)."""

    mode: LogdetMode = "exact"
    generator: torch.Generator | None = None
    exact_terms: int = 2


#: on an accelerator, the inverse's fixed-point test is read back to the host once every this many iterations
INVERSE_CHECK_EVERY = 8


def _check_every(device: torch.device) -> int:
    """How often `ResidualBlock.inverse` reads its test back: every iteration on a CPU, where that is free."""
    return 1 if device.type == "cpu" else INVERSE_CHECK_EVERY


class ResidualBlock(FlowLayer):
    def __init__(self, g: nn.Module, settings: LogdetSettings, c: ResFlowConfig):
        super().__init__()
        self.g = g
        self.settings = settings
        self.n_dist, self.lam, self.p = c.n_dist, c.poisson_lambda, c.geometric_p
        self.neumann_grad = c.neumann_grad
        self.inverse_tol, self.inverse_max_iters = c.inverse_tol, c.inverse_max_iters

    # Russian roulette over the number of series terms beyond the exact ones
    def survival(self, j: int) -> float:
        """P(N >= j)."""
        if j <= 0:
            return 1.0
        if self.n_dist == "geometric":  # N ∈ {1, 2, ...}
            return (1.0 - self.p) ** (j - 1)
        return 1.0 - sum(math.exp(-self.lam) * self.lam ** i / math.factorial(i) for i in range(j))

    def sample_n(self, generator: torch.Generator) -> int:
        u = torch.rand((), generator=generator, dtype=torch.float64).item()
        n = 1 if self.n_dist == "geometric" else 0
        while self.survival(n + 1) > u:  # inverse CDF: the largest n with P(N >= n) > u
            n += 1
        return n

    def series_weight(self, k: int, exact_terms: int) -> float:
        return 1.0 / self.survival(k - exact_terms)

    def estimate_logdet(self, x: Tensor, gx: Tensor, exact_terms: int, generator: torch.Generator) -> Tensor:
        """Unbiased estimate of log|det(I + J_g(x))| per example; differentiable while training."""
        n_terms = exact_terms + self.sample_n(generator)
        v = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        create_graph = self.training and torch.is_grad_enabled()
        w = v
        if create_graph and self.neumann_grad:
            # §3.2: the gradient of log det(I+J) is tr((I+J)⁻¹ ∂J) = Σ_k (−1)^k tr(J^k ∂J); vᵀ(Σ_k ...) is
            # built without a graph and differentiated once, and the value is the plain series estimate
            value = x.new_zeros(x.shape[0])
            neumann = v
            with torch.no_grad():
                for k in range(1, n_terms + 1):
                    w = torch.autograd.grad(gx, x, w, retain_graph=True)[0]
                    weight = self.series_weight(k, exact_terms)
                    value = value + (-1) ** (k + 1) / k * weight * (w * v).flatten(1).sum(1)
                    neumann = neumann + (-1) ** k * weight * w
            surrogate = (torch.autograd.grad(gx, x, neumann, create_graph=True)[0] * v).flatten(1).sum(1)
            return surrogate - surrogate.detach() + value
        logdet = x.new_zeros(x.shape[0])
        for k in range(1, n_terms + 1):
            w = torch.autograd.grad(gx, x, w, create_graph=create_graph, retain_graph=True)[0]
            logdet = logdet + (-1) ** (k + 1) / k * self.series_weight(k, exact_terms) * (w * v).flatten(1).sum(1)
        return logdet

    def exact_logdet(self, x: Tensor) -> Tensor:
        """log|det(I + J_g(x))| from the full Jacobian of every example (D×D each)."""
        def g_one(xi: Tensor) -> Tensor:
            return self.g(xi.unsqueeze(0)).squeeze(0)

        jac = torch.func.vmap(torch.func.jacrev(g_one))(x)
        d = x[0].numel()
        jac = jac.reshape(x.shape[0], d, d) + torch.eye(d, dtype=x.dtype, device=x.device)
        return torch.linalg.slogdet(jac)[1]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        s = self.settings
        if s.mode == "none":
            return x + self.g(x), x.new_zeros(x.shape[0])
        if s.mode == "exact":
            return x + self.g(x), self.exact_logdet(x)
        if s.generator is None:
            raise ValueError("the log-det estimator needs a generator: set LogdetSettings.generator")
        with torch.enable_grad():
            xg = x if x.requires_grad else x.detach().requires_grad_(True)
            gx = self.g(xg)
            logdet = self.estimate_logdet(xg, gx, s.exact_terms, s.generator)
        return xg + gx, logdet

    @torch.no_grad()
    def inverse(self, y: Tensor) -> Tensor:
        """Banach fixed-point iteration x ← y − g(x); converges geometrically since Lip(g) < 1. Returns the
        first iterate that moved less than the tolerance (or the last one).

        On an accelerator the test is read back once every `INVERSE_CHECK_EVERY` iterations, not at each: the
        iterate that first passed it is kept on the device (``torch.where``), so the result is the same as
        checking every iteration, at the cost of up to that many iterations more. A read-back at every
        iteration stalled the GPU.

        The iteration runs in IEEE fp32 on CUDA (`bench.numerics.ieee_fp32`), whatever the run's TF32 setting:
        with cuDNN's default TF32 convolutions g(x) carries about 1e-3 relative error, the iterates never move
        less than the tolerance and every block ran to ``inverse_max_iters`` (500 iterations where fp32
        needs 7-25; on the H200 the sampling was slower than on a 2-core CPU and the inverse only TF32-exact)."""
        # a tolerance below the dtype's resolution would never be met: floor it at a few ulps of |y|
        tol = max(self.inverse_tol, 8 * torch.finfo(y.dtype).eps) * (1.0 + y.abs().max().item())
        every = _check_every(y.device)
        with ieee_fp32():
            return self._fixed_point(y, tol, every)

    def _fixed_point(self, y: Tensor, tol: float, every: int) -> Tensor:
        x = y - self.g(y)
        first, done = x, torch.zeros((), dtype=torch.bool, device=y.device)
        for i in range(1, self.inverse_max_iters + 1):
            x_next = y - self.g(x)
            passed = (x_next - x).abs().max() < tol
            if every == 1:
                if passed.item():
                    return x_next
            else:
                first = torch.where(done, first, x_next)
                done = done | passed
                if (i % every == 0 or i == self.inverse_max_iters) and done.item():
                    return first
            x = x_next
        return x


class Flat(FlowLayer):
    """Apply a layer to the flattened example (the fully connected blocks and their actnorms)."""

    def __init__(self, layer: FlowLayer):
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z, ld = self.layer(x.reshape(x.shape[0], -1))
        return z.reshape(x.shape), ld

    def inverse(self, z: Tensor) -> Tensor:
        return self.layer.inverse(z.reshape(z.shape[0], -1)).reshape(z.shape)


def conv_g(shape: Shape, c: ResFlowConfig, preact: bool) -> nn.Module:
    ch, h, w = shape
    widths = [ch] + [c.hidden] * (len(c.kernels) - 1) + [ch]
    mods: list[nn.Module] = [LipSwish()] if preact else []
    for i, k in enumerate(c.kernels):
        if i > 0:
            mods.append(LipSwish())
        mods.append(SNConv2d(widths[i], widths[i + 1], k, (h, w), c.coeff))
    return nn.Sequential(*mods)


def fc_g(dim: int, c: ResFlowConfig) -> nn.Module:
    widths = [dim] + [c.fc_hidden] * (len(c.kernels) - 1) + [dim]
    mods: list[nn.Module] = []
    for i in range(len(widths) - 1):
        mods += [LipSwish(), SNLinear(widths[i], widths[i + 1], c.coeff)]
    return nn.Sequential(*mods)


#: the small recipe's step budget on images past 16×16 (bench.scales: calibrated on 2 CPU cores)
LARGE_STEPS = 300


@register("resflow")
class ResFlow(FlowModel):
    Config = ResFlowConfig
    reference = "Chen et al. 2019 (arXiv:1906.02735); rtqichen/residual-flows train_img.py --task hybrid, resflow.py"
    #: a paper-scale smoke on a CPU (bench.smoke): tiny batches; at most 5 power iterations per step (each costs
    #: a pass through all 48 blocks' maps) and 5 fixed-point iterations per block when sampling
    smoke_overrides: ClassVar[dict[str, Any]] = {"batch_size": 2, "power_iters": 5, "inverse_max_iters": 5}

    def __init__(self, config: ResFlowConfig, data: DataInfo):
        super().__init__(config, data)
        c = config
        _, h, w = data.shape
        if h % (2 ** (len(c.blocks) - 1)) or w % (2 ** (len(c.blocks) - 1)):
            raise ValueError(f"resflow: {len(c.blocks)} scales squeeze {h}×{w} images {len(c.blocks) - 1} times; "
                             "use fewer entries in `blocks`")
        if c.normalize_mean and len(c.normalize_mean) != data.shape[0]:
            raise ValueError(f"resflow: normalize_mean has {len(c.normalize_mean)} values for {data.shape[0]}-channel "
                             "data")
        self.settings = LogdetSettings()
        stages: list[FlowLayer] = []
        shape: Shape = tuple(data.shape)
        self.stage_shapes: list[Shape] = []
        for i, n_blocks in enumerate(c.blocks):
            # their `first_resblock and actnorm`: an actnorm right after the input layer
            layers: list[FlowLayer] = [ActNorm(shape[0], min_var=0.2)] if i == 0 else []
            for j in range(n_blocks):
                # the very first block sees the input directly (the paper's `first_resblock`: no pre-activation)
                g = conv_g(shape, c, preact=(i, j) != (0, 0))
                layers += [ResidualBlock(g, self.settings, c), ActNorm(shape[0], min_var=0.2)]
            if i < len(c.blocks) - 1:
                layers.append(Squeeze())
                shape = layers[-1].out_shape(shape)
            else:
                d = math.prod(shape)
                for _ in range(c.fc_blocks):
                    layers += [Flat(ResidualBlock(fc_g(d, c), self.settings, c)), Flat(ActNorm(d, min_var=0.2))]
            stages.append(FlowSequence(layers))
            self.stage_shapes.append(shape)
        pre = input_layers(c.logit_alpha, c.value_warp, (c.normalize_mean, c.normalize_std))
        self.flow = FlowSequence([pre, *stages, Flatten(shape)])
        self.classifier = ClassifierHeads(self.stage_shapes, c.classifier_hidden, data.n_classes, actnorm=True)
        self.power_iteration(20)  # start every map at its norm bound, so even an untrained flow is invertible

    @classmethod
    def recipe(cls, scale: Scale, data: DataInfo) -> ResFlowConfig:
        if scale == Scale.paper:
            if data.shape[0] != 3:  # their MNIST setting: the logit transform with α = 1e-6, no augmentation
                return ResFlowConfig(logit_alpha=1e-6)
            # their CIFAR-10 hybrid setting (train_img.py: Normalize with these statistics; crops, flips)
            return ResFlowConfig(normalize_mean=CIFAR10_MEAN, normalize_std=CIFAR10_STD,
                                 augment=reference_augment(data.hflip))
        scales = 2 if min(data.shape[1:]) < 16 else 3
        if scale == Scale.small:
            epochs = small_epochs(data, 30, 64, LARGE_STEPS, drop_last=False)
            return ResFlowConfig(blocks=(2,) * scales, hidden=32, fc_blocks=2, fc_hidden=64, coeff=0.9, power_iters=5,
                                 sn_tol=0.0, value_warp=True, epochs=epochs, batch_size=64, lr=1e-3, warmup_iters=100,
                                 classifier_hidden=64, ema=0.0, eval_dequantize=False)
        return ResFlowConfig(blocks=(1,) * scales, hidden=8, fc_blocks=1, fc_hidden=8, coeff=0.9, power_iters=5,
                             sn_tol=0.0, value_warp=True, epochs=1, batch_size=64, warmup_iters=5, classifier_hidden=8,
                             ema=0.0, eval_dequantize=False)

    def deviations(self, scale: Scale) -> list[str]:
        small = "a small network: minutes on a CPU"
        reasons = {
            "blocks": small, "hidden": small, "fc_blocks": small, "fc_hidden": small, "classifier_hidden": small,
            "coeff": "a looser Lipschitz bound, so the few blocks of a small flow can move the data far enough",
            "power_iters": "5 power iterations per step instead of iterating to convergence: CPU time",
            "sn_tol": "see power_iters",
            "value_warp": "a learned per-value warp before the logit (_flows.ValueWarp): digits use 17 of 256 "
                          "values",
            "epochs": "fewer epochs: minutes on a CPU",
            "warmup_iters": "a warm-up scaled to the short run",
            "ema": "no weight average: decay 0.999 averages over more steps than the whole short run has",
            "eval_dequantize": "the classifier reads the bin centres (the mean of the dequantized inputs), not one "
                               "dequantization of each test image: lower variance for a short run (digits: 91.67% "
                               "against 89.17%)",
        }
        return config_deviations(self.config, self.recipe(Scale.paper, self.data_info), reasons,
                                 ignore={"exact_logdet_max_dim", "eval_seed", "inverse_tol", "inverse_max_iters"})

    # views into `flow` (registering the parts twice would duplicate them in the state dict)
    @property
    def pre(self) -> FlowLayer:
        return self.flow.layers[0]

    @property
    def stages(self) -> list[FlowLayer]:
        return list(self.flow.layers)[1:-1]

    @property
    def log_prob_kind(self) -> str:  # type: ignore[override]
        return "exact" if self.dim <= self.config.exact_logdet_max_dim else "estimate"

    def log_prob_protocol(self) -> dict[str, Any]:
        """How log_prob computes the blocks' log-dets (recorded beside bits/dim)."""
        c = self.config
        if self.log_prob_kind == "exact":
            return {"logdet": "exact: slogdet of each block's full Jacobian",
                    "exact_logdet_max_dim": c.exact_logdet_max_dim}
        return {"logdet": "unbiased estimate: Hutchinson trace, Russian-roulette power series",
                "exact_terms": c.eval_exact_terms, "n_dist": c.n_dist, "poisson_lambda": c.poisson_lambda,
                "geometric_p": c.geometric_p, "eval_seed": c.eval_seed, "exact_logdet_max_dim": c.exact_logdet_max_dim}

    def power_iteration(self, n: int, tol: float = 0.0) -> None:
        for m in self.modules():
            if isinstance(m, _SpectralNormed):
                m.power_iteration(n, tol)

    # --- the flow with a chosen log-det computation ---------------------------------------------
    def _run(self, y: Tensor, mode: LogdetMode, generator: torch.Generator | None,
             exact_terms: int) -> tuple[Tensor, Tensor, list[Tensor]]:
        self.settings.mode, self.settings.generator, self.settings.exact_terms = mode, generator, exact_terms
        try:
            x, logdet = self.pre(y)
            features = []
            for stage in self.stages:
                x, ld = stage(x)
                logdet = logdet + ld
                features.append(x)
        finally:
            self.settings.generator = None
        return x.reshape(x.shape[0], -1), logdet, features

    def latent(self, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.log_prob_kind == "exact":
            z, logdet, _ = self._run(y, "exact", None, 0)
        else:
            g = torch.Generator().manual_seed(self.config.eval_seed)
            z, logdet, _ = self._run(y, "estimate", g, self.config.eval_exact_terms)
        return z, logdet

    def logits(self, x: Tensor) -> Tensor:
        """Class logits of images x ∈ [0, 1] (uint8/255), read from the latent of `_flows.classifier_input`: the
        images dequantized as in training (``eval_dequantize``, seeded by content) or the bin centres."""
        self.check_images(x, "logits")
        return self.classifier(self._run(classifier_input(x, self.config.eval_dequantize), "none", None, 0)[2])

    def features(self, x: Tensor) -> Tensor:
        """What the classifier's linear layer reads, from the same latent as ``logits`` (Features capability)."""
        self.check_images(x, "features")
        y = classifier_input(x, self.config.eval_dequantize)
        return self.classifier.pooled(self._run(y, "none", None, 0)[2])

    def sampler_protocol(self) -> dict[str, Any]:
        c = self.config
        return {**super().sampler_protocol(), "inverse": "fixed-point iteration x ← y − g(x) per block",
                "inverse_tol": c.inverse_tol, "inverse_max_iters": c.inverse_max_iters}

    # --- training -------------------------------------------------------------------------------
    def _train_latent(self, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Any]:
        return self._run(y, "estimate", generator, self.config.n_exact_terms)

    def _objective(self, nll: Tensor, features: Any, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        return hybrid_objective(nll, self.classifier(features), labels, self.config.nll_weight)

    def optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.Adam(self.parameters(), lr=c.lr, betas=(0.9, c.beta2), weight_decay=c.weight_decay)

    def _average_decay(self, steps_per_epoch: int) -> float:
        return self.config.ema

    def _after_step(self) -> None:
        self.power_iteration(self.config.power_iters, self.config.sn_tol)

    def fit(self, train: Split, ctx: TrainContext) -> dict[str, Any]:
        stats = super().fit(train, ctx)
        # evaluate with converged norm estimates (to sn_tol where set, as after every step)
        c = self.config
        self.power_iteration(c.power_iters if c.sn_tol > 0 else 200, c.sn_tol)
        lips = [m.sigma().item() / max(1.0, m.sigma().item() / m.coeff) for m in self.modules()
                if isinstance(m, _SpectralNormed)]
        if not all(math.isfinite(s) for s in lips):
            raise NonFiniteError(f"{self.name}: non-finite spectral norms after training; lower lr")
        return {**stats, "max_layer_lipschitz": round(max(lips), 4)}

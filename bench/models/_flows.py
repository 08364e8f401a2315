"""Building blocks the normalizing flows share (`nice`, `realnvp`, `glow`, `glow_hybrid`, `resflow`).

A flow is a bijection f from dequantized images y ∈ [0, 1)^D to a latent z ∈ R^D with a tractable
log|det ∂f/∂y|, and log p(y) = log p_base(f(y)) + log|det ∂f/∂y| (change of variables). Every layer here
is a `FlowLayer`: ``forward(x) -> (z, logdet)`` with one log-determinant per example, ``inverse(z) -> x``.

- `LogitTransform`: y → logit(α + (1−2α)y), with its log-det, so the flows' density is that of y on
  [0, 1]^D (Dinh et al. 2016, §4.1); `ValueWarp`, optionally before it, learns which 8-bit values occur.
  `Normalize` (y − mean)/std per channel, with its log-det, is Residual Flows' hybrid input layer instead.
- `Squeeze`: C×H×W → 4C×H/2×W/2 (Dinh et al. 2016, §3.6).
- `ActNorm` with data-dependent initialization and `InvConv1x1` with the LU parametrization (Kingma &
  Dhariwal 2018, §3.1–3.2).
- `Coupling`: additive (NICE) or affine (Real NVP, Glow) coupling through a binary mask: checkerboard,
  channel-wise or, on flat vectors, alternating dimensions.
- `MultiScale`: levels of layers with half of the channels factored out after each level but the last,
  optionally through Glow's learned conditional prior, and per-level features for classifier heads.
- `FlowModel`: the `BenchModel` part every flow shares: input checks, log_prob, ancestral sampling and the
  maximum-likelihood training loop (optional augmentation, micro-batches, warm-up, gradient clipping and an
  average of the weights, each set by the subclass's config and hooks).
- `GlowAdamax`: openai/glow's Adamax, which is not torch's.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.data.base import Split
from bench.errors import NonFiniteError, UserError
from bench.models.base import BenchModel, DataInfo, TrainContext, to_uint8
from bench.models.training import TrainLoop
from bench.samplers import content_generator

Shape = tuple[int, ...]
Prior = Literal["gaussian", "logistic"]
LOG_2PI = math.log(2.0 * math.pi)
#: the canonical 8-bit quantization every bits/dim convention starts from
N_BINS = 256


def sum_per_example(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).sum(1)


def max_squeezes(shape: Shape) -> int:
    """How many 2×2 squeezes a C×H×W image allows (28×28 MNIST: 2, 32×32 CIFAR: 5)."""
    _, h, w = shape
    n = 0
    while h % 2 == 0 and w % 2 == 0 and min(h, w) > 1:
        h, w, n = h // 2, w // 2, n + 1
    return n


# --- the layer interface ------------------------------------------------------------------------
class FlowLayer(nn.Module, abc.ABC):
    """A bijection with a tractable Jacobian log-determinant."""

    @abc.abstractmethod
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(f(x), log|det ∂f/∂x| per example)."""

    @abc.abstractmethod
    def inverse(self, z: Tensor) -> Tensor:
        """f⁻¹(z)."""

    def out_shape(self, shape: Shape) -> Shape:
        """Per-example shape of f(x) for x of per-example ``shape``."""
        return shape


class FlowSequence(FlowLayer):
    def __init__(self, layers: Iterable[FlowLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            z = layer.inverse(z)
        return z

    def out_shape(self, shape: Shape) -> Shape:
        for layer in self.layers:
            shape = layer.out_shape(shape)
        return shape


# --- elementwise and reshaping layers -----------------------------------------------------------
class LogitTransform(FlowLayer):
    """y ∈ [0, 1) → logit(α + (1−2α)y). α keeps the boundary values (black and white pixels) finite."""

    def __init__(self, alpha: float):
        super().__init__()
        if not 0.0 < alpha < 0.5:
            raise ValueError(f"logit alpha must be in (0, 0.5), got {alpha}")
        self.alpha = alpha

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        p = self.alpha + (1.0 - 2.0 * self.alpha) * x
        log_p, log_1mp = torch.log(p), torch.log1p(-p)
        logdet = sum_per_example(math.log(1.0 - 2.0 * self.alpha) - log_p - log_1mp)
        return log_p - log_1mp, logdet

    def inverse(self, z: Tensor) -> Tensor:
        return (torch.sigmoid(z) - self.alpha) / (1.0 - 2.0 * self.alpha)


class ValueWarp(FlowLayer):
    """A learned monotone piecewise-linear bijection of [0, 1] with one bin per 8-bit value, shared by every
    dimension: the bin [k/256, (k+1)/256) is stretched to width q_k, q = softmax(θ), log-det log(256·q_k).

    Not from the flow papers: data such as scikit-learn's digits use only 17 of the 256 values, and a flow
    in logit space spends most of its capacity carving the empty bins out of a smooth density (a small Glow
    on digits: 4.2 bits/dim without the warp, 2.1 with it, in the same number of steps). This layer
    learns which values occur (like a shared per-pixel histogram) and hands the flow a smooth problem.
    Like actnorm it is initialized from its first training batch: q ∝ the batch's value counts + 1 (an
    untrained layer is the identity). Recipes record whether it is on (`value_warp`).
    """

    def __init__(self, bins: int = N_BINS):
        super().__init__()
        self.bins = bins
        self.theta = nn.Parameter(torch.zeros(bins))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        k = (x * self.bins).floor().clamp(0, self.bins - 1).long().flatten()
        counts = torch.bincount(k, minlength=self.bins).to(self.theta)
        self.theta.copy_(torch.log(counts + 1.0))
        self.initialized.fill_(1)

    def _table(self, like: Tensor) -> tuple[Tensor, Tensor]:
        q = torch.softmax(self.theta.to(like.dtype), dim=0)
        return q, torch.cat([q.new_zeros(1), torch.cumsum(q, 0)[:-1]])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not self.initialized:
            self._initialize(x)
        q, left = self._table(x)
        k = (x * self.bins).floor().clamp(0, self.bins - 1).long()
        qk = q[k]
        z = left[k] + qk * (x * self.bins - k)
        return z, sum_per_example(torch.log(self.bins * qk))

    def inverse(self, z: Tensor) -> Tensor:
        q, left = self._table(z)
        k = (torch.searchsorted(left, z.contiguous(), right=True) - 1).clamp(0, self.bins - 1)
        return (k + (z - left[k]) / q[k]) / self.bins


class Normalize(FlowLayer):
    """y → (y − mean_c)/std_c per channel (Residual Flows' hybrid `init_layer`, CIFAR-10's statistics).
    log-det −H·W·Σ_c log std_c: the density stays that of y (on all of R^D, so the mass it puts outside
    [0, 1)^D makes bits/dim an upper bound still)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"Normalize needs one mean and one positive std per channel, got {mean}, {std}")
        # float64 so that a float64 model computes with the exact constants
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float64))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float64))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.shape[1] != self.mean.numel():
            raise ValueError(f"Normalize holds {self.mean.numel()} channel statistics, the data has {x.shape[1]}")
        z = (x - _per_channel(self.mean, x).to(x)) / _per_channel(self.std, x).to(x)
        return z, (-self.std.to(x).log().sum() * x[0, 0].numel()).expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return z * _per_channel(self.std, z).to(z) + _per_channel(self.mean, z).to(z)


def input_layers(logit_alpha: float, value_warp: bool, normalize: tuple[Sequence[float], Sequence[float]] = ((), ())
                 ) -> FlowSequence:
    """y ∈ [0, 1)^D → the flow's working space: `Normalize` when ``normalize`` = (mean, std) is given,
    otherwise optionally `ValueWarp`, then `LogitTransform`."""
    if normalize[0]:
        return FlowSequence([Normalize(*normalize)])
    return FlowSequence([*([ValueWarp()] if value_warp else []), LogitTransform(logit_alpha)])


class Squeeze(FlowLayer):
    """Each 2×2 spatial block becomes 4 channels (a permutation: log-det 0)."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        n, c, h, w = x.shape
        x = x.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return x.reshape(n, 4 * c, h // 2, w // 2), x.new_zeros(n)

    def inverse(self, z: Tensor) -> Tensor:
        n, c, h, w = z.shape
        z = z.reshape(n, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return z.reshape(n, c // 4, 2 * h, 2 * w)

    def out_shape(self, shape: Shape) -> Shape:
        c, h, w = shape
        if h % 2 or w % 2:
            raise ValueError(f"cannot squeeze a {h}×{w} feature map: height and width must be even")
        return (4 * c, h // 2, w // 2)


class Flatten(FlowLayer):
    """C×H×W → D (NICE works on vectors)."""

    def __init__(self, shape: Shape):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x.reshape(x.shape[0], -1), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return z.reshape(z.shape[0], *self.shape)

    def out_shape(self, shape: Shape) -> Shape:
        return (math.prod(shape),)


def _per_channel(p: Tensor, x: Tensor) -> Tensor:
    """View a [C] parameter so it broadcasts over N×C×... inputs."""
    return p.view(1, -1, *([1] * (x.dim() - 2)))


class ActNorm(FlowLayer):
    """Per-channel affine z = (x + b)·exp(s); on its first training batch b and s are set so that the
    output has zero mean and unit variance per channel (Glow's data-dependent initialization).
    ``min_var`` > 0 is Residual Flows' variant: s = −½·log max(var, min_var) (their ActNorm uses 0.2)."""

    def __init__(self, channels: int, min_var: float = 0.0):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.logs = nn.Parameter(torch.zeros(channels))
        self.min_var = min_var
        # a buffer so that a loaded checkpoint is never re-initialized
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        dims = [d for d in range(x.dim()) if d != 1]
        self.bias.copy_(-x.mean(dim=dims))
        if self.min_var > 0:
            self.logs.copy_(-0.5 * torch.log(x.var(dim=dims).clamp_min(self.min_var)))
        else:
            self.logs.copy_(-torch.log(x.std(dim=dims) + 1e-6))
        self.initialized.fill_(1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not self.initialized:
            self._initialize(x)
        z = (x + _per_channel(self.bias, x)) * _per_channel(self.logs, x).exp()
        n_positions = x[0, 0].numel()
        return z, (self.logs.sum() * n_positions).expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return z * _per_channel(-self.logs, z).exp() - _per_channel(self.bias, z)


class InvConv1x1(FlowLayer):
    """Invertible 1×1 convolution W = P·L·(U + diag(sign(s)·exp(log|s|))), P fixed, L unit lower- and U
    strictly upper-triangular: log|det W| = Σ log|s| costs O(C) (Glow §3.2, LU-decomposed)."""

    def __init__(self, channels: int):
        super().__init__()
        w = torch.linalg.qr(torch.randn(channels, channels))[0]  # a random rotation, as Glow initializes
        p, lower, upper = torch.linalg.lu(w)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("l_mask", torch.tril(torch.ones(channels, channels), -1))
        self.lower = nn.Parameter(lower * self.l_mask)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(torch.abs(s)))

    def weight(self) -> Tensor:
        eye = torch.eye(self.lower.shape[0], dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.l_mask + eye
        upper = self.upper * self.l_mask.T + torch.diag(self.sign_s * self.log_s.exp())
        return self.perm @ lower @ upper

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        w = self.weight()
        z = F.conv2d(x, w.view(*w.shape, 1, 1))
        return z, (self.log_s.sum() * x[0, 0].numel()).expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        w_inv = torch.linalg.inv(self.weight())
        return F.conv2d(z, w_inv.view(*w_inv.shape, 1, 1))


# --- coupling -----------------------------------------------------------------------------------
def checkerboard_mask(shape: Shape, parity: int) -> Tensor:
    c, h, w = shape
    ij = torch.arange(h).view(-1, 1) + torch.arange(w).view(1, -1)
    return ((ij + parity) % 2 == 0).float().expand(c, h, w).clone()


def channel_mask(shape: Shape, parity: int) -> Tensor:
    c = shape[0]
    m = torch.zeros(shape)
    if parity == 0:
        m[: c // 2] = 1.0
    else:
        m[c // 2:] = 1.0
    return m


def alternating_mask(dim: int, parity: int) -> Tensor:
    return ((torch.arange(dim) + parity) % 2 == 0).float()


Scaling = Literal["additive", "tanh", "sigmoid"]


class Coupling(FlowLayer):
    """z = m⊙x + (1−m)⊙(x·exp(s(m⊙x)) + t(m⊙x)) for a fixed binary mask m (1 = conditioning part).

    ``scaling``: "additive" (NICE: s = 0, the net outputs t only), "tanh" (Real NVP: s = γ·tanh(h) with
    a learned per-channel γ) or "sigmoid" (Glow: exp(s) = sigmoid(h + 2), so scales start near 0.88 and
    never exceed 1). ``net`` maps a tensor of the input's shape to 1 (additive) or 2 such tensors stacked
    along dim 1, and should start at zero so that the layer starts as the identity.
    """

    def __init__(self, net: nn.Module, mask: Tensor, scaling: Scaling):
        super().__init__()
        self.net = net
        self.scaling = scaling
        self.register_buffer("mask", mask.unsqueeze(0))
        if scaling == "tanh":
            self.gamma = nn.Parameter(torch.ones(mask.shape[0]))

    def _shift_logscale(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.net(x * self.mask)
        free = 1.0 - self.mask
        if self.scaling == "additive":
            return h * free, torch.zeros_like(x)
        raw, t = h.chunk(2, dim=1)
        if self.scaling == "tanh":
            logs = _per_channel(self.gamma, raw) * torch.tanh(raw)
        else:
            logs = F.logsigmoid(raw + 2.0)
        return t * free, logs * free

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        t, logs = self._shift_logscale(x)
        return x * logs.exp() + t, sum_per_example(logs)

    def inverse(self, z: Tensor) -> Tensor:
        # the conditioning part is unchanged by the layer, so s and t can be recomputed from z
        t, logs = self._shift_logscale(z)
        return (z - t) * (-logs).exp()


def zero_init(layer: nn.Module) -> nn.Module:
    """Zero the output layer of a coupling network so that the flow starts as the identity."""
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


# --- multi-scale architecture -------------------------------------------------------------------
class MultiScale(FlowLayer):
    """Levels of flow layers on C×H×W; after every level but the last, half of the channels leave the
    flow as latents (Real NVP §3.6). With ``learned_prior`` each factored-out half z₂ is standardized by
    a zero-initialized conv of the kept half z₁ — (z₂ − μ(z₁))·exp(−log σ(z₁)) — which is Glow's
    learned conditional prior N(μ(z₁), σ(z₁)²) written as one more invertible layer. Output: the flat
    latent (every factored-out part, then the last level's output), N×D.
    """

    def __init__(self, levels: Sequence[FlowLayer], in_shape: Shape, learned_prior: bool, prior_hidden: int = 0):
        super().__init__()
        self.levels = nn.ModuleList(levels)
        self.in_shape = tuple(in_shape)
        self.level_shapes: list[Shape] = []  # each level's output shape (before the split)
        self.latent_shapes: list[Shape] = []  # the shapes of the latent pieces, in output order
        priors = []
        shape = self.in_shape
        for i, level in enumerate(self.levels):
            shape = level.out_shape(shape)
            self.level_shapes.append(shape)
            if i < len(self.levels) - 1:
                c, h, w = shape
                if c < 2:
                    raise ValueError(f"level {i} outputs {c} channel(s): squeeze before factoring out")
                kept, out = c // 2, c - c // 2
                self.latent_shapes.append((out, h, w))
                if learned_prior:
                    priors.append(zero_init(nn.Conv2d(kept, 2 * out, 3, padding=1)))
                shape = (kept, h, w)
        self.latent_shapes.append(shape)
        self.priors = nn.ModuleList(priors)

    def forward_features(self, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(latent, log-det, each level's output) — the last for classifier heads on the latent."""
        logdet = x.new_zeros(x.shape[0])
        pieces, features = [], []
        for i, level in enumerate(self.levels):
            x, ld = level(x)
            logdet = logdet + ld
            features.append(x)
            if i < len(self.levels) - 1:
                kept = x.shape[1] // 2
                x, out = x[:, :kept], x[:, kept:]
                if self.priors:
                    mu, logsd = self.priors[i](x).chunk(2, dim=1)
                    out = (out - mu) * (-logsd).exp()
                    logdet = logdet - sum_per_example(logsd)
                pieces.append(out.reshape(x.shape[0], -1))
        pieces.append(x.reshape(x.shape[0], -1))
        return torch.cat(pieces, dim=1), logdet, features

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z, logdet, _ = self.forward_features(x)
        return z, logdet

    def inverse(self, z: Tensor) -> Tensor:
        sizes = [math.prod(s) for s in self.latent_shapes]
        pieces = [p.reshape(z.shape[0], *s) for p, s in zip(z.split(sizes, dim=1), self.latent_shapes)]
        x = self.levels[-1].inverse(pieces[-1])
        for i in range(len(self.levels) - 2, -1, -1):
            out = pieces[i]
            if self.priors:
                mu, logsd = self.priors[i](x).chunk(2, dim=1)
                out = out * logsd.exp() + mu
            x = self.levels[i].inverse(torch.cat([x, out], dim=1))
        return x

    def out_shape(self, shape: Shape) -> Shape:
        return (math.prod(self.in_shape),)


class _ActNormValue(nn.Module):
    """An `ActNorm` used as an ordinary layer (its log-det dropped): the classifier heads' normalization."""

    def __init__(self, channels: int, min_var: float):
        super().__init__()
        self.norm = ActNorm(channels, min_var)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x)[0]


class ClassifierHeads(nn.Module):
    """Residual Flows' hybrid classifier (rtqichen/residual-flows `build_multiscale_classifier`): per level,
    conv3×3 → ActNorm (their ActNorm2d, data-initialized, variance floored at 0.2) → ReLU → global average
    pooling; the pooled features of all levels → one linear layer. ``actnorm=False`` drops the ActNorm."""

    def __init__(self, level_shapes: Sequence[Shape], hidden: int, n_classes: int, actnorm: bool = True):
        super().__init__()

        def head(channels: int) -> nn.Module:
            norm = [_ActNormValue(hidden, 0.2)] if actnorm else []
            return nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), *norm, nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten())

        self.heads = nn.ModuleList(head(s[0]) for s in level_shapes)
        self.linear = nn.Linear(hidden * len(level_shapes), n_classes)

    def pooled(self, features: Sequence[Tensor]) -> Tensor:
        """What the linear layer reads: every level's pooled head output, concatenated."""
        return torch.cat([h(f) for h, f in zip(self.heads, features)], dim=1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.linear(self.pooled(features))


def hybrid_objective(nll: Tensor, logits: Tensor, labels: Tensor, nll_weight: float) -> tuple[Tensor, dict]:
    """Residual Flows' hybrid loss (train_img.py, task=hybrid): (λ·(−log p(x)) + cross-entropy) in bits,
    i.e. both terms in nats divided by ln 2; λ = 1 is their (and JEM's Table 1's) setting."""
    ce = F.cross_entropy(logits, labels)
    return (nll_weight * nll + ce) / math.log(2.0), {"ce": ce.item()}


# --- base distribution --------------------------------------------------------------------------
def base_log_prob(z: Tensor, prior: Prior) -> Tensor:
    """log p_base(z) per example for a standard normal or standard logistic base."""
    if prior == "gaussian":
        return sum_per_example(-0.5 * z * z - 0.5 * LOG_2PI)
    return sum_per_example(-F.softplus(z) - F.softplus(-z))


def base_sample(n: int, dim: int, prior: Prior, generator: torch.Generator, temperature: float = 1.0) -> Tensor:
    """n draws from the base, on the generator's (CPU) device; ``temperature`` scales them (Glow §5)."""
    if prior == "gaussian":
        z = torch.randn(n, dim, generator=generator)
    else:
        u = torch.rand(n, dim, generator=generator, dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
        z = (u.log() - torch.log1p(-u)).float()
    return temperature * z


def log_prob_from_latent(z: Tensor, logdet: Tensor, prior: Prior) -> Tensor:
    """Change of variables: log p(y) = log p_base(f(y)) + log|det ∂f/∂y|."""
    return base_log_prob(z, prior) + logdet


def dequantize(x: Tensor, generator: torch.Generator) -> Tensor:
    """uint8 → y = (x + u)/256, u ~ U[0, 1)^D (the convention of docs/architecture.md)."""
    return (x.float() + torch.rand(x.shape, generator=generator)) / N_BINS


def classifier_input(x: Tensor, dequantized: bool) -> Tensor:
    """The y a hybrid flow's classifier reads for images x ∈ [0, 1] (uint8/255). ``dequantized``: (255·x + u)/256
    with u ~ U[0, 1) drawn from a generator seeded by the batch's own bytes, as Residual Flows' test transform
    (train_img.py's add_noise) dequantizes every test image afresh; else the bin centres (255·x + ½)/256."""
    if not dequantized:
        return (x * 255.0 + 0.5) / N_BINS
    u = torch.rand(x.shape, generator=content_generator(x)).to(x.device, x.dtype)
    return (x * 255.0 + u) / N_BINS


def quantize(y: Tensor, what: str) -> Tensor:
    """y ∈ [0, 1) → the pixel x = floor(256·y) whose bin holds it, as uint8; refuses NaN/Inf."""
    return to_uint8(N_BINS * y - 0.5, 0.0, 255.0, what=what)


# --- the model part every flow shares ----------------------------------------------------------
class FlowModel(BenchModel):
    """A flow over dequantized images: subclasses build ``self.flow`` (y → flat z) in ``__init__`` and set
    ``self.prior``; they may override ``_train_latent``, ``_objective`` (hybrid models) and ``_after_step``."""

    family = "flow"
    log_prob_kind: ClassVar[str] = "exact"
    divergence_hint = "lower lr or lengthen the warm-up"

    flow: FlowLayer
    prior: Prior = "gaussian"

    def __init__(self, config: Any, data: DataInfo):
        super().__init__(config, data)
        self.dim = math.prod(data.shape)

    # --- input checks ---------------------------------------------------------------------------
    def check_images(self, x: Tensor, what: str) -> None:
        expected = tuple(self.data_info.shape)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise UserError(f"{self.name}.{what} expects images of shape N×{'×'.join(map(str, expected))} (the "
                            f"data it was built for), got {tuple(x.shape)}; evaluate it on the data it was trained on")
        if not torch.is_floating_point(x):
            raise UserError(f"{self.name}.{what} expects float images, got {x.dtype}; divide uint8 images by 255 "
                            "(logits) or dequantize them as (x + u)/256 (log_prob)")

    def check_finite(self, lp: Tensor) -> Tensor:
        if not torch.isfinite(lp).all():
            bad = (~torch.isfinite(lp)).sum().item()
            raise NonFiniteError(f"{self.name}.log_prob is non-finite for {bad} of {lp.shape[0]} images: "
                                 "the flow overflowed; retrain with a lower lr or check the inputs")
        return lp

    # --- capabilities ---------------------------------------------------------------------------
    def latent(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.flow(y)

    def log_prob(self, y: Tensor) -> Tensor:
        """log-density of dequantized y ∈ [0, 1)^D on [0, 1]^D, in nats, float64, shape [N]."""
        self.check_images(y, "log_prob")
        if y.min() < 0 or y.max() >= 1:
            raise UserError(f"{self.name}.log_prob takes dequantized images y = (x + u)/256 in [0, 1), got values in "
                            f"[{y.min().item():.3g}, {y.max().item():.3g}]")
        z, logdet = self.latent(y)
        return self.check_finite(log_prob_from_latent(z.double(), logdet.double(), self.prior))

    @property
    def temperature(self) -> float:
        return 1.0

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        was_training = self.training
        self.eval()
        dev = next(self.parameters()).device
        z = base_sample(n, self.dim, self.prior, generator, self.temperature)
        with torch.no_grad():
            y = self.flow.inverse(z.to(dev))
        self.train(was_training)
        return quantize(y, what=f"{self.name} samples").cpu()

    def sampler_protocol(self) -> dict[str, Any]:
        return {"algorithm": "ancestral: z ~ base, y = f⁻¹(z), x = floor(256·y)", "base": self.prior,
                "temperature": self.temperature}

    # --- training -------------------------------------------------------------------------------
    def _objective(self, nll: Tensor, features: Any, labels: Tensor) -> tuple[Tensor, dict[str, float]]:
        """The training loss from the batch's mean −log p(y); hybrid models add a classification loss."""
        return nll, {}

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay)

    def _make_optimizer(self, steps_per_epoch: int) -> torch.optim.Optimizer:
        """The optimizer for a run of ``steps_per_epoch`` steps per epoch (Glow's depends on it)."""
        return self.optimizer()

    def _lr_factor(self, step: int, steps_per_epoch: int) -> float:
        """The learning rate of optimizer step ``step`` (0, 1, ...) over the base lr: a linear warm-up over
        ``warmup_iters`` steps, (step + 1)/warmup_iters, as Residual Flows' `update_lr`."""
        return min(1.0, (step + 1) / max(1, self.config.warmup_iters))

    def _average_decay(self, steps_per_epoch: int) -> float:
        """Decay of the running average of the parameters that training ends with (0: none, the last weights)."""
        return 0.0

    def _after_step(self) -> None:
        """Hook after every optimizer step (Residual Flows re-normalize their Lipschitz constants)."""

    def _train_latent(self, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Any]:
        """(z, log-det, features for `_objective`) for a training batch."""
        z, logdet = self.flow(y)
        return z, logdet, None

    def training_batch(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """uint8 images → dequantized y ∈ [0, 1)^D, after the config's augmentation if it has one (applied to
        x/255 first, then y = (255·x + u)/256, as torchvision's ToTensor followed by their add_noise)."""
        augment = getattr(self.config, "augment", None)
        if not augment:
            return dequantize(x, generator)
        x = augment(x.float() / 255.0, generator)
        return (x * 255.0 + torch.rand(x.shape, generator=generator)) / N_BINS

    def _train_step(self, x: Tensor, labels: Tensor, generator: torch.Generator, dev: torch.device,
                    micro: int, run: TrainLoop) -> tuple[Tensor, dict[str, float]]:
        """Gradients of one batch's loss, accumulated over micro-batches of ``micro`` images (0: one pass)
        so that they equal the whole batch's mean; returns the batch's mean −log p and the objective's fields."""
        n = x.shape[0]
        micro = micro or n
        dtype = next(self.parameters()).dtype
        nll_sum, fields = 0.0, {}
        for a in range(0, n, micro):
            y = self.training_batch(x[a:a + micro], generator).to(dev, dtype)
            z, logdet, features = self._train_latent(y, generator)
            nll = -log_prob_from_latent(z, logdet, self.prior).mean()
            loss, fields = self._objective(nll, features, labels[a:a + micro].to(dev))
            run.check(loss)
            (loss * (y.shape[0] / n)).backward()
            nll_sum += nll.item() * y.shape[0]
        return torch.tensor(nll_sum / n), fields

    def fit(self, train: Split, ctx: TrainContext) -> dict[str, Any]:
        """Maximum likelihood on dequantized data: the subclass's optimizer, warm-up and weight average,
        gradient-norm clipping (``max_grad_norm`` 0: none), optional micro-batches (``micro_batch_size``)."""
        c = self.config
        g = ctx.generator()
        dev = ctx.device
        self.to(dev).train()
        steps_per_epoch = math.ceil(len(train) / c.batch_size)
        opt = self._make_optimizer(steps_per_epoch)
        run = TrainLoop(self, ctx, n=len(train), batch_size=c.batch_size, epochs=c.epochs, drop_last=False,
                        optimizer=opt, lr=lambda step, epoch: c.lr * self._lr_factor(step, steps_per_epoch))
        average = WeightAverage(self, self._average_decay(steps_per_epoch))
        for idx in run.batches(g):
            opt.zero_grad(set_to_none=True)
            nll, fields = self._train_step(train.x[idx], train.y[idx], g, dev, getattr(c, "micro_batch_size", 0), run)
            if c.max_grad_norm > 0:
                nn.utils.clip_grad_norm_(self.parameters(), c.max_grad_norm)
            opt.step()
            self._after_step()
            average.update()
            run.advance(bpd=(nll.item() / self.dim + math.log(N_BINS)) / math.log(2.0), **fields)
        average.install()
        return run.finish()


class WeightAverage:
    """An exponential moving average of a module's parameters (not its buffers), started from the weights
    after the first update and copied into the module by `install` — Residual Flows' `ExponentialMovingAverage`
    (decay 0.999) and, with decay 1 − 1/(steps per epoch), openai/glow's Polyak average. decay 0: no-op."""

    def __init__(self, module: nn.Module, decay: float):
        self.module, self.decay = module, decay
        self.shadow: list[Tensor] | None = None

    @torch.no_grad()
    def update(self) -> None:
        if self.decay <= 0:
            return
        params = list(self.module.parameters())
        if self.shadow is None:
            self.shadow = [p.detach().clone() for p in params]
            return
        for s, p in zip(self.shadow, params):
            s.sub_((1.0 - self.decay) * (s - p))

    @torch.no_grad()
    def install(self) -> None:
        if self.shadow is not None:
            for s, p in zip(self.shadow, self.module.parameters()):
                p.copy_(s)


class GlowAdamax(torch.optim.Optimizer):
    """openai/glow's `optim.adamax` (not torch's Adamax): m ← β1·m + (1−β1)·g, u ← max(β2·u, |g|),
    θ ← θ − α_t·m/(u + ε) with α_t = α·√(1 − β2^t)/(1 − β1^t). Glow sets β2 = 1 − 1/(steps per epoch ·
    polyak_epochs), the same decay as its Polyak average."""

    def __init__(self, params, lr: float, beta1: float, beta2: float, eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["beta1"], group["beta2"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["t"], st["m"], st["u"] = 0, torch.zeros_like(p), torch.zeros_like(p)
                st["t"] += 1
                t = st["t"]
                st["m"].mul_(b1).add_(p.grad, alpha=1.0 - b1)
                torch.maximum(st["u"] * b2, p.grad.abs(), out=st["u"])
                alpha = group["lr"] * math.sqrt(1.0 - b2**t) / (1.0 - b1**t)
                p.sub_(alpha * st["m"] / (st["u"] + group["eps"]))

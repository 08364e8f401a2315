"""Building blocks the normalizing flows share (`nice`, `realnvp`, `glow`, `glow_hybrid`, `resflow`).

A flow is a bijection f from dequantized images y ∈ [0, 1)^D to a latent z ∈ R^D with a tractable
log|det ∂f/∂y|, and log p(y) = log p_base(f(y)) + log|det ∂f/∂y| (change of variables). Every layer here
is a `FlowLayer`: ``forward(x) -> (z, logdet)`` with one log-determinant per example, ``inverse(z) -> x``.

- `LogitTransform`: y → logit(α + (1−2α)y), with its log-det, so the flows' density is that of y on
  [0, 1]^D (Dinh et al. 2016, §4.1); `ValueWarp`, optionally before it, learns which 8-bit values occur.
- `Squeeze`: C×H×W → 4C×H/2×W/2 (Dinh et al. 2016, §3.6).
- `ActNorm` with data-dependent initialization and `InvConv1x1` with the LU parametrization (Kingma &
  Dhariwal 2018, §3.1–3.2).
- `Coupling`: additive (NICE) or affine (Real NVP, Glow) coupling through a binary mask: checkerboard,
  channel-wise or, on flat vectors, alternating dimensions.
- `MultiScale`: levels of layers with half of the channels factored out after each level but the last,
  optionally through Glow's learned conditional prior, and per-level features for classifier heads.
- `FlowModel`: the `BenchModel` part every flow shares: input checks, log_prob, ancestral sampling and the
  maximum-likelihood training loop.
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
from bench.errors import ModelFailure, NonFiniteError, UserError
from bench.models.base import BenchModel, DataInfo, TrainContext, batches, to_uint8

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


def input_layers(logit_alpha: float, value_warp: bool) -> FlowSequence:
    """y ∈ [0, 1)^D → the flow's working space: optionally `ValueWarp`, then `LogitTransform`."""
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
    output has zero mean and unit variance per channel (Glow's data-dependent initialization)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.logs = nn.Parameter(torch.zeros(channels))
        # a buffer so that a loaded checkpoint is never re-initialized
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        dims = [d for d in range(x.dim()) if d != 1]
        self.bias.copy_(-x.mean(dim=dims))
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


class ClassifierHeads(nn.Module):
    """Residual Flows' hybrid classifier (rtqichen/residual-flows `build_multiscale_classifier`): per level,
    conv3×3 → ReLU → global average pooling; the pooled features of all levels → one linear layer."""

    def __init__(self, level_shapes: Sequence[Shape], hidden: int, n_classes: int):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(s[0], hidden, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            for s in level_shapes)
        self.linear = nn.Linear(hidden * len(level_shapes), n_classes)

    def pooled(self, features: Sequence[Tensor]) -> Tensor:
        """What the linear layer reads: every level's pooled head output, concatenated."""
        return torch.cat([h(f) for h, f in zip(self.heads, features)], dim=1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.linear(self.pooled(features))


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
    """uint8 → y = (x + u)/256, u ~ U[0, 1)^D (DESIGN.md's convention)."""
    return (x.float() + torch.rand(x.shape, generator=generator)) / N_BINS


def quantize(y: Tensor, what: str) -> Tensor:
    """y ∈ [0, 1) → the pixel x = floor(256·y) whose bin holds it, as uint8; refuses NaN/Inf."""
    return to_uint8(N_BINS * y - 0.5, 0.0, 255.0, what=what)


# --- the model part every flow shares ----------------------------------------------------------
class FlowModel(BenchModel):
    """A flow over dequantized images: subclasses build ``self.flow`` (y → flat z) in ``__init__`` and set
    ``self.prior``; they may override ``_train_latent``, ``_objective`` (hybrid models) and ``_after_step``."""

    family = "flow"
    log_prob_kind: ClassVar[str] = "exact"
    code_modules: ClassVar[tuple[str, ...]] = ("bench.models._flows",)

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

    def _after_step(self) -> None:
        """Hook after every optimizer step (Residual Flows re-normalize their Lipschitz constants)."""

    def _train_latent(self, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Any]:
        """(z, log-det, features for `_objective`) for a training batch."""
        z, logdet = self.flow(y)
        return z, logdet, None

    def fit(self, train: Split, ctx: TrainContext) -> dict[str, Any]:
        """Maximum likelihood on dequantized data with Adam, linear warm-up and gradient-norm clipping."""
        c = self.config
        g = ctx.generator()
        dev = ctx.device
        self.to(dev).train()
        opt = self.optimizer()
        n = len(train)
        steps_per_epoch = math.ceil(n / c.batch_size)
        step = 0
        with ctx.progress(f"train {self.name}", c.epochs * steps_per_epoch) as update:
            for _ in range(c.epochs):
                perm = torch.randperm(n, generator=g)
                for a, b in batches(n, c.batch_size):
                    idx = perm[a:b]
                    y = dequantize(train.x[idx], g).to(dev)
                    for group in opt.param_groups:
                        group["lr"] = c.lr * min(1.0, (step + 1) / max(1, c.warmup_iters))
                    z, logdet, features = self._train_latent(y, g)
                    nll = -log_prob_from_latent(z, logdet, self.prior).mean()
                    loss, fields = self._objective(nll, features, train.y[idx].to(dev))
                    if not torch.isfinite(loss):
                        raise ModelFailure(f"{self.name} training diverged at step {step} (loss={loss.item():.3g}); "
                                           "lower lr or raise warmup_iters")
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    nn.utils.clip_grad_norm_(self.parameters(), c.max_grad_norm)
                    opt.step()
                    self._after_step()
                    step += 1
                    update(1, bpd=(nll.item() / self.dim + math.log(N_BINS)) / math.log(2.0), **fields)
        self.eval()
        return {"steps": step, "epochs": c.epochs}

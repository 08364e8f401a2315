"""`pixelcnn`: the gated PixelCNN (van den Oord et al., "Conditional Image Generation with PixelCNN
Decoders", NeurIPS 2016, arXiv:1606.05328), unconditional, with a 256-way softmax per sub-pixel.

P(x) = Πᵢ P(xᵢ | x<ᵢ) over sub-pixels in raster order, and within a pixel R, then G, then B (PixelRNN,
van den Oord et al. 2016, arXiv:1601.06759). What is implemented:
- two stacks per layer, removing the blind spot of masked 3×3 convolutions: a vertical stack of n×n
  convolutions that sees every row above (its output is shifted down one row before it feeds the horizontal
  stack) and a horizontal stack of 1×n convolutions that sees the pixels to the left in the current row;
- gated activations tanh(W_f ∗ x) ⊙ σ(W_g ∗ x), a residual connection in the horizontal stack and skip
  connections to the output (the paper's Figure 2);
- masks of type A (first layer: the current sub-pixel is hidden) and B (later layers): for colour images the
  feature maps are split into R/G/B groups (channel i belongs to group i mod C) and a group sees, at the
  current pixel, only the groups before it (A) or up to and including it (B). Every 1×1 convolution of the
  horizontal stack and of the output head carries the B mask.
- ``log_prob`` is exact: log P(floor(256·y)) + D·log 256. ``sample`` is ancestral, one sub-pixel at a time.

Scales: ``tiny`` for tests, ``small`` for 8×8 digits, ``paper`` the paper's CIFAR-10 model as §3.1 describes
it (20 layers, 384 feature maps, 5×5 filters, batch 128); the optimizer is not given there, we use Adam.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.data.base import Split
from bench.errors import UserError
from bench.models.base import (
    BenchModel,
    DataInfo,
    TrainContext,
    as_float01,
    cpu_threads,
    register,
    to_uint8,
)
from bench.models.training import TrainLoop
from bench.scales import Scale, small_epochs


@dataclass(frozen=True)
class PixelCNNConfig:
    channels: int = 384  # feature maps per stack (a multiple of the image's channel count)
    n_layers: int = 20  # gated layers, the first of type A
    kernel_size: int = 5  # n of the n×n vertical and 1×n horizontal filters (odd)
    head_channels: int = 384  # the 1×1 output layers before the softmax (a multiple of the channel count)
    # optimization
    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    grad_clip: float = 1.0
    lr_decay: float = 1.0  # ×lr_decay per epoch (1.0: constant)
    #: intra-op threads while training on a CPU (0: torch's default). 1 at tiny/small: ops on 8×8 images are too
    #: small to split, and on a busy 2-core machine thread synchronization made training 5-20× slower (measured)
    cpu_threads: int = 0

    def __post_init__(self):
        if self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 3, got {self.kernel_size}")
        if self.n_layers < 1 or self.channels < 1 or self.head_channels < 1:
            raise ValueError("n_layers, channels and head_channels must be positive")


# --- masks --------------------------------------------------------------------------------------------
def channel_groups(n: int, colours: int) -> Tensor:
    """The colour group of each of ``n`` channels: i mod C (so both halves of a gate keep the grouping)."""
    return torch.arange(n) % colours


def centre_mask(out_ch: int, in_ch: int, colours: int, kind: Literal["A", "B"]) -> Tensor:
    """out×in mask of the connections allowed at the current pixel: group_in < group_out (A) or ≤ (B)."""
    g_out = channel_groups(out_ch, colours)[:, None]
    g_in = channel_groups(in_ch, colours)[None, :]
    return (g_in < g_out if kind == "A" else g_in <= g_out).float()


class HorizontalConv(nn.Conv2d):
    """1×(n//2+1) convolution over the current row, left-padded so that the last tap is the current pixel,
    whose channel connections are masked (A or B). With n = 1 it is the masked 1×1 convolution."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, colours: int, kind: Literal["A", "B"]):
        width = kernel_size // 2 + 1
        super().__init__(in_ch, out_ch, (1, width))
        self.pad = width - 1
        mask = torch.ones(out_ch, in_ch, 1, width)
        mask[:, :, 0, -1] = centre_mask(out_ch, in_ch, colours, kind)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, (self.pad, 0, 0, 0)), self.weight * self.mask, self.bias)


class VerticalConv(nn.Conv2d):
    """(n//2+1)×n convolution: the output at row i sees rows i−n//2 .. i (all columns within reach)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int):
        super().__init__(in_ch, out_ch, (kernel_size // 2 + 1, kernel_size))
        self.k = kernel_size // 2

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, (self.k, self.k, self.k, 0)))


def shift_down(x: Tensor) -> Tensor:
    """Row i gets row i−1 (zeros in row 0): the vertical stack then only carries rows strictly above."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def gate(x: Tensor) -> Tensor:
    f, g = x.chunk(2, dim=1)
    return torch.tanh(f) * torch.sigmoid(g)


class GatedLayer(nn.Module):
    def __init__(self, in_ch: int, channels: int, kernel_size: int, colours: int, kind: Literal["A", "B"]):
        super().__init__()
        self.v_conv = VerticalConv(in_ch, 2 * channels, kernel_size)
        self.v_to_h = nn.Conv2d(2 * channels, 2 * channels, 1)  # rows above only: no mask needed
        self.h_conv = HorizontalConv(in_ch, 2 * channels, kernel_size, colours, kind)
        self.h_out = HorizontalConv(channels, channels, 1, colours, "B")
        self.skip = HorizontalConv(channels, channels, 1, colours, "B")
        self.residual = kind == "B" and in_ch == channels

    def forward(self, v: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        v_pre = self.v_conv(v)
        h_gated = gate(self.h_conv(h) + self.v_to_h(shift_down(v_pre)))
        h_new = self.h_out(h_gated)
        if self.residual:
            h_new = h_new + h
        return gate(v_pre), h_new, self.skip(h_gated)


class GatedPixelCNN(nn.Module):
    """Images in [-1, 1] (N×C×H×W) → logits N×256×C×H×W; logit (v, c, i, j) depends only on the sub-pixels
    before (c, i, j) in raster order."""

    def __init__(self, colours: int, channels: int, n_layers: int, kernel_size: int, head_channels: int):
        super().__init__()
        self.colours = colours
        self.layers = nn.ModuleList(
            GatedLayer(colours if i == 0 else channels, channels, kernel_size, colours, "A" if i == 0 else "B")
            for i in range(n_layers))
        self.head1 = HorizontalConv(channels, head_channels, 1, colours, "B")
        # output channel o = value·C + colour, so that o mod C is the colour it predicts
        self.head2 = HorizontalConv(head_channels, 256 * colours, 1, colours, "B")

    def forward(self, x: Tensor) -> Tensor:
        v, h = x, x
        skips: Tensor | int = 0
        for layer in self.layers:
            v, h, s = layer(v, h)
            skips = skips + s
        out = self.head2(F.relu(self.head1(F.relu(skips))))
        return out.view(x.shape[0], 256, self.colours, *x.shape[2:])


# --- model --------------------------------------------------------------------------------------------
def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


#: the small recipe's step budget on images past 16×16 (bench.scales: calibrated on 2 CPU cores)
LARGE_STEPS = 600


@register("pixelcnn")
class PixelCNN(BenchModel):
    family = "autoregressive"
    Config = PixelCNNConfig
    divergence_hint = "lower lr or grad_clip"
    log_prob_kind = "exact"
    density_is_differentiable = False  # P(x) is discrete: log p(y) is flat within each 8-bit bin

    def __init__(self, config: PixelCNNConfig, data: DataInfo):
        super().__init__(config, data)
        c = config
        colours = data.shape[0]
        for name, v in (("channels", c.channels), ("head_channels", c.head_channels)):
            if v % colours:
                raise UserError(f"pixelcnn: {name}={v} must be a multiple of the image's {colours} channels (one "
                                f"group per colour); set opts.{name}={_round_up(v, colours)}")
        self.net = GatedPixelCNN(colours, c.channels, c.n_layers, c.kernel_size, c.head_channels)
        # shaped like the training images, so that a checkpoint is refused on data of another shape before
        # anything runs: the convolutions themselves would run on any image size, silently
        self.register_buffer("image_shape", torch.zeros(data.shape, dtype=torch.uint8))

    @classmethod
    def recipe(cls, scale: Scale, data: DataInfo) -> PixelCNNConfig:
        if scale == Scale.paper:
            return PixelCNNConfig()
        if scale == Scale.small:
            colours = data.shape[0]
            return PixelCNNConfig(channels=_round_up(32, colours), n_layers=5, kernel_size=3,
                                  head_channels=_round_up(64, colours),
                                  epochs=small_epochs(data, 30, 64, LARGE_STEPS, drop_last=False), batch_size=64,
                                  lr=3e-3, lr_decay=0.92, cpu_threads=1)
        return PixelCNNConfig(channels=6, n_layers=2, kernel_size=3, head_channels=6, epochs=1, batch_size=64,
                              lr=1e-3, cpu_threads=1)

    def _check(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.data_info.shape:
            raise UserError(f"{self.name} was built for images {self.data_info.shape}, got {tuple(x.shape[1:])}; "
                            "evaluate it on data of the shape it was trained on")

    def conditional_log_probs(self, x: Tensor) -> Tensor:
        """log P(xᵢ | x<ᵢ) per sub-pixel (N×C×H×W) for uint8-valued long images x."""
        logits = self.net(as_float01(x) * 2.0 - 1.0)
        return torch.log_softmax(logits, dim=1).gather(1, x.unsqueeze(1)).squeeze(1)

    # --- capabilities ---------------------------------------------------------------------------
    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density of dequantized y = ``x`` ∈ [0,1)^D in nats, float64 [N]."""
        self._check(x)
        xi = (x * 256.0).floor().clamp(0, 255).long()
        d = math.prod(self.data_info.shape)
        return self.conditional_log_probs(xi).flatten(1).double().sum(1) + d * math.log(256.0)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """Ancestral sampling in raster order, R, G, B within a pixel; Gumbel-max on CPU-generator noise."""
        dev = next(self.parameters()).device
        ch, h, w = self.data_info.shape
        x = torch.zeros(n, ch, h, w, dtype=torch.long, device=dev)
        with torch.no_grad():
            for i in range(h):
                for j in range(w):
                    for c in range(ch):
                        # rows below i cannot influence row i (causal padding), so they are left out
                        logits = self.net(as_float01(x[:, :, : i + 1]) * 2.0 - 1.0)[:, :, c, i, j]
                        u = torch.rand(logits.shape, generator=generator).clamp(1e-12, 1.0 - 1e-7).to(dev)
                        x[:, c, i, j] = (logits - torch.log(-torch.log(u))).argmax(1)
        return to_uint8(x.float() / 255.0, what=f"{self.name} samples").cpu()

    def sampler_protocol(self) -> dict[str, Any]:
        return {"algorithm": "ancestral", "order": "raster, R→G→B within a pixel", "temperature": 1.0,
                "distribution": "256-way softmax per sub-pixel"}

    # --- training -------------------------------------------------------------------------------
    def fit(self, train: Split, ctx: TrainContext) -> dict[str, Any]:
        c = self.config
        g = ctx.generator()
        self.to(ctx.device).train()
        opt = torch.optim.Adam(self.parameters(), lr=c.lr)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=c.lr_decay)  # per epoch, the last partial one too
        run = TrainLoop(self, ctx, n=len(train), batch_size=c.batch_size, epochs=c.epochs, drop_last=False,
                        optimizer=opt, grad_clip=c.grad_clip, on_epoch_end=sched.step)
        with cpu_threads(ctx.device, c.cpu_threads):
            for idx in run.batches(g):
                loss = -self.conditional_log_probs(train.x[idx].long().to(ctx.device)).mean()  # nats per sub-pixel
                run.step(loss, bpd=loss.item() / math.log(2))
        return run.finish()

"""`vae`: a convolutional variational auto-encoder (Kingma & Welling, "Auto-Encoding Variational Bayes",
ICLR 2014, arXiv:1312.6114) on 8-bit images, evaluated with the importance-weighted bound of Burda et al.
("Importance Weighted Autoencoders", ICLR 2016, arXiv:1509.00519).

- Encoder q(z|x) = N(μ(x), diag σ²(x)): strided 3×3 convolutions, then a linear layer. Prior p(z) = N(0, I).
- Decoder p(x|z): the mirror image (linear, then transposed convolutions), every sub-pixel independent given
  z, either a 256-way categorical or a discretized logistic (Kingma et al. 2016, "Improved Variational
  Inference with Inverse Autoregressive Flow", arXiv:1606.04934; binning as in PixelCNN++). Both are
  distributions over {0..255}, so the model is a discrete P(x) and the density of dequantized y is
  P(floor(256·y))·256^D.
- Training maximizes the ELBO (reparameterized, one sample), with an optional linear KL warm-up.
- ``log_prob`` is the IWAE-k bound log (1/k) Σᵢ p(x, zᵢ)/q(zᵢ|x), zᵢ ~ q(z|x): a lower bound on log P(x) that
  tightens with k (``log_prob_kind = "bound"``; k is recorded). ``sample`` draws z from the prior, then x.

Scales: ``tiny`` for tests; ``small`` for 8×8 digits (categorical decoder: the digits take 17 grey levels,
which a categorical learns and a logistic smears); ``paper`` for CIFAR-10: the discretized logistic of the IAF
paper and Burda et al.'s k = 5000 for evaluation. The encoder/decoder widths there are ours: no single
published conv-VAE recipe matches this architecture, so treat ``paper`` as "published likelihood and
evaluation protocol, GPU-sized network", not as a reproduction of a table.
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
    batches,
    cpu_threads,
    register,
    to_uint8,
)
from bench.models.training import TrainLoop
from bench.numerics import ELU
from bench.scales import Scale, small_epochs

LOG_SCALE_MIN = -7.0  # PixelCNN++'s floor on the logistic's log-scale; keeps bin probabilities finite


@dataclass(frozen=True)
class VAEConfig:
    latent_dim: int = 128
    #: one conv stage per width; a stage halves the resolution while it stays even and at least 8
    widths: tuple[int, ...] = (64, 128, 256)
    likelihood: Literal["categorical", "logistic"] = "logistic"
    # optimization
    epochs: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    kl_warmup_steps: int = 0  # β rises linearly from 0 to 1 over these steps (0: plain ELBO throughout)
    grad_clip: float = 100.0
    #: intra-op threads while training on a CPU (0: torch's default). 1 at tiny/small: ops on 8×8 images are too
    #: small to split, and on a busy 2-core machine thread synchronization made training 5-20× slower (measured)
    cpu_threads: int = 0
    # evaluation
    iwae_k: int = 5000
    iwae_chunk: int = 10  # importance samples per decoder pass: memory only (batch × chunk decoder outputs)

    def __post_init__(self):
        if self.latent_dim < 1 or not self.widths or min(self.widths) < 1:
            raise ValueError(f"latent_dim and every width must be positive, got {self.latent_dim}, {self.widths}")
        if self.iwae_k < 1 or self.iwae_chunk < 1:
            raise ValueError(f"iwae_k and iwae_chunk must be >= 1, got {self.iwae_k}, {self.iwae_chunk}")
        if self.likelihood not in ("categorical", "logistic"):
            raise ValueError(f"likelihood must be 'categorical' or 'logistic', got {self.likelihood!r}")


# --- decoder likelihoods over {0..255} ----------------------------------------------------------------
def categorical_log_prob(logits: Tensor, x: Tensor) -> Tensor:
    """log P(x) per sub-pixel; logits N×256×C×H×W, x long N×C×H×W."""
    return torch.log_softmax(logits, dim=1).gather(1, x.unsqueeze(1)).squeeze(1)


def discretized_logistic_log_prob(mean: Tensor, log_scale: Tensor, x: Tensor) -> Tensor:
    """log P(x) per sub-pixel for a logistic in [-1, 1] units binned at width 2/255, the outer bins taking the
    tails (PixelCNN++); mean, log_scale and x (long) are N×C×H×W."""
    log_scale = log_scale.clamp(min=LOG_SCALE_MIN)
    centered = x.float() / 127.5 - 1.0 - mean
    inv_s = torch.exp(-log_scale)
    plus_in = inv_s * (centered + 1.0 / 255.0)
    min_in = inv_s * (centered - 1.0 / 255.0)
    log_cdf_plus = plus_in - F.softplus(plus_in)  # log σ(plus_in), for x = 0
    log_one_minus_cdf_min = -F.softplus(min_in)  # log(1 − σ(min_in)), for x = 255
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    mid_in = inv_s * centered
    # where the bin mass underflows, the density at the centre times the bin width is accurate
    log_pdf_mid = mid_in - log_scale - 2.0 * F.softplus(mid_in) - math.log(127.5)
    log_mid = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)), log_pdf_mid)
    return torch.where(x == 0, log_cdf_plus, torch.where(x == 255, log_one_minus_cdf_min, log_mid))


# --- modules ------------------------------------------------------------------------------------------
def stage_strides(height: int, width: int, n_stages: int) -> list[int]:
    """Stride 2 while the resolution stays even and at least 8 (8→4, 28→14→7, 32→16→8→4), else 1."""
    strides = []
    for _ in range(n_stages):
        s = 2 if height % 2 == 0 and width % 2 == 0 and height >= 8 and width >= 8 else 1
        strides.append(s)
        height, width = height // s, width // s
    return strides


class Encoder(nn.Module):
    def __init__(self, in_channels: int, widths: tuple[int, ...], strides: list[int], flat: int, latent_dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w, s in zip(widths, strides):
            layers += [nn.Conv2d(c, w, 3, stride=s, padding=1), ELU()]
            c = w
        self.convs = nn.Sequential(*layers)
        self.head = nn.Linear(flat, 2 * latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.head(self.convs(x).flatten(1)).chunk(2, dim=1)
        return mu, logvar


class Decoder(nn.Module):
    def __init__(self, out_params: int, widths: tuple[int, ...], strides: list[int], bottom: tuple[int, int, int],
                 latent_dim: int):
        super().__init__()
        self.bottom = bottom
        self.fc = nn.Linear(latent_dim, math.prod(bottom))
        layers: list[nn.Module] = [ELU()]
        rev = list(widths[::-1])
        for i, s in enumerate(strides[::-1]):
            c_out = rev[i + 1] if i + 1 < len(rev) else rev[-1]
            if s == 2:
                layers += [nn.ConvTranspose2d(rev[i], c_out, 4, stride=2, padding=1), ELU()]
            else:
                layers += [nn.Conv2d(rev[i], c_out, 3, padding=1), ELU()]
        # 1×1: with 256 logits per sub-pixel a 3×3 here would dominate the cost of IWAE's k decoder passes
        layers.append(nn.Conv2d(rev[-1], out_params, 1))
        self.convs = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.convs(self.fc(z).view(-1, *self.bottom))


# --- model --------------------------------------------------------------------------------------------
#: the small recipe's step budget on images past 16×16 (bench.scales: calibrated on 2 CPU cores)
LARGE_STEPS = 2000


@register("vae")
class VAE(BenchModel):
    family = "vae"
    Config = VAEConfig
    divergence_hint = "lower lr or grad_clip"
    log_prob_kind = "bound"
    density_is_differentiable = False  # P(x) is discrete: log p(y) is flat within each 8-bit bin

    def __init__(self, config: VAEConfig, data: DataInfo):
        super().__init__(config, data)
        c = config
        ch, h, w = data.shape
        strides = stage_strides(h, w, len(c.widths))
        bh, bw = h // math.prod(strides), w // math.prod(strides)
        bottom = (c.widths[-1], bh, bw)
        self.encoder = Encoder(ch, c.widths, strides, math.prod(bottom), c.latent_dim)
        per_subpixel = 256 if c.likelihood == "categorical" else 2
        self.decoder = Decoder(ch * per_subpixel, c.widths, strides, bottom, c.latent_dim)
        # shaped like the training images, so that a checkpoint is refused on data of another shape before
        # anything runs (the linear layers would catch a new size, not always a new channel count first)
        self.register_buffer("image_shape", torch.zeros(data.shape, dtype=torch.uint8))

    @classmethod
    def recipe(cls, scale: Scale, data: DataInfo) -> VAEConfig:
        if scale == Scale.paper:
            return VAEConfig()
        if scale == Scale.small:
            return VAEConfig(latent_dim=16, widths=(32, 64), likelihood="categorical",
                             epochs=small_epochs(data, 100, 64, LARGE_STEPS, drop_last=False), batch_size=64, lr=1e-3,
                             kl_warmup_steps=500, cpu_threads=1, iwae_k=256, iwae_chunk=8)
        return VAEConfig(latent_dim=4, widths=(8,), likelihood="categorical", epochs=1, batch_size=64, lr=1e-3,
                         cpu_threads=1, iwae_k=8, iwae_chunk=4)

    # --- pieces ---------------------------------------------------------------------------------
    def _encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.encoder(x.float() / 127.5 - 1.0)

    def _decoder_log_prob(self, z: Tensor, x: Tensor) -> Tensor:
        """log p(x|z) summed over sub-pixels; z M×L, x long M×C×H×W."""
        out = self.decoder(z)
        ch = self.data_info.shape[0]
        if self.config.likelihood == "categorical":
            logits = out.view(out.shape[0], 256, ch, *out.shape[2:])
            lp = categorical_log_prob(logits, x)
        else:
            mean, log_scale = out.view(out.shape[0], 2, ch, *out.shape[2:]).unbind(1)
            lp = discretized_logistic_log_prob(mean, log_scale, x)
        return lp.flatten(1).sum(1)

    def elbo(self, x: Tensor, beta: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
        """Per-example ELBO in nats (β-weighted KL during warm-up) of long images x."""
        mu, logvar = self._encode(x)
        eps = _randn(mu.shape, generator, mu.device)
        z = mu + torch.exp(0.5 * logvar) * eps
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
        return self._decoder_log_prob(z, x) - beta * kl

    def iwae_bound(self, x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """log (1/k) Σᵢ p(x|zᵢ)p(zᵢ)/q(zᵢ|x) for long images x (N×C×H×W), float64 [N]."""
        mu, logvar = self._encode(x)
        std = torch.exp(0.5 * logvar)
        n = x.shape[0]
        log_w = []
        for a, b in batches(k, self.config.iwae_chunk):
            eps = _randn((b - a, *mu.shape), generator, mu.device)
            z = mu + std * eps  # (b−a)×N×L
            log_q = (-0.5 * eps.pow(2) - torch.log(std) - 0.5 * math.log(2 * math.pi)).sum(-1)
            log_pz = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(-1)
            xr = x.unsqueeze(0).expand(b - a, *x.shape).reshape(-1, *x.shape[1:])
            log_px_z = self._decoder_log_prob(z.reshape(-1, z.shape[-1]), xr).view(b - a, n)
            log_w.append((log_px_z + log_pz - log_q).double())
        return torch.logsumexp(torch.cat(log_w), dim=0) - math.log(k)

    def _check(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.data_info.shape:
            raise UserError(f"{self.name} was built for images {self.data_info.shape}, got {tuple(x.shape[1:])}; "
                            "evaluate it on data of the shape it was trained on")

    # --- capabilities ---------------------------------------------------------------------------
    def log_prob(self, x: Tensor, k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """IWAE-k lower bound on the log-density of dequantized y = ``x`` ∈ [0,1)^D, nats, float64 [N].

        Noise comes from ``generator`` (a CPU generator) or else torch's global RNG."""
        self._check(x)
        xi = (x * 256.0).floor().clamp(0, 255).long()
        d = math.prod(self.data_info.shape)
        return self.iwae_bound(xi, k or self.config.iwae_k, generator) + d * math.log(256.0)

    def log_prob_protocol(self) -> dict[str, Any]:
        return {"estimator": "iwae", "k": self.config.iwae_k, "likelihood": self.config.likelihood}

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        dev = next(self.parameters()).device
        ch = self.data_info.shape[0]
        with torch.no_grad():
            z = torch.randn(n, self.config.latent_dim, generator=generator).to(dev)
            out = self.decoder(z)
            if self.config.likelihood == "categorical":
                logits = out.view(n, 256, ch, *out.shape[2:])
                gumbel = -torch.log(-torch.log(_uniform(logits.shape, generator, dev)))
                values = (logits + gumbel).argmax(1).float()
            else:
                mean, log_scale = out.view(n, 2, ch, *out.shape[2:]).unbind(1)
                u = _uniform(mean.shape, generator, dev)
                v = mean + torch.exp(log_scale.clamp(min=LOG_SCALE_MIN)) * (torch.log(u) - torch.log1p(-u))
                values = torch.round((v + 1.0) * 127.5).clamp(0, 255)
        return to_uint8(values / 255.0, what=f"{self.name} samples").cpu()

    def sampler_protocol(self) -> dict[str, Any]:
        return {"algorithm": "ancestral", "prior": "N(0, I)", "latent_dim": self.config.latent_dim,
                "decoder": f"{self.config.likelihood}, sampled (not its mean or mode)", "temperature": 1.0}

    # --- training -------------------------------------------------------------------------------
    def fit(self, train: Split, ctx: TrainContext) -> dict[str, Any]:
        c = self.config
        g = ctx.generator()
        self.to(ctx.device).train()
        d = math.prod(self.data_info.shape)
        run = TrainLoop(self, ctx, n=len(train), batch_size=c.batch_size, epochs=c.epochs, drop_last=False,
                        optimizer=torch.optim.Adam(self.parameters(), lr=c.lr), grad_clip=c.grad_clip)
        with cpu_threads(ctx.device, c.cpu_threads):
            for idx in run.batches(g):
                x = train.x[idx].long().to(ctx.device)
                beta = min(1.0, (run.steps + 1) / c.kl_warmup_steps) if c.kl_warmup_steps > 0 else 1.0
                loss = -self.elbo(x, beta, g).mean()
                run.step(loss, bpd=loss.item() / (d * math.log(2)))
        return run.finish()

def _randn(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None, device: torch.device) -> Tensor:
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator).to(device)


def _uniform(shape: tuple[int, ...] | torch.Size, generator: torch.Generator, device: torch.device) -> Tensor:
    """U(0, 1) from a CPU generator, kept off 0 and 1 so that logs stay finite."""
    return torch.rand(shape, generator=generator).clamp(1e-12, 1.0 - 1e-7).to(device)


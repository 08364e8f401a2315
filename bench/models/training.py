"""The one training loop of every model that trains in batches (`TrainLoop`), and the training mechanics of
JEM's ``train_wrn_ebm.py`` (wgrathwohl/JEM) that `jem`, `jem_factored` and `wrn` add to it.

`TrainLoop` owns what every fit shares: the plan (``planned_steps`` of fractional epochs, or a fixed count of
iterations, capped by ``ctx.max_steps``), shuffled index batches epoch by epoch from the model's generator,
progress through ``ctx.progress``, the divergence check (one message: the model, the step, the loss(es), the
model's ``divergence_hint``), an optional per-step lr schedule, optional validation with the best checkpoint
kept, and the training statistics for the record. A model plugs in its step:

- one optimizer: ``for idx in run.batches(g): run.step(loss_of(idx))`` (check, zero_grad, backward, clip,
  optimizer step, progress);
- its own update (several optimizers, micro-batches, PCD): per batch or per ``run.iterations()``, compute the
  loss(es), ``run.check(d=ld, g=lg)``, do the update, then ``run.advance(**progress_fields)``.

Then ``stats = run.finish()``. Model-specific behaviour (EMA, n_critic, replay buffers, noise levels...)
stays in the model.

JEM's mechanics:

- **Hold-out.** The first ``n_valid`` images of the training split under a fixed shuffle,
  ``RandomState(1234).permutation(n)``: the reference's ``np.random.seed(1234); np.random.shuffle``, so on
  CIFAR-10 the very images it held out, the same for every ``seed=``.
- **Batches.** Each pass is a fresh permutation cut into full batches (the reference's
  ``DataLoader(shuffle=True, drop_last=True)``); a split smaller than one batch is one short batch.
- **Schedule.** lr · step/warmup_iters for step <= warmup_iters, then lr, times decay_rate at each decay
  epoch reached (the reference's loop, whose decays are whole epochs, sets exactly these values, so its first
  step has lr 0). A fraction of a pass counts: a decay at 1.14 of a 1.7-epoch run comes 14% into the second.
- **Best checkpoint.** With a hold-out, accuracy on it after every epoch (and when ``max_steps`` stops the
  run); the weights (and buffers, e.g. a replay buffer) of the best epoch are restored at the end. The first
  evaluation always counts, so a run whose accuracy never rises keeps its first epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bench.data.base import Split
from bench.errors import ModelFailure
from bench.models.base import BenchModel, TrainContext, as_float01, batches, passes, planned_steps

#: why the tiny and small recipes of jem, jem_factored and wrn leave a paper setting (`recipe_differences`)
CPU_CUTS = {
    "depth": "a network a CPU trains in minutes",
    "width": "a network a CPU trains in minutes",
    "epochs": "minutes on a CPU",
    "batch_size": "minutes on a CPU",
    "lr": "tuned for the CPU-sized network (grey digits train stably at 1e-3; larger images with energy_l2)",
    "energy_l2": "IGEBM's α·(E(x)² + E(x̃)²), the JEM author's advice for a diverging run (wgrathwohl/JEM issue 4): "
                 "it keeps the CPU recipe's lr 1e-3 stable on MNIST- and CIFAR-sized images",
    "warmup_iters": "scaled with the shorter run",
    "decay_epochs": "scaled with the shorter run",
    "sgld_steps": "minutes on a CPU",
    "buffer_size": "scaled with the shorter run",
    "sample_steps": "minutes on a CPU",
    "augment": "tuned without it (a 4-pixel shift is half an 8×8 digit)",
    "valid_size": "no hold-out: 1-2 tiny epochs leave nothing to choose, and a tenth of digits' 1,437 training "
                  "images (143) ranks epochs only to ±2.5 points",
    "eval_noise": "no test-time noise, as the tiny and small baselines were measured",
    "bn_momentum": "PyTorch's default, with which the small recipe was tuned (the reference's 0.9 makes the "
                   "running statistics about the last batch's)",
    "sample_source": "the end-of-training buffer refined once: about 6x cheaper than fresh rounds",
    "chain_init": "JEM++'s informative initialization (Yang & Ji, ICCV 2021): chains start near the data, so a "
                  "few SGLD steps give useful negatives; from U(-1, 1) the p(x) term of a CPU-length run took the "
                  "classifier down (MNIST 78.8%)",
    "px_weight": "log p(x) weighed less than log p(y|x) on MNIST-sized grey images: at the reference's equal "
                 "weights the p(x) term of a CPU-length run holds the classifier back (Fashion-MNIST 81.69% at "
                 "2,800 steps, 85.29% at a quarter), while the samples stay legible",
    "norm": "a per-image norm (the reference's --norm layer) for the CPU recipe",
}
VALID_SPLIT_SEED = 1234  # the reference's np.random.seed before it shuffles the training indices
VALID_BATCH = 100  # the reference's validation loader


def hold_out(train: Split, n_valid: int) -> tuple[Split, Split | None]:
    """(the rest, the held-out images); ``n_valid`` is capped at a tenth of the split (CIFAR-10: 5,000 of
    50,000, the reference's share), so a small split keeps most of its images for training."""
    n_valid = min(n_valid, len(train) // 10)
    if n_valid <= 0:
        return train, None
    perm = torch.from_numpy(np.random.RandomState(VALID_SPLIT_SEED).permutation(len(train)))
    valid, rest = perm[:n_valid], perm[n_valid:]
    return Split(train.x[rest], train.y[rest]), Split(train.x[valid], train.y[valid])


def epoch_batches(n: int, batch_size: int, generator: torch.Generator, drop_last: bool = True) -> list[Tensor]:
    """One shuffled pass over ``n`` items: full batches (``drop_last``) or every item (a short last batch);
    one short batch if n < batch_size either way."""
    perm = torch.randperm(n, generator=generator)
    if n < batch_size:
        return [perm]
    if not drop_last:
        return list(perm.split(batch_size))
    return list(perm[: n // batch_size * batch_size].view(-1, batch_size))


def cycle_batches(n: int, batch_size: int, generator: torch.Generator, drop_last: bool = True) -> Iterator[Tensor]:
    """`epoch_batches` pass after pass: the reference's ``cycle(DataLoader(...))``."""
    while True:
        yield from epoch_batches(n, batch_size, generator, drop_last)


def lr_at(step: int, epoch: float, c: Any) -> float:
    """JEM's schedule (see the module docstring); ``epoch``: the passes done, fractions included."""
    lr = c.lr * step / c.warmup_iters if 0 < c.warmup_iters and step <= c.warmup_iters else c.lr
    return lr * c.decay_rate ** sum(1 for e in c.decay_epochs if epoch >= e)


def train_inputs(x: Tensor, c: Any, generator: torch.Generator, device: torch.device) -> Tensor:
    """A uint8 batch as the reference's training transform gives it: augmented (``c.augment``), mapped to
    [-1, 1] and with Gaussian noise of σ = ``c.data_noise`` there."""
    z = 2.0 * c.augment(as_float01(x), generator) - 1.0
    return (z + c.data_noise * torch.randn(z.shape, generator=generator)).to(device)


def accuracy(model: BenchModel, split: Split, device: torch.device) -> float:
    """Top-1 accuracy of ``model.logits`` (evaluation mode: its eval noise included) on ``split``."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for a, b in batches(len(split), VALID_BATCH):
            pred = model.logits(as_float01(split.x[a:b]).to(device)).argmax(1).cpu()
            correct += int((pred == split.y[a:b]).sum())
    model.train(was_training)
    return correct / len(split)


Optimizers = torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None


class TrainLoop:
    """One fit's loop (see the module docstring). ``epochs`` (fractional ones too) or ``steps`` plans the run;
    ``ctx.max_steps`` caps it. ``drop_last``: full batches only (a split smaller than a batch is one short
    batch). ``optimizer`` (one or several): what `step` updates and what ``lr(step, epoch)`` sets before each
    step. ``grad_clip``: the gradient norm `step` clips to (None: no clipping). ``threshold``: a loss whose
    magnitude exceeds it has diverged, as a non-finite one. ``valid``: a hold-out whose accuracy after every
    epoch picks the weights `finish` restores. ``on_epoch_end``: called after every pass (a per-epoch scheduler)."""

    def __init__(self, model: BenchModel, ctx: TrainContext, *, n: int, batch_size: int,
                 epochs: int | float | None = None, steps: int | None = None, drop_last: bool = True,
                 optimizer: Optimizers = None, lr: Callable[[int, float], float] | None = None,
                 grad_clip: float | None = None, threshold: float = math.inf, valid: Split | None = None,
                 on_epoch_end: Callable[[], Any] | None = None):
        if (epochs is None) == (steps is None):
            raise ValueError("TrainLoop plans by epochs or by steps: give exactly one")
        self.model, self.ctx, self.n, self.batch_size, self.drop_last = model, ctx, n, batch_size, drop_last
        self.per_epoch = max(1, n // batch_size) if drop_last else math.ceil(n / batch_size)
        #: the recipe's whole run, and the steps this fit takes (``ctx.max_steps`` may stop it earlier)
        self.planned = planned_steps(epochs, self.per_epoch, None) if epochs is not None else steps
        self.total = self.planned if ctx.max_steps is None else min(self.planned, ctx.max_steps)
        self.optimizers = [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else list(optimizer or ())
        self.lr, self.grad_clip, self.threshold = lr, grad_clip, threshold
        self.valid, self.on_epoch_end = valid, on_epoch_end
        self.steps = self.epoch = self.batches_drawn = 0
        self.best: dict[str, Any] | None = None
        self._update: Callable[..., Any] | None = None

    @property
    def done(self) -> bool:
        return self.steps >= self.total

    # --- the plan: batches, or bare iterations ---------------------------------------------------------
    def batches(self, generator: torch.Generator) -> Iterator[Tensor]:
        """Index batches epoch by epoch, a fresh shuffle from ``generator`` each, until the plan (a fractional
        last epoch included) or ``max_steps`` ends; after every epoch, validation and ``on_epoch_end``. One
        `step` (or `advance`) per batch."""
        with self.ctx.progress(f"train {self.model.name}", self.total) as self._update:
            while not self.done:
                for k, idx in enumerate(epoch_batches(self.n, self.batch_size, generator, self.drop_last)):
                    if self.done:
                        break
                    self._set_lr(self.epoch + k / self.per_epoch)
                    self.batches_drawn += 1
                    yield idx
                self._end_epoch()
                self.epoch += 1

    def iterations(self) -> Iterator[int]:
        """The step numbers 0, 1, ... of the plan, for a model whose step draws its own batches (`cycle`)
        or none; one `step` (or `advance`) per iteration."""
        with self.ctx.progress(f"train {self.model.name}", self.total) as self._update:
            while not self.done:
                self._set_lr(self.steps / self.per_epoch)
                yield self.steps

    def cycle(self, generator: torch.Generator) -> Iterator[Tensor]:
        """Endless index batches, pass after pass, a fresh shuffle each (the reference's
        ``cycle(DataLoader(...))``): the real batches of a GAN's discriminator steps."""
        while True:
            for idx in epoch_batches(self.n, self.batch_size, generator, self.drop_last):
                self.batches_drawn += 1
                yield idx

    def _set_lr(self, epoch: float) -> None:
        """Set ``lr(step, epoch)``; ``epoch`` is the fraction of passes done before this step (2.5: half-way
        through the third), so a fractional decay epoch of a short run on a large split takes effect."""
        if self.lr is not None:
            lr = self.lr(self.steps, epoch)
            for opt in self.optimizers:
                for group in opt.param_groups:
                    group["lr"] = lr

    # --- a step ---------------------------------------------------------------------------------------
    def step(self, loss: Tensor, **fields: float) -> None:
        """The divergence check, then one update of the optimizer(s) on ``loss`` (gradients clipped to
        ``grad_clip``), then `advance` with the loss and ``fields`` for the progress line."""
        self.check(loss)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        for opt in self.optimizers:
            opt.step()
        self.advance(loss=loss.item(), **fields)

    def check(self, loss: Tensor | float | None = None, /, **losses: Tensor | float) -> None:
        """Raise `ModelFailure` if any loss is non-finite or larger in magnitude than ``threshold``: the
        model, the step, every loss and the model's ``divergence_hint``."""
        named = ({"loss": loss} if loss is not None else {}) | losses
        values = {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in named.items()}
        if all(math.isfinite(v) and abs(v) <= self.threshold for v in values.values()):
            return
        shown = ", ".join(f"{k}={v:.3g}" for k, v in values.items())
        raise ModelFailure(f"{self.model.name} training diverged at step {self.steps} ({shown}); "
                           f"{self.model.divergence_hint}")

    def advance(self, **fields: float) -> None:
        """Count one step done and show ``fields`` on the progress line."""
        self.steps += 1
        if self._update is not None:
            self._update(1, **fields)

    # --- validation and the end -----------------------------------------------------------------------
    def _end_epoch(self) -> None:
        if self.valid is not None:
            acc = accuracy(self.model, self.valid, self.ctx.device)
            if self.best is None or acc > self.best["accuracy"]:
                state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
                self.best = {"accuracy": acc, "epoch": self.epoch, "state": state}
        if self.on_epoch_end is not None:
            self.on_epoch_end()

    def finish(self, **extra: Any) -> dict[str, Any]:
        """Restore the best-validation weights (if any), switch to evaluation mode; the training statistics
        for the record: ``steps``, ``epochs`` (passes over the data the batches made), the validation's
        choice, and ``extra``."""
        stats: dict[str, Any] = {"steps": self.steps, "epochs": passes(self.batches_drawn, self.per_epoch)}
        if self.best is not None:
            self.model.load_state_dict(self.best["state"])
            stats.update(n_valid=len(self.valid), best_epoch=self.best["epoch"],
                         valid_accuracy=self.best["accuracy"], kept="best validation accuracy")
        self.model.eval()
        return {**stats, **extra}


def jem_loop(model: BenchModel, ctx: TrainContext, c: Any, n_train: int, valid: Split | None) -> TrainLoop:
    """The loop of JEM's reference (jem, jem_factored, wrn): Adam, full batches, JEM's lr schedule and its
    divergence threshold, the hold-out's best epoch."""
    return TrainLoop(model, ctx, n=n_train, batch_size=c.batch_size, epochs=c.epochs,
                     optimizer=torch.optim.Adam(model.parameters(), lr=c.lr),
                     lr=lambda step, epoch: lr_at(step, epoch, c), threshold=c.divergence_threshold, valid=valid)

"""The training mechanics of JEM's ``train_wrn_ebm.py`` (wgrathwohl/JEM), shared by `jem`, `jem_factored`
and `wrn`: the validation hold-out, shuffled batches, the lr schedule, the divergence check, progress, the
``max_steps`` cap of a paper-scale smoke, and keeping the best-validation checkpoint.

- **Hold-out.** The first ``n_valid`` images of the training split under a fixed shuffle,
  ``RandomState(1234).permutation(n)``: the reference's ``np.random.seed(1234); np.random.shuffle``, so on
  CIFAR-10 the very images it held out, the same for every ``seed=``.
- **Batches.** Each pass is a fresh permutation cut into full batches (the reference's
  ``DataLoader(shuffle=True, drop_last=True)``); a split smaller than one batch is one short batch.
- **Schedule.** lr · step/warmup_iters for step <= warmup_iters, then lr, times decay_rate at each decay
  epoch reached (the reference's loop sets exactly these values, so its first step has lr 0).
- **Best checkpoint.** With a hold-out, accuracy on it after every epoch (and when ``max_steps`` stops the
  run); the weights (and buffers, e.g. a replay buffer) of the best epoch are restored at the end. The first
  evaluation always counts, so a run whose accuracy never rises keeps its first epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bench.data.base import Split
from bench.errors import ModelFailure
from bench.models.base import BenchModel, TrainContext, as_float01, batches, passes, planned_steps

#: why the tiny and small recipes of jem, jem_factored and wrn leave a paper setting (`recipe_differences`)
CPU_CUTS = {
    "depth": "a network a CPU trains in minutes",
    "width": "a network a CPU trains in minutes",
    "epochs": "minutes on a CPU",
    "batch_size": "minutes on a CPU",
    "lr": "tuned for the CPU-sized network (grey digits train stably at 1e-3)",
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


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """One shuffled pass over ``n`` items in full batches (drop_last), or one short batch if n < batch_size."""
    perm = torch.randperm(n, generator=generator)
    if n < batch_size:
        return [perm]
    return list(perm[: n // batch_size * batch_size].view(-1, batch_size))


def cycle_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """`epoch_batches` pass after pass: the reference's ``cycle(DataLoader(...))``."""
    while True:
        yield from epoch_batches(n, batch_size, generator)


def lr_at(step: int, epoch: int, c: Any) -> float:
    """JEM's schedule (see the module docstring)."""
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


class TrainRun:
    """One fit's loop: ``for idx in run.batches(g): ...; run.step(loss)``, then ``run.finish()``."""

    def __init__(self, model: BenchModel, ctx: TrainContext, c: Any, n_train: int, valid: Split | None):
        self.model, self.ctx, self.c, self.n, self.valid = model, ctx, c, n_train, valid
        self.opt = torch.optim.Adam(model.parameters(), lr=c.lr)
        self.steps = self.epoch = self.total = 0
        self.best: dict[str, Any] | None = None
        self._update = None

    @property
    def done(self) -> bool:
        return self.steps >= self.total

    def batches(self, generator: torch.Generator) -> Iterator[Tensor]:
        """Index batches epoch by epoch, validating after each, until the schedule (a fractional last epoch
        included) or ``max_steps`` ends."""
        self.total = planned_steps(self.c.epochs, max(1, self.n // self.c.batch_size), self.ctx.max_steps)
        with self.ctx.progress(f"train {self.model.name}", self.total) as update:
            self._update = update
            for epoch in range(math.ceil(self.c.epochs)):
                self.epoch = epoch
                for idx in epoch_batches(self.n, self.c.batch_size, generator):
                    if self.done:
                        break
                    yield idx
                self._validate()
                if self.done:
                    break

    def step(self, loss: Tensor) -> None:
        """JEM's divergence check, then one Adam step at the schedule's lr."""
        if not torch.isfinite(loss) or loss.abs().item() > self.c.divergence_threshold:
            raise ModelFailure(f"{self.model.name} training diverged at step {self.steps} (loss={loss.item():.3g}); "
                               "lower lr or sgld_step_size, or raise sgld_steps")
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.steps, self.epoch, self.c)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.steps += 1
        self._update(1, loss=loss.item())

    def _validate(self) -> None:
        if self.valid is None:
            return
        acc = accuracy(self.model, self.valid, self.ctx.device)
        if self.best is None or acc > self.best["accuracy"]:
            state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            self.best = {"accuracy": acc, "epoch": self.epoch, "state": state}

    def finish(self) -> dict[str, Any]:
        """Restore the best-validation weights (if any); the training statistics for the record."""
        stats: dict[str, Any] = {"steps": self.steps, "epochs": passes(self.steps, max(1, self.n // self.c.batch_size))}
        if self.best is not None:
            self.model.load_state_dict(self.best["state"])
            stats.update(n_valid=len(self.valid), best_epoch=self.best["epoch"],
                         valid_accuracy=self.best["accuracy"], kept="best validation accuracy")
        self.model.eval()
        return stats

"""Expected calibration error (Guo et al. 2017; JEM's calibration figure): the max-softmax confidence
binned into equal-width bins over [0, 1] (right-closed: (lo, hi]), ECE = Σ_b (n_b/N)·|acc_b − conf_b|,
in percent. 20 bins by default (JEM's figure), configurable with ``ece_bins=`` and recorded.

Bin edges and membership. The edges are ``torch.linspace(0, 1, B + 1)`` in float64, and a confidence
equal to an edge belongs to the bin below it: bin b holds (edges[b], edges[b+1]], the first bin also
holds 0. This is Guo et al.'s reference code (``conf > lo and conf <= hi``), and a confidence of exactly
1.0, which a saturated float softmax gives, lands in the top bin. torchmetrics differs at the edges only:
it bins [edges[b], edges[b+1]) in float32 and gives 1.0 a bin of its own (``bucketize(right=True) - 1``
over B+1 bins); netcal bins [lo, hi) with the top bin closed. Off the edges all three agree (tests/test_calibration.py
checks both the agreement and each difference)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from bench.errors import NonFiniteError, UserError
from bench.metrics.base import Metric, MetricResult, MetricValue, register

DEFAULT_BINS = 20


@dataclass(frozen=True)
class Bins:
    edges: Tensor  # B+1
    count: Tensor  # B, int
    accuracy: Tensor  # B, mean correctness per bin (0 where empty)
    confidence: Tensor  # B, mean confidence per bin (0 where empty)


def calibration_bins(probs: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> Bins:
    probs = probs.double()
    if not torch.isfinite(probs).all():
        raise NonFiniteError("calibration bins got non-finite probabilities: the logits are broken")
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # bin b holds confidences in (edges[b], edges[b+1]]; bucketize(right=False) gives exactly that
    idx = (torch.bucketize(conf, edges, right=False) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(idx, minlength=n_bins)
    sum_acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, correct)
    sum_conf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    nz = count.clamp(min=1).double()
    return Bins(edges, count, sum_acc / nz, sum_conf / nz)


def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = DEFAULT_BINS) -> float:
    """ECE as a fraction in [0, 1]."""
    b = calibration_bins(probs, labels, n_bins)
    return float(((b.count.double() / len(labels)) * (b.accuracy - b.confidence).abs()).sum())


def n_bins_of(ctx) -> int:
    return int(ctx.settings.get("ece_bins", DEFAULT_BINS))


def validate(settings: dict, data, model_classes=()) -> None:
    n = settings.get("ece_bins", DEFAULT_BINS)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 1000:
        raise UserError(f"ece_bins={n!r} must be an integer from 1 to 1000 (JEM uses 20)")


def reliability_diagram(bins: Bins, ece_percent: float, title: str, path: Path) -> None:
    """Bars of per-bin accuracy against confidence, the diagonal, and the ECE in the corner (JEM Fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = float(bins.edges[1] - bins.edges[0])
    centers = (bins.edges[:-1] + width / 2).numpy()
    fig, ax = plt.subplots(figsize=(4, 4), dpi=120)
    ax.bar(centers, bins.accuracy.numpy(), width=width, edgecolor="black", color="tab:blue", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (max softmax)")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    ax.text(0.04, 0.93, f"ECE = {ece_percent:.2f}%", transform=ax.transAxes, fontsize=11,
            bbox={"facecolor": "white", "alpha": 0.8})
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _compute(ctx) -> MetricResult:
    n_bins = n_bins_of(ctx)
    probs = ctx.test_logits().double().softmax(dim=1)
    labels = ctx.data.test.y
    ece = 100.0 * expected_calibration_error(probs, labels, n_bins)
    bins = calibration_bins(probs, labels, n_bins)
    title = f"{ctx.model.name} on {ctx.data.name} ({n_bins} bins)"
    return MetricResult.of(
        MetricValue(ece, n=len(labels), extra={"bins": n_bins}),
        protocol={"calibration": {"bins": n_bins, "binning": "equal-width over [0,1], right-closed",
                                  "confidence": "max softmax"}},
        artifacts={"reliability.png": lambda path: reliability_diagram(bins, ece, title, path)})


ECE = register(Metric(key="ece", title="ECE", higher_is_better=False, unit="%", requires=("Classifier",),
                      compute=_compute, tolerance="1", settings=("ece_bins",), validate=validate))

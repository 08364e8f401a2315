"""Calibration metrics against netcal, torchmetrics and scikit-learn, plus invariances."""

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss

from bench.errors import UserError
from bench.metrics.brier import per_example_brier
from bench.metrics.ece import calibration_bins, expected_calibration_error, reliability_diagram, validate
from bench.metrics.mce import maximum_calibration_error
from bench.metrics.nll import per_example_nll


def _data(seed=0, n=2000, k=10):
    g = torch.Generator().manual_seed(seed)
    logits = 2.5 * torch.randn(n, k, generator=g, dtype=torch.float64)
    labels = torch.randint(0, k, (n,), generator=g)
    labels[: n // 2] = logits[: n // 2].argmax(1)
    return logits, logits.softmax(1), labels


@pytest.mark.parametrize("bins", [10, 15, 20])
def test_ece_and_mce_equal_netcal(bins):
    netcal = pytest.importorskip("netcal.metrics")
    _, probs, labels = _data(bins)
    ours = expected_calibration_error(probs, labels, bins)
    assert ours == pytest.approx(netcal.ECE(bins=bins).measure(probs.numpy(), labels.numpy()), abs=1e-6)
    ours_m = maximum_calibration_error(probs, labels, bins)
    assert ours_m == pytest.approx(netcal.MCE(bins=bins).measure(probs.numpy(), labels.numpy()), abs=1e-6)


@pytest.mark.parametrize("bins", [10, 20])
def test_ece_and_mce_equal_torchmetrics(bins):
    tm = pytest.importorskip("torchmetrics.functional.classification")
    _, probs, labels = _data(bins + 1)
    ref = tm.multiclass_calibration_error(probs, labels, num_classes=10, n_bins=bins, norm="l1").item()
    assert expected_calibration_error(probs, labels, bins) == pytest.approx(ref, abs=1e-6)
    ref_max = tm.multiclass_calibration_error(probs, labels, num_classes=10, n_bins=bins, norm="max").item()
    assert maximum_calibration_error(probs, labels, bins) == pytest.approx(ref_max, abs=1e-6)


def test_ece_invariant_to_order_and_zero_when_perfectly_calibrated():
    _, probs, labels = _data(3)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    assert expected_calibration_error(probs[perm], labels[perm]) == pytest.approx(
        expected_calibration_error(probs, labels), abs=1e-12)
    # confidence 1 and always right: calibrated
    onehot = torch.nn.functional.one_hot(labels, 10).double()
    assert expected_calibration_error(onehot, labels) == pytest.approx(0.0, abs=1e-12)
    # confidence 1 and always wrong: ECE 1
    assert expected_calibration_error(onehot, (labels + 1) % 10) == pytest.approx(1.0)


def test_bins_partition_the_examples():
    _, probs, labels = _data(4)
    b = calibration_bins(probs, labels, 20)
    assert int(b.count.sum()) == len(labels)
    assert (b.count[:1] == 0).all()  # max-softmax over 10 classes is never below 0.1


def test_nll_equals_sklearn_and_brier_equals_numpy():
    logits, probs, labels = _data(5)
    assert per_example_nll(logits, labels).mean().item() == pytest.approx(
        log_loss(labels.numpy(), probs.numpy(), labels=list(range(10))), rel=1e-9)
    onehot = np.eye(10)[labels.numpy()]
    assert per_example_brier(probs, labels).mean().item() == pytest.approx(
        ((probs.numpy() - onehot) ** 2).sum(1).mean(), rel=1e-12)


def test_bad_bin_count_is_a_user_error():
    for bad in (0, -3, 2.5, "x", True):
        with pytest.raises(UserError):
            validate({"ece_bins": bad}, None)
    validate({"ece_bins": 20}, None)


def test_reliability_diagram_is_written(tmp_path):
    _, probs, labels = _data(6)
    b = calibration_bins(probs, labels, 20)
    out = tmp_path / "r.png"
    reliability_diagram(b, 12.3, "test", out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def _edge_data(n_bins=20, k=10):
    """Confidences exactly on the bin edges (the float64 linspace values) and exactly 1.0, one in four
    wrong, beside bin centres that are always wrong: an edge group joins the centres of the bin below or
    of the bin above, which gives a different ECE."""
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    centres = (edges[3:-1] + edges[4:]) / 2
    conf = torch.cat([edges[3:].repeat_interleave(4), centres.repeat_interleave(2)])  # max-softmax >= 1/k
    probs = torch.empty(len(conf), k, dtype=torch.float64)
    probs[:] = ((1 - conf) / (k - 1)).unsqueeze(1)
    probs[:, 0] = conf
    labels = torch.zeros(len(conf), dtype=torch.int64)
    labels[1: 4 * (n_bins - 2): 4] = 1  # one in four edge points wrong
    labels[4 * (n_bins - 2):] = 1  # every centre wrong
    assert torch.equal(probs.max(1).values, conf) and (probs.argmax(1) == 0).all()
    return probs, labels, edges


def _guo_ece(probs, labels, edges):
    """Guo et al.'s reference loop: bin (lo, hi], the first bin also holding 0."""
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    total = 0.0
    for b in range(len(edges) - 1):
        lo, hi = edges[b], edges[b + 1]
        in_bin = ((conf > lo) | ((b == 0) & (conf == lo))) & (conf <= hi)
        if in_bin.any():
            total += in_bin.double().mean() * (correct[in_bin].mean() - conf[in_bin].mean()).abs()
    return float(total)


def _left_closed_ece(probs, labels, n_bins):
    """torchmetrics' binning as read from its code: [lo, hi), 1.0 in a bin of its own, in float32."""
    conf, pred = probs.max(1)
    conf, edges = conf.float(), torch.linspace(0, 1, n_bins + 1, dtype=torch.float32)
    correct = (pred == labels).float()
    total = 0.0
    for lo, hi in [*zip(edges[:-1], edges[1:], strict=True), (edges[-1], np.inf)]:
        in_bin = (conf >= lo) & (conf < hi)
        if in_bin.any():
            total += in_bin.double().mean() * (correct[in_bin].mean() - conf[in_bin].mean()).abs()
    return float(total)


@pytest.mark.parametrize("bins", [10, 20])
def test_ece_at_exact_bin_edges_is_right_closed_as_documented(bins):
    probs, labels, edges = _edge_data(bins)
    ours = calibration_bins(probs, labels, bins)
    conf = probs.max(1).values
    # membership: a confidence on an edge belongs to the bin below it; 1.0 to the top bin
    for b in range(bins):
        assert int(ours.count[b]) == int(((conf > edges[b]) & (conf <= edges[b + 1])).sum()), b
    assert int(ours.count[-1]) == int((conf == 1.0).sum()) + 2  # 1.0 joins the top bin's centres
    assert expected_calibration_error(probs, labels, bins) == pytest.approx(_guo_ece(probs, labels, edges), abs=1e-12)


@pytest.mark.parametrize("bins", [10, 20])
def test_torchmetrics_bins_edges_the_other_way_as_documented(bins):
    """The documented difference: torchmetrics bins [lo, hi) with 1.0 alone (in float32), so at the edges
    it differs from Guo et al.'s (lo, hi]."""
    tm = pytest.importorskip("torchmetrics.functional.classification")
    probs, labels, _ = _edge_data(bins)
    ref = tm.multiclass_calibration_error(probs, labels, num_classes=10, n_bins=bins, norm="l1").item()
    assert ref == pytest.approx(_left_closed_ece(probs, labels, bins), abs=1e-6)
    assert abs(expected_calibration_error(probs, labels, bins) - ref) > 5e-4  # 500x float32 rounding


def test_ece_refuses_non_finite_probabilities():
    from bench.errors import NonFiniteError

    _, probs, labels = _data(7, n=20)
    probs[3, 2] = float("nan")
    with pytest.raises(NonFiniteError):
        expected_calibration_error(probs, labels)

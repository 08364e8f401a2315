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

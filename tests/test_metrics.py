"""Each metric against an independent implementation, plus invariances."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.metrics import accuracy_score
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_features_to_metric

from bench.errors import NonFiniteError
from bench.metrics import METRICS, MetricValue
from bench.metrics.accuracy import accuracy, accuracy_stderr
from bench.metrics.fid import fid
from bench.metrics.inception_score import inception_score


def test_accuracy_equals_sklearn():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, 10, generator=g)
    labels = torch.randint(0, 10, (1000,), generator=g)
    labels[:300] = logits[:300].argmax(1)
    ours = accuracy(logits, labels)
    assert ours == pytest.approx(accuracy_score(labels.numpy(), logits.argmax(1).numpy()), abs=1e-12)
    assert accuracy_stderr(ours, 1000) == pytest.approx(math.sqrt(ours * (1 - ours) / 1000))


def test_accuracy_invariant_to_order():
    g = torch.Generator().manual_seed(1)
    logits, labels = torch.randn(500, 10, generator=g), torch.randint(0, 10, (500,), generator=g)
    perm = torch.randperm(500, generator=g)
    assert accuracy(logits[perm], labels[perm]) == accuracy(logits, labels)


def _fid_reference(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's matrix square root (independent of torch-fidelity's eigvals trick)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _is_reference(logits: np.ndarray) -> float:
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    py = p.mean(0, keepdims=True)
    return float(np.exp((p * (np.log(p) - np.log(py))).sum(1).mean()))


def test_fid_equals_independent_formula_and_torch_fidelity():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(800, 16, generator=g)
    b = torch.randn(600, 16, generator=g) @ (torch.eye(16) + 0.1 * torch.randn(16, 16, generator=g)) + 0.3
    ours = fid(a, b)
    ref = _fid_reference(a.double().numpy(), b.double().numpy())
    assert abs(ours - ref) / ref <= 1e-6
    tf = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), False)
    assert abs(ours - tf["frechet_inception_distance"]) / ours <= 1e-6


def test_fid_of_identical_sets_is_zero_and_order_invariant():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=g)
    assert abs(fid(a, a)) < 1e-6
    b = torch.randn(400, 8, generator=g) + 1
    perm = torch.randperm(500, generator=g)
    assert fid(a[perm], b) == pytest.approx(fid(a, b), rel=1e-6)  # float32 summation order only


def test_inception_score_equals_independent_formula():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2000, 10, generator=g)
    mean1, std1 = inception_score(logits, splits=1)
    assert abs(mean1 - _is_reference(logits.double().numpy())) / mean1 <= 1e-6
    assert std1 == 0
    mean10, std10 = inception_score(logits)
    tf = isc_features_to_metric(logits, splits=10, shuffle=True, rng_seed=2020)
    assert mean10 == pytest.approx(tf["inception_score_mean"], rel=1e-6)
    assert std10 == pytest.approx(tf["inception_score_std"], rel=1e-6)
    # IS over splits: the mean of per-split references
    perm = np.random.RandomState(2020).permutation(2000)
    shuffled = logits.double().numpy()[perm]
    per_split = [_is_reference(shuffled[i * 200:(i + 1) * 200]) for i in range(10)]
    assert mean10 == pytest.approx(np.mean(per_split), rel=1e-6)


def test_inception_score_bounds_and_order_invariance_with_one_split():
    g = torch.Generator().manual_seed(0)
    confident = torch.full((1000, 10), -50.0)
    confident[torch.arange(1000), torch.arange(1000) % 10] = 50.0
    assert inception_score(confident, splits=1)[0] == pytest.approx(10.0, rel=1e-6)  # max is the class count
    assert inception_score(torch.zeros(100, 10), splits=1)[0] == pytest.approx(1.0)
    logits = torch.randn(300, 10, generator=g)
    perm = torch.randperm(300, generator=g)
    assert inception_score(logits[perm], splits=1)[0] == pytest.approx(inception_score(logits, splits=1)[0], rel=1e-9)


def test_metric_declarations():
    assert METRICS.get("accuracy").higher_is_better and METRICS.get("accuracy").unit == "%"
    assert METRICS.get("is").higher_is_better and METRICS.get("is").requires == ("Sampler",)
    assert not METRICS.get("fid").higher_is_better


def test_metric_value_refuses_non_finite():
    with pytest.raises(NonFiniteError):
        MetricValue(float("nan"))
    with pytest.raises(NonFiniteError):
        MetricValue(1.0, stderr=float("inf"))


def test_a_metric_value_fact_never_shadows_a_field_of_its_record_entry():
    """Version 1 merged a metric's facts into its entry, where one named like a field was silently lost."""
    assert MetricValue(1.0, extra={"bound": True}).extra == {"bound": True}
    for field in ("higher_is_better", "value", "unit"):
        with pytest.raises(ValueError, match=f"record entry: \\['{field}'\\]"):
            MetricValue(1.0, extra={field: False})

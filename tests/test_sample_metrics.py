"""KID and precision/recall against independent implementations, plus invariances."""

import numpy as np
import pytest
import torch
from sklearn.metrics import pairwise_distances

from bench.metrics.kid import kid
from bench.metrics.precision_recall import precision_recall


def _feats(seed, n, d=8, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + shift


def _mmd2_unbiased_poly(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m = len(x)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def test_kid_with_one_full_subset_equals_unbiased_mmd():
    x, y = _feats(0, 300), _feats(1, 300, shift=0.3)
    mean, std, size = kid(x, y, subsets=1, subset_size=300)
    assert size == 300 and std == 0
    assert mean == pytest.approx(_mmd2_unbiased_poly(x.double().numpy(), y.double().numpy()), rel=1e-5)


def test_kid_near_zero_for_same_distribution_and_positive_for_shift():
    same, _, _ = kid(_feats(0, 500), _feats(1, 500), subsets=20)
    shifted, _, _ = kid(_feats(0, 500), _feats(1, 500, shift=1.0), subsets=20)
    assert abs(same) < 0.02 < shifted


def _prc_reference(fake: np.ndarray, real: np.ndarray, k: int = 3) -> tuple[float, float]:
    def radii(a):
        d = pairwise_distances(a, a)
        return np.sort(d, axis=1)[:, k]  # k-th neighbour, self excluded (column 0 is the point itself)

    r_real, r_fake = radii(real), radii(fake)
    d = pairwise_distances(fake, real)
    precision = (d <= r_real[None, :]).any(axis=1).mean()
    recall = (d.T <= r_fake[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def test_precision_recall_equal_brute_force():
    fake, real = _feats(2, 200, shift=0.5), _feats(3, 250)
    p, r = precision_recall(fake, real)
    rp, rr = _prc_reference(fake.double().numpy(), real.double().numpy())
    assert p == pytest.approx(rp, abs=1e-6) and r == pytest.approx(rr, abs=1e-6)  # float32 means


def test_precision_recall_order_invariant():
    fake, real = _feats(4, 150, shift=0.2), _feats(5, 180)
    perm = torch.randperm(150, generator=torch.Generator().manual_seed(0))
    assert precision_recall(fake[perm], real) == precision_recall(fake, real)

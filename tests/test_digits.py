import numpy as np
import torch
from sklearn.datasets import load_digits as sk_load_digits

from bench.data import load_dataset


def test_digits_shapes_and_quantization():
    d = load_dataset("digits")
    assert d.shape == (1, 8, 8) and d.n_classes == 10
    assert len(d.train) == 1437 and len(d.test) == 360
    assert d.train.x.dtype == torch.uint8
    raw = sk_load_digits()
    expected = np.rint(raw.images * 255.0 / 16.0).astype(np.uint8)
    # every test image is one of the original images, mapped by round(v*255/16)
    all_x = torch.cat([d.train.x, d.test.x]).numpy()[:, 0]
    assert sorted(map(bytes, all_x)) == sorted(map(bytes, expected))
    assert d.train.x.max() == 255 and d.train.x.min() == 0


def test_digits_split_is_stratified_and_fixed():
    d = load_dataset("digits")
    counts = torch.bincount(d.test.y, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    desc = d.describe()
    assert desc["split"]["test_size"] == 360 and desc["split"]["random_state"] == 0
    # the same split on every call (the recorded hash of the test indices does not move)
    from bench.data.digits import load_digits

    assert load_digits().describe()["split"] == desc["split"]
    assert load_digits().fingerprint() == d.fingerprint()

"""`digits`: the embedded default. scikit-learn's 1,797 8×8 handwritten digits (UCI), no file needed.

Pixel values 0..16 are mapped to uint8 by round(v·255/16). The train/test split is fixed: scikit-learn's
stratified `train_test_split` with 360 test images and random_state 0, recorded with the hash of the
test indices.
"""

from __future__ import annotations

import numpy as np
import torch

from bench.data.base import Dataset, Split, split_description, stratified_split
from bench.data.registry import DATASETS

TEST_SIZE = 360
SPLIT_SEED = 0


@DATASETS.register("digits")
def load_digits(root: str | None = None, arg: str | None = None) -> Dataset:
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    x = np.rint(d.images.astype(np.float64) * 255.0 / 16.0).astype(np.uint8)[:, None]  # N×1×8×8
    y = d.target.astype(np.int64)
    tr, te = stratified_split(y, TEST_SIZE, SPLIT_SEED)
    xt = torch.from_numpy(x)
    yt = torch.from_numpy(y)
    return Dataset(
        name="digits",
        train=Split(xt[tr].contiguous(), yt[tr].contiguous()),
        test=Split(xt[te].contiguous(), yt[te].contiguous()),
        n_classes=10,
        class_names=tuple(str(i) for i in range(10)),
        provenance={
            "source": "sklearn.datasets.load_digits (UCI optical digits, 8x8)",
            "quantization": "uint8 = round(v * 255 / 16)",
            **split_description(TEST_SIZE, SPLIT_SEED, te),
        },
    )

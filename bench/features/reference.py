"""The real split's features, cached on disk for slow extractors (Inception: ~30 min for 10,000 images
on 2 CPU cores), keyed by their content: the extractor's full protocol (weights' hashes, preprocessing,
the IS extractor beside it), the data's sha256, the split and the numerics of the extraction. FID's mean
and covariance, KID and precision/recall are all computed from these features."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import nullcontext

from torch import Tensor

from bench import distributed, fileio
from bench.cache import cache_dir, load_verified, save_verified
from bench.data.base import Dataset
from bench.features.domain import ResolvedExtractor


def reference_key(extractor: ResolvedExtractor, data: Dataset, split: str, numerics: dict) -> str:
    content = {"extractor": extractor.protocol(), "data_sha256": data.fingerprint(), "split": split,
               "numerics": numerics}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def cached_reference(extractor: ResolvedExtractor, data: Dataset, split: str, numerics: dict,
                     compute: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """``compute()``'s features, from bench's cache when this extractor keeps them there. Under torchrun
    every rank must agree on a hit, since computing is collective."""
    if not extractor.cache_reference:
        return compute()
    path = cache_dir("reference") / f"{reference_key(extractor, data, split, numerics)[:32]}.safetensors"
    # the model jobs of one run (jobs=) need the same features: the first computes, the others wait and load
    with fileio.one_at_a_time(path) if not distributed.active() else nullcontext():
        features = load_verified(path)
        if distributed.all_ok(features is not None):
            return features
        features = compute()
        if distributed.is_main():
            save_verified(path, features)
        return features

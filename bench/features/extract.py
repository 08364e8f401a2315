"""Streaming feature extraction: images go through the extractor one batch at a time, only the features
are kept, so 50,000 samples never sit in memory as images."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from torch_fidelity.utils import create_feature_extractor

from bench.features.domain import ResolvedExtractor, register


class FeatureStream:
    def __init__(self, extractor: ResolvedExtractor, device: torch.device, autocast: bool = False,
                 channels_last: bool = False):
        register()
        self.spec = extractor
        self.device = device
        self.autocast = autocast  # bf16 autocast of the extractor's forward; features are returned as fp32
        features = [extractor.fid_feature, extractor.isc_feature]
        self.module = create_feature_extractor(
            extractor.name, features, cuda=False, feature_extractor_weights_path=str(extractor.weights_path),
            verbose=False)
        self.module.to(device)
        if channels_last:
            self.module.to(memory_format=torch.channels_last)

    def __call__(self, images: Iterable[Tensor]) -> dict[str, Tensor]:
        out: dict[str, list[Tensor]] = {}
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            for x in images:
                if x.dtype != torch.uint8 or x.dim() != 4:
                    raise ValueError(f"feature extraction needs uint8 N×C×H×W, got {x.dtype} {tuple(x.shape)}")
                if self.spec.in_channels == 3 and x.shape[1] == 1:
                    x = x.expand(-1, 3, -1, -1)  # grayscale to RGB for Inception
                feats = self.module.convert_features_tuple_to_dict(self.module(x.to(self.device)))
                for k, v in feats.items():
                    out.setdefault(k, []).append(v.detach().float().cpu())
        return {k: torch.cat(v) for k, v in out.items()}

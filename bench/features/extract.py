"""Streaming feature extraction: images go through the extractor one batch at a time, only the features
are kept, so 50,000 samples never sit in memory as images."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager

import torch
from torch import Tensor
from torch_fidelity.utils import create_feature_extractor

from bench.features import inception
from bench.features.domain import ResolvedExtractor, register
from bench.numerics import cudnn_tf32


@contextmanager
def fp32_convolutions(device: torch.device, spec: ResolvedExtractor):
    """Inception in true fp32 on CUDA: cuDNN's default TF32 convolutions change pool3 features in the third
    decimal, and published FIDs were computed in fp32."""
    if device.type != "cuda" or spec.description.get("kind") != "inception":
        yield
        return
    with cudnn_tf32(False):
        yield


class FeatureStream:
    def __init__(self, extractor: ResolvedExtractor, device: torch.device, autocast: bool = False,
                 channels_last: bool = False):
        register()
        inception.register()
        self.spec = extractor
        self.device = device
        self.autocast = autocast  # bf16 autocast of the extractor's forward; features are returned as fp32
        # IS's features come from a second extractor when the first has no classifier layer
        parts = [(extractor, [extractor.fid_feature] if extractor.isc else [extractor.fid_feature,
                                                                              extractor.isc_feature])]
        if extractor.isc is not None:
            parts.append((extractor.isc, [extractor.isc.isc_feature]))
        self.parts = []
        for spec, features in parts:
            module = create_feature_extractor(
                spec.name, features, cuda=False, feature_extractor_weights_path=str(spec.weights_path),
                verbose=False)
            module.to(device)
            if channels_last:
                module.to(memory_format=torch.channels_last)
            self.parts.append((spec, module))

    def __call__(self, images: Iterable[Tensor]) -> dict[str, Tensor]:
        out: dict[str, list[Tensor]] = {}
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            for x in images:
                if x.dtype != torch.uint8 or x.dim() != 4:
                    raise ValueError(f"feature extraction needs uint8 N×C×H×W, got {x.dtype} {tuple(x.shape)}")
                for spec, module in self.parts:
                    xi = x.expand(-1, 3, -1, -1) if spec.in_channels == 3 and x.shape[1] == 1 else x  # gray to RGB
                    with fp32_convolutions(self.device, spec):
                        feats = module.convert_features_tuple_to_dict(module(xi.to(self.device)))
                    for k, v in feats.items():
                        out.setdefault(k, []).append(v.detach().float().cpu())
        return {k: torch.cat(v) for k, v in out.items()}

"""The evaluation context a suite's metrics share for one model: test logits, sample features and
reference features are computed once, lazily, and whatever settings they used are added to the
protocol that goes into the record."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from bench.data.base import Dataset
from bench.errors import ModelFailure
from bench.features.domain import ResolvedExtractor
from bench.features.extract import FeatureStream
from bench.models.base import BenchModel, as_float01, batches
from bench.scales import Scale
from bench.suites import Suite

EVAL_BATCH = 500
GRID_SIZE = 100
#: offsets so that the seed streams for sampling and other uses never coincide
SAMPLE_SEED_OFFSET = 1_000_000


class EvalContext:
    def __init__(self, model: BenchModel, data: Dataset, suite: Suite, scale: Scale, seed: int, device: torch.device,
                 extractor: Callable[[], ResolvedExtractor], reference_cache: dict, progress):
        self.model, self.data, self.suite, self.scale, self.seed, self.device = model, data, suite, scale, seed, device
        self._extractor_fn = extractor
        self._reference_cache = reference_cache  # shared across the models of one run
        self.progress = progress
        self.protocol: dict = {}
        #: suite settings after command-line overrides (see `bench.runner.suite_settings`)
        self.settings: dict = dict(suite.settings)
        #: files to write beside the record: suffix (e.g. "reliability.png") -> writer(path)
        self.artifacts: dict[str, Callable[[Path], None]] = {}
        #: metric keys (or prefixes) that do not apply to this model -> why; merged into the record
        self.skipped: dict[str, str] = {}
        self.grid: Tensor | None = None
        self._logits: Tensor | None = None
        self._sample_features: dict[str, Tensor] | None = None
        self._stream: FeatureStream | None = None

    @property
    def extractor(self) -> ResolvedExtractor:
        ext = self._extractor_fn()
        self.protocol["feature_extractor"] = ext.protocol()
        return ext

    def _features(self) -> FeatureStream:
        if self._stream is None:
            self._stream = FeatureStream(self.extractor, self.device)
        return self._stream

    def test_logits(self) -> Tensor:
        if self._logits is None:
            x = self.data.test.x
            out = []
            with torch.no_grad():
                for a, b in batches(len(x), EVAL_BATCH):
                    out.append(self.model.logits(as_float01(x[a:b]).to(self.device)).float().cpu())
            self._logits = torch.cat(out)
            if not torch.isfinite(self._logits).all():
                raise ModelFailure(f"{self.model.name} produced non-finite logits on the test split")
            self.protocol["classifier"] = {"split": "test", "input": "uint8/255 in [0,1]",
                                           "eval_noise": getattr(self.model.config, "eval_noise", 0.0)}
        return self._logits

    def n_samples(self) -> int:
        return self.suite.n_samples[self.scale.value]

    def _sample_batches(self) -> Iterator[Tensor]:
        n, bs = self.n_samples(), self.suite.sample_batch_size
        g = torch.Generator().manual_seed(self.seed + SAMPLE_SEED_OFFSET)
        shape = tuple(self.data.shape)
        with self.progress(f"sample {self.model.name}", n) as update:
            for a, b in batches(n, bs):
                with torch.enable_grad():  # SGLD-type samplers need gradients w.r.t. the input
                    s = self.model.sample(b - a, g)
                if s.dtype != torch.uint8 or tuple(s.shape) != (b - a, *shape):
                    raise ModelFailure(f"{self.model.name}.sample returned {s.dtype} {tuple(s.shape)}; "
                                       f"expected uint8 {(b - a, *shape)}")
                if self.grid is None or len(self.grid) < GRID_SIZE:
                    keep = s[: GRID_SIZE - (0 if self.grid is None else len(self.grid))]
                    self.grid = keep if self.grid is None else torch.cat([self.grid, keep])
                update(b - a)
                yield s

    def sample_features(self) -> dict[str, Tensor]:
        if self._sample_features is None:
            stream = self._features()
            self._sample_features = stream(self._sample_batches())
            self.protocol["samples"] = {
                "n": self.n_samples(),
                "batch_size": self.suite.sample_batch_size,
                "seed_offset": SAMPLE_SEED_OFFSET,
                "sampler": self.model.sampler_protocol(),
            }
        return self._sample_features

    def reference_features(self) -> dict[str, Tensor]:
        split = self.suite.reference.get(self.scale.value, "test")
        ext = self.extractor
        key = (ext.sha256, self.data.fingerprint(), split)
        if key not in self._reference_cache:
            x = getattr(self.data, split).x
            self._reference_cache[key] = self._features()(x[a:b] for a, b in batches(len(x), EVAL_BATCH))
        self.protocol["reference"] = {"split": split, "n": len(getattr(self.data, split))}
        return self._reference_cache[key]

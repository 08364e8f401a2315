"""The evaluation context a suite's metrics share for one model: its inputs (the model, the data, the
settings) and caches (test logits, sample features, reference features), computed once, lazily. What
those shared inputs used (sample count, extractor, reference split...) the context notes in its own
``protocol`` and ``draws``; what a metric adds it returns in its `MetricResult`, never here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bench import distributed
from bench.checkpoints import tensors_digest
from bench.data.base import Dataset
from bench.errors import ModelFailure
from bench.features import sample_cache
from bench.features.domain import ResolvedExtractor
from bench.features.extract import FeatureStream
from bench.features.reference import cached_reference
from bench.models.base import EVAL_BATCH, BenchModel, as_float01, batches
from bench.scales import Scale
from bench.suites import Suite

GRID_SIZE = 100
#: offsets so that the seed streams for sampling and other uses never coincide
SAMPLE_SEED_OFFSET = 1_000_000


def _malloc_trim() -> Callable[[], None]:
    """glibc's malloc_trim(0), or a no-op elsewhere."""
    try:
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim  # resolved now: a libc without it is a no-op, not an error
        return lambda: trim(0)
    except (OSError, AttributeError):
        return lambda: None


#: hand the heap's free pages back to the OS after each sample batch: the batch's temporaries otherwise
#: fragment glibc's heap between the small feature tensors that stay, and peak RSS grows with the sample
#: count although nothing is held (measured: +260 MB from 2k to 50k CIFAR-shaped samples without it)
release_freed_memory = _malloc_trim()
TRIM_EVERY = 16  # batches; a trim costs about as much as a tiny model's sample batch


def eval_sampler_protocol(model: BenchModel) -> dict:
    """The settings of the sampler that draws the evaluation samples. A ``train`` entry (the training
    sampler's settings) is part of the model's recipe, which ``model_config`` records; it is what a run
    compares, not how it measures, so it stays out of the fingerprint: a recipe change reads as a change of
    the numbers, not as an incomparable protocol."""
    return {k: v for k, v in model.sampler_protocol().items() if k != "train"}


class EvalContext:
    def __init__(self, model: BenchModel, data: Dataset, suite: Suite, scale: Scale, seed: int, device: torch.device,
                 extractor: Callable[[], ResolvedExtractor], reference_cache: dict, progress):
        self.model, self.data, self.suite, self.scale, self.seed, self.device = model, data, suite, scale, seed, device
        self._extractor_fn = extractor
        self._reference_cache = reference_cache  # shared across the models of one run
        self.progress = progress
        #: the settings the shared inputs were computed with (classifier, samples, feature_extractor,
        #: reference); written by the context only, merged into the record's protocol
        self.protocol: dict = {}
        #: what the shared inputs drew but is not protocol (a locally trained extractor's weight hash, which
        #: varies bit-wise by machine); written by the context only, recorded beside the protocol
        self.draws: dict = {}
        #: suite settings after command-line overrides (see `bench.plan.suite_settings`)
        self.settings: dict = dict(suite.settings)
        #: the first samples, for the record's sample grid
        self.grid: Tensor | None = None
        self._logits: Tensor | None = None
        self._sample_features: dict[str, Tensor] | None = None
        self._stream: FeatureStream | None = None
        self.n_samples_override: int | None = None
        #: bf16 autocast for sampling and feature extraction; channels_last for the extractor
        self.autocast = False
        self.channels_last = False
        #: what each metric already computed for this record handed on to the later ones (metric key ->
        #: `MetricResult.handed_on`); set by the runner, read by metrics
        self.earlier: dict[str, dict[str, Any]] = {}
        self._memo: dict[str, Any] = {}
        #: the evaluated checkpoint's sha256 (None: none, a smoke) and whether it was loaded rather than
        #: trained in this run; torch.compile's setting. They key and gate the sample cache
        self.checkpoint_sha256: str | None = None
        self.checkpoint_loaded = False
        self.compile = False

    def memo(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per record: an input several metrics share (precision and recall's manifolds)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    @property
    def extractor(self) -> ResolvedExtractor:
        ext = self._extractor_fn()
        self.protocol["feature_extractor"] = ext.protocol()
        if ext.draws():
            self.draws["feature_extractor"] = ext.draws()
        return ext

    def _features(self) -> FeatureStream:
        if self._stream is None:
            self._stream = FeatureStream(self.extractor, self.device, autocast=self.autocast,
                                         channels_last=self.channels_last)
        return self._stream

    def test_logits(self) -> Tensor:
        if self._logits is None:
            x = self.data.test.x

            def work(i: int, a: int, b: int) -> Tensor:
                with torch.no_grad():
                    return self.model.logits(as_float01(x[a:b]).to(self.device)).float().cpu()

            self._logits = torch.cat(distributed.map_batches(list(batches(len(x), EVAL_BATCH)), work, "test logits"))
            if not torch.isfinite(self._logits).all():
                raise ModelFailure(f"{self.model.name} produced non-finite logits on the test split")
            self.protocol["classifier"] = {"split": "test", "input": "uint8/255 in [0,1]",
                                           "eval_noise": self.model.eval_noise}
        return self._logits

    def n_samples(self) -> int:
        return self.n_samples_override or self.suite.n_samples[self.scale.value]

    def sample_seed(self, batch_index: int) -> int:
        """Each sample batch has its own seed, derived from the run's seed and the batch's index (not
        from the process or rank that draws it), so sharded and single-process runs draw the same images."""
        return int(np.random.SeedSequence([self.seed + SAMPLE_SEED_OFFSET, batch_index]).generate_state(1)[0])

    def _sample_batch(self, i: int, a: int, b: int) -> Tensor:
        g = torch.Generator().manual_seed(self.sample_seed(i))
        shape = tuple(self.data.shape)
        # SGLD-type samplers need gradients w.r.t. the input
        with torch.enable_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            s = self.model.sample(b - a, g)
        if s.dtype != torch.uint8 or tuple(s.shape) != (b - a, *shape):
            raise ModelFailure(f"{self.model.name}.sample returned {s.dtype} {tuple(s.shape)}; "
                               f"expected uint8 {(b - a, *shape)}")
        return s

    def _sample_cache_content(self) -> dict | None:
        """What decides the samples' features and grid (`bench.features.sample_cache`); None: not cached."""
        if not self.checkpoint_sha256 or distributed.active():
            return None
        ext = self.extractor
        weights = tensors_digest(self.model.state_dict(), "")
        return {"weights": weights, "model": self.model.name,
                "code": self.model.code_version(), "config": self.model.config_dict(),
                "sampler": eval_sampler_protocol(self.model), "n": self.n_samples(),
                "batch_size": self.suite.sample_batch_size, "seed": self.seed, "seed_offset": SAMPLE_SEED_OFFSET,
                "shape": list(self.data.shape), "grid": GRID_SIZE,
                "extractor": ext.protocol(), "extractor_sha256": ext.sha256,
                "numerics": {"device_type": self.device.type, "bf16": self.autocast,
                             "channels_last": self.channels_last, "compile": self.compile}}

    def sample_features(self) -> dict[str, Tensor]:
        if self._sample_features is None:
            n, bs = self.n_samples(), self.suite.sample_batch_size
            features, self.grid, threads = sample_cache.cached(
                self.model.name, self._sample_cache_content(), self.device, self.checkpoint_loaded,
                self._draw_sample_features)
            self._sample_features = features
            if threads is not None:
                self.draws["samples"] = {"from_cache": True, "num_threads": threads}
            self.protocol["samples"] = {
                "n": n,
                "batch_size": bs,
                "seed_offset": SAMPLE_SEED_OFFSET,
                "seeding": "batch i uses numpy SeedSequence([seed + seed_offset, i])",
                "sampler": eval_sampler_protocol(self.model),
            }
        return self._sample_features

    def _draw_sample_features(self) -> tuple[dict[str, Tensor], Tensor]:
        """The samples' features and the grid's images, drawn and extracted here."""
        stream = self._features()
        n, bs = self.n_samples(), self.suite.sample_batch_size
        bounds = list(batches(n, bs))
        with self.progress(f"sample {self.model.name}", n) as update:
            def work(i: int, a: int, b: int) -> tuple[dict[str, Tensor], Tensor]:
                s = self._sample_batch(i, a, b)
                update(b - a)
                # only features are kept, and a copy of the first GRID_SIZE images for the grid (a
                # slice would be a view that keeps every batch's images alive: 150 MB at 50k CIFAR)
                result = stream([s]), (s[: GRID_SIZE - a].clone() if a < GRID_SIZE else None)
                if i % TRIM_EVERY == TRIM_EVERY - 1:
                    release_freed_memory()
                return result

            parts = distributed.map_batches(bounds, work, "sampling")
        grid = torch.cat([g for _, g in parts if g is not None])
        return {k: torch.cat([f[k] for f, _ in parts]) for k in parts[0][0]}, grid

    def reference_features(self) -> dict[str, Tensor]:
        split = self.suite.reference.get(self.scale.value, "test")
        ext = self.extractor
        key = (ext.sha256, self.data.fingerprint(), split)
        if key not in self._reference_cache:
            x = getattr(self.data, split).x
            stream = self._features()

            def compute() -> dict[str, Tensor]:
                parts = distributed.map_batches(list(batches(len(x), EVAL_BATCH)),
                                                lambda i, a, b: stream([x[a:b]]), "reference features")
                return {k: torch.cat([f[k] for f in parts]) for k in parts[0]}

            numerics = {"device_type": self.device.type, "bf16": self.autocast, "channels_last": self.channels_last}
            self._reference_cache[key] = cached_reference(ext, self.data, split, numerics, compute)
        self.protocol["reference"] = {"split": split, "n": len(getattr(self.data, split))}
        return self._reference_cache[key]

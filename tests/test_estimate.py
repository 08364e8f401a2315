"""The plan before training (bench.estimate): planned steps, calibrated and recorded times, the confirmation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from bench import estimate
from bench.acquire import obtain_model
from bench.config import load_config
from bench.errors import UserError
from bench.plan import plan
from bench.runner import run


def _plan(tmp_path, *overrides):
    return plan(load_config(["scale=tiny", f"out={tmp_path}", *overrides]))


def test_calibration_finds_the_planned_steps_and_leaves_the_real_training_unchanged(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    p = _plan(tmp_path, "model=wrn", "retrain=true")
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    steps, seconds, sampling = estimate.calibrate(p, "wrn")
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is as it was
    model, _, train = obtain_model(p, "wrn")
    assert steps == train["steps"] and seconds > 0 and sampling is None  # wrn draws no samples
    fresh, _, _ = obtain_model(p, "wrn")  # retrain=true: trained again, without a calibration before it
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_second_run_uses_the_recorded_times(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    p = _plan(tmp_path, "model=wrn")
    first = estimate.plan_estimates(p)
    assert [e.how for e in first] == ["calibrated"] and first[0].eval_s is None
    run(load_config(["scale=tiny", f"out={tmp_path}", "model=wrn", "retrain=true"]))
    (again,) = estimate.plan_estimates(_plan(tmp_path, "model=wrn", "retrain=true"))
    assert again.how == "recorded" and again.steps == first[0].steps and again.eval_s is not None
    (cached,) = estimate.plan_estimates(_plan(tmp_path, "model=wrn"))
    assert cached.how == "cached" and cached.train_s == 0
    assert "total ~" in estimate.report(p, [again, cached])


def test_a_cold_plan_times_a_samplers_sampling_and_scales_it_to_the_suites_count(tmp_path, monkeypatch):
    """A cold plan's evaluation of a sampler: `CALIBRATION_SAMPLES` drawn from the calibration's barely trained
    model, timed, times the suite's sample count over them; none for a model that draws no samples or a suite
    that needs none."""
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    p = _plan(tmp_path, "suite=hybrid", "models=[ncsn,wrn]", "n_samples=50")
    drawn = []
    real = estimate.MODELS.get("ncsn").sample

    def sample(self, n, generator):
        drawn.append((n, self.training, torch.is_grad_enabled()))
        return real(self, n, generator)

    monkeypatch.setattr(estimate.MODELS.get("ncsn"), "sample", sample)
    clock = iter(range(1000))
    monkeypatch.setattr(estimate.time, "perf_counter", lambda: float(next(clock)))  # each reading 1 s later
    steps, seconds, sampling = estimate.calibrate(p, "ncsn")
    # in eval mode with gradients on, as the evaluation draws; one reading before and one after the draw
    assert drawn == [(estimate.CALIBRATION_SAMPLES, False, True)]
    assert steps and seconds > 0 and sampling == pytest.approx(1.0 * 50 / estimate.CALIBRATION_SAMPLES)
    assert estimate.calibrate(p, "wrn")[2] is None  # no sampler
    monkeypatch.undo()
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    ncsn, wrn = estimate.plan_estimates(p)
    assert (ncsn.eval_how, wrn.eval_s) == ("calibrated sampling", None) and ncsn.eval_s > 0
    assert "eval calibrated sampling" in estimate.report(p, [ncsn, wrn])
    assert "evaluation of 1 model(s), not yet measured" in estimate.report(p, [ncsn, wrn])
    assert estimate.calibrate(_plan(tmp_path, "suite=calibration", "model=ncsn"), "ncsn")[2] is None  # no samples


def test_a_sampler_that_fails_to_draw_leaves_its_evaluation_unknown(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    p = _plan(tmp_path, "suite=hybrid", "model=ncsn")

    def broken(self, n, generator):
        raise RuntimeError("boom")

    monkeypatch.setattr(estimate.MODELS.get("ncsn"), "sample", broken)
    steps, seconds, sampling = estimate.calibrate(p, "ncsn")
    assert steps and seconds > 0 and sampling is None


def test_a_model_that_cannot_train_is_left_to_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    p = _plan(tmp_path, "model=wrn")

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(estimate, "calibrate", broken)
    (e,) = estimate.plan_estimates(p)
    assert e.how.startswith("calibration failed") and e.steps is None


def test_a_long_cpu_run_needs_yes_without_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    p = _plan(tmp_path, "model=wrn", "device=cpu")
    long = [estimate.Estimate("wrn", 10_000, 2 * 3600.0, "calibrated")]
    monkeypatch.setattr("sys.stdin.isatty", lambda: False, raising=False)
    with pytest.raises(UserError) as e:
        estimate.confirm(p, long, assume_yes=False)
    msg = str(e.value)
    assert "2h00m" in msg and "yes=true" in msg and "device=cuda" in msg and "\n" not in msg
    estimate.confirm(p, long, assume_yes=True)  # yes=true: no question
    estimate.confirm(p, [estimate.Estimate("wrn", 10, 60.0, "calibrated")], assume_yes=False)  # short: no question


def test_the_cli_stops_a_long_run_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(estimate, "CONFIRM_ABOVE_S", 0.0)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match="yes=true"):
        run(load_config(["scale=tiny", f"out={out}", "model=wrn", "device=cpu"]))
    assert list(out.iterdir()) == []
    outcome = run(load_config(["scale=tiny", f"out={out}", "model=wrn", "device=cpu", "yes=true"]))
    assert [r.status for r, _ in outcome.records] == ["ok"]


def test_the_estimate_includes_inception_features_on_a_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    p = _plan(tmp_path, "suite=samples", "models=[pixel_independent,wrn]", "device=cpu", "threads=1")
    es = [estimate.Estimate("pixel_independent", None, 0.0, "no training loop"),
          estimate.Estimate("wrn", 10, 5.0, "calibrated")]
    assert estimate.inception_seconds(p, es) == 0.0  # the domain extractor: nothing to add
    p.inception = object()  # planned Inception weights
    torch.set_num_threads(1)
    n, n_ref = p.suite.n_samples["tiny"], len(p.data.test)
    # one sampling model (wrn has no Sampler) and the reference split once, at 2.7 images/s per thread
    assert estimate.inception_seconds(p, es) == pytest.approx((n + n_ref) / 2.7)
    text = estimate.report(p, es)
    assert "Inception features on the CPU" in text
    es[0].eval_s = 3.0  # measured before: its evaluation time already holds the features
    assert estimate.inception_seconds(p, es) == 0.0


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", '{"version": 1, "train_s": "abc"}',
                                  '{"version": 1, "train_s": NaN}', '{"version": 1, "train_s": -1}',
                                  '{"version": 1, "train_s": 5, "steps": "x"}', '{"version": 1, "eval_s.hybrid": true}',
                                  '{"version": 99, "train_s": 5}', "[" * 100_000])
def test_a_broken_rates_file_is_ignored_not_a_crash(tmp_path, monkeypatch, text):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    p = _plan(tmp_path, "model=wrn")
    key = estimate.rate_key(p, "wrn")
    estimate._rate_path(key).write_text(text)
    assert estimate.read_rate(key) == {}
    (e,) = estimate.plan_estimates(p)
    assert e.how == "calibrated"  # measured afresh
    estimate.write_rate(key, train_s=2.5, steps=10)  # and a good one replaces it
    assert estimate.read_rate(key) == {"version": 1, "train_s": 2.5, "steps": 10}


def test_the_plan_counts_the_feature_extractor_a_new_data_set_trains_first(tmp_path, monkeypatch):
    """Digits' extractor ships with bench; other data trains one before its first FID (MNIST: 1,200 steps, a
    few minutes), and the plan says so, once: afterwards it is cached."""
    import numpy as np

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = (rng.random((120, 8, 8, 1)) * 60 + y[:, None, None, None] * 60).astype(np.uint8)
    np.savez(tmp_path / "set.npz", x=x, y=y)
    p = _plan(tmp_path, "model=pixel_independent", f"data=npz:{tmp_path / 'set.npz'}")
    steps, seconds = estimate.extractor_seconds(p)
    assert steps == 30 * 2 and seconds > 0  # 96 training images: 2 batches of 64 per pass, 30 passes
    assert [x.own_job for x in estimate.extra_costs(p, []) if "feature extractor" in x.line] == [True]
    assert estimate.extractor_seconds(_plan(tmp_path, "model=pixel_independent")) == (0, 0.0)  # digits: shipped
    run(load_config(["scale=tiny", f"out={tmp_path / 'r'}", "model=pixel_independent",
                     f"data=npz:{tmp_path / 'set.npz'}"]))
    assert estimate.extractor_seconds(p) == (0, 0.0)  # trained by that run, now cached


def test_an_evaluation_measured_on_other_data_is_scaled_by_the_step_time(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    p = _plan(tmp_path, "model=wrn", "device=cpu", "threads=1")
    torch.set_num_threads(1)
    suite = f"eval_s.{p.suite.name}"
    monkeypatch.setattr(estimate, "calibrate", lambda p, name: (10, 5.0, None))  # 0.5 s a step on digits
    same = {"model": "wrn", "scale": p.scale.value, "device": "cpu", "threads": 1}
    # a hostile file: a step time so small that scaling by it is infinite
    estimate.write_rate("wrn-tiny-cpu-1", **same, data="cifar", steps=1, train_s=5e-324, **{suite: 1e308})
    (e,) = estimate.plan_estimates(p)
    assert e.eval_s is None  # nothing measured anywhere (but the hostile file, ignored)
    # measured on MNIST at 2 s a step, 30 s of evaluation; and runs that must not count
    estimate.write_rate("wrn-mnist-cpu-1", **same, data="mnist", steps=10, train_s=20.0, **{suite: 30.0})
    estimate.write_rate("wrn-other-cpu-2", **{**same, "threads": 2}, data="cifar", steps=10, train_s=1.0,
                        **{suite: 1.0})
    estimate.write_rate("wrn-small-cpu-1", **{**same, "scale": "paper"}, data="cifar", steps=10, train_s=1.0,
                        **{suite: 1.0})
    estimate.write_rate("wrn-samedata-cpu-1", **same, data=p.data.name, steps=10, train_s=1.0, **{suite: 1.0})
    estimate.write_rate("wrn-suite-cpu-1", **same, data="cifar", steps=10, train_s=1.0, **{"eval_s.nope": 1.0})
    estimate.write_rate("wrn-old-cpu-1", steps=10, train_s=1.0, **{suite: 1.0})  # no fields: written before them
    (e,) = estimate.plan_estimates(p)
    assert (e.eval_s, e.eval_how) == (pytest.approx(30.0 * 0.5 / 2.0), "scaled from mnist")
    # of two such runs, the one whose step time is nearest: here 0.6 s a step on Fashion-MNIST, 0.1 s on cifar
    estimate.write_rate("wrn-fashion-cpu-1", **same, data="fashion_mnist", steps=10, train_s=6.0, **{suite: 12.0})
    estimate.write_rate("wrn-cifar-cpu-1", **same, data="cifar", steps=10, train_s=1.0, **{suite: 1.0})
    (e,) = estimate.plan_estimates(p)
    assert (e.eval_s, e.eval_how) == (pytest.approx(12.0 * 0.5 / 0.6), "scaled from fashion_mnist")
    assert "eval ~10s" in estimate.report(p, [e]) and "eval scaled from fashion_mnist" in estimate.report(p, [e])
    assert "not yet measured" not in estimate.report(p, [e])

    run(load_config(["scale=tiny", f"out={tmp_path}", "model=wrn", "device=cpu", "threads=1", "retrain=true"]))
    (e,) = estimate.plan_estimates(_plan(tmp_path, "model=wrn", "device=cpu", "threads=1", "retrain=true"))
    assert e.eval_how == "recorded" and e.how == "recorded"  # measured on this data now: its own figure
    got = estimate.read_rate(estimate.rate_key(p, "wrn", 1))
    assert {k: got[k] for k in ("model", "data", "scale", "device", "threads")} == {**same, "data": p.data.name}


def test_the_inception_features_of_a_scaled_evaluation_are_still_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    p = _plan(tmp_path, "suite=samples", "models=[pixel_independent]", "device=cpu", "threads=1")
    p.inception = object()
    torch.set_num_threads(1)
    e = estimate.Estimate("pixel_independent", None, 0.0, "no training loop", 3.0, "scaled from mnist")
    assert estimate.inception_seconds(p, [e]) > 0  # measured on data whose features may have been cheaper
    e.eval_how = "recorded"
    assert estimate.inception_seconds(p, [e]) == 0.0


def test_a_model_without_a_training_loop_scales_by_its_whole_fit(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    p = _plan(tmp_path, "model=pixel_independent", "device=cpu", "threads=1")
    torch.set_num_threads(1)
    monkeypatch.setattr(estimate, "calibrate", lambda p, name: (None, 0.9, None))  # the fit ran whole: 0.9 s
    same = {"model": "pixel_independent", "scale": p.scale.value, "device": "cpu", "threads": 1}
    estimate.write_rate("pixel_independent-mnist", **same, data="mnist", steps=1, train_s=0.6,
                        **{f"eval_s.{p.suite.name}": 10.0})
    (e,) = estimate.plan_estimates(p)
    assert e.how == "no training loop" and (e.eval_s, e.eval_how) == (pytest.approx(15.0), "scaled from mnist")


def test_the_extractors_training_is_kept_out_of_a_models_recorded_evaluation(tmp_path, monkeypatch):
    """The plan lists the feature extractor on its own line; the model whose evaluation trained it (or waited
    for another job to) must not carry it into the rate that later plans scale."""
    import bench.runner as runner
    from bench.features import domain

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    real = runner.evaluate_model

    def evaluate_training_an_extractor(*a, **k):
        record, artifacts = real(*a, **k)
        monkeypatch.setattr(domain, "seconds_obtaining", domain.seconds_obtaining + 1000.0)
        return dataclasses.replace(record, seconds=record.seconds + 1000.0), artifacts  # 1,000 s went to it

    monkeypatch.setattr(runner, "evaluate_model", evaluate_training_an_extractor)
    run(load_config(["scale=tiny", f"out={tmp_path}", "model=wrn", "device=cpu", "threads=1"]))
    p = _plan(tmp_path, "model=wrn", "device=cpu", "threads=1")
    got = estimate.read_rate(estimate.rate_key(p, "wrn", 1))[f"eval_s.{p.suite.name}"]
    assert 0 <= got < 100

"""bench/scale_stats.py: the pure summaries of the scale bench, on hand-made series (no Ray, no timing)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_scale_stats", ROOT / "bench" / "scale_stats.py")
ss = importlib.util.module_from_spec(_spec)
sys.modules["bench_scale_stats"] = ss
_spec.loader.exec_module(ss)


@pytest.mark.parametrize("values", [[3.0], [5.0, 1.0], [1, 2, 3, 4, 100], list(np.random.default_rng(0).random(37))])
@pytest.mark.parametrize("q", [0, 1, 50, 99, 100])
def test_percentile_matches_numpy_linear(values, q):
    assert ss.percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)


def test_percentile_refuses_bad_input():
    with pytest.raises(ValueError, match="no values"):
        ss.percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        ss.percentile([1.0], 101)
    with pytest.raises(ValueError, match="NaN"):
        ss.percentile([1.0, float("nan")], 50)


def test_lag_summary_in_ms_and_one_outlier_moves_p99_not_p50():
    lags = [0.001] * 990 + [0.5] * 10  # 1% of samples at 500 ms
    s = ss.lag_summary(lags)
    assert s["lag_p50_ms"] == pytest.approx(1.0)
    assert s["lag_max_ms"] == pytest.approx(500.0)
    assert s["lag_p99_ms"] > 1.0 and s["lag_samples"] == 1000
    with pytest.raises(ValueError, match="negative"):
        ss.lag_summary([0.001, -0.002])
    with pytest.raises(ValueError, match="no lag samples"):
        ss.lag_summary([])


def test_after_keeps_the_samples_at_or_after_t0():
    assert ss.after([0.0, 1.0, 2.0, 3.0], [10, 11, 12, 13], 2.0) == [12, 13]
    with pytest.raises(ValueError, match="3 times for 2 values"):
        ss.after([0, 1, 2], [1, 2], 0)


def test_flatness_against_the_first_value_after_warmup():
    flat = ss.flatness([100.0, 105.0, 109.9, 95.0])
    assert flat["flat"] == 1.0 and flat["max_deviation"] == pytest.approx(0.099, rel=1e-9)
    grown = ss.flatness([100.0, 105.0, 111.0])  # +11%: a leak-shaped series fails
    assert grown["flat"] == 0.0 and grown["max_deviation"] == pytest.approx(0.11, rel=1e-9)
    shrunk = ss.flatness([100.0, 89.0])  # ±: falling by more than 10% fails too
    assert shrunk["flat"] == 0.0
    with pytest.raises(ValueError, match="empty"):
        ss.flatness([])
    with pytest.raises(ValueError, match="must be > 0"):
        ss.flatness([0.0, 1.0])


def test_step_peaks_see_growth_across_steps_not_the_sawtooth_phase():
    # a sawtooth 100 -> 150 within each step, flat across steps; samples at step ends are troughs
    times = [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0]
    values = [100, 150, 100, 150, 100, 150, 100]
    peaks = ss.step_peaks(times, values, [1.0, 2.0, 3.0, 4.0])
    assert peaks == [150, 150, 150] and ss.flatness(peaks)["flat"] == 1.0
    assert ss.flatness(values)["flat"] == 0.0  # against the first sample the same series "grew" 50%
    growing = ss.step_peaks(times, [100, 150, 100, 160, 100, 170, 100], [1.0, 2.0, 3.0, 4.0])
    assert growing == [150, 160, 170] and ss.flatness(growing)["max_deviation"] == pytest.approx(20 / 150)
    assert ss.step_peaks(times, values, [10.0, 11.0]) == []  # no sample inside: nothing, not a zero
    with pytest.raises(ValueError, match="must not decrease"):
        ss.step_peaks(times, values, [2.0, 1.0])
    with pytest.raises(ValueError, match="2 times for 1 values"):
        ss.step_peaks([1.0, 2.0], [1.0], [0.0, 3.0])


def test_cpu_ms_per_sample():
    assert ss.cpu_ms_per_sample(10.0, 12.0, 4000) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="samples must be > 0"):
        ss.cpu_ms_per_sample(1.0, 2.0, 0)
    with pytest.raises(ValueError, match="backwards"):
        ss.cpu_ms_per_sample(2.0, 1.0, 10)


def test_verdicts_at_the_limits():
    ok = ss.verdicts({"cpu_ms_per_sample": 1.0, "lag_p99_ms": 50.0, "rss_flat": 1.0})
    assert all(ok.values())
    bad = ss.verdicts({"cpu_ms_per_sample": 1.01, "lag_p99_ms": 50.1, "rss_flat": 0.0})
    assert not any(bad.values())


def test_the_bench_summary_leaves_warmup_out(monkeypatch):
    """bench/scale.py:summarise on a hand-made probe: CPU, lag, RSS and syncs count only after step W."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    steps = [  # warm-up step 1 is slow and CPU-hungry; steps 2-3 cost 0.5 s CPU per 1000 samples
        {"step": 1.0, "t": 10.0, "cpu_s": 50.0, "consumed": 1000.0, "sync_s": 9.0, "step_s": 10.0, "train_wait_s": 9.0},
        {"step": 2.0, "t": 12.0, "cpu_s": 50.5, "consumed": 2000.0, "sync_s": 0.2, "step_s": 2.0, "train_wait_s": 1.0,
         "pack_s": 0.25, "train_s": 0.5},
        {"step": 3.0, "t": 14.0, "cpu_s": 51.0, "consumed": 3000.0, "sync_s": float("nan"), "step_s": 2.0, "train_wait_s": 1.0,
         "pack_s": 0.75, "train_s": 0.3},
    ]
    probe = SimpleNamespace(
        steps=steps, lags=[(5.0, 0.9), (11.0, 0.002), (13.0, 0.004), (15.0, 2.0)],  # start-up and final checkpoint lags left out
        busy_lags=[(5.0, 0.9), (11.0, 0.001), (13.0, 0.004), (15.0, 2.0)],
        resources=[(5.0, 50, 0), (10.0, 100, 7), (12.0, 105, 9), (14.0, 104, 3), (15.0, 900, 1)],  # 15: after the end
        peak_in_flight=64, peak_pending=64, peak_in_flight_after_warmup=60,
        # (t, generation, s): the full collections at 5 and 15 are outside the measured window
        gc_pauses=[(5.0, 2, 0.9), (11.0, 2, 0.3), (11.5, 0, 0.002), (13.0, 1, 0.004), (15.0, 2, 2.0)],
        occupancy_t=[10.5, 12.0, 13.0, 15.0], occupancy_in_flight=[40, 50, 60, 0], occupancy_pending=[64, 60, 62, 0],
        tracked_at_end={"total": 9})
    args = SimpleNamespace(warmup=1, max_staleness=1, prompts_per_step=32)
    s = bench.summarise(probe, args)
    assert s["samples_measured"] == 2000 and s["cpu_ms_per_sample"] == pytest.approx(0.5)
    assert s["lag_max_ms"] == pytest.approx(4.0) and s["lag_samples"] == 2
    assert s["busy_lag_p50_ms"] == pytest.approx(2.5) and s["busy_lag_samples"] == 2
    # step peaks: (10, 12] -> 105, (12, 14] -> 104; the sample at 15 (final checkpoint) is left out
    assert s["rss_step_peaks_bytes"] == [105, 104] and s["rss_reference_bytes"] == 105
    assert s["rss_max_deviation"] == pytest.approx(1 / 105) and s["rss_flat"] == 1.0
    assert s["object_store_max_bytes"] == 9
    assert s["syncs_measured"] == 1 and s["sync_max_s"] == pytest.approx(0.2)  # the NaN (skipped) sync left out
    assert s["admission_window"] == 64 and s["verdicts"]["cpu <= 1 ms/sample"]
    assert s["gc_full_count"] == 1 and s["gc_full_max_ms"] == pytest.approx(300) and s["gc_pauses_1ms_count"] == 3
    assert s["gc_pauses_total_s"] == pytest.approx(0.306)
    assert s["in_flight_p50_after_warmup"] == 50 and s["pending_min_after_warmup"] == 60
    # the step's parts, after warm-up; the skipped sync (NaN) left out of its mean
    assert (s["pack_s_mean"], s["train_s_mean"], s["sync_s_mean"]) == pytest.approx((0.5, 0.4, 0.2))
    assert s["rss_peak_method"] == "1 s samples"
    # With each step's kernel high-water mark the step peaks are those, transients included.
    for step, peak in zip(steps, [500, 120, 130]):
        step["rss_peak"] = peak
    s = bench.summarise(probe, args)
    assert s["rss_step_peaks_bytes"] == [120, 130] and s["rss_peak_method"].startswith("VmHWM")
    assert s["rss_max_deviation"] == pytest.approx(10 / 120) and s["rss_flat"] == 1.0


def test_engine_slowdown_reaches_every_engine_and_is_absent_by_default():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from verimed.core.config import load_config

    def slowdown(*argv):
        args = bench.parse_args(["--engines", "3", *argv])
        return load_config(None, bench.overrides(args, Path("/tmp/unused/run"))).emulation.engine_slowdown

    assert slowdown() == {} and slowdown("--engine-slowdown", "40") == {0: 40.0, 1: 40.0, 2: 40.0}
    with pytest.raises(SystemExit, match="engine-slowdown"):
        slowdown("--engine-slowdown", "0")

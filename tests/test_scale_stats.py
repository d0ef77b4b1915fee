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

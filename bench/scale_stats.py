"""Pure summaries of ``bench/scale.py``: percentiles, event-loop lag, flatness after warm-up, CPU per sample.

No Ray, no controller: every function takes plain numbers so ``tests/test_scale_stats.py`` checks it
on hand-made series. The bench records raw series (lag samples, RSS / object-store samples with their
wall times, per-step CPU and sample counters) and hands them here.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

# The must-shows (issue #17, part 1).
CPU_MS_PER_SAMPLE_MAX = 1.0
LAG_P99_MS_MAX = 50.0
RSS_FLAT_TOLERANCE = 0.10


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) by linear interpolation between closest ranks.

    With x sorted ascending and n values: position p = (n - 1)·q/100, i = floor(p),
    result = x[i] + (p - i)·(x[i+1] - x[i]) (numpy's default "linear" method).
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile: q must be in [0, 100], got {q}")
    if len(values) == 0:
        raise ValueError("percentile: no values")
    xs = sorted(float(v) for v in values)
    if any(math.isnan(x) for x in xs):
        raise ValueError("percentile: NaN among the values")
    pos = (len(xs) - 1) * q / 100.0
    i = math.floor(pos)
    if i + 1 >= len(xs):
        return xs[-1]
    return xs[i] + (pos - i) * (xs[i + 1] - xs[i])


def lag_summary(lags_s: Sequence[float]) -> dict[str, float]:
    """Event-loop lag in ms: p50, p99, max and the sample count.

    ``lags_s``: overshoots of a timer task, in seconds: each sample is (wall time the sleep
    returned) - (wall time it asked to return), so 0 is a loop that was free when the timer fired.
    A negative overshoot cannot happen with a monotonic clock and is refused.
    """
    if len(lags_s) == 0:
        raise ValueError("lag_summary: no lag samples (did the timer task run after warm-up?)")
    if min(lags_s) < 0:
        raise ValueError(f"lag_summary: negative lag {min(lags_s)} s (expected overshoots >= 0)")
    return {"lag_p50_ms": 1e3 * percentile(lags_s, 50), "lag_p99_ms": 1e3 * percentile(lags_s, 99),
            "lag_max_ms": 1e3 * max(lags_s), "lag_samples": float(len(lags_s))}


def after(times: Sequence[float], values: Sequence[float], t0: float) -> list[float]:
    """The values whose time is >= t0 (the series after warm-up)."""
    if len(times) != len(values):
        raise ValueError(f"after: {len(times)} times for {len(values)} values")
    return [v for t, v in zip(times, values) if t >= t0]


def step_peaks(times: Sequence[float], values: Sequence[float], step_ends: Sequence[float]) -> list[float]:
    """The largest value in each step: max{v_i : step_ends[k-1] < t_i <= step_ends[k]} for k = 1 … n-1.

    Driver RSS is a sawtooth within a step (the batch is packed, sent and freed); comparing each
    step's peak with the first measured step's peak sees growth across steps, not where in the
    sawtooth a sample fell. Steps without a sample are left out.
    """
    if len(times) != len(values):
        raise ValueError(f"step_peaks: {len(times)} times for {len(values)} values")
    if any(b < a for a, b in itertools.pairwise(step_ends)):
        raise ValueError("step_peaks: step end times must not decrease")
    peaks = []
    for lo, hi in itertools.pairwise(step_ends):
        inside = [v for t, v in zip(times, values) if lo < t <= hi]
        if inside:
            peaks.append(float(max(inside)))
    return peaks


def flatness(values: Sequence[float], tolerance: float = RSS_FLAT_TOLERANCE) -> dict[str, float]:
    """How far a series strays from its first value (the value right after warm-up).

    reference = values[0]; deviation = max_i |values[i] / reference - 1|; flat = deviation <= tolerance.
    """
    if len(values) == 0:
        raise ValueError("flatness: empty series (no sample after warm-up)")
    reference = float(values[0])
    if reference <= 0:
        raise ValueError(f"flatness: reference value {reference} must be > 0")
    deviation = max(abs(float(v) / reference - 1.0) for v in values)
    return {"reference": reference, "min": float(min(values)), "max": float(max(values)),
            "max_deviation": deviation, "flat": float(deviation <= tolerance)}


def cpu_ms_per_sample(cpu_start_s: float, cpu_end_s: float, samples: int) -> float:
    """Controller CPU per consumed sample, in ms: 1000·(cpu_end - cpu_start) / samples.

    ``cpu_*``: the driver process's CPU time (user + system, all threads) at the end of warm-up
    and at the end of the run; ``samples``: samples the learner consumed in between.
    """
    if samples <= 0:
        raise ValueError(f"cpu_ms_per_sample: samples must be > 0, got {samples} (no step after warm-up?)")
    if cpu_end_s < cpu_start_s:
        raise ValueError(f"cpu_ms_per_sample: CPU time went backwards ({cpu_start_s} -> {cpu_end_s})")
    return 1e3 * (cpu_end_s - cpu_start_s) / samples


def verdicts(summary: dict[str, float]) -> dict[str, bool]:
    """The issue's three must-shows on a summary with ``cpu_ms_per_sample``, ``lag_p99_ms``, ``rss_flat``."""
    return {"cpu <= 1 ms/sample": summary["cpu_ms_per_sample"] <= CPU_MS_PER_SAMPLE_MAX,
            "lag p99 <= 50 ms": summary["lag_p99_ms"] <= LAG_P99_MS_MAX,
            "rss within ±10%": bool(summary["rss_flat"])}

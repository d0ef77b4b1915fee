"""bench/scale.py at small scale: 8 emulated engines, 256 groups admitted at once, 3 steps (issue #17.1).

Starts a local Ray node of its own (the bench's temp dir) with logical GPUs, so it is marked
integration + slow. It checks what the bench reports, never how fast: the summary has every
figure, the admission window was filled (peak in flight = (S + 1)·B), and the run trained every
sample exactly once (the shared ledger check, ``verimed/core/train/ledger_check.py``).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from verimed.core.train.ledger_check import check_exactly_once

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENGINES, B, G, S, STEPS, WARMUP = 8, 32, 4, 7, 3, 1
FIGURES = ("cpu_ms_per_sample", "lag_p50_ms", "lag_p99_ms", "lag_max_ms", "rss_reference_bytes", "rss_max_deviation",
           "object_store_max_bytes", "sync_p50_s", "sync_max_s", "samples_per_s", "engine_rss_bytes_sum",
           "gc_full_count", "gc_full_max_ms", "in_flight_p50_after_warmup", "pending_min_after_warmup")


def test_scale_bench_small(tmp_path):
    cpus = sorted(os.sched_getaffinity(0))
    pin = ["--driver-cpus", str(cpus[0])] if len(cpus) >= 2 else []  # the driver on a CPU of its own
    out = subprocess.run(
        [sys.executable, "bench/scale.py", "--engines", str(ENGINES), "--learners", "1", "--prompts-per-step", str(B), "--group-size", str(G),
         "--max-staleness", str(S), "--steps", str(STEPS), "--warmup", str(WARMUP), "--time-scale", "100",
         "--output-dir", str(tmp_path), *pin],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
    )
    assert out.returncode == 0, (out.stdout[-2000:], out.stderr[-3000:])
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in FIGURES:
        assert isinstance(summary[key], (int, float)) and math.isfinite(summary[key]), (key, summary[key])
    assert set(summary["verdicts"]) == {"cpu <= 1 ms/sample", "lag p99 <= 50 ms", "rss within ±10%"}
    # The admission window, (S + 1)·B groups, was filled: that many admitted and not yet consumed at
    # once (in flight or finished and waiting); never more in flight than the window.
    assert summary["admission_window"] == (S + 1) * B
    assert summary["peak_pending"] == (S + 1) * B and B <= summary["peak_in_flight"] <= (S + 1) * B
    assert summary["steps_measured"] == STEPS - WARMUP and summary["samples_measured"] == (STEPS - WARMUP) * B * G
    assert summary["lag_samples"] > 0
    assert 0 <= summary["pending_min_after_warmup"] <= (S + 1) * B and summary["in_flight_p50_after_warmup"] <= (S + 1) * B
    assert summary["gc_tracked_at_end"]["total"] > 0  # the census after the last step
    if pin:
        assert summary["cpu_affinity"] == {"driver": cpus[:1], "rest": cpus[1:]}
    series = json.loads((tmp_path / "series.json").read_text())
    assert [s["step"] for s in series["steps"]] == [1.0, 2.0, 3.0] and series["resources"]
    # Exactly once: the bench's own count and the shared checker over the run's files.
    assert summary["ledger_ok"] and summary["ledger_consumed"] == STEPS * B * G
    report = check_exactly_once(tmp_path / "run")
    assert report.ok, report.problems
    assert report.consumed == STEPS * B * G


@pytest.mark.parametrize("bad", ["x", "0,", "99999", ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))])
def test_driver_cpus_refuses_what_it_cannot_pin_and_says_why(bad):
    """Not ids, a CPU this process may not use, or every CPU (nothing left for Ray's node)."""
    out = subprocess.run([sys.executable, "bench/scale.py", "--driver-cpus", bad, "--output-dir", "/nonexistent"],
                         cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode != 0 and "--driver-cpus" in out.stderr, out.stderr[-500:]

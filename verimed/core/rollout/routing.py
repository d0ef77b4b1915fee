"""Engine routing by expected completion: pure functions behind ``verimed.actors.rollout.EngineRouter``.

Least-loaded routing by requests in flight gives every engine the same number of
requests; an engine five times slower then holds its share five times longer, so
its admission slots yield a fifth of the groups and the groups on it come back
old (the staleness bound drops and re-runs them). Routing by expected completion
instead weighs each engine's queue by how long its requests have been taking:

    cost_i = (inflight_i + 1) * L_i          L_i: EWMA of engine i's observed request latency
    pick   = argmin over live engines of cost_i   (ties: fewest in flight, unmeasured, lowest index)

("peak EWMA" load balancing). Two engines with latencies L and f·L then settle at
in-flight counts n and about (n + 1)/f - 1: a slow engine gets proportionally less
work, and a fast one is never starved while requests queue on a slow one. An engine
with no measurement yet takes the mean of the measured ones and wins ties, so it is
probed without being flooded (all equal before any completes: plain least-loaded,
the old behaviour); a hung engine's in-flight count still prices it out.
"""
from __future__ import annotations

from typing import Collection, Sequence

# Weight of the newest latency sample: about the last 1/ALPHA ≈ 5 requests dominate, so a
# slowdown (or a recovery) shows within a few completions.
LATENCY_EWMA_ALPHA = 0.2


def ewma(previous: float | None, sample: float, alpha: float = LATENCY_EWMA_ALPHA) -> float:
    """previous + alpha * (sample - previous); the sample itself when there is no previous value."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    return sample if previous is None else previous + alpha * (sample - previous)


def expected_costs(inflight: Sequence[int], latency_s: Sequence[float | None]) -> list[float]:
    """cost_i = (inflight_i + 1) * L_i, unmeasured L_i = mean of the measured ones (1.0 when none is)."""
    if len(inflight) != len(latency_s):
        raise ValueError(f"inflight ({len(inflight)}) and latency_s ({len(latency_s)}) must have one entry per engine")
    measured = [x for x in latency_s if x is not None]
    default = sum(measured) / len(measured) if measured else 1.0
    return [(n + 1) * (default if x is None else x) for n, x in zip(inflight, latency_s)]


def pick_engine(inflight: Sequence[int], latency_s: Sequence[float | None], skip: Collection[int] = ()) -> int:
    """The engine of least expected completion among those not in ``skip`` (all of them when every one is)."""
    if not inflight:
        raise ValueError("pick_engine: no engines")
    live = [i for i in range(len(inflight)) if i not in skip] or list(range(len(inflight)))
    costs = expected_costs(inflight, latency_s)
    # Ties: fewer in flight, then an unmeasured engine (so it gets measured), then the lower index.
    return min(live, key=lambda i: (costs[i], inflight[i], latency_s[i] is not None, i))

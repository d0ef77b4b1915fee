"""Engine routing by expected completion: pure functions behind ``verimed.actors.rollout.EngineRouter``.

Least-loaded routing by requests in flight gives every engine the same number of
requests; an engine five times slower then holds its share five times longer, so
its admission slots yield a fifth of the groups and the groups on it come back
old (the staleness bound drops and re-runs them). Routing by expected completion
instead weighs each engine's queue by how long its requests have been taking:

    cost_i = L_i * (1 + inflight_i / c)     L_i: EWMA of engine i's observed request latency
    pick   = argmin over live engines of cost_i   (ties: fewest in flight, unmeasured, lowest index)

``c`` is how many requests an engine serves at once. An engine that serves one at a
time (c = 1) queues the rest: cost (inflight + 1) * L, "peak EWMA" load balancing.
A continuous-batching engine (vLLM: ``max_num_seqs`` sequences, G per generate
request, so c = max_num_seqs // G) runs a new request beside those in flight, in
about L_i while it has room: its cost grows only by the share of its batch in use.
With c = 1, an engine five times slower still got a request whenever the fast ones
held four each; every such group held an admission slot five times longer and came
back past the staleness bound (bench/faults.py: 0.70 of the rate without it). With
the engines' real c it is used only when the fast ones are (c-)full.

An engine with no measurement yet takes the mean of the measured ones and wins ties,
so it is probed without being flooded (all equal before any completes: plain
least-loaded). A hung engine answers nothing, so its in-flight count grows and prices
it out once it holds more than the others. The caller forgets a measurement that is old
(``EngineRouter``): an engine that was slow once is probed again rather than avoided forever.
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


def expected_costs(inflight: Sequence[int], latency_s: Sequence[float | None], capacity: int = 1) -> list[float]:
    """cost_i = L_i * (1 + inflight_i / capacity), unmeasured L_i = mean of the measured ones (1.0 when none is)."""
    if len(inflight) != len(latency_s):
        raise ValueError(f"inflight ({len(inflight)}) and latency_s ({len(latency_s)}) must have one entry per engine")
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1 request, got {capacity}")
    measured = [x for x in latency_s if x is not None]
    default = sum(measured) / len(measured) if measured else 1.0
    return [(1 + n / capacity) * (default if x is None else x) for n, x in zip(inflight, latency_s)]


def pick_engine(inflight: Sequence[int], latency_s: Sequence[float | None], skip: Collection[int] = (),
                capacity: int = 1) -> int:
    """The engine of least expected completion among those not in ``skip`` (all of them when every one is);
    ``capacity``: requests an engine serves at once (c above)."""
    if not inflight:
        raise ValueError("pick_engine: no engines")
    live = [i for i in range(len(inflight)) if i not in skip] or list(range(len(inflight)))
    costs = expected_costs(inflight, latency_s, capacity)
    # Ties: fewer in flight, then an unmeasured engine (so it gets measured), then the lower index.
    return min(live, key=lambda i: (costs[i], inflight[i], latency_s[i] is not None, i))


def requests_at_once(max_num_seqs: int, samples_per_request: int) -> int:
    """c for ``generate``: an engine batching ``max_num_seqs`` sequences runs max_num_seqs // G
    requests of G samples at once (at least one)."""
    return max(1, max_num_seqs // max(1, samples_per_request))

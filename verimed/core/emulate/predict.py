"""What a run's ``metrics.jsonl`` says about its speed: summaries, overlap bound, and emulated-run predictions.

Pure functions over metrics rows (one dict per learner step), shared by ``bench/throughput.py`` and
``verimed plan CONFIG --simulate PROFILE`` (``verimed/cli/plan.py``). Measured over the steps after the
first ``warmup`` (model load, first batch with nothing to overlap):

- wall      W = Σ time/step_s (the learner's steps run back to back: the wall time of the measured steps);
- trained tokens/s = Σ throughput/train_tokens / W (response tokens with loss);
- generated tokens/s = Σ throughput/gen_tokens_per_s · time/step_s / W;
- trainer idle = Σ time/train_wait_s / W; rollout idle = Σ time/rollout_idle_ratio · time/step_s / W;
- component times of a synchronous run: T_gen = mean time/train_wait_s, T_train = mean step − T_gen;
  perfect overlap turns T_gen + T_train into max(T_gen, T_train): the ideal-overlap bound.

An emulated run waits modelled seconds / ``emulation.time_scale`` = X, so its predicted figures are
the wall ones converted back (:func:`to_predicted`): times × X, rates ÷ X.
"""
from __future__ import annotations

REQUIRED = ("time/step_s", "time/train_s", "time/sync_s", "time/train_wait_s", "time/rollout_idle_ratio",
            "throughput/gen_tokens_per_s", "throughput/train_tokens")
# Keys of a summary by unit: seconds scale with time_scale, per-second rates inversely, the rest not at all.
TIME_KEYS = ("wall_s", "step_s", "train_s", "sync_s", "train_wait_s", "other_s", "t_gen", "t_train",
             "reference_wait_s")
RATE_KEYS = ("train_tokens_per_s", "gen_tokens_per_s")


def _value(row: dict, key: str, default: float | None = None) -> float:
    value = row.get(key, default)
    if value is None:
        raise ValueError(f"metrics step {row.get('step', '?')}: {key} is missing or non-finite")
    return float(value)


def measured_rows(rows: list[dict], warmup: int) -> list[dict]:
    """The rows sorted by step with the first ``warmup`` left out; ValueError if none is left."""
    if warmup < 0:
        raise ValueError(f"warmup = {warmup}: must be >= 0")
    measured = sorted(rows, key=lambda r: r.get("step", 0))[warmup:]
    if not measured:
        raise ValueError(f"{len(rows)} steps logged and {warmup} skipped as warmup: nothing left to measure "
                         "(use more steps or a smaller warmup)")
    return measured


def summarise(rows: list[dict], warmup: int) -> dict[str, float]:
    """Throughput and idle figures of one run's metrics rows, warmup skipped (formulas: module docstring).

    ``t_gen`` / ``t_train`` are the component times (meaningful for a synchronous run); ``other_s`` is
    step − wait − train − sync − reference wait (batching, the parity check after the broadcast).
    """
    measured = measured_rows(rows, warmup)
    get = {k: [_value(r, k) for r in measured] for k in REQUIRED}
    ref_wait = [_value(r, "time/reference_wait_s", 0.0) for r in measured]
    step_s = get["time/step_s"]
    wall = sum(step_s)
    if wall <= 0:
        raise ValueError(f"measured steps took {wall} s in total: time/step_s must be positive")
    n = len(measured)
    mean_step, mean_train = wall / n, sum(get["time/train_s"]) / n
    wait = sum(get["time/train_wait_s"]) / n
    gen_tokens = sum(rate * s for rate, s in zip(get["throughput/gen_tokens_per_s"], step_s))
    return {
        "steps": float(n), "wall_s": wall,
        "train_tokens": sum(get["throughput/train_tokens"]), "gen_tokens": gen_tokens,
        "train_tokens_per_s": sum(get["throughput/train_tokens"]) / wall, "gen_tokens_per_s": gen_tokens / wall,
        "step_s": mean_step, "train_s": mean_train, "sync_s": sum(get["time/sync_s"]) / n,
        "train_wait_s": wait,
        "trainer_idle": sum(get["time/train_wait_s"]) / wall,
        "rollout_idle": sum(r * s for r, s in zip(get["time/rollout_idle_ratio"], step_s)) / wall,
        "other_s": mean_step - wait - mean_train - sum(get["time/sync_s"]) / n - sum(ref_wait) / n,
        "t_gen": wait, "t_train": max(0.0, mean_step - wait),
        "reference_wait_s": sum(ref_wait) / n,
        "reference_wait_ratio": (sum(ref_wait) / n) / mean_train if mean_train > 0 else 0.0,
    }


def to_predicted(summary: dict[str, float], time_scale: float) -> dict[str, float]:
    """A summary of an emulated run converted to predicted (modelled) units: every time in TIME_KEYS × X,
    every rate in RATE_KEYS ÷ X (X = emulation.time_scale); ratios, counts and token totals unchanged."""
    if not time_scale > 0:
        raise ValueError(f"time_scale must be > 0, got {time_scale}")
    out = dict(summary)
    for key in TIME_KEYS:
        if key in out:
            out[key] = out[key] * time_scale
    for key in RATE_KEYS:
        if key in out:
            out[key] = out[key] / time_scale
    return out


def overlap_bound(t_gen: float, t_train: float) -> float:
    """Ideal speedup of perfect overlap: (T_gen + T_train) / max(T_gen, T_train), in [1, 2]."""
    if t_gen < 0 or t_train < 0:
        raise ValueError(f"component times must be >= 0, got T_gen={t_gen}, T_train={t_train}")
    if max(t_gen, t_train) == 0:
        raise ValueError("T_gen and T_train are both 0: no step time to overlap")
    return (t_gen + t_train) / max(t_gen, t_train)


def compare(sync: dict[str, float], run: dict[str, float]) -> dict[str, float]:
    """Speedup of ``run`` over the sync baseline (trained tokens/s), the sync run's overlap bound and
    efficiency = speedup / bound."""
    bound = overlap_bound(sync["t_gen"], sync["t_train"])
    speedup = run["train_tokens_per_s"] / sync["train_tokens_per_s"] if sync["train_tokens_per_s"] > 0 else 0.0
    return {"speedup": speedup, "step_speedup": sync["step_s"] / run["step_s"], "bound": bound,
            "efficiency": speedup / bound}


def staleness_histogram(rows: list[dict], warmup: int) -> dict[int, float]:
    """Fraction of the trained tokens per staleness k over the measured steps:
    h_k = Σ_steps staleness/hist_k / Σ_steps Σ_j staleness/hist_j (empty when no step logs a histogram)."""
    counts: dict[int, float] = {}
    for row in measured_rows(rows, warmup):
        for key, value in row.items():
            if key.startswith("staleness/hist_") and value is not None:
                k = int(key.rsplit("_", 1)[1])
                counts[k] = counts.get(k, 0.0) + float(value)
    total = sum(counts.values())
    return {k: counts[k] / total for k in sorted(counts)} if total > 0 else {}


def modelled_learner_share(rows: list[dict], warmup: int, time_scale: float) -> float | None:
    """Share of the learner phase's wall time that the emulated learner spent waiting modelled time:

        Σ (train/modelled_seconds + sync/modelled_seconds) / X  /  Σ (time/train_s + time/sync_s)

    Near 1: the phase is the modelled wait; well below 1: this machine's CPU (controller, Ray calls,
    batching) stretched it. None when the rows carry no modelled seconds (a real run)."""
    modelled = wall = 0.0
    for row in measured_rows(rows, warmup):
        if row.get("train/modelled_seconds") is None:
            return None
        modelled += (_value(row, "train/modelled_seconds") + _value(row, "sync/modelled_seconds", 0.0)) / time_scale
        wall += _value(row, "time/train_s") + _value(row, "time/sync_s")
    return modelled / wall if wall > 0 else None


def cpu_bound_warning(cpu_busy: float | None, learner_share: float | None, cores: int,
                      busy_limit: float = 0.5, share_limit: float = 0.7) -> str | None:
    """One warning line when the emulated run's wall time was dominated by this machine's CPU rather
    than by modelled waits: the run's processes kept more than ``busy_limit`` of the ``cores`` busy over
    the measured steps, or the learner phase waited modelled time for less than ``share_limit`` of its
    wall time. The predicted times then overstate the modelled cluster (CPU seconds × time_scale)."""
    reasons = []
    if cpu_busy is not None and cpu_busy > busy_limit:
        reasons.append(f"the run's processes kept {cpu_busy:.0%} of this machine's {cores} cores busy")
    if learner_share is not None and learner_share < share_limit:
        reasons.append(f"the learner phase waited modelled time for only {learner_share:.0%} of its wall time")
    if not reasons:
        return None
    return ("WARNING: CPU-bound: " + " and ".join(reasons) + "; predicted times include this machine's CPU work "
            "× time_scale (upper bounds): lower emulation.time_scale or run on a quieter/bigger machine")


def format_prediction(predicted: dict[str, float], histogram: dict[int, float], time_scale: float,
                      warning: str | None = None) -> str:
    """The ``verimed plan --simulate`` report: predicted step time, rates, idle ratios, time breakdown,
    staleness histogram (all in modelled units), and the CPU-bound warning if any."""
    p = predicted
    hist = ", ".join(f"{k}: {v:.0%}" for k, v in histogram.items()) or "none logged"
    lines = [(f"predicted step time     {p['step_s']:.2f} s  (over {p['steps']:.0f} measured steps, wall × time_scale "
             f"{time_scale:g})"),
             f"trained tokens/s        {p['train_tokens_per_s']:.1f}",
             f"generated tokens/s      {p['gen_tokens_per_s']:.1f}",
             f"trainer idle            {p['trainer_idle']:.0%}",
             f"rollout idle            {p['rollout_idle']:.0%}",
             (f"step breakdown (s)      wait {p['train_wait_s']:.2f}, train {p['train_s']:.2f}, sync {p['sync_s']:.2f}, "
             f"reference wait {p['reference_wait_s']:.2f}, other {p['other_s']:.2f}"),
             f"staleness histogram     {hist}  (fraction of trained tokens per staleness)"]
    if warning:
        lines.append(warning)
    return "\n".join(lines) + "\n"

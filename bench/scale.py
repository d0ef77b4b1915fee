"""Scale: the real controller driving many emulated engines with thousands of groups in flight (issue #17.1).

    .venv/bin/python bench/scale.py                                   # the issue's workload (below)
    .venv/bin/python bench/scale.py --engines 16 --prompts-per-step 128 --max-staleness 7 --steps 8 --warmup 2
    .venv/bin/python bench/scale.py --engines 8 --prompts-per-step 32 --group-size 4 --steps 3 --warmup 1 \
        --profile cprofile                                            # + cProfile of the driver after warm-up

Defaults are the issue's workload: 64 engines, B = 512 prompts x G = 16 samples = 8192 samples per
step, max_staleness S = 7 so (S + 1)·B = 4096 groups may be admitted at once, 50 steps. The
controller runs IN this process (``verimed.actors.controller.Controller``, unchanged but for a
hook after each step), so it can be sampled; engines and the learner are emulated Ray actors
(``--emulate`` profile, ``emulation.time_scale``) on a local Ray node started here with its own
``--temp-dir`` and stopped at the end.

Stage: one ``rule`` stage on the cases (diagnosis vignette -> G replies -> exact-match answer
checker). Its reward is a regex over each reply run in the controller process: no verifier actor
and no extra Ray hop per sample, so what is measured is the controller's own work (routing,
admission, buffer, ledger, batching, sync), not a judge's. (``--stage-kind rubric`` runs HealthBench
prompts with the rules judge instead: one verifier call per group.)

Measured (formulas in ``bench/scale_stats.py``), after the first ``--warmup`` steps:

- controller CPU per sample = driver process CPU time (user + system, every thread: the event
  loop and Ray's core-worker threads) / samples consumed;
- event-loop lag p50 / p99: a timer task sleeps 10 ms and records how late it woke; and the part
  of each lag the loop thread spent on CPU (``time.thread_time`` over the interval, capped at the
  lag): on a shared 2-core box the rest is the OS running other processes, not the controller;
- driver RSS and Ray object-store bytes in use, sampled every second; RSS flat = the peak RSS of
  every measured step within ±10% of the first measured step's peak. A step's peak is the kernel's
  high-water mark (VmHWM, reset at every step end): RSS is a sawtooth within a step (the batch is
  packed, sent, freed), and a 1 s sample catches its tooth only sometimes (fallback where
  /proc/self/clear_refs is not writable);
- weight-sync fan-out = the ``sync/seconds`` metric of each step: the wall time of the learner
  broadcast and every engine's ``update_weights`` (each engine pauses its batch first), concurrently;
  the parity check after it is not included. Before 2026-11-30 (eleventh session) the learner's
  own send time overwrote it, so earlier RESULTS rows report the send alone;
- peak groups in flight (``admission.in_flight``, sampled by the timer), and peak pending
  (in flight + buffered, the quantity admission bounds by (S + 1)·B); after warm-up, at every timer
  tick, the median generating and the min / median pending;
- garbage-collector pauses after warm-up: every full collection, and the others of >= 1 ms.

``--driver-cpus 0`` gives this process a CPU of its own and Ray's node (engines, learners, GCS,
raylet) the others: the shape of a cluster, whose driver runs on a head node the engines do not
share. Without it every process shares every core, and on a 2-core box the wall-clock lag is
mostly the OS running the ~75 other busy processes (the loop's own-CPU part says how much).

Writes ``summary.json`` and ``series.json`` under ``--output-dir``; prints a table.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from array import array
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's verimed, not the venv's install
import scale_stats as stats
from machine_info import cpu_model

ROOT = Path(__file__).resolve().parents[1]
LAG_TIMER_S = 0.010
RESOURCE_EVERY_S = 1.0
GC_PAUSE_KEPT_S = 0.001


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", type=int, default=64, help="emulated rollout engines (placement.rollout.replicas)")
    p.add_argument("--learners", type=int, default=8,
                   help="emulated learner ranks (placement.learner.replicas): with one, 64 engines outrun it and "
                        "finished groups wait in the buffer instead of generating")
    p.add_argument("--prompts-per-step", type=int, default=512, help="B groups per learner step")
    p.add_argument("--group-size", type=int, default=16, help="G samples per group")
    p.add_argument("--max-staleness", type=int, default=7, help="S: (S+1)·B groups may be admitted at once")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of CPU, lag and RSS figures")
    p.add_argument("--max-tokens", type=int, default=64, help="rollout.max_tokens (tokens per reply, at most)")
    p.add_argument("--emulate", default="h100-qwen2.5-7b", help="device profile of engines and learner")
    p.add_argument("--time-scale", type=float, default=100.0, help="emulation.time_scale: modelled waits / X")
    p.add_argument("--engine-slowdown", type=float, default=1.0,
                   help="every engine's compute x this (emulation.engine_slowdown on all of them): > 1 makes "
                        "generation, not the learner, the bottleneck, so the window's groups generate at once "
                        "instead of waiting, finished, for the learner")
    p.add_argument("--stage-kind", choices=("rule", "rubric"), default="rule")
    p.add_argument("--profile", choices=("none", "cprofile"), default="none",
                   help="cprofile: profile the driver's event loop from the end of warm-up (adds CPU: the "
                        "CPU figure of a profiled run is not the one to report)")
    p.add_argument("--loop-nice", type=int, default=0,
                   help="nice value of the driver's event-loop thread (and the worker threads it starts), set "
                        "after Ray is up: on a box whose few cores also run every engine, a negative value "
                        "stands in for the core of its own a cluster's driver has (Linux: per thread; < 0 needs root)")
    p.add_argument("--driver-cpus", default="",
                   help="CPU ids (comma list) for this driver process alone; Ray's node, the engines and the learners "
                        "get the others (Linux affinity, inherited by every process Ray starts). On a box whose few "
                        "cores also run every engine, this stands in for the head node a cluster's driver runs on; "
                        "empty: every process shares every core")
    p.add_argument("--output-dir", type=Path, default=None, help="default: runs/scale/<UTC time>")
    p.add_argument("--override", nargs="*", default=[], help="more dotted config overrides")
    args = p.parse_args(argv)
    for name in ("engines", "learners", "prompts_per_step", "group_size", "steps", "max_tokens"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.engine_slowdown <= 0:
        raise SystemExit(f"--engine-slowdown must be > 0, got {args.engine_slowdown}")
    if args.max_staleness < 0:
        raise SystemExit(f"--max-staleness must be >= 0, got {args.max_staleness}")
    args.driver_cpus = parse_cpus(args.driver_cpus)
    if not 1 <= args.warmup < args.steps:
        # at least one: the first step holds the actors' start-up and a batch with nothing to overlap
        raise SystemExit(f"--warmup must be in [1, --steps), got {args.warmup} with --steps {args.steps}")
    return args


def parse_cpus(text: str) -> set[int]:
    """``"0"`` / ``"0,1"`` -> CPU ids this process may run on, leaving at least one for the rest; ``""`` -> none."""
    if not text.strip():
        return set()
    try:
        cpus = {int(x) for x in text.split(",")}
    except ValueError:
        raise SystemExit(f"--driver-cpus: expected comma-separated CPU ids like 0 or 0,1, got {text!r}") from None
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed or not allowed - cpus:
        raise SystemExit(f"--driver-cpus {text}: must be a subset of this process's CPUs {sorted(allowed)} "
                         "that leaves at least one for Ray's node")
    return cpus


def pin_driver(driver_cpus: set[int], rest_cpus: set[int]) -> dict[str, list[int]]:
    """After ``ray.init`` under the rest's affinity: every thread of this process onto ``driver_cpus``.

    ``sched_setaffinity`` with a thread id moves that thread alone, so each of /proc/self/task is
    moved (Ray's core-worker threads started by ``ray.init`` too); threads started later inherit the
    main thread's set.
    """
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), driver_cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass
    return {"driver": sorted(driver_cpus), "rest": sorted(rest_cpus)}


def overrides(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The config overrides of the bench's run (the workload in dotted form)."""
    data = "{cases: 1.0}" if args.stage_kind == "rule" else "{healthbench: 1.0}"
    return [
        "rollout.backend=emulated", "trainer.backend=emulated", f"emulation.profile={args.emulate}",
        f"emulation.time_scale={args.time_scale}",
        f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}", f"run.steps={args.steps}",
        f"rollout.prompts_per_step={args.prompts_per_step}", f"rollout.group_size={args.group_size}",
        f"rollout.max_tokens={args.max_tokens}", f"async.max_staleness={args.max_staleness}",
        f"stages=[{{name: {args.stage_kind}, kind: {args.stage_kind}, steps: {args.steps}, data: {data}}}]",
        # Logical GPUs, one per engine and per learner rank; no CPU reservations (2 real cores here).
        f"placement.rollout.replicas={args.engines}", "placement.rollout.gpus_per_replica=1",
        "placement.rollout.cpus_per_replica=0", f"placement.learner.replicas={args.learners}",
        "placement.learner.gpus_per_replica=1", "placement.learner.cpus_per_replica=0",
        "stage_eval.healthbench=0", "stage_eval.consultations=0", "metrics.wandb=disabled",
        "metrics.console=false", "grpo.dynamic_sampling=false",
        "model.max_model_len=4096",  # emulated: no KV cache; no vignette is skipped as too long
        *([f"emulation.engine_slowdown={{{', '.join(f'{i}: {args.engine_slowdown}' for i in range(args.engines))}}}"]
          if args.engine_slowdown != 1.0 else []),
        *args.override,
    ]


class Probe:
    """Samples the controller from inside its event loop: lag, in-flight peak, RSS, object store, per-step CPU."""

    def __init__(self, ctl, warmup: int, profiler=None):
        self.ctl, self.warmup, self.profiler = ctl, warmup, profiler
        self.t0 = time.perf_counter()
        self.process = psutil.Process()
        self.lags: list[tuple[float, float]] = []  # (t, overshoot s)
        self.busy_lags: list[tuple[float, float]] = []  # (t, min(overshoot, loop-thread CPU s in the interval))
        self.resources: list[tuple[float, int, int]] = []  # (t, driver RSS bytes, object store bytes used)
        self.steps: list[dict[str, float]] = []
        self.peak_in_flight = self.peak_pending = 0
        self.peak_in_flight_after_warmup = 0
        # At every timer tick after warm-up: groups generating and groups admitted but not trained
        # (compact arrays: a Python tuple per tick would add to the RSS this probe measures).
        self.occupancy_t, self.occupancy_in_flight, self.occupancy_pending = array("d"), array("i"), array("i")
        self.warm_t: float | None = None
        self.tracked_at_end: dict[str, int] = {}  # GC-tracked objects by type after the last step
        # (t, generation, s) of every full collection and every other one of >= 1 ms, any thread (the
        # ~100k short young-generation ones of a run would swell the RSS this probe measures)
        self.gc_pauses: list[tuple[float, int, float]] = []
        self._gc_start = 0.0
        gc.callbacks.append(self._gc_event)

    def _gc_event(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
            return
        pause = time.perf_counter() - self._gc_start
        if info["generation"] == 2 or pause >= GC_PAUSE_KEPT_S:
            self.gc_pauses.append((self.now(), info["generation"], pause))

    def close(self) -> None:
        gc.callbacks.remove(self._gc_event)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def lag_loop(self) -> None:
        while True:
            asked, cpu0 = time.perf_counter() + LAG_TIMER_S, time.thread_time()
            await asyncio.sleep(LAG_TIMER_S)
            lag = max(0.0, time.perf_counter() - asked)
            # The loop thread's CPU time over the interval bounds the part of the lag the loop's own
            # work caused; the rest is the OS running other processes (2 cores, 60+ processes).
            self.lags.append((self.now(), lag))
            self.busy_lags.append((self.now(), min(lag, time.thread_time() - cpu0)))
            self.admission_changed()  # also buffered -> consumed, which calls no hook
            if self.warm_t is not None:
                adm = self.ctl.admission
                self.occupancy_t.append(self.now())
                self.occupancy_in_flight.append(adm.in_flight)
                self.occupancy_pending.append(adm.pending)

    async def resource_loop(self) -> None:
        import ray
        from ray._private.internal_api import (
            get_memory_info_reply,
            get_state_from_address,
        )

        state = get_state_from_address(ray.get_runtime_context().gcs_address)

        def store_bytes() -> int:
            return int(get_memory_info_reply(state).store_stats.object_store_bytes_used)

        while True:
            used = await asyncio.to_thread(store_bytes)
            self.resources.append((self.now(), self.process.memory_info().rss, used))
            await asyncio.sleep(RESOURCE_EVERY_S)

    def admission_changed(self) -> None:
        """After every group start or finish: exact peaks (the 10 ms timer alone could miss one)."""
        adm = self.ctl.admission
        self.peak_in_flight = max(self.peak_in_flight, adm.in_flight)
        self.peak_pending = max(self.peak_pending, adm.pending)
        if self.warm_t is not None:
            self.peak_in_flight_after_warmup = max(self.peak_in_flight_after_warmup, adm.in_flight)

    def step_done(self, metrics: dict[str, float]) -> None:
        cpu = self.process.cpu_times()
        self.steps.append({"step": float(self.ctl.version), "t": self.now(), "cpu_s": cpu.user + cpu.system,
                           "consumed": float(len(self.ctl.ledger)), "sync_s": metrics.get("sync/seconds", float("nan")),
                           "step_s": metrics["time/step_s"], "train_wait_s": metrics["time/train_wait_s"],
                           # .get: older commits (a baseline) have no pack time
                           "pack_s": metrics.get("time/pack_s", float("nan")), "train_s": metrics["time/train_s"],
                           "in_flight": float(self.ctl.admission.in_flight), "buffered": float(len(self.ctl.buffer))})
        self.steps[-1]["rss_peak"] = step_peak_rss()
        # RSS at every step end too (a short run may have no periodic sample after warm-up)
        last_store = self.resources[-1][2] if self.resources else 0
        self.resources.append((self.now(), self.process.memory_info().rss, last_store))
        if self.ctl.version == self.warmup:
            self.warm_t = self.now()
            if self.profiler is not None:
                self.profiler.enable()
        if self.ctl.version == self.ctl.cfg.run.steps:  # after the last measured sample: what a full collection walks
            self.tracked_at_end = tracked_census()


def step_peak_rss() -> float | None:
    """This process's peak RSS in bytes since the last call (Linux: VmHWM, then reset through
    /proc/self/clear_refs), so a step's short-lived batch arrays count however briefly they lived;
    None where that is not available (the 1 s samples are used then)."""
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except (OSError, StopIteration):
        return None
    return float(kib * 1024)


def tracked_census(top: int = 8) -> dict[str, int]:
    """Objects the garbage collector tracks (the frozen ones not included), the ``top`` types by count."""
    counts: dict[str, int] = {}
    for obj in gc.get_objects():
        name = type(obj).__qualname__
        counts[name] = counts.get(name, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    return {"total": sum(counts.values()), **dict(ranked[:top])}


def make_controller_class():
    from verimed.actors.controller import Controller

    class ProbedController(Controller):
        """The real controller; ``step`` reports to the probe after each learner step."""

        probe: Probe

        async def step(self):
            metrics = await super().step()
            self.probe.step_done(metrics)
            return metrics

        def _track_idle(self) -> None:  # called after every group start and every group end
            super()._track_idle()
            self.probe.admission_changed()

    return ProbedController


async def run_probed(cfg, run_dir: Path, model_path: str, warmup: int, profiler) -> tuple[Probe, dict]:
    ctl = make_controller_class()(cfg, run_dir, model_path)
    probe = ctl.probe = Probe(ctl, warmup, profiler)
    tasks = [asyncio.create_task(probe.lag_loop()), asyncio.create_task(probe.resource_loop())]
    try:
        await ctl.run()
    finally:
        if profiler is not None:
            profiler.disable()
        for t in tasks:
            t.cancel()
        probe.close()
    mem = await asyncio.gather(*[e.memory.remote() for e in ctl.engines])
    engines = {"engine_rss_bytes_sum": sum(m["rss_bytes"] for m in mem), "engine_rss_bytes_max": max(m["rss_bytes"] for m in mem)}
    return probe, engines


def summarise(probe: Probe, args: argparse.Namespace) -> dict:
    """The bench's figures after warm-up (see the module docstring)."""
    warm, end = probe.steps[args.warmup - 1], probe.steps[-1]
    # From the end of warm-up to the end of the last step: the final checkpoint and export after it
    # (thousands of buffered groups written out once) are not the steady state.
    lags = [lag for t, lag in probe.lags if warm["t"] <= t <= end["t"]]
    window = [(t, r, s) for t, r, s in probe.resources if t <= end["t"]]
    rss = stats.after([t for t, _, _ in window], [r for _, r, _ in window], warm["t"])
    store = stats.after([t for t, _, _ in window], [s for _, _, s in window], warm["t"])
    syncs = [s["sync_s"] for s in probe.steps[args.warmup:] if s["sync_s"] == s["sync_s"]]  # NaN: a sync skipped
    measured = probe.steps[args.warmup:]
    out = {
        "steps_measured": len(measured), "samples_measured": int(end["consumed"] - warm["consumed"]),
        "cpu_ms_per_sample": stats.cpu_ms_per_sample(warm["cpu_s"], end["cpu_s"], int(end["consumed"] - warm["consumed"])),
        "wall_s_measured": end["t"] - warm["t"],
        "samples_per_s": (end["consumed"] - warm["consumed"]) / max(end["t"] - warm["t"], 1e-9),
        **stats.lag_summary(lags),
        **{f"busy_{k}": v for k, v in stats.lag_summary(
            [lag for t, lag in probe.busy_lags if warm["t"] <= t <= end["t"]]).items()},
        "rss_reference_bytes": 0.0, "rss_max_deviation": float("nan"), "rss_flat": 0.0,
        "object_store_max_bytes": float(max(store, default=0)),
        "sync_p50_s": stats.percentile(syncs, 50) if syncs else float("nan"), "sync_max_s": max(syncs, default=float("nan")),
        "syncs_measured": len(syncs),
        "peak_in_flight": float(probe.peak_in_flight), "peak_pending": float(probe.peak_pending),
        "peak_in_flight_after_warmup": float(probe.peak_in_flight_after_warmup),
        **occupancy_summary(probe, warm["t"], end["t"]),
        "admission_window": float((args.max_staleness + 1) * args.prompts_per_step),
        **gc_summary([(g, d) for t, g, d in probe.gc_pauses if warm["t"] <= t <= end["t"]]),
        "gc_tracked_at_end": probe.tracked_at_end,
        "step_s_mean": sum(s["step_s"] for s in measured) / len(measured),
        "train_wait_s_mean": sum(s["train_wait_s"] for s in measured) / len(measured),
        # NaN: a skipped sync, or a commit without the figure (a baseline)
        **{f"{k}_mean": float(np.nanmean([s.get(k, np.nan) for s in measured])) for k in ("pack_s", "train_s", "sync_s")},
    }
    exact = [st.get("rss_peak") for st in measured]
    if exact and None not in exact:  # the kernel's high-water mark of each step: no transient missed
        peaks, method = [float(x) for x in exact], "VmHWM, reset at every step end"
    else:  # the 1 s samples: a transient between two samples is missed
        ends = [st["t"] for st in probe.steps[args.warmup - 1:]]
        peaks, method = stats.step_peaks([t for t, _, _ in window], [r for _, r, _ in window], ends), "1 s samples"
    out.update(rss_step_peaks_bytes=peaks, rss_peak_method=method, rss_samples_min_bytes=float(min(rss, default=0)),
               rss_samples_max_bytes=float(max(rss, default=0)))
    if peaks:
        flat = stats.flatness(peaks)
        out.update(rss_reference_bytes=flat["reference"], rss_max_bytes=flat["max"], rss_min_bytes=flat["min"],
                   rss_max_deviation=flat["max_deviation"], rss_flat=flat["flat"])
    out["verdicts"] = stats.verdicts(out)
    return out


def occupancy_summary(probe: Probe, t0: float, t1: float) -> dict[str, float]:
    """Timer-tick samples between warm-up's end and the last step's: groups generating (in flight)
    and admitted but not yet trained (pending = in flight + finished, waiting in the buffer)."""
    keep = [i for i, t in enumerate(probe.occupancy_t) if t0 <= t <= t1]
    in_flight = [probe.occupancy_in_flight[i] for i in keep] or [0]
    pending = [probe.occupancy_pending[i] for i in keep] or [0]
    return {"in_flight_p50_after_warmup": stats.percentile(in_flight, 50),
            "pending_min_after_warmup": float(min(pending)), "pending_p50_after_warmup": stats.percentile(pending, 50)}


def gc_summary(pauses: list[tuple[int, float]]) -> dict[str, float]:
    """Garbage-collector pauses after warm-up (every full collection, the others of >= 1 ms): a full,
    generation-2 collection walks every tracked object of the heap, and with thousands of groups
    buffered it stalls whichever thread triggered it, often the event loop."""
    full = [d for g, d in pauses if g == 2]
    return {"gc_full_count": float(len(full)), "gc_full_max_ms": 1e3 * max(full, default=0.0),
            "gc_pauses_1ms_count": float(len(pauses)), "gc_pauses_total_s": sum(d for _, d in pauses)}


def ledger_summary(run_dir: Path, steps: int, samples_per_step: int) -> dict:
    """Exactly-once over ``ledger.jsonl``: every consumed uid once, B·G per step, one line per step."""
    lines = [json.loads(x) for x in (run_dir / "ledger.jsonl").read_text().splitlines() if x.strip()]
    lines = [line for line in lines if "step" in line]  # not the {"checkpoint": k, "dropped": ...} lines
    uids = [u for line in lines for u in line["consumed"]]
    out = {"ledger_lines": len(lines), "ledger_consumed": len(uids), "ledger_unique": len(set(uids)),
           "ledger_ok": len(uids) == len(set(uids)) == steps * samples_per_step and len(lines) == steps}
    try:  # the shared checker (verimed/core/train/ledger_check.py), once it is on this branch
        from verimed.core.train.ledger_check import check_exactly_once
    except ImportError:
        return out
    report = check_exactly_once(run_dir)
    out.update(ledger_check_ok=report.ok, ledger_check_problems=report.problems[:10])
    return out


def format_table(s: dict) -> str:
    mib = 1024 * 1024
    rows = [("controller CPU / sample", f"{s['cpu_ms_per_sample']:.3f} ms"),
            ("event-loop lag p50 / p99 / max", f"{s['lag_p50_ms']:.1f} / {s['lag_p99_ms']:.1f} / {s['lag_max_ms']:.1f} ms"),
            ("  of it the loop thread's own CPU, p50 / p99 / max", f"{s['busy_lag_p50_ms']:.1f} / {s['busy_lag_p99_ms']:.1f} / {s['busy_lag_max_ms']:.1f} ms"),
            ("driver RSS, step peaks after warm-up, min..max", (f"{s.get('rss_min_bytes', 0) / mib:.0f}..{s.get('rss_max_bytes', 0) / mib:.0f} MiB "
                                                   f"(max dev {s['rss_max_deviation']:.1%} of {s['rss_reference_bytes'] / mib:.0f} MiB)")),
            ("GC: full collections, longest / pauses >= 1 ms, their total", (f"{s['gc_full_count']:.0f}, "
             f"{s['gc_full_max_ms']:.0f} ms / {s['gc_pauses_1ms_count']:.0f}, {s['gc_pauses_total_s']:.1f} s")),
            ("object store in use, max", f"{s['object_store_max_bytes'] / mib:.1f} MiB"),
            ("weight-sync fan-out p50 / max", f"{s['sync_p50_s']:.3f} / {s['sync_max_s']:.3f} s"),
            ("peak in flight (after warm-up) / pending / window", (f"{s['peak_in_flight']:.0f} "
             f"({s['peak_in_flight_after_warmup']:.0f}) / {s['peak_pending']:.0f} / {s['admission_window']:.0f}")),
            ("after warm-up: generating p50 / admitted, not trained: min, p50", (f"{s['in_flight_p50_after_warmup']:.0f} / "
             f"{s['pending_min_after_warmup']:.0f}, {s['pending_p50_after_warmup']:.0f}")),
            ("samples measured, samples/s", f"{s['samples_measured']}, {s['samples_per_s']:.0f}"),
            ("step s (mean): wait for a batch, pack, train, sync", (f"{s['step_s_mean']:.2f}: {s['train_wait_s_mean']:.2f}, "
             f"{s['pack_s_mean']:.2f}, {s['train_s_mean']:.2f}, {s['sync_s_mean']:.2f}")),
            *[(k, "PASS" if v else "FAIL") for k, v in s["verdicts"].items()]]
    return "\n".join(["| figure | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]) + "\n"


def start_ray(cfg, temp_dir: str) -> None:
    """A local Ray node of this bench alone (own temp dir), with the plan's logical GPUs."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from verimed.cli.train import planned_resources

    cpus, gpus = planned_resources(cfg)
    ray.init(num_cpus=max(4.0, cpus), num_gpus=gpus, include_dashboard=False, _temp_dir=temp_dir,
             object_store_memory=2 * 1024**3, log_to_driver=False, logging_level=logging.WARNING,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out_dir = (args.output_dir or ROOT / "runs" / "scale" / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")).resolve()
    run_dir = out_dir / "run"
    import uvloop

    from verimed.cli.train import resolve_policy_path
    from verimed.core.config import load_config

    cfg = load_config(None, overrides(args, run_dir))
    model_path = resolve_policy_path(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    temp_dir = tempfile.mkdtemp(prefix="ray-scale-", dir="/tmp")
    profiler = None
    if args.profile == "cprofile":
        import cProfile

        profiler = cProfile.Profile()
    rest_cpus = os.sched_getaffinity(0) - args.driver_cpus
    if args.driver_cpus:
        # Before ray.init: GCS, raylet and every worker the raylet forks inherit the rest's CPUs.
        os.sched_setaffinity(0, rest_cpus)
    start_ray(cfg, temp_dir)
    import ray

    pinned = pin_driver(args.driver_cpus, rest_cpus) if args.driver_cpus else {}

    if args.loop_nice:
        # After ray.init: Ray's own processes and the driver's Ray threads keep their priority; the
        # engines and learners Ray starts later fork from the raylet, not from this thread.
        os.setpriority(os.PRIO_PROCESS, 0, args.loop_nice)

    wall0 = time.perf_counter()
    try:
        probe, engines = uvloop.run(run_probed(cfg, run_dir, model_path, args.warmup, profiler))
    finally:
        ray.shutdown()
    summary = {"command": "python bench/scale.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
               "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": cpu_model(),
               "cores": os.cpu_count(), "cpu_affinity": pinned, "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
               "load_before": load_before, "load_after": os.getloadavg(), "wall_s_total": time.perf_counter() - wall0,
               "samples_per_step": args.prompts_per_step * args.group_size, **vars(args) | {"output_dir": str(out_dir), "driver_cpus": sorted(args.driver_cpus)},
               **summarise(probe, args), **engines, **ledger_summary(run_dir, args.steps, args.prompts_per_step * args.group_size)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    (out_dir / "series.json").write_text(json.dumps({"lags": probe.lags, "busy_lags": probe.busy_lags, "gc_pauses": probe.gc_pauses,
                                                      "resources": probe.resources, "steps": probe.steps}))
    if profiler is not None:
        profiler.dump_stats(out_dir / "driver.prof")
    print(format_table(summary))
    print(json.dumps({k: v for k, v in summary.items() if not isinstance(v, list) or len(v) < 5}, default=str))
    return 0 if summary["ledger_ok"] and summary.get("ledger_check_ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())

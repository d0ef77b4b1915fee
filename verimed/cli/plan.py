"""``verimed plan CONFIG [--cluster-resources SPEC]``: print the resolved placement plan and check it fits.

    verimed plan configs/cluster/m2-32b-8x8.yaml --cluster-resources 8x8gpu,cpus_per_node=96
    verimed plan configs/default.yaml --simulate cpu-smollm2 --steps 6
    verimed plan configs/cluster/m2-32b-8x8.yaml --simulate h100-qwen2.5-32b --time-scale 5 run.ray_address=null

``--simulate PROFILE`` predicts instead of placing: it trains ``--steps`` steps on emulated devices
(``verimed train CONFIG --emulate PROFILE``, a subprocess with its own local Ray node unless the
config joins a cluster) under ``runs/plan-simulate/`` (W&B off, checkpoints deleted), then prints the
predicted step time, tokens/s, idle ratios, step breakdown and staleness histogram in modelled
seconds (``verimed/core/emulate/predict.py``), and a warning when this machine's CPU, not the
modelled waits, set the pace (CPU seconds of the run's processes over the measured steps).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from verimed.core.cluster.planner import (
    ClusterResources,
    PlacementError,
    format_plan,
    plan,
)
from verimed.core.config import ConfigError, load_config, reference_needed


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``verimed plan CONFIG [--cluster-resources SPEC] [section.key=value ...]``."""
    parser.add_argument("config", help="run config YAML (its placement: section is planned)")
    parser.add_argument(
        "--cluster-resources", metavar="SPEC", default=None,
        help="plan for a cluster you are not on: '8x8gpu', 'nodes=8,gpus_per_node=8,cpus_per_node=96' or a "
             "JSON file; default: the Ray cluster at run.ray_address, else this machine",
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. placement.rollout.replicas=2")
    parser.add_argument("--simulate", metavar="PROFILE", default=None,
                        help="predict speed: train --steps steps on devices emulated with this profile and report")
    parser.add_argument("--steps", type=int, default=6, help="--simulate: learner steps to run (default 6)")
    parser.add_argument("--warmup", type=int, default=2, help="--simulate: first steps left out (default 2)")
    parser.add_argument("--time-scale", type=float, default=None, metavar="X",
                        help="--simulate: emulation.time_scale (waits / X, reported x X); default the config's")
    parser.add_argument("--output-dir", default="runs/plan-simulate", help="--simulate: where the run directory goes")


def run_plan(args: argparse.Namespace, cluster_from_ray=None) -> int:
    """Print the resolved plan; 0 if it fits, 1 (with the reason on stderr) if not. With ``--simulate``:
    :func:`run_simulate`."""
    if getattr(args, "simulate", None):
        return run_simulate(args)
    try:
        cfg = load_config(args.config, args.overrides)
        placement = cfg.placement
        cluster = ClusterResources.parse(args.cluster_resources) if args.cluster_resources else local_cluster(cfg, cluster_from_ray)
        result = plan(placement, kl_enabled=reference_needed(cfg), cluster=cluster)
    except (ConfigError, PlacementError, ValueError) as exc:
        print(f"verimed plan: {exc}", file=sys.stderr)
        return 1
    print(format_plan(result))
    return 0


def local_cluster(cfg, cluster_from_ray=None) -> ClusterResources:
    """Resources of the cluster a run of ``cfg`` would use, without starting one.

    run.ray_address set: ask that Ray cluster (imports ray). Otherwise this machine:
    run.ray_num_cpus or os.cpu_count() CPUs, and the NVIDIA GPUs the driver lists
    (narrowed by CUDA_VISIBLE_DEVICES), read from /proc without importing torch.
    """
    if cfg.run.ray_address:
        if cluster_from_ray is None:
            raise PlacementError("run.ray_address is set: pass --cluster-resources, or plan through `verimed plan`")
        # Injected by the CLI (verimed.actors.placement.cluster_resources_from_ray): core never imports Ray.
        return cluster_from_ray(cfg.run.ray_address)
    gpu_dir = Path("/proc/driver/nvidia/gpus")
    gpus = len(list(gpu_dir.iterdir())) if gpu_dir.is_dir() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = min(gpus, len([d for d in visible.split(",") if d.strip()]))
    return ClusterResources.uniform(1, gpus, float(cfg.run.ray_num_cpus or os.cpu_count() or 1))


# ------------------------------------------------------------------ --simulate


def simulate_command(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The ``verimed train`` command of a simulation: the user's overrides, then the simulation's own."""
    scale = [] if args.time_scale is None else [f"emulation.time_scale={args.time_scale:g}"]
    return [sys.executable, "-m", "verimed.cli", "train", str(args.config), "--emulate", args.simulate,
            *args.overrides, f"run.steps={args.steps}", *scale, f"run.output_dir={run_dir.parent}",
            f"run.name={run_dir.name}", "metrics.wandb=disabled", "metrics.console=false", "metrics.report=false"]


def tree_cpu_seconds(root: int, proc: Path = Path("/proc")) -> float:
    """utime + stime (seconds) of ``root`` and every living descendant (a local Ray node's raylet, GCS
    and workers descend from the driver), read from /proc/<pid>/stat (fields 14, 15, in clock ticks)."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
        except (OSError, IndexError):
            continue  # the process ended while we looked
        pid = int(stat.parent.name)
        parents[pid], ticks[pid] = int(fields[1]), int(fields[11]) + int(fields[12])
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += ticks.get(pid, 0)
        todo += children.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


def _count_rows(metrics: Path) -> int:
    try:
        return sum(1 for line in metrics.read_text().splitlines() if line.strip())
    except OSError:
        return 0


def run_training_watched(cmd: list[str], metrics: Path, warmup: int, log: Path) -> tuple[int, float | None]:
    """Run ``cmd``; return (exit code, CPU busy fraction of this machine's cores over the measured steps).

    The CPU of the run's process tree is sampled whenever metrics.jsonl gains a row; the window runs from
    the row of the last warmup step to the last row seen while the tree was alive:
    busy = Δ cpu_seconds / (Δ wall · cores).
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                      os.environ.get("PYTHONPATH")])))
    samples: list[tuple[float, float]] = []  # (wall, cpu seconds) at rows warmup, warmup+1, ...
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        seen = 0
        try:
            while proc.poll() is None:
                rows = _count_rows(metrics)
                if rows > seen:
                    seen = rows
                    if rows >= max(warmup, 1):
                        samples.append((time.perf_counter(), tree_cpu_seconds(proc.pid)))
                time.sleep(0.2)
        except KeyboardInterrupt:
            os.killpg(proc.pid, 15)
            proc.wait()
            raise
    if len(samples) < 2 or samples[-1][0] <= samples[0][0]:
        return proc.returncode, None
    (w0, c0), (w1, c1) = samples[0], samples[-1]
    return proc.returncode, (c1 - c0) / ((w1 - w0) * (os.cpu_count() or 1))


def run_simulate(args: argparse.Namespace) -> int:
    """``verimed plan CONFIG --simulate PROFILE``: an emulated run of ``--steps`` steps, then the prediction."""
    from verimed.core.emulate.predict import (
        cpu_bound_warning,
        format_prediction,
        modelled_learner_share,
        staleness_histogram,
        summarise,
        to_predicted,
    )

    if args.steps <= args.warmup or args.warmup < 0:
        print(f"verimed plan: --steps {args.steps} must exceed --warmup {args.warmup} (>= 0)", file=sys.stderr)
        return 1
    if args.time_scale is not None and not args.time_scale > 0:
        print(f"verimed plan: --time-scale {args.time_scale}: must be > 0", file=sys.stderr)
        return 1
    from verimed.cli.train import emulate_overrides

    try:  # fail on a bad config or profile here, before a Ray node starts
        cfg = load_config(args.config, emulate_overrides(args.simulate) + list(args.overrides)
                          + ([f"emulation.time_scale={args.time_scale:g}"] if args.time_scale else []))
        from verimed.core.emulate.profile import load_profile

        load_profile(cfg.emulation.profile)
    except (ConfigError, ValueError) as exc:
        print(f"verimed plan: {exc}", file=sys.stderr)
        return 1
    time_scale = cfg.emulation.time_scale
    run_dir = Path(args.output_dir).resolve() / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    run_dir.mkdir(parents=True)
    metrics, log = run_dir / "metrics.jsonl", run_dir.with_suffix(".log")
    print(f"verimed plan: simulating {args.steps} steps of {args.config} on {args.simulate} "
          f"(time_scale {time_scale:g}) in {run_dir}; log {log}", file=sys.stderr)
    rc, cpu_busy = run_training_watched(simulate_command(args, run_dir), metrics, args.warmup, log)
    for sub in ("checkpoints", "final"):  # an emulated run trains nothing worth keeping
        shutil.rmtree(run_dir / sub, ignore_errors=True)
    if rc != 0:
        print(f"verimed plan: the emulated run failed (exit {rc}); see {log}", file=sys.stderr)
        return 1
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    try:
        predicted = to_predicted(summarise(rows, args.warmup), time_scale)
        histogram = staleness_histogram(rows, args.warmup)
        share = modelled_learner_share(rows, args.warmup, time_scale)
    except ValueError as exc:
        print(f"verimed plan: {metrics}: {exc}", file=sys.stderr)
        return 1
    warning = cpu_bound_warning(cpu_busy, share, os.cpu_count() or 1)
    cpu = "not measured" if cpu_busy is None else f"{cpu_busy:.0%} of {os.cpu_count()} cores"
    share_text = "n/a" if share is None else f"{share:.0%}"
    print(format_prediction(predicted, histogram, time_scale, warning)
          + f"this machine            run's CPU {cpu}; learner phase in modelled waits {share_text}\n"
          + f"run directory           {run_dir}", end="\n")
    return 0

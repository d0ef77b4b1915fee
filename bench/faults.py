"""Slow engine: trained tokens/s with one of N engines slowed vs the same run without that engine.

    .venv/bin/python bench/faults.py                                  # 4 engines, one 5x slower, vs 3
    .venv/bin/python bench/faults.py --engines 4 --slowdown 5 --steps 14 --warmup 4 --time-scale 5
    .venv/bin/python bench/faults.py --healthy                        # + the 4 healthy engines
    .venv/bin/python bench/faults.py --dry-run                        # print the commands only

Issue #17: with one engine of N running ``--slowdown`` x slower (``emulation.engine_slowdown``),
routing (``verimed/core/rollout/routing.py``, by expected completion) must keep the trained
tokens/s at >= 90% of what the other N-1 engines give alone, and the staleness bound must hold.

Runs (each its own ``verimed train`` subprocess and local Ray instance, emulated devices of
``--profile``, one consultation stage, ``async.max_staleness=--staleness``):

- ``slowed``:  N engines, engine N-1 slowed ``--slowdown`` x;
- ``without``: N-1 engines, none slowed (the slow engine removed);
- ``healthy`` (``--healthy``): N engines, none slowed.

Measured over the steps after ``--warmup`` (``verimed.core.emulate.predict.summarise``,
converted to predicted units: rates / time_scale):

    ratio = trained tokens/s (slowed) / trained tokens/s (without)          target >= 0.90

and, per run, the largest staleness/max of any step (<= max_staleness: the bound held), the
stale drops, and the slow engine's share of generate requests (router/engine_<i>/requests).
The profile's generation must be the bottleneck (trainer idle > 0) for the ratio to say
anything about routing: the table prints the trainer idle share so a reader can check.
"""
from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "bench" / "throughput.py")
tp = importlib.util.module_from_spec(_spec)
sys.modules["bench_throughput"] = tp  # its dataclasses look their module up by name
_spec.loader.exec_module(tp)

TARGET_RATIO = 0.90  # issue #17: >= 90% of the N-1 healthy engines' trained tokens/s


def plan(args: argparse.Namespace) -> list:
    base = ["stages=[]", f"run.steps={args.steps}", f"rollout.prompts_per_step={args.prompts}",
            f"rollout.group_size={args.group}", f"rollout.max_tokens={args.max_tokens}",
            f"model.max_model_len={args.max_tokens + 1536}",  # room for the longest case prompt
            f"async.max_staleness={args.staleness}", f"emulation.time_scale={args.time_scale}",
            "stage_eval.healthbench=0", "stage_eval.consultations=0", *args.override]
    n = args.engines

    def spec(name: str, engines: int, slowdown: dict[int, float]) -> object:
        extra = [f"placement.rollout.replicas={engines}"]
        if slowdown:
            extra.append("emulation.engine_slowdown={" + ", ".join(f"{i}: {f}" for i, f in slowdown.items()) + "}")
        return tp.RunSpec(name=name, mode="async", config=args.config, overrides=base + extra,
                          emulate=args.profile, time_scale=args.time_scale)

    runs = [spec("slowed", n, {n - 1: args.slowdown}), spec("without", n - 1, {})]
    if args.healthy:
        runs.append(spec("healthy", n, {}))
    return runs


def run_facts(rows: list[dict], warmup: int, engines: int) -> dict[str, float]:
    """Staleness and routing facts of one run: the largest staleness/max of any step, the stale drops
    at the end, and the last engine's share of answered generate requests."""
    last = rows[-1]
    requests = [last.get(f"router/engine_{i}/requests", 0.0) for i in range(engines)]
    return {"staleness_max": max(r.get("staleness/max", 0.0) for r in rows),
            "stale_dropped": last.get("counters/stale_dropped", 0.0),
            "last_engine_share": requests[-1] / sum(requests) if sum(requests) else 0.0}


def report(summaries: dict[str, dict[str, float]], facts: dict[str, dict[str, float]], args) -> str:
    head = (f"slow engine: {args.engines} engines, engine {args.engines - 1} {args.slowdown}x slower, profile "
            f"{args.profile}, B={args.prompts} G={args.group}, max_staleness {args.staleness}, "
            f"{args.steps} steps ({args.warmup} warmup), time_scale {args.time_scale}")
    columns = (f"{'run':<9} {'train tok/s':>12} {'trainer idle':>13} {'staleness max':>14} {'stale drops':>12} "
               f"{'last engine share':>18}")
    lines = [head, columns]
    for name, s in summaries.items():
        f = facts[name]
        lines.append(f"{name:<9} {s['train_tokens_per_s']:>12.1f} {s['trainer_idle']:>13.2f} "
                     f"{f['staleness_max']:>14.0f} {f['stale_dropped']:>12.0f} {f['last_engine_share']:>18.3f}")
    ratio = summaries["slowed"]["train_tokens_per_s"] / summaries["without"]["train_tokens_per_s"]
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    bound = all(f["staleness_max"] <= args.staleness for f in facts.values())
    lines.append(f"ratio slowed / without = {ratio:.3f} (target >= {TARGET_RATIO}: {verdict}); staleness bound "
                 f"{'held' if bound else 'VIOLATED'} in every run")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs/default.yaml")
    p.add_argument("--profile", default="h100-qwen2.5-7b", help="device profile of the emulated runs")
    p.add_argument("--engines", type=int, default=4, help="N: engines of the slowed run (>= 2)")
    p.add_argument("--slowdown", type=float, default=5.0)
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8, help="rollout.prompts_per_step (B)")
    p.add_argument("--group", type=int, default=2, help="rollout.group_size (G)")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--staleness", type=int, default=1)
    p.add_argument("--time-scale", type=float, default=5.0)
    p.add_argument("--healthy", action="store_true", help="also run the N healthy engines")
    p.add_argument("--override", action="append", default=[], help="extra dotted override for every run")
    p.add_argument("--output-dir", type=Path, default=ROOT / "runs" / "bench-faults")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    if args.engines < 2:
        p.error(f"--engines {args.engines}: at least 2 (one slowed, one left without it)")
    if args.warmup >= args.steps:
        p.error(f"--warmup {args.warmup} must be below --steps {args.steps}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    runs = plan(args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        for spec in runs:
            print(shlex.join(tp.command(spec, spec.config, args.output_dir)))
        return 0
    summaries, facts = {}, {}
    for spec in runs:
        metrics, load = tp.run_one(spec, tp.command(spec, spec.config, args.output_dir), args.output_dir, args.timeout)
        rows = tp.read_metrics(metrics)
        summaries[spec.name] = tp.run_summary(rows, args.warmup, spec)
        engines = args.engines - 1 if spec.name == "without" else args.engines
        facts[spec.name] = run_facts(rows, args.warmup, engines)
        print(f"faults: {spec.name}: load {load}", file=sys.stderr)
    text = report(summaries, facts, args)
    print(text)
    (args.output_dir / "report.txt").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Throughput: the same config trained synchronously and asynchronously, in one invocation.

    .venv/bin/python bench/throughput.py                         # sync vs async on configs/default.yaml
    .venv/bin/python bench/throughput.py --kl                    # + async with grpo.kl_coef=0.05 (reference wait)
    .venv/bin/python bench/throughput.py --placement configs/cluster/cpu-default.yaml other.yaml
    .venv/bin/python bench/throughput.py --steps 3 --warmup 1 --override rollout.max_tokens=16 --no-record
    .venv/bin/python bench/throughput.py --dry-run               # print the commands only
    .venv/bin/python bench/throughput.py --emulate cpu-smollm2 --calibrate   # emulated sync/async + the real sync
    .venv/bin/python bench/throughput.py --config configs/cluster/m2-32b-8x8.yaml --emulate h100-qwen2.5-32b \
        --time-scale 3 --override run.ray_address=null --placement configs/cluster/placements/m2-32b-*.yaml

Every run is its own ``verimed train`` subprocess (each starts and stops its own
Ray cluster), on one consultation stage (``stages=[]``: the same kind of work
every step) of ``--steps`` learner steps:

- sync:  ``async.max_staleness=0`` — generation never overlaps training;
- async: ``async.max_staleness=--staleness`` (default 1);
- kl (``--kl``): async with ``grpo.kl_coef=0.05``, so the reference actor runs;
- one async run per ``--placement`` file: the base config with that file's
  sections (its ``placement:`` and anything else it sets) merged over it; the
  runs are ranked by trained tokens/s.

Emulated devices (``--emulate PROFILE``): every run gets ``--emulate PROFILE`` and
``emulation.time_scale=--time-scale`` X; engines and learners wait the profile's modelled times / X,
and every summary is converted back (``verimed.core.emulate.predict.to_predicted``: times × X,
rates ÷ X), so the table is in predicted seconds. ``--calibrate`` adds the REAL synchronous run of
the same config (run ``real-sync``) and reports emulated-sync step time / real-sync step time with
the ±15% verdict: the profile is calibrated when the emulated run predicts the real one.

Measured over the steps after the first ``--warmup`` (model load, first batch
with nothing to overlap), from each run's ``metrics.jsonl``:

- wall      W = sum(time/step_s) — the learner's steps run back to back, so this is
              the wall time of the measured steps;
- trained tokens/s = sum(throughput/train_tokens) / W (response tokens with loss);
- generated tokens/s = sum(throughput/gen_tokens_per_s · time/step_s) / W;
- trainer idle = sum(time/train_wait_s) / W; rollout idle = sum(time/rollout_idle_ratio · time/step_s) / W;
- speedup   = trained tokens/s of a run / trained tokens/s of the sync run.

(The formulas live in ``verimed/core/emulate/predict.py``, shared with ``verimed plan --simulate``.)
Component times come from the sync run, where nothing overlaps (generation of
the next batch starts only once the weight sync returns):
T_gen = mean(time/train_wait_s) (generate + judge one batch), T_train =
mean(time/step_s) - T_gen (learner busy: batching, the train step, the weight
broadcast time/sync_s and the engine-vs-learner parity check that follows it,
which time/sync_s leaves out; the table's "other s" column is that remainder,
step - wait - train - sync - reference wait). Overlapping
them perfectly turns a step of T_gen + T_train into max(T_gen, T_train), so the
ideal-overlap bound is (T_gen + T_train) / max(T_gen, T_train), and
efficiency = speedup / bound. The reference wait (issue #9) is
mean(time/reference_wait_s) / mean(time/train_s) of the kl run.

The table is printed and, unless ``--no-record``, appended to bench/RESULTS.md
with the date (UTC), machine, command line, run directories and metrics paths.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers, also when loaded by path
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's verimed, not the venv's install
from machine_info import cpu_model  # noqa: E402

from verimed.core.emulate.predict import compare, overlap_bound, summarise, to_predicted

ROOT = Path(__file__).resolve().parents[1]
KL_COEF = 0.05
TARGET_SPEEDUP, TARGET_EFFICIENCY, TARGET_REF_WAIT = 1.5, 0.85, 0.05  # issue #5 and #9 must-shows
CALIBRATION_TOLERANCE = 0.15  # issue #16: emulated sync step time within ±15% of the real one


@dataclass
class RunSpec:
    """One ``verimed train`` subprocess of the benchmark."""

    name: str
    mode: str  # "sync" | "async" | "kl" | "placement" | "real-sync" (the --calibrate baseline)
    config: Path
    overrides: list[str] = field(default_factory=list)
    placement: Path | None = None  # the placement file merged into ``config`` (mode "placement")
    emulate: str | None = None  # device profile: the run is emulated (``verimed train --emulate``)
    time_scale: float = 1.0  # emulation.time_scale of an emulated run (its summary is converted back)


# ------------------------------------------------------------------ analysis (pure)


def format_table(summaries: dict[str, dict[str, float]], modes: dict[str, str], baseline: str) -> str:
    """Markdown table: one row per run, speedup and efficiency against ``baseline`` (the sync run)."""
    if baseline not in summaries:
        raise ValueError(f"baseline run {baseline!r} is not among the runs: {', '.join(summaries)}")
    sync = summaries[baseline]
    lines = ["| run | mode | steps | trained tok/s | generated tok/s | speedup | % of bound | trainer idle | "
             "rollout idle | step s | train s | sync s | other s | ref wait / train |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        c = compare(sync, s)
        eff = "—" if name == baseline or modes.get(name) == "real-sync" else f"{c['efficiency']:.0%}"
        lines.append(f"| {name} | {modes.get(name, '?')} | {s['steps']:.0f} | {s['train_tokens_per_s']:.1f} | "
                     f"{s['gen_tokens_per_s']:.1f} | {c['speedup']:.2f}× | {eff} | {s['trainer_idle']:.0%} | "
                     f"{s['rollout_idle']:.0%} | {s['step_s']:.2f} | {s['train_s']:.2f} | {s['sync_s']:.2f} | "
                     f"{s['other_s']:.2f} | {s['reference_wait_ratio']:.2%} |")
    bound = overlap_bound(sync["t_gen"], sync["t_train"])
    lines += ["", f"Component times (sync run `{baseline}`): T_gen = {sync['t_gen']:.2f} s, "
              f"T_train = {sync['t_train']:.2f} s (learner busy: train, weight sync, parity check); ideal-overlap bound "
              f"(T_gen + T_train) / max(T_gen, T_train) = {bound:.2f}×."]
    return "\n".join(lines) + "\n"


def format_ranking(summaries: dict[str, dict[str, float]], names: list[str]) -> str:
    """Placement runs ranked by trained tokens/s (best first)."""
    ranked = sorted(names, key=lambda n: summaries[n]["train_tokens_per_s"], reverse=True)
    lines = ["| rank | placement run | trained tok/s | trainer idle | rollout idle | step s |", "|---|---|---|---|---|---|"]
    for i, n in enumerate(ranked, 1):
        s = summaries[n]
        lines.append(f"| {i} | {n} | {s['train_tokens_per_s']:.1f} | {s['trainer_idle']:.0%} | "
                     f"{s['rollout_idle']:.0%} | {s['step_s']:.2f} |")
    return "\n".join(lines) + "\n"


def ranking_reason(summaries: dict[str, dict[str, float]], names: list[str]) -> str:
    """One line: why the best placement wins over the runner-up, read off the idle ratios and step parts.

    The trainer idles while it waits for generation (too little rollout capacity); the rollout idles
    while the engines wait for the learner and the weight sync (too little learner capacity). The winner
    is explained by the larger of the two gaps it closes, else by its shorter train or sync time.
    """
    ranked = sorted(names, key=lambda n: summaries[n]["train_tokens_per_s"], reverse=True)
    if len(ranked) < 2:
        raise ValueError(f"a ranking needs >= 2 placement runs, got {ranked}")
    (a, b), (sa, sb) = ranked[:2], (summaries[ranked[0]], summaries[ranked[1]])
    gain = sa["train_tokens_per_s"] / sb["train_tokens_per_s"] - 1 if sb["train_tokens_per_s"] > 0 else float("inf")
    gaps = {"trainer": sb["trainer_idle"] - sa["trainer_idle"], "rollout": sb["rollout_idle"] - sa["rollout_idle"]}
    head = f"`{a}` wins ({sa['train_tokens_per_s']:.1f} vs {sb['train_tokens_per_s']:.1f} trained tok/s of `{b}`, {gain:+.0%}): "
    side = max(gaps, key=gaps.get)
    if gaps[side] > 0.02:
        why = ("its learners wait less for generation" if side == "trainer" else
               "its engines wait less for the learner and the weight sync")
        return head + (f"{why} (trainer idle {sa['trainer_idle']:.0%} vs {sb['trainer_idle']:.0%}, rollout idle "
                       f"{sa['rollout_idle']:.0%} vs {sb['rollout_idle']:.0%})")
    return head + (f"similar idle ratios; its learner phase is shorter (train {sa['train_s']:.1f} vs {sb['train_s']:.1f} s, "
                   f"sync {sa['sync_s']:.1f} vs {sb['sync_s']:.1f} s per step)")


def calibration_ratio(emulated_sync: dict[str, float], real_sync: dict[str, float]) -> float:
    """Emulated-sync step time / real-sync step time (predicted seconds over measured seconds)."""
    if real_sync["step_s"] <= 0:
        raise ValueError(f"real sync step time {real_sync['step_s']} s: must be > 0")
    return emulated_sync["step_s"] / real_sync["step_s"]


def calibration_line(emulated_sync: dict[str, float], real_sync: dict[str, float], profile: str) -> str:
    """The ±15% calibration verdict of ``profile``, with both step times and the parts that differ most."""
    ratio = calibration_ratio(emulated_sync, real_sync)
    ok = abs(ratio - 1) <= CALIBRATION_TOLERANCE
    parts = ", ".join(f"{k} {emulated_sync[k]:.2f} vs {real_sync[k]:.2f}" for k in ("train_wait_s", "train_s", "sync_s", "other_s"))
    return (f"- calibration `{profile}`: emulated sync step {emulated_sync['step_s']:.2f} s / real sync step "
            f"{real_sync['step_s']:.2f} s = {ratio:.3f} (target within ±{CALIBRATION_TOLERANCE:.0%}: "
            f"{'met' if ok else 'NOT met'}); emulated vs real s: {parts}")


def target_lines(summaries: dict[str, dict[str, float]], modes: dict[str, str], baseline: str) -> list[str]:
    """The issue #5 / #9 must-shows, each with its measured value and whether it holds."""
    out = []
    for name, mode in modes.items():
        if mode in ("async", "placement"):
            c = compare(summaries[baseline], summaries[name])
            out.append(f"- `{name}`: speedup {c['speedup']:.2f}× (target ≥ {TARGET_SPEEDUP}×: "
                       f"{'met' if c['speedup'] >= TARGET_SPEEDUP else 'NOT met'}), {c['efficiency']:.0%} of the "
                       f"bound (target ≥ {TARGET_EFFICIENCY:.0%}: {'met' if c['efficiency'] >= TARGET_EFFICIENCY else 'NOT met'})"
                       + ("; above the bound: the runs did not see the same machine (load), rerun on a quiet one"
                          if c["efficiency"] > 1.05 else ""))
        elif mode == "kl":
            r = summaries[name]["reference_wait_ratio"]
            out.append(f"- `{name}`: reference wait {r:.2%} of the learner's train time "
                       f"(target < {TARGET_REF_WAIT:.0%}: {'met' if r < TARGET_REF_WAIT else 'NOT met'})")
    return out


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``: mappings recursively, anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# ------------------------------------------------------------------ runs


def plan_runs(args: argparse.Namespace) -> list[RunSpec]:
    """The benchmark's runs: sync baseline, then async (or one per placement file), then kl."""
    common = ["stages=[]", f"run.steps={args.steps}", *args.override]
    staleness = f"async.max_staleness={args.staleness}"
    emu = {"emulate": args.emulate, "time_scale": args.time_scale} if args.emulate else {}
    if args.emulate:
        common.append(f"emulation.time_scale={args.time_scale:g}")
    runs = [] if args.no_sync else [RunSpec("sync", "sync", args.config, common + ["async.max_staleness=0"], **emu)]
    if args.placement:
        stems = [p.stem for p in args.placement]
        for p in args.placement:
            name = f"placement-{p.stem}" if stems.count(p.stem) == 1 else f"placement-{p.parent.name}-{p.stem}"
            runs.append(RunSpec(name, "placement", args.config, common + [staleness], placement=p, **emu))
    else:
        runs.append(RunSpec("async", "async", args.config, common + [staleness], **emu))
    if args.kl:
        runs.append(RunSpec("kl", "kl", args.config, common + [staleness, f"grpo.kl_coef={KL_COEF}"], **emu))
    if args.calibrate:  # the real devices, same config and steps, no time scale: what the emulation must predict
        real = ["stages=[]", f"run.steps={args.steps}", *args.override, "async.max_staleness=0"]
        runs.insert(1, RunSpec("real-sync", "real-sync", args.config, real))  # beside the emulated sync: same load
    if len({r.name for r in runs}) != len(runs):
        raise ValueError(f"two --placement files give the same run name: {[str(p) for p in args.placement]}")
    return runs


def resolve_config(spec: RunSpec, out_dir: Path) -> Path:
    """The config file a run trains: the base config, or the base with the placement file merged over it."""
    if spec.placement is None:
        return spec.config
    base = yaml.safe_load(spec.config.read_text()) or {}
    over = yaml.safe_load(spec.placement.read_text()) or {}
    if not isinstance(base, dict) or not isinstance(over, dict):
        raise ValueError(f"{spec.config} and {spec.placement} must each be a mapping of config sections")
    merged = out_dir / f"{spec.name}.yaml"
    merged.parent.mkdir(parents=True, exist_ok=True)
    merged.write_text(f"# {spec.config} with {spec.placement} merged over it (bench/throughput.py)\n"
                      + yaml.safe_dump(deep_merge(base, over), sort_keys=False))
    return merged


def command(spec: RunSpec, config: Path, out_dir: Path) -> list[str]:
    emulate = ["--emulate", spec.emulate] if spec.emulate else []
    return [sys.executable, "-m", "verimed.cli", "train", str(config), *emulate, *spec.overrides,
            f"run.output_dir={out_dir}", f"run.name={spec.name}",
            "metrics.wandb=disabled", "metrics.console=false", "metrics.report=false"]


def run_summary(rows: list[dict], warmup: int, spec: RunSpec) -> dict[str, float]:
    """``summarise`` of a run, converted to predicted units when it was emulated (times × X, rates ÷ X)."""
    summary = summarise(rows, warmup)
    return to_predicted(summary, spec.time_scale) if spec.emulate else summary


def read_metrics(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no metrics rows")
    return rows


def run_one(spec: RunSpec, cmd: list[str], out_dir: Path, timeout: float | None,
            keep_checkpoints: bool = False) -> tuple[Path, str]:
    """Run one training subprocess (log in <out_dir>/<name>.log); return its metrics.jsonl and the load.

    The load is the 1-minute load average before -> after the run: on a shared
    machine it says which runs were disturbed (their times are not comparable).
    """
    log = out_dir / f"{spec.name}.log"
    metrics = out_dir / spec.name / "metrics.jsonl"
    if metrics.exists():
        raise ValueError(f"{metrics} exists already: use a fresh --output-dir")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    start, load = time.perf_counter(), os.getloadavg()[0]
    with log.open("w") as f:
        # Its own process group: on a timeout the run and the local Ray cluster it started are stopped together.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | str = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = f"timeout after {timeout:.0f} s"
            _stop(proc)
    if rc != 0:
        with log.open("rb") as f:  # a failing run can log a lot: read only its end
            f.seek(max(0, log.stat().st_size - 6000))
            tail = "\n".join(line[:300] for line in f.read().decode(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"run {spec.name} failed (exit {rc}); log {log}, last lines:\n{tail}")
    print(f"throughput: {spec.name} done in {time.perf_counter() - start:.0f} s -> {metrics}", file=sys.stderr)
    if not keep_checkpoints:  # ~2 GB per run on the CPU default (optimizer state + final HF weights); unused here
        for sub in ("checkpoints", "final"):
            shutil.rmtree(out_dir / spec.name / sub, ignore_errors=True)
    return metrics, f"{load:.1f} -> {os.getloadavg()[0]:.1f}"


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the run's process group (Ray shuts down cleanly), SIGKILL it if still there after 30 s."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def machine() -> str:
    nproc = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip() or os.cpu_count()
    return f"{cpu_model()}, nproc {nproc}"


def record(text: str, args: argparse.Namespace, runs: list[RunSpec], paths: dict[str, Path], loads: dict[str, str],
           cmdline: str) -> str:
    """The RESULTS.md entry: heading, provenance, the tables, the must-shows, the metrics paths."""
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    title = "placements ranked" if args.placement else "sync vs async"
    lines = [f"### Throughput{' (emulated: ' + args.emulate + ')' if args.emulate else ''}: {title} ({when})", "",
             f"- machine: {machine()}", f"- command: `{cmdline}`",
             f"- config: {args.config}, one consultation stage (`stages=[]`), {args.steps} steps, first "
             f"{args.warmup} skipped; " + (f"no sync run: reference row = run `{runs[0].name}`" if args.no_sync else
                                          "baseline = run `sync` (async.max_staleness=0) of this invocation"),
             *([f"- emulated: `--emulate {args.emulate}`, emulation.time_scale {args.time_scale:g}; every time "
                f"below is wall × {args.time_scale:g} (predicted seconds), every rate wall ÷ {args.time_scale:g}"
                + ("; run `real-sync` is the real CPU run of the same config" if args.calibrate else "")]
              if args.emulate else []),
             "- 1-min load average before -> after each run: " + ", ".join(f"{r.name} {loads[r.name]}" for r in runs),
             "- metrics: " + ", ".join(f"`{paths[r.name]}`" for r in runs), "", text]
    return "\n".join(lines)


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    ap.add_argument("--steps", type=int, default=8, help="learner steps per run")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the averages")
    ap.add_argument("--staleness", type=int, default=1, help="async.max_staleness of the asynchronous runs")
    ap.add_argument("--kl", action="store_true", help=f"also run async with grpo.kl_coef={KL_COEF} (reference wait)")
    ap.add_argument("--placement", type=Path, nargs="+", default=[], metavar="YAML",
                    help="placement configs to rank (each an async run with the file merged over --config)")
    ap.add_argument("--emulate", metavar="PROFILE", default=None,
                    help="run every run on emulated devices with this profile (configs/profiles/<name>.yaml or a path)")
    ap.add_argument("--time-scale", type=float, default=1.0, metavar="X",
                    help="emulation.time_scale of the emulated runs (waits / X); summaries are converted back")
    ap.add_argument("--calibrate", action="store_true",
                    help="with --emulate: also run the REAL synchronous run and report emulated/real step time (±15%%)")
    ap.add_argument("--no-sync", action="store_true",
                    help="with --placement: skip the sync baseline (placements are ranked against each other)")
    ap.add_argument("--override", action="append", default=[], metavar="KEY=VALUE", help="passed to every run")
    ap.add_argument("--output-dir", type=Path, default=None, help="run directories (default runs/bench_throughput/<UTC time>)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per run")
    ap.add_argument("--keep-checkpoints", action="store_true",
                    help="keep each run's checkpoints/ and final/ (deleted by default: only metrics.jsonl is needed)")
    ap.add_argument("--results", type=Path, default=Path(__file__).with_name("RESULTS.md"))
    ap.add_argument("--no-record", action="store_true", help="print only, do not append to --results")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = ap.parse_args(argv)
    if args.steps <= args.warmup:
        ap.error(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    if args.warmup < 0 or args.staleness < 1:
        ap.error("--warmup must be >= 0 and --staleness >= 1 (0 is the sync baseline, always run)")
    if args.no_sync and (not args.placement or args.calibrate or args.kl):
        ap.error("--no-sync only ranks --placement runs (without --calibrate or --kl, which need the sync run)")
    if args.calibrate and not args.emulate:
        ap.error("--calibrate compares an emulated run with the real one: it needs --emulate PROFILE")
    if not args.time_scale > 0 or (args.time_scale != 1.0 and not args.emulate):
        ap.error(f"--time-scale {args.time_scale}: must be > 0, and only with --emulate (real devices do not scale)")
    bad = [o for o in args.override if "=" not in o]
    if bad:
        ap.error(f"--override expects KEY=VALUE, got {bad}")
    for path in [args.config, *args.placement]:
        if not path.is_file():
            ap.error(f"{path}: no such config file")
    # The runs start in the repository root: absolute paths work from anywhere.
    args.config, args.placement = args.config.resolve(), [p.resolve() for p in args.placement]
    if args.output_dir is None:
        args.output_dir = ROOT / "runs" / "bench_throughput" / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    args.output_dir = args.output_dir.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cmdline = shlex.join(["python", "bench/throughput.py", *(sys.argv[1:] if argv is None else argv)])
    runs = plan_runs(args)
    if args.dry_run:
        for spec in runs:
            config = spec.config if spec.placement is None else args.output_dir / f"{spec.name}.yaml"
            note = f"  # {config} = {spec.config} + {spec.placement}" if spec.placement else ""
            print(shlex.join(command(spec, config, args.output_dir)) + note)
        return 0
    args.output_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    loads: dict[str, str] = {}
    for i, spec in enumerate(runs, 1):
        print(f"throughput: run {i}/{len(runs)}: {spec.name}", file=sys.stderr)
        try:
            paths[spec.name], loads[spec.name] = run_one(
                spec, command(spec, resolve_config(spec, args.output_dir), args.output_dir), args.output_dir, args.timeout,
                args.keep_checkpoints)
        except (RuntimeError, ValueError) as exc:
            print(f"throughput: {exc}", file=sys.stderr)
            return 1
    summaries = {s.name: run_summary(read_metrics(paths[s.name]), args.warmup, s) for s in runs}
    modes = {s.name: s.mode for s in runs}
    # Without the sync run (--no-sync, placements only) the first run is the table's reference row.
    baseline = "sync" if "sync" in summaries else runs[0].name
    text = format_table(summaries, modes, baseline)
    placements = [s.name for s in runs if s.mode == "placement"]
    if placements:
        text += "\nPlacements ranked by trained tokens/s:\n\n" + format_ranking(summaries, placements)
        if len(placements) >= 2:
            text += "\n" + ranking_reason(summaries, placements) + "\n"
    lines = target_lines(summaries, modes, "sync") if "sync" in summaries else [
        f"- no sync run (--no-sync): speedups are against `{baseline}`; the overlap bound and its % are not meaningful"]
    if args.calibrate:
        lines.append(calibration_line(summaries["sync"], summaries["real-sync"], args.emulate))
    text += "\n" + "\n".join(lines) + "\n"
    entry = record(text, args, runs, paths, loads, cmdline)
    print(entry)
    (args.output_dir / "summary.json").write_text(json.dumps(
        {"command": cmdline, "summaries": summaries, "modes": modes, "load": loads,
         "metrics": {k: str(v) for k, v in paths.items()}}, indent=2))
    if not args.no_record:
        with args.results.open("a") as f:
            f.write("\n" + entry)
        print(f"throughput: appended to {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

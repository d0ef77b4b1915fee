"""Does multi-turn RL improve the rubric reward? First 5 vs last 5 steps of the multiturn stage, over seeds.

    python bench/multiturn_reward.py                       # trains configs/default.yaml for seeds 0 1 2, then checks
    python bench/multiturn_reward.py --seeds 0 1 2 --config configs/default.yaml -- rollout.max_tokens=48
    python bench/multiturn_reward.py --analyse-only        # re-read runs/mt-bench-seed*/ (no training)

For each seed it runs ``verimed train CONFIG run.seed=S run.name=mt-bench-seedS``
(the staged CPU default: rule -> rubric -> multiturn), then reads the run's
``metrics.jsonl`` and ``config.yaml``: the steps whose ``stage/index`` is the
multiturn stage, and their ``reward/rubric_mean`` (the mean rubric score of all
candidates of the step's slices). It prints first-5 / last-5 means per seed and
exits 1 unless the last 5 beat the first 5 for every seed. Needs the controller
to log ``stage/index`` per step (see verimed.core.config.stages).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 5


def multiturn_rewards(run_dir: Path, key: str = "reward/rubric_mean") -> list[float]:
    """``key`` per learner step of the run's (first) multiturn stage, in step order."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    kinds = [s["kind"] for s in cfg.get("stages") or []]
    if "multiturn" not in kinds:
        raise ValueError(f"{run_dir}: the run has no multiturn stage")
    index = kinds.index("multiturn")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if rows and "stage/index" not in rows[0]:
        raise ValueError(f"{run_dir}/metrics.jsonl has no stage/index metric (controller without stages?)")
    steps = {r["step"]: r[key] for r in rows if r.get("stage/index") == index and r.get(key) is not None}
    return [steps[s] for s in sorted(steps)]


def first_last(values: list[float], window: int = WINDOW) -> tuple[float, float]:
    """Means of the first and last ``window`` values (the stage needs >= 2·window steps to not overlap)."""
    if len(values) < 2 * window:
        raise ValueError(f"the multiturn stage logged {len(values)} steps; need >= {2 * window}")
    return sum(values[:window]) / window, sum(values[-window:]) / window


def train(config: str, seed: int, name: str, overrides: list[str]) -> Path:
    cmd = [str(ROOT / ".venv/bin/verimed"), "train", config, f"run.seed={seed}", f"run.name={name}",
           "metrics.wandb=disabled", *overrides]
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return ROOT / "runs" / name


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--analyse-only", action="store_true", help="read existing runs, do not train")
    p.add_argument("overrides", nargs="*", help="extra section.key=value overrides for every run")
    args = p.parse_args()
    rows, ok = [], True
    for seed in args.seeds:
        name = f"mt-bench-seed{seed}"
        run_dir = ROOT / "runs" / name if args.analyse_only else train(args.config, seed, name, args.overrides)
        first, last = first_last(multiturn_rewards(run_dir))
        ok &= last > first
        rows.append(f"| {seed} | {first:.4f} | {last:.4f} | {last - first:+.4f} |")
    print("| seed | first 5 steps | last 5 steps | change |\n|---|---|---|---|\n" + "\n".join(rows))
    print("multiturn rubric reward improved for every seed" if ok else "NOT improved for every seed")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

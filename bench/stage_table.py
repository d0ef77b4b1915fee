"""Per-step and per-stage table of a run's reward and minibatch clip fractions (markdown).

    python bench/stage_table.py runs/default

Reads ``RUN_DIR/metrics.jsonl`` (one line per learner step; a resumed run appends,
and the last line of a step wins) and ``RUN_DIR/config.yaml`` for the stage names.
Columns: the stage, ``reward/mean``, ``reward/rubric_mean``, the clip fraction of
each minibatch (``loss/mb<k>/clip_frac``: with ``trainer.minibatches: M`` the first
minibatch's ratio is 1 by construction, so its clip fraction is 0, and the clip binds
from the second on), the step's largest token staleness, and the step time.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def read_steps(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    steps: dict[int, dict] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
            steps[int(row["step"])] = row
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise SystemExit(f"{path}:{n}: not a metrics line ({exc})") from None
    return [steps[k] for k in sorted(steps)]


def minibatch_count(rows: list[dict]) -> int:
    return max((int(r.get("train/minibatches", 1)) for r in rows), default=1)


def table(rows: list[dict], stage_names: list[str]) -> str:
    m = minibatch_count(rows)
    head = ["step", "stage", "reward", "rubric"] + [f"clip mb{k}" for k in range(m)] + ["max stale", "step s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        stage = int(r.get("stage/index", 0))
        cells = [str(r["step"]), stage_names[stage] if stage < len(stage_names) else str(stage),
                 f"{r.get('reward/mean', float('nan')):.3f}", f"{r.get('reward/rubric_mean', float('nan')):.3f}"]
        cells += [f"{r.get(f'loss/mb{k}/clip_frac', float('nan')):.3f}" for k in range(m)]
        cells += [f"{r.get('staleness/max', float('nan')):.0f}", f"{r.get('time/step_s', float('nan')):.1f}"]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", "| stage | steps | mean reward | mean rubric | " + " | ".join(f"mean clip mb{k}" for k in range(m)) + " |",
            "|" + "---|" * (4 + m)]
    for index, name in enumerate(stage_names):
        mine = [r for r in rows if int(r.get("stage/index", 0)) == index]
        if not mine:
            continue

        def mean(key: str) -> float:
            return sum(r.get(key, float("nan")) for r in mine) / len(mine)

        clips = " | ".join(f"{mean(f'loss/mb{k}/clip_frac'):.3f}" for k in range(m))
        out.append(f"| {name} | {len(mine)} | {mean('reward/mean'):.3f} | {mean('reward/rubric_mean'):.3f} | {clips} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path)
    args = p.parse_args(argv)
    cfg = yaml.safe_load((args.run_dir / "config.yaml").read_text()) or {}
    names = [s["name"] for s in cfg.get("stages") or []] or ["consult"]
    rows = read_steps(args.run_dir)
    if not rows:
        print(f"{args.run_dir / 'metrics.jsonl'}: no steps yet", file=sys.stderr)
        return 1
    print(table(rows, names))
    return 0


if __name__ == "__main__":
    sys.exit(main())

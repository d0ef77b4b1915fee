"""The metrics sink: console (rich), ``metrics.jsonl``, Weights & Biases, and ``report.png``.

Every actor's numbers reach the controller, which calls :meth:`MetricsSink.log`
once per learner step. W&B runs online when ``WANDB_API_KEY`` is set (or
``metrics.wandb: online``), offline otherwise; the key is never logged.
Non-finite values are written as null and flagged, never dropped silently.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from verimed.core.config import Config, to_dict

# Panels of the end-of-run report: (title, metric keys).
REPORT_PANELS = [
    ("reward (stage boundaries dashed)", ["reward/mean", "reward/rubric_mean", "reward/accuracy"]),
    ("held-out eval (end of each stage)", ["eval/healthbench", "eval/consultation"]),
    ("loss", ["loss/policy"]),
    ("entropy", ["loss/entropy"]),
    ("staleness (tokens)", ["staleness/mean", "staleness/max"]),
    ("weight sync seconds", ["sync/seconds"]),
    ("engine-learner log-prob gap", ["sync/parity_max_abs"]),
    ("step time breakdown (s)", ["time/step_s", "time/train_wait_s", "time/pack_s", "time/train_s", "time/sync_s"]),
    ("idle ratios", ["time/trainer_idle_ratio", "time/rollout_idle_ratio"]),
]


class MetricsSink:
    def __init__(self, cfg: Config, run_dir: Path, stage_names: list[str] | None = None):
        self.cfg, self.run_dir = cfg, run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = (run_dir / "metrics.jsonl").open("a", encoding="utf-8")
        self.history: list[dict[str, Any]] = []
        self.wandb = self._start_wandb()
        self.stage_names = stage_names or [st.name for st in cfg.stages]
        self.progress = None
        if cfg.metrics.console and sys.stderr.isatty() or os.environ.get("VERIMED_FORCE_PROGRESS"):
            self.progress = _Progress(cfg.run.steps)

    def _start_wandb(self):
        mode = self.cfg.metrics.wandb
        if mode == "disabled":
            return None
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        import wandb

        # wandb's own banner is a dozen lines; one line here says where the run is.
        run = wandb.init(project=self.cfg.metrics.wandb_project, name=self.cfg.run.name, dir=str(self.run_dir),
                         mode=mode, config=to_dict(self.cfg), reinit="finish_previous",
                         settings=wandb.Settings(silent=True, disable_git=True))
        where = run.url if mode == "online" else f"{Path(run.dir).parent} (offline; `wandb sync` uploads it)"
        print(f"verimed: W&B run {where}", file=sys.stderr)
        return run

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        clean: dict[str, Any] = {"step": step}
        bad = []
        for key, value in metrics.items():
            if isinstance(value, float) and not math.isfinite(value):
                bad.append(key)
                value = None
            clean[key] = value
        if bad:
            clean["nonfinite_keys"] = bad
            print(f"verimed: step {step}: non-finite metrics {bad}", file=sys.stderr)
        self.history.append(clean)
        self.jsonl.write(json.dumps(clean) + "\n")
        self.jsonl.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in clean.items() if isinstance(v, (int, float))}, step=step)
        line = summary_line(clean, self.stage_names)
        if self.progress is not None:
            self.progress.update(step, line)
        else:
            print(f"step {step:>3}/{self.cfg.run.steps} | {line}", flush=True)

    def close(self) -> Path | None:
        if self.progress is not None:
            self.progress.stop()
        self.jsonl.close()
        report = write_report(self.history, self.run_dir / "report.png") if self.cfg.metrics.report else None
        if self.wandb is not None:
            self.wandb.finish()
        return report


def _fmt(m: dict[str, Any], key: str, spec: str) -> str:
    v = m.get(key)
    return "-" if v is None else format(v, spec)


def summary_line(m: dict[str, Any], stage_names: list[str]) -> str:
    """One step's headline numbers: the console line (no TTY) and the progress display's text."""
    index = m.get("stage/index")
    stage = stage_names[int(index)] if index is not None and 0 <= int(index) < len(stage_names) else "-"
    return (f"{stage} | reward {_fmt(m, 'reward/mean', '.3f')} | loss {_fmt(m, 'loss/policy', '.4f')} | "
            f"train tok/s {_fmt(m, 'throughput/train_tokens_per_s', '.1f')} | "
            f"staleness {_fmt(m, 'staleness/mean', '.2f')} | sync {_fmt(m, 'sync/seconds', '.2f')}s | "
            f"parity {_fmt(m, 'sync/parity_max_abs', '.1e')}")


class _Progress:
    """The live display on a terminal: step k/N with a bar, elapsed time and ETA, and the last step's numbers."""

    def __init__(self, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]step"), MofNCompleteColumn(), BarColumn(bar_width=24),
                            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                            TextColumn("{task.description}"))
        self.task = self.bar.add_task("starting actors", total=total)
        self.bar.start()

    def update(self, step: int, line: str) -> None:
        self.bar.update(self.task, completed=step, description=line)

    def stop(self) -> None:
        self.bar.stop()


def write_report(history: list[dict[str, Any]], path: Path, panels=REPORT_PANELS) -> Path | None:
    """A PNG with one panel per metric group, x = learner step."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    # A stage starts at the first step logged with a new stage/index.
    boundaries = [h["step"] - 0.5 for prev, h in zip(history, history[1:]) if h.get("stage/index") != prev.get("stage/index")]
    for ax, (title, keys) in zip(axes.flat, panels):
        for x in boundaries:
            ax.axvline(x, color="grey", ls="--", lw=0.8)
        for key in keys:
            points = [(h["step"], h[key]) for h in history if h.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

"""verimed/core/emulate/predict.py (the pure summaries behind `verimed plan --simulate` and bench/throughput.py)
and the --simulate plumbing of verimed/cli/plan.py; one short integration run of `verimed plan --simulate`."""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from verimed.cli import plan as plan_cli
from verimed.core.emulate import predict

ROOT = Path(__file__).resolve().parents[1]


def row(step, step_s=10.0, train_s=4.0, sync_s=1.0, wait_s=3.0, hist=None, modelled=None, sync_modelled=None):
    r = {"step": step, "time/step_s": step_s, "time/train_s": train_s, "time/sync_s": sync_s,
         "time/train_wait_s": wait_s, "time/rollout_idle_ratio": 0.0, "throughput/gen_tokens_per_s": 10.0,
         "throughput/train_tokens": 100.0}
    for k, v in (hist or {}).items():
        r[f"staleness/hist_{k}"] = v
    if modelled is not None:
        r["train/modelled_seconds"], r["sync/modelled_seconds"] = modelled, sync_modelled
    return r


def test_staleness_histogram_sums_tokens_over_measured_steps():
    rows = [row(1, hist={0: 1000.0}),  # warmup: left out
            row(2, hist={0: 30.0, 1: 10.0}), row(3, hist={0: 10.0, 2: 50.0})]
    h = predict.staleness_histogram(rows, warmup=1)
    assert list(h) == [0, 1, 2]  # sorted by k, keys ints (hist_10 must not sort before hist_2)
    assert h[0] == pytest.approx(40 / 100) and h[1] == pytest.approx(10 / 100) and h[2] == pytest.approx(50 / 100)
    assert sum(h.values()) == pytest.approx(1.0)
    assert predict.staleness_histogram([row(1), row(2)], warmup=0) == {}  # nothing logged: empty, not 0/0
    assert predict.staleness_histogram([row(1, hist={2: 1.0, 10: 3.0})], warmup=0) == {2: 0.25, 10: 0.75}
    with pytest.raises(ValueError, match="nothing left"):
        predict.staleness_histogram([row(1)], warmup=1)


def test_modelled_learner_share_and_cpu_warning():
    # Wall train+sync 5 s per step; modelled 8 + 2 = 10 s at time_scale 2 -> 5 wall s: all modelled.
    rows = [row(1, modelled=8.0, sync_modelled=2.0), row(2, modelled=8.0, sync_modelled=2.0)]
    assert predict.modelled_learner_share(rows, 0, 2.0) == pytest.approx(1.0)
    assert predict.modelled_learner_share(rows, 0, 4.0) == pytest.approx(0.5)  # the other half was CPU
    assert predict.modelled_learner_share([row(1)], 0, 1.0) is None  # a real run logs no modelled seconds
    assert predict.cpu_bound_warning(0.2, 0.95, 2) is None
    w = predict.cpu_bound_warning(0.8, 0.95, 2)
    assert w.startswith("WARNING: CPU-bound") and "80% of this machine's 2 cores" in w and "learner phase" not in w
    w = predict.cpu_bound_warning(None, 0.5, 2)
    assert "only 50%" in w and "cores busy" not in w
    assert predict.cpu_bound_warning(None, None, 2) is None


def test_format_prediction_is_in_predicted_units():
    rows = [row(1, hist={0: 3.0, 1: 1.0}), row(2, hist={0: 3.0, 1: 1.0})]
    p = predict.to_predicted(predict.summarise(rows, 0), 3.0)
    text = predict.format_prediction(p, predict.staleness_histogram(rows, 0), 3.0, "WARNING: x")
    assert "predicted step time     30.00 s" in text and "time_scale 3" in text
    assert "trained tokens/s        3.3" in text  # 100 tokens per 10 wall s = 30 predicted s
    assert "wait 9.00, train 12.00, sync 3.00" in text
    assert "0: 75%, 1: 25%" in text and text.rstrip().endswith("WARNING: x")


def test_tree_cpu_seconds_sums_living_descendants_only(tmp_path):
    tick = plan_cli.os.sysconf("SC_CLK_TCK")

    def proc(pid, ppid, ut, st, comm="python"):
        d = tmp_path / str(pid)
        d.mkdir()
        # comm may hold spaces and parentheses: the parser splits at the last ")".
        (d / "stat").write_text(f"{pid} ({comm}) S {ppid} 1 1 0 -1 0 0 0 0 0 {ut} {st} 0 0 20 0 1 0\n")

    proc(10, 1, 100, 50)                     # the driver
    proc(11, 10, 30, 20, comm="ray::A (x) y")  # a worker
    proc(12, 11, 5, 5)                       # grandchild
    proc(20, 1, 999, 999)                    # someone else's process
    (tmp_path / "self").mkdir()              # not a pid: ignored
    assert plan_cli.tree_cpu_seconds(10, tmp_path) == pytest.approx((150 + 50 + 10) / tick)
    assert plan_cli.tree_cpu_seconds(11, tmp_path) == pytest.approx(60 / tick)
    assert plan_cli.tree_cpu_seconds(99, tmp_path) == 0.0


def test_simulate_rejects_bad_arguments_before_starting_anything(tmp_path, capsys):
    def args(**kw):
        base = {"config": str(ROOT / "configs/default.yaml"), "simulate": "cpu-smollm2", "steps": 6, "warmup": 2,
                "time_scale": None, "overrides": [], "output_dir": str(tmp_path), "cluster_resources": None}
        return argparse.Namespace(**{**base, **kw})

    assert plan_cli.run_plan(args(steps=2)) == 1 and "must exceed --warmup" in capsys.readouterr().err
    assert plan_cli.run_plan(args(time_scale=0.0)) == 1 and "must be > 0" in capsys.readouterr().err
    assert plan_cli.run_plan(args(simulate="no-such-profile")) == 1
    assert "no-such-profile" in capsys.readouterr().err
    assert plan_cli.run_plan(args(overrides=["trainer.lrr=1"])) == 1 and "lrr" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # no run directory was made
    cmd = plan_cli.simulate_command(args(time_scale=4.0, overrides=["stages=[]"]), tmp_path / "r")
    assert cmd[cmd.index("--emulate") + 1] == "cpu-smollm2" and "emulation.time_scale=4" in cmd
    assert cmd.index("stages=[]") < cmd.index("run.steps=6")  # the simulation's own keys win
    assert f"run.output_dir={tmp_path}" in cmd and "run.name=r" in cmd and "metrics.wandb=disabled" in cmd


@pytest.mark.integration
def test_plan_simulate_cpu_default(tmp_path):
    out = subprocess.run([sys.executable, "-m", "verimed.cli", "plan", "configs/default.yaml", "--simulate",
                          "cpu-smollm2", "--steps", "3", "--time-scale", "10", "--output-dir", str(tmp_path)],
                         # ~1 min on a quiet 2-core box; 10 min leaves room for a machine 2x slower and loaded
                         cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for label in ("predicted step time", "trained tokens/s", "generated tokens/s", "trainer idle", "rollout idle",
                  "step breakdown (s)", "staleness histogram", "this machine"):
        assert label in text, text
    step_s = float(text.split("predicted step time")[1].split()[0])
    assert step_s > 0
    run_dir = Path(text.split("run directory")[1].split()[0])
    assert (run_dir / "metrics.jsonl").is_file() and not (run_dir / "checkpoints").exists()

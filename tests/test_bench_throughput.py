"""bench/throughput.py: the pure analysis (summaries, overlap bound, tables), run planning and --dry-run.

No training here: synthetic metrics rows stand in for ``metrics.jsonl``.
"""
from __future__ import annotations

import importlib.util
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_throughput", ROOT / "bench" / "throughput.py")
tp = importlib.util.module_from_spec(_spec)
sys.modules["bench_throughput"] = tp
_spec.loader.exec_module(tp)


def row(step, step_s, train_s=4.0, sync_s=1.0, wait_s=None, rollout_idle=0.0, gen_tps=10.0, train_tokens=100.0,
        ref_wait=0.0):
    return {"step": step, "time/step_s": step_s, "time/train_s": train_s, "time/sync_s": sync_s,
            "time/train_wait_s": step_s - train_s - sync_s if wait_s is None else wait_s,
            "time/rollout_idle_ratio": rollout_idle, "throughput/gen_tokens_per_s": gen_tps,
            "throughput/train_tokens": train_tokens, "time/reference_wait_s": ref_wait}


def test_summarise_skips_warmup_and_weights_by_time():
    rows = [row(1, 100.0, train_tokens=1.0),  # warmup: must not count
            row(2, 10.0, rollout_idle=0.5, gen_tps=20.0, train_tokens=100.0),
            row(3, 30.0, rollout_idle=0.0, gen_tps=10.0, train_tokens=300.0)]
    s = tp.summarise(list(reversed(rows)), warmup=1)  # order of the rows does not matter
    assert s["steps"] == 2 and s["wall_s"] == pytest.approx(40.0)
    assert s["train_tokens_per_s"] == pytest.approx(400.0 / 40.0)
    assert s["gen_tokens_per_s"] == pytest.approx((20 * 10 + 10 * 30) / 40.0)
    assert s["rollout_idle"] == pytest.approx(0.5 * 10 / 40)  # time-weighted, not the mean of ratios (0.25)
    assert s["trainer_idle"] == pytest.approx((5.0 + 25.0) / 40.0)
    assert s["t_train"] == pytest.approx(5.0) and s["t_gen"] == pytest.approx(20.0 - 5.0)


def test_summarise_reference_wait_ratio_and_errors():
    s = tp.summarise([row(1, 10.0, train_s=4.0, ref_wait=0.2), row(2, 10.0, train_s=4.0, ref_wait=0.0)], warmup=0)
    assert s["reference_wait_ratio"] == pytest.approx(0.1 / 4.0)
    # The parity check after the broadcast is in no timer: it counts as learner time, not generation.
    s = tp.summarise([row(1, 10.0, train_s=4.0, sync_s=1.0, wait_s=3.0, ref_wait=0.5)], warmup=0)
    assert s["other_s"] == pytest.approx(10.0 - 3.0 - 4.0 - 1.0 - 0.5)
    assert s["t_gen"] == pytest.approx(3.0) and s["t_train"] == pytest.approx(7.0)
    with pytest.raises(ValueError, match="nothing left to measure"):
        tp.summarise([row(1, 1.0)], warmup=1)
    bad = row(1, 1.0)
    bad["time/train_s"] = None  # a non-finite metric, as MetricsSink logs it
    with pytest.raises(ValueError, match="time/train_s"):
        tp.summarise([bad], warmup=0)
    missing = row(1, 1.0)
    del missing["throughput/train_tokens"]
    with pytest.raises(ValueError, match="train_tokens"):
        tp.summarise([missing], warmup=0)


def test_overlap_bound():
    assert tp.overlap_bound(5.0, 5.0) == pytest.approx(2.0)
    assert tp.overlap_bound(3.0, 1.0) == pytest.approx(4.0 / 3.0)
    assert tp.overlap_bound(0.0, 2.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        tp.overlap_bound(-1.0, 2.0)
    with pytest.raises(ValueError):
        tp.overlap_bound(0.0, 0.0)


def test_compare_and_tables():
    sync = tp.summarise([row(i, 10.0) for i in range(1, 5)], warmup=1)  # T_gen = T_train = 5: bound 2
    fast = tp.summarise([row(i, 6.25, wait_s=0.5) for i in range(1, 5)], warmup=1)  # 1.6x the tokens/s
    c = tp.compare(sync, fast)
    assert c["bound"] == pytest.approx(2.0) and c["speedup"] == pytest.approx(1.6)
    assert c["efficiency"] == pytest.approx(0.8)
    modes = {"sync": "sync", "async": "async"}
    table = tp.format_table({"sync": sync, "async": fast}, modes, "sync")
    assert "| async | async | 3 | 16.0 |" in table and "1.60×" in table and "80%" in table
    assert "bound (T_gen + T_train) / max(T_gen, T_train) = 2.00×" in table
    targets = tp.target_lines({"sync": sync, "async": fast}, modes, "sync")
    assert "speedup 1.60×" in targets[0] and "NOT met" in targets[0]  # 80% < 85% of the bound
    noisy = tp.summarise([row(i, 4.0, wait_s=0.0) for i in range(1, 5)], warmup=1)  # 2.5x > the 2x bound
    assert "above the bound" in tp.target_lines({"sync": sync, "async": noisy}, modes, "sync")[0]
    assert "above the bound" not in targets[0]
    with pytest.raises(ValueError, match="baseline"):
        tp.format_table({"async": fast}, modes, "sync")
    slow = tp.summarise([row(i, 8.0) for i in range(1, 5)], warmup=1)
    ranking = tp.format_ranking({"a": slow, "b": fast}, ["a", "b"])
    assert ranking.index("| 1 | b |") < ranking.index("| 2 | a |")


def test_deep_merge():
    base = {"run": {"name": "x", "steps": 4}, "placement": {"learner": {"replicas": 1, "cpus_per_replica": 1}},
            "stages": [{"name": "a"}]}
    out = tp.deep_merge(base, {"placement": {"learner": {"cpus_per_replica": 2}}, "stages": []})
    assert out["placement"]["learner"] == {"replicas": 1, "cpus_per_replica": 2}
    assert out["stages"] == [] and out["run"] == base["run"]
    assert base["placement"]["learner"]["cpus_per_replica"] == 1  # the input is not changed


def test_placement_config_merges_and_loads(tmp_path):
    from verimed.core.config import load_config

    args = tp.parse_args(["--placement", str(ROOT / "configs/cluster/cpu-default.yaml"), "--output-dir", str(tmp_path)])
    runs = tp.plan_runs(args)
    assert [r.mode for r in runs] == ["sync", "placement"]
    merged = tp.resolve_config(runs[1], tmp_path)
    cfg = load_config(merged, runs[1].overrides)
    assert cfg.placement.learner.cpus_per_replica == 1 and cfg.placement.simulator.cpus_per_replica == 0
    assert cfg.rollout.max_tokens == 64 and cfg.stages == [] and cfg.async_.max_staleness == 1  # base kept


def test_dry_run_commands(tmp_path, capsys):
    assert tp.main(["--dry-run", "--kl", "--steps", "5", "--warmup", "1", "--staleness", "2",
                    "--override", "rollout.max_tokens=16", "--output-dir", str(tmp_path)]) == 0
    cmds = [shlex.split(line.split("  #")[0]) for line in capsys.readouterr().out.splitlines()]
    assert len(cmds) == 3 and not list(tmp_path.iterdir())  # nothing ran, nothing written
    sync, asyn, kl = cmds
    for cmd in cmds:
        assert cmd[1:4] == ["-m", "verimed.cli", "train"]
        assert {"stages=[]", "run.steps=5", "rollout.max_tokens=16", f"run.output_dir={tmp_path}"} <= set(cmd)
    assert "async.max_staleness=0" in sync and "run.name=sync" in sync
    assert "async.max_staleness=2" in asyn and "grpo.kl_coef=0.05" not in asyn
    assert "async.max_staleness=2" in kl and "grpo.kl_coef=0.05" in kl


@pytest.mark.parametrize("argv", [["--steps", "2", "--warmup", "2"], ["--override", "novalue"],
                                  ["--staleness", "0"], ["--placement", "does/not/exist.yaml"]])
def test_bad_arguments(argv):
    with pytest.raises(SystemExit):
        tp.parse_args(argv)

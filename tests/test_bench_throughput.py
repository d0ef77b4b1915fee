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


def test_to_predicted_converts_emulated_units_back():
    s = tp.summarise([row(1, 10.0, train_s=4.0, sync_s=1.0, gen_tps=20.0, train_tokens=100.0, ref_wait=0.5)], warmup=0)
    p = tp.to_predicted(s, 4.0)
    for key in ("wall_s", "step_s", "train_s", "sync_s", "train_wait_s", "other_s", "t_gen", "t_train",
                "reference_wait_s"):
        assert p[key] == pytest.approx(s[key] * 4.0), key
    assert p["train_tokens_per_s"] == pytest.approx(100.0 / 40.0)  # 100 tokens over 10 wall s = 40 modelled s
    assert p["gen_tokens_per_s"] == pytest.approx(20.0 / 4.0)
    # Ratios and token totals are unit-free: unchanged.
    for key in ("trainer_idle", "rollout_idle", "reference_wait_ratio", "train_tokens", "gen_tokens", "steps"):
        assert p[key] == s[key], key
    assert tp.to_predicted(s, 1.0) == s and s["step_s"] == 10.0  # the input is not changed
    for bad in (0.0, -2.0, float("nan")):
        with pytest.raises(ValueError, match="time_scale"):
            tp.to_predicted(s, bad)


def test_emulated_runs_get_profile_and_scale_and_calibrate_adds_the_real_sync(tmp_path, capsys):
    assert tp.main(["--dry-run", "--emulate", "cpu-smollm2", "--time-scale", "2.5", "--calibrate",
                    "--output-dir", str(tmp_path)]) == 0
    cmds = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    by_name = {next(a for a in c if a.startswith("run.name=")).split("=", 1)[1]: c for c in cmds}
    assert list(by_name) == ["sync", "real-sync", "async"]  # the real run beside the emulated sync
    for name in ("sync", "async"):
        cmd = by_name[name]
        assert cmd[cmd.index("--emulate") + 1] == "cpu-smollm2" and "emulation.time_scale=2.5" in cmd
    real = by_name["real-sync"]
    assert "--emulate" not in real and not any(a.startswith("emulation.") for a in real)
    assert "async.max_staleness=0" in real and "stages=[]" in real


@pytest.mark.parametrize("argv", [["--calibrate"], ["--time-scale", "2"], ["--emulate", "x", "--time-scale", "0"],
                                  ["--emulate", "x", "--time-scale", "-1"]])
def test_emulation_flags_rejected_without_emulate_or_with_bad_scale(argv):
    with pytest.raises(SystemExit):
        tp.parse_args(argv)


def test_calibration_verdict_at_the_edges():
    real = tp.summarise([row(1, 10.0)], warmup=0)
    assert tp.calibration_ratio(tp.summarise([row(1, 11.4)], warmup=0), real) == pytest.approx(1.14)
    assert "met" in tp.calibration_line(tp.summarise([row(1, 11.4)], warmup=0), real, "p").split("±15%: ")[1][:4]
    assert "NOT met" in tp.calibration_line(tp.summarise([row(1, 11.6)], warmup=0), real, "p")
    assert "NOT met" in tp.calibration_line(tp.summarise([row(1, 8.4)], warmup=0), real, "p")  # too fast fails too
    assert "NOT met" not in tp.calibration_line(tp.summarise([row(1, 8.6)], warmup=0), real, "p")


def test_ranking_reason_names_the_winner_and_the_idle_side():
    # b: learners wait less for generation (trainer idle 10% vs 50%): more rollout capacity wins.
    starved = tp.summarise([row(1, 10.0, wait_s=5.0, train_tokens=100.0)], warmup=0)
    fed = tp.summarise([row(1, 8.0, wait_s=0.8, train_tokens=100.0)], warmup=0)
    line = tp.ranking_reason({"a": starved, "b": fed}, ["a", "b"])
    assert line.startswith("`b` wins") and "learners wait less for generation" in line and "`a`" in line
    # Engines idle waiting for the learner in a: b's engines wait less.
    slow_learner = tp.summarise([row(1, 10.0, wait_s=0.0, rollout_idle=0.6)], warmup=0)
    quick = tp.summarise([row(1, 9.0, wait_s=0.0, rollout_idle=0.1)], warmup=0)
    assert "engines wait less" in tp.ranking_reason({"a": slow_learner, "b": quick}, ["a", "b"])
    same = tp.summarise([row(1, 9.0, train_s=3.0, wait_s=0.0)], warmup=0)
    assert "learner phase is shorter" in tp.ranking_reason({"a": tp.summarise([row(1, 10.0, wait_s=0.0)], warmup=0),
                                                           "b": same}, ["a", "b"])
    with pytest.raises(ValueError, match=">= 2"):
        tp.ranking_reason({"a": same}, ["a"])


def test_no_sync_ranks_placements_only(tmp_path, capsys):
    placement = str(ROOT / "configs/cluster/placements/m2-32b-shipped.yaml")
    assert tp.main(["--dry-run", "--no-sync", "--placement", placement, str(ROOT / "configs/cluster/placements/m2-32b-more-rollout.yaml"),
                    "--emulate", "h100-qwen2.5-32b", "--time-scale", "3", "--output-dir", str(tmp_path)]) == 0
    names = [next(a for a in shlex.split(line.split("  #")[0]) if a.startswith("run.name="))
             for line in capsys.readouterr().out.splitlines()]
    assert names == ["run.name=placement-m2-32b-shipped", "run.name=placement-m2-32b-more-rollout"]
    for argv in (["--no-sync"], ["--no-sync", "--placement", placement, "--kl"],
                 ["--no-sync", "--placement", placement, "--emulate", "x", "--calibrate"]):
        with pytest.raises(SystemExit):
            tp.parse_args(argv)

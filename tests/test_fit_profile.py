"""bench/fit_profile.py: the pure fits, the in-place rewrite of the profile YAML, and a fit from synthetic runs."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from verimed.core.emulate.profile import learner_seconds, load_profile, sync_seconds

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_fit_profile", ROOT / "bench" / "fit_profile.py")
fp = importlib.util.module_from_spec(_spec)
sys.modules["bench_fit_profile"] = fp
_spec.loader.exec_module(fp)
BASE = ROOT / "configs" / "profiles" / "cpu-smollm2.yaml"


def test_decode_step_observed():
    # 16 sequences, 1024 tokens: 64 decode steps; 6.5 s wait of which 0.1 s prefill -> 0.1 s a step.
    assert fp.decode_step_seconds_observed(6.5, 1024, 16, 0.1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="no decode time"):
        fp.decode_step_seconds_observed(0.1, 1024, 16, 0.2)
    with pytest.raises(ValueError):
        fp.decode_step_seconds_observed(1.0, 0, 16, 0.0)


def test_fit_decode_two_levels_recovers_the_line_and_one_level_keeps_the_split():
    step_s, per_seq, how = fp.fit_decode([(8, 0.02 + 8 * 0.005), (16, 0.02 + 16 * 0.005), (16, 0.02 + 16 * 0.005)],
                                         1.0, 1.0)
    assert step_s == pytest.approx(0.02) and per_seq == pytest.approx(0.005) and "least squares" in how
    # One level: the base split 0.02 : 0.0055 is kept and t_step(16) reproduced exactly.
    step_s, per_seq, how = fp.fit_decode([(16, 0.2), (16, 0.2)], 0.02, 0.0055)
    assert step_s / per_seq == pytest.approx(0.02 / 0.0055) and step_s + 16 * per_seq == pytest.approx(0.2)
    assert "kept the base split" in how
    # Two levels whose line has a negative intercept (slower at lower concurrency: noise) fall back.
    step_s, per_seq, how = fp.fit_decode([(8, 0.3), (16, 0.2)], 0.02, 0.0055)
    assert step_s > 0 and per_seq > 0 and "not both > 0" in how
    with pytest.raises(ValueError):
        fp.fit_decode([], 0.02, 0.0055)


def test_response_length_stats():
    mean, std = fp.response_length_stats([640.0, 480.0], [10.0, 10.0])  # step means 64 and 48
    assert mean == pytest.approx(56.0)
    assert std == pytest.approx(((10 * 64 + 10 * 64) / 1) ** 0.5)  # n·(8²) per step, K−1 = 1
    assert fp.response_length_stats([64.0], [1.0]) == (64.0, 0.0)
    with pytest.raises(ValueError):
        fp.response_length_stats([1.0], [0.0])


def test_learner_and_sync_fits_invert_the_profile_formulas():
    profile = load_profile("cpu-smollm2")
    lp = profile.learner
    ratio = lp.train_tokens_per_s_per_gpu / lp.forward_tokens_per_s_per_gpu
    steps = [learner_seconds(profile, t, 1, forward_passes=1, optimizer_steps=2) for t in (2000, 3000)]
    assert fp.fit_learner_tokens_per_s(steps, [2000, 3000], 1, 2, lp.optimizer_step_s, ratio) == pytest.approx(
        lp.train_tokens_per_s_per_gpu)
    secs = [sync_seconds(profile, b) for b in (5e8, 6e8)]
    assert fp.fit_sync_bandwidth([5e8, 6e8], secs, profile.weight_sync.latency_s) == pytest.approx(
        profile.weight_sync.bandwidth_gb_per_s)
    # One step slowed 5x by another job on the machine: the median ignores it, a ratio of sums would not.
    slowed = [steps[0], steps[1], 5 * steps[1]]
    assert fp.fit_learner_tokens_per_s(slowed, [2000, 3000, 3000], 1, 2, lp.optimizer_step_s, ratio) == pytest.approx(
        lp.train_tokens_per_s_per_gpu)
    with pytest.raises(ValueError):
        fp.fit_learner_tokens_per_s([0.5], [100], 1, 2, 0.3, ratio)  # less than the optimizer steps
    with pytest.raises(ValueError):
        fp.fit_sync_bandwidth([1e8], [0.005], 0.01)


def test_rewrite_values_keeps_layout_and_drops_stale_comments():
    text = BASE.read_text()
    out = fp.rewrite_values(text, {"step_s": 0.123, "bandwidth_gb_per_s": 9.5, "basis": "fitted",
                                   "assumption": 'has: colon "quotes"'})
    data = yaml.safe_load(out)
    assert data["rollout"]["by_tp"][1]["step_s"] == 0.123 and data["weight_sync"]["bandwidth_gb_per_s"] == 9.5
    assert data["assumption"] == 'has: colon "quotes"' and data["basis"] == "fitted"
    assert data["architecture"] == yaml.safe_load(text)["architecture"]
    assert "  judge: {" in out  # flow-style roles kept
    assert data["rollout"]["by_tp"][1]["step_s_per_seq"] == yaml.safe_load(text)["rollout"]["by_tp"][1]["step_s_per_seq"]
    with pytest.raises(ValueError, match="no line for"):
        fp.rewrite_values(text, {"no_such_key": 1})


def _run(tmp_path, name, b, steps, backend="vllm", staleness=0):
    d = tmp_path / name
    d.mkdir()
    cfg = {"rollout": {"backend": backend, "prompts_per_step": b, "group_size": 4}, "trainer": {"minibatches": 2},
           "grpo": {"proximal": "recompute", "m2po_threshold": 0.0}, "async": {"max_staleness": staleness}}
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    return d


def test_fit_from_synthetic_runs_reproduces_a_known_profile(tmp_path, capsys):
    """Runs generated from a known profile (decode 0.03 + c·0.004) are fitted back to it, then written."""
    profile = load_profile("cpu-smollm2")
    prefill = profile.rollout.by_tp[1].prefill_tokens_per_s
    dirs = []
    for name, b in (("b4", 4), ("b2", 2)):
        c, rows, total = b * 4, [], 0.0
        for step in range(1, 5):
            gen, prompt = 64.0 * c, 200.0  # 64 tokens per sequence; 200 prompt tokens per group
            packed = gen + 4 * prompt * b
            total += gen
            rows.append({"step": step, "time/train_wait_s": prompt / prefill + 64 * (0.03 + c * 0.004),
                         "counters/gen_tokens": total, "loss/tokens": gen, "loss/sequences": float(c),
                         "train/step_seconds": learner_seconds(profile, int(packed), 1, 1, 2),
                         "train/packed_tokens": packed, "sync/bytes": 5.38e8,
                         "sync/seconds": sync_seconds(profile, int(5.38e8))})
            if name == "b4":  # a newer run: the fan-out's wall time holds the engines' pause, the send apart
                rows[-1].update({"sync/send_seconds": rows[-1]["sync/seconds"], "sync/seconds": rows[-1]["sync/seconds"] + 2.0})
        dirs.append(_run(tmp_path, name, b, rows))
    values, notes = fp.fit(dirs, yaml.safe_load(BASE.read_text()), warmup=1)
    # The B groups prefill concurrently: the wait holds one group's 200 prompt tokens, (packed − loss)/(G·B).
    assert values["step_s"] == pytest.approx(0.03, rel=1e-3) and values["step_s_per_seq"] == pytest.approx(0.004, rel=1e-3)
    assert values["train_tokens_per_s_per_gpu"] == pytest.approx(profile.learner.train_tokens_per_s_per_gpu, rel=1e-3)
    assert values["response_tokens_mean"] == 64.0 and values["response_tokens_std"] == 0.0
    assert values["bandwidth_gb_per_s"] == pytest.approx(profile.weight_sync.bandwidth_gb_per_s, rel=1e-2)
    assert any("least squares over concurrency [8, 16]" in n for n in notes)
    out = tmp_path / "fitted.yaml"
    assert fp.main([str(d) for d in dirs] + ["--out", str(out), "--warmup", "1"]) == 0
    fitted = load_profile(str(out))  # the written file is a valid profile
    assert fitted.basis == "fitted" and fitted.rollout.by_tp[1].step_s == pytest.approx(0.03, rel=1e-3)
    assert "b4" in out.read_text().splitlines()[1]  # the header names the runs
    # An emulated run is refused: the fit must come from real devices.
    emu = _run(tmp_path, "emu", 4, [{"step": 1}], backend="emulated")
    assert fp.main([str(emu)]) == 1 and "emulated" in capsys.readouterr().err
    # A missing metric names the file and the key.
    bad = _run(tmp_path, "bad", 4, [{"step": 1, "time/train_wait_s": 1.0}])
    assert fp.main([str(bad), "--warmup", "0"]) == 1
    assert "train/packed_tokens" in capsys.readouterr().err

"""bench/gpu_learner.py on CPU: the GPU learner bench runs end to end, and its checks can fail.

The benches' purpose is one H100/H200 run (bench/gpu_check.sh); here the same
script and code run at toy sizes with the Triton kernels interpreted, so the
first GPU run spends its minutes on the GPU, not on a typo.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_learner  # noqa: E402


@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu(tmp_path):
    """bench/gpu_check.sh in its CPU smoke mode (Triton interpreted, toy sizes): every step of the
    GPU run — kernel checks, the learner step (fused vs torch head, packing check), the kernel table
    (fused, naive, torch.compile, both Liger rows, the 3-GEMM floor, targets, advantages) — runs end
    to end and writes its tables. fp16 kernel inputs: the interpreter's bf16 dot is wrong."""
    env = dict(os.environ, OUT=str(tmp_path), GPU_CHECK_SMOKE="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    log = (tmp_path / "gpu_check.log").read_text()
    assert proc.returncode == 0, log[-4000:]
    assert [line.split(":")[0] for line in log.splitlines() if " exit " in line] == \
        ["== correctness", "== learner", "== kernels 48,32,300", "== done"]

    data = json.loads((tmp_path / "learner.json").read_text())
    assert [(r["head"], r["attention"]) for r in data["rows"]] == [("triton", "sdpa"), ("torch", "sdpa")]
    # fp32 on CPU: the two heads differ by accumulation order only (~1e-7 relative of a ~1e-3 loss)
    assert data["loss_rel"] <= 1e-4
    assert all(r["step_s"] > 0 and np.isfinite(r["loss"]) for r in data["rows"])
    (check,) = data["checks"]
    assert check["ok"] and max(check["errors"]) <= 1e-4 and min(check["control"][1:]) > 0.1

    table = (tmp_path / "tables.md").read_text()
    assert "| triton | sdpa |" in table and "Packing (sdpa)" in table
    rows = {line.split("|")[2].strip(): line.split("|") for line in table.splitlines() if line.startswith("| 48, 32, 300")}
    assert set(rows) == {"3-GEMM floor", "fused (triton)", "naive torch", "torch.compile(naive)",
                         "liger FLCE sum (no entropy)", "liger FLCE none (no entropy)"}
    # fp16 logits of the naive paths vs the fused kernel's fp32 ones: |Δlogp| ~ |z|·2^-11 ≲ 1e-2
    for name in ("naive torch", "torch.compile(naive)", "liger FLCE none (no entropy)"):
        assert float(rows[name][8]) <= 1e-2, (name, rows[name][8])
    assert "- N,H,V = 48,32,300: fused fwd+bwd" in table
    assert "-> ok" in table.split("grpo_advantages, 64 samples in groups of 16")[1]


@pytest.fixture(scope="module")
def tiny_learner(tmp_path_factory):
    from verimed.core.config import load_config
    from verimed.core.train.learner import Learner

    path = gpu_learner.write_model_config(tmp_path_factory.mktemp("qwen2"), gpu_learner.TINY)
    return Learner(load_config(None, []), str(path), random_init=True)


def test_packing_check_fails_when_sequences_see_each_other(tiny_learner, monkeypatch):
    """Position ids that do not restart: transformers sees one long sequence, and the check must say FAIL."""
    import torch

    from verimed.core.train import policy

    cpu = torch.device("cpu")
    assert gpu_learner.packing_check(tiny_learner, "sdpa", [20, 30, 40], 1000, cpu, 1e-4)["ok"]
    real = policy.packed_layout

    def no_restart(*args, **kwargs):
        row = real(*args, **kwargs)
        return row._replace(position_ids=np.arange(len(row.ids)))

    monkeypatch.setattr(policy, "packed_layout", no_restart)
    broken = gpu_learner.packing_check(tiny_learner, "sdpa", [20, 30, 40], 1000, cpu, 1e-4)
    assert not broken["ok"] and max(broken["errors"]) > 1e-2


def test_step_flops_by_hand():
    """One layer, h=4, inter=8, 2 heads / 1 KV head, V=10; one group of two 2+3-token sequences."""
    from learner_step import grpo_batch

    shape = dict(hidden_size=4, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=10)
    batch = grpo_batch(1, 2, 2, 3, vocab=10)
    # P_blocks = q,o 2·4·4 + k,v 2·4·2 + mlp 3·4·8 = 144; T = 10; Σn² = 50; loss tokens = 6
    assert gpu_learner.step_flops(batch, shape, False) == 3 * (2 * 144 * 10 + 2 * 4 * 50 + 2 * 10 * 4 * 6)
    # shared prompt: 6 response tokens + the 2-token prompt once
    assert gpu_learner.step_flops(batch, shape, True) == 3 * (2 * 144 * 8 + 2 * 4 * 50 + 2 * 10 * 4 * 6)


def test_a_failing_configuration_keeps_the_others(tmp_path):
    """The Triton head on CPU without the interpreter fails at run time: that row is reported FAILED,
    the torch row and the packing check still run, the exit status says so. A malformed spec is refused."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VERIMED_KERNELS")}
    cmd = [sys.executable, "bench/gpu_learner.py", "--tiny", "--steps", "1", "--results", "-", "--configs"]
    proc = subprocess.run(cmd + ["torch:sdpa", "triton:sdpa"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAILED configuration triton:sdpa: ValueError" in proc.stdout and "| torch | sdpa |" in proc.stdout
    assert "Packing (sdpa)" in proc.stdout and "GPU LEARNER CHECKS FAILED" in proc.stdout
    bad = subprocess.run(cmd + ["torch-sdpa"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "expected HEAD:ATTENTION" in bad.stderr

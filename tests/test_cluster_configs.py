"""A shipped cluster config, run as a user would run it before renting the cluster.

`verimed cluster up` (one loopback node with 8 logical GPUs), then `ray job submit --
verimed train configs/cluster/node-8gpu.yaml --emulate h100-qwen2.5-7b` for a few steps:
the config's own placement (4 learner ranks, 3 policy engines, a judge engine, CPU
clients), the real controller, the real weight-sync coordinator and the start-up
placement check, on emulated devices. Then `verimed cluster down`. What it proves is
listed in README "Try a cluster config on a laptop"; the 20-step runs of both cluster
configs are in bench/RESULTS.md.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from netutil import loopback_up_args

from verimed.cli import main
from verimed.core.cluster import loopback as lb
from verimed.core.train.ledger_check import check_exactly_once

REPO = Path(__file__).resolve().parent.parent
RAY_BIN = str(Path(sys.executable).parent / "ray")
STEPS = 3


@pytest.mark.integration
@pytest.mark.slow
def test_node_8gpu_config_runs_through_ray_job_submit_on_a_loopback_node(tmp_path):
    tmp, up = loopback_up_args(1, 8, 64, RAY_BIN)
    runs = tmp_path / "runs"
    try:
        assert main(up) == 0
        state = lb.read_state(tmp)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        runtime_env = json.dumps({"env_vars": {"PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}})
        job = subprocess.run(
            [RAY_BIN, "job", "submit", f"--address={state.dashboard_url}", f"--runtime-env-json={runtime_env}", "--",
             sys.executable, "-m", "verimed.cli", "train", str(REPO / "configs/cluster/node-8gpu.yaml"),
             "--emulate", "h100-qwen2.5-7b", f"run.steps={STEPS}", "emulation.time_scale=20",
             f"run.output_dir={runs}", "metrics.wandb=disabled"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900, check=False)
        logs = job.stdout + job.stderr
        assert job.returncode == 0, logs[-4000:]
    finally:
        main(["cluster", "down", "--temp-dir", tmp])
        shutil.rmtree(tmp, ignore_errors=True)
    run = runs / "node-8gpu"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # The emulated engines serve the learner's version after every sync: the real parity check reads 0.
    assert all(r["sync/parity_max_abs"] == 0.0 and r["counters/sync_failures"] == 0 for r in rows)
    assert rows[-1]["llm/judge/calls"] > 0  # the judge's prompts reached the verifier engine group
    placement = json.loads((run / "placement.json").read_text())
    assert placement["ok"], placement["problems"]
    actors = placement["actors"]
    expected = {f"learner-{r}" for r in range(4)} | {f"rollout-{i}" for i in range(3)} | {"verifier_engine-0"}
    assert expected <= set(actors), sorted(actors)
    assert {a["node_ip"] for a in actors.values()} == {"127.0.0.2"}
    gpu_devices = [actors[name]["CUDA_VISIBLE_DEVICES"] for name in sorted(expected)]
    assert sorted(gpu_devices) == [str(d) for d in range(8)]  # 8 whole GPUs, each seen by exactly one actor
    consumed = [uid for line in (run / "ledger.jsonl").read_text().splitlines() for uid in json.loads(line)["consumed"]]
    assert len(consumed) == len(set(consumed)) == STEPS * 32 * 8  # B·G samples per step, each once
    report = check_exactly_once(run)
    assert report.ok, report.summary()

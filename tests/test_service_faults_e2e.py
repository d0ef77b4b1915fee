"""Service faults end to end (issue #17, part 2): `verimed train` on emulated devices under a fault.

- **Judge outage**: the LLM judge is an OpenAI-compatible server (``tests/fault_proxy.py``'s own
  fake judge) that goes down for 30 s mid-run, the way a crashed server is down (connections
  refused, open ones reset). Every group judged during the outage waits and re-runs with
  backoff: none is dropped, no reward is computed without a verdict, the run trains every
  step, and the outage is counted at the step it happened (``faults/judge_unavailable``),
  with the failing actor and cause in ``logs/faults.log``.
- **Slow engine**: one of four emulated policy engines runs 5x slower
  (``emulation.engine_slowdown``). The staleness bound holds, every draw is trained or
  accounted for exactly once, and routing by expected completion gives the slow engine
  fewer groups than any other. (Its throughput is measured in ``bench/faults.py``.)

Each run is its own ``verimed train`` subprocess with its own local Ray instance.

    pytest -q -m slow tests/test_service_faults_e2e.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fault_proxy import FaultProxy

from verimed.core.train.ledger_check import check_exactly_once

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.integration, pytest.mark.slow]

OUTAGE_S = 30.0


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, never a shared one
    return {**env, "PYTHONPATH": f"{REPO}:{os.environ.get('PYTHONPATH', '')}",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "WANDB_MODE": "disabled"}


def _train(tmp_path: Path, name: str, profile: str, overrides: list[str], timeout: float) -> tuple[Path, list[dict], str]:
    cmd = [sys.executable, "-m", "verimed.cli", "train", str(REPO / "configs/default.yaml"), "--emulate", profile,
           "stages=[]", "stage_eval.healthbench=0", "stage_eval.consultations=0", "metrics.wandb=disabled",
           "metrics.console=false", "metrics.report=false", f"run.output_dir={tmp_path}", f"run.name={name}",
           *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return run, rows, proc.stderr


def test_a_30s_judge_outage_delays_groups_loses_none_and_is_counted_at_its_step(tmp_path):
    steps, prompts, group = 6, 2, 2
    # About 2 x 2 x (rubric items) judge requests per step: the 60th arrives during step 2.
    proxy = FaultProxy(fault_rate=0.0, down_after=60, down_s=OUTAGE_S).start()
    try:
        run, rows, stderr = _train(tmp_path, "outage", "cpu-smollm2", [
            f"run.steps={steps}", f"rollout.prompts_per_step={prompts}", f"rollout.group_size={group}",
            "rollout.max_tokens=32", "emulation.time_scale=10",
            "judge.backend=llm", "judge.max_retries=1", "llm.type=openai", f"llm.base_url={proxy.base_url}",
            "llm.model=fake-judge", "llm.max_retries=2", "llm.backoff_base_s=0.1", "llm.backoff_max_s=0.5",
            "llm.timeout_s=20"], timeout=600)
    finally:
        proxy.stop()
    assert len(proxy.outages) == 1 and proxy.outages[0][1] - proxy.outages[0][0] >= OUTAGE_S
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # the run continued to its end

    # none lost: every draw trained exactly once, nothing dropped as failed, every sample trained
    report = check_exactly_once(run)
    assert report.ok, report.problems
    assert report.dropped.get("failed", 0) == 0 and report.consumed == steps * prompts * group, report.summary()
    last = rows[-1]
    # no reward came from a missing verdict (today's main graded the outage's items "ungradable")
    assert last["judge/ungradable"] == 0 and last["judge/unavailable"] > 0
    assert last["counters/draws_failed"] == 0

    # counted at the step it happened, cumulative at the end, and nothing after the judge came back
    per_step = [r["faults/judge_unavailable"] for r in rows]
    print(f"outage {proxy.outages[0][1] - proxy.outages[0][0]:.1f} s; judge_unavailable per step {per_step}; "
          f"step seconds {[round(r['time/step_s'], 1) for r in rows]}; {report.summary()}")
    hit = [r["step"] for r in rows if r["faults/judge_unavailable"] > 0]
    assert hit and sum(per_step) == last["counters/judge_unavailable"] > 0
    assert hit[-1] < steps and per_step[-1] == 0, per_step

    # which actor failed and why: logs/faults.log and the driver log
    log = (run / "logs" / "faults.log").read_text().splitlines()
    assert len(log) == last["counters/judge_unavailable"]
    assert all("judge_unavailable" in ln and "actor VerifierActor.judge" in ln and "JudgeUnavailable" in ln for ln in log)
    assert "re-run in" in stderr and "JudgeUnavailable" in stderr


def test_one_engine_5x_slower_keeps_the_bound_exactly_once_and_gets_fewer_groups(tmp_path):
    steps, staleness = 8, 1
    run, rows, _ = _train(tmp_path, "slow", "h100-qwen2.5-7b", [
        f"run.steps={steps}", "rollout.prompts_per_step=8", "rollout.group_size=2", "rollout.max_tokens=512", "model.max_model_len=2048",
        f"async.max_staleness={staleness}", "placement.rollout.replicas=4", "emulation.engine_slowdown={3: 5}",
        "emulation.time_scale=5"], timeout=600)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    report = check_exactly_once(run)
    assert report.ok, report.problems
    # the staleness bound: no trained token older than version - max_staleness, at any step
    assert all(r["staleness/max"] <= staleness for r in rows), [r["staleness/max"] for r in rows]
    last = rows[-1]
    fast = [last[f"router/engine_{i}/requests"] for i in range(3)]
    slow = last["router/engine_3/requests"]
    print(f"generate requests per engine {fast + [slow]}; latency_s "
          f"{[round(last[f'router/engine_{i}/latency_s'], 2) for i in range(4)]}; staleness/max "
          f"{[r['staleness/max'] for r in rows]}; stale drops {last['counters/stale_dropped']:.0f}; {report.summary()}")
    # least-loaded routing would give each engine about a quarter; by expected completion the
    # slow engine settles near a fifth of a fast one's share (core/rollout/routing.py)
    assert slow < min(fast) / 2, (fast, slow)
    assert last["router/engine_3/latency_s"] > 2 * max(last[f"router/engine_{i}/latency_s"] for i in range(3))
    assert last["counters/draws_failed"] == 0 and last["counters/groups_failed"] == 0

"""`ray job submit` against a loopback head: the job joins the existing cluster and finishes.

Starts `ray start --head --block` (dashboard + job server, ray[default]) as a child
process bound to 127.0.0.1, submits `verimed train` with `--working-dir .`, follows
its logs and stops the head. Slow: marked integration + slow.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from netutil import free_port

REPO = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")


def test_ray_job_submit_joins_existing_cluster(runs_tmp):
    ray_bin = Path(sys.executable).parent / "ray"
    gcs, dash = free_port(), free_port()
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    # Ray's unix socket paths must stay under 107 characters: pytest's tmp_path is too deep.
    ray_tmp = tempfile.mkdtemp(prefix="vrj", dir="/tmp")
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--num-cpus=4", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--temp-dir={ray_tmp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_http(f"http://127.0.0.1:{dash}/api/version", 120)
        out_dir = runs_tmp / "runs"
        job = subprocess.run(
            [str(ray_bin), "job", "submit", f"--address=http://127.0.0.1:{dash}", "--working-dir", ".", "--",
             sys.executable, "-m", "verimed.cli", "train", "configs/default.yaml", "run.steps=2",
             "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_tokens=16", "metrics.console=false",
             "metrics.wandb=offline", f"run.output_dir={out_dir}", "run.name=job"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
        )
        logs = job.stdout + job.stderr
        assert job.returncode == 0, logs[-4000:]
        assert "succeeded" in logs, logs[-2000:]
        # The driver joined the head we started (no second, local cluster).
        assert "verimed: joined the Ray cluster at" in logs and "Started a local Ray instance" not in logs, logs[-3000:]
        rows = [json.loads(line) for line in (out_dir / "job" / "metrics.jsonl").read_text().splitlines()]
        assert [r["version"] for r in rows] == [1.0, 2.0]
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        # `ray start --block` stops its own node on SIGTERM; sweep anything left under our temp dir.
        subprocess.run(["pkill", "-f", ray_tmp], check=False)
        shutil.rmtree(ray_tmp, ignore_errors=True)

"""Node faults on the loopback cluster (issue #17): a node dies mid-run, the job is stopped.

Unit tests: ``verimed cluster kill-node`` / ``start-node`` on hand-made state files (bad node
index, the head, no cluster, a node already down or still running) and a CPU head.
Integration (a loopback cluster, emulated devices, ``ray job submit``):

- engine node lost: SIGKILL of a worker node that hosts only rollout engines; the run must
  go on with the others (it stalled in the weight-sync rejoin before), re-run the lost groups,
  and after ``start-node`` sync the restarted engines before routing to them;
- learner node lost: the job stops with a message naming the rank, the node and the resume
  command; ``--resume`` finishes from the last checkpoint;
- job stopped: ``ray job stop``; ``--resume`` finishes from the last checkpoint.

Each run ends with the exactly-once ledger check (``verimed/core/train/ledger_check.py``).

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_node_faults.py -m "not integration"
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from netutil import loopback_up_args

from verimed.cli import main
from verimed.core.cluster import loopback as lb
from verimed.core.train.checkpoint import latest_checkpoint
from verimed.core.train.ledger_check import check_exactly_once


def _state(tmp: str, sessions: list[int]) -> None:
    spec = lb.LoopbackSpec(nodes=len(sessions), gpus_per_node=1, cpus_per_node=1, temp_dir=tmp)
    nodes = tuple(lb.NodeState(index=k, ip=lb.node_ip(k), session=s, log=f"{tmp}/node-{k}.log")
                  for k, s in enumerate(sessions))
    lb._write_state(lb.ClusterState(spec=spec, nodes=nodes, gcs_address="127.0.0.2:1",
                                    dashboard_url="http://127.0.0.2:1", started_at=0, startup_s=0))


@pytest.fixture
def short_tmp():
    tmp = tempfile.mkdtemp(prefix="vf", dir="/tmp")
    yield tmp
    lb.state_path(tmp).unlink(missing_ok=True)
    os.rmdir(tmp)


def test_kill_and_start_node_refuse_no_cluster_the_head_and_a_bad_index(short_tmp, capsys):
    with pytest.raises(lb.LoopbackError, match="no loopback cluster state file"):
        lb.kill_node(short_tmp, 1)
    with pytest.raises(lb.LoopbackError, match="no loopback cluster state file"):
        lb.start_node(short_tmp, 1, "/nonexistent/ray")
    _state(short_tmp, [os.getsid(0), os.getsid(0)])  # sessions with live processes: ours (never killed below)
    for k, expected in ((0, "--node 0 is the head"), (2, r"--node 2: this cluster has nodes 0\.\.1"),
                        (-1, r"--node -1: this cluster has nodes 0\.\.1")):
        with pytest.raises(lb.LoopbackError, match=expected):
            lb.kill_node(short_tmp, k)
        with pytest.raises(lb.LoopbackError, match=expected):
            lb.start_node(short_tmp, k, "/nonexistent/ray")
    with pytest.raises(lb.LoopbackError, match="node 1 \\(127.0.0.3\\) is running .*kill-node --node 1` first"):
        lb.start_node(short_tmp, 1, "/nonexistent/ray")
    assert main(["cluster", "kill-node", "--node", "0", "--temp-dir", short_tmp]) == 1
    assert "--node 0 is the head" in capsys.readouterr().err
    assert main(["cluster", "start-node", "--node", "7", "--temp-dir", short_tmp]) == 1
    assert "this cluster has nodes 0..1" in capsys.readouterr().err


def test_kill_node_kills_exactly_that_nodes_session_at_once(short_tmp):
    node = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 300 & sleep 300 & wait"], start_new_session=True)
    bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)  # another node, another user's cluster
    try:
        for _ in range(200):
            if len(lb.session_members(node.pid)) == 3:
                break
            time.sleep(0.05)
        _state(short_tmp, [bystander.pid, node.pid])
        killed_node, killed = lb.kill_node(short_tmp, 1)
        assert killed_node.ip == "127.0.0.3" and killed == 3  # the shell ignores SIGTERM: only SIGKILL does this
        assert lb.session_members(node.pid) == [] and bystander.poll() is None
        with pytest.raises(lb.LoopbackError, match="already down .*start-node --node 1"):
            lb.kill_node(short_tmp, 1)
        with pytest.raises(lb.LoopbackError, match="no `ray` executable"):
            lb.start_node(short_tmp, 1, "/nonexistent/ray")
        # A ray that exists, but the head's dashboard of this (hand-made) cluster does not answer.
        with pytest.raises(lb.LoopbackError, match="does not answer .*is the cluster up"):
            lb.start_node(short_tmp, 1, "/bin/true")
    finally:
        node.wait(timeout=10)
        bystander.kill()
        bystander.wait()


def test_a_cpu_head_gets_no_gpus_and_the_workers_keep_theirs():
    spec = lb.LoopbackSpec(nodes=3, gpus_per_node=2, cpus_per_node=4, head_gpus=0, temp_dir="/tmp/vl")
    spec.validate()
    gpus = [next(a for a in lb.start_command(spec, k, "ray") if a.startswith("--num-gpus=")) for k in range(3)]
    assert gpus == ["--num-gpus=0", "--num-gpus=2", "--num-gpus=2"]
    default = lb.LoopbackSpec(nodes=2, gpus_per_node=2, cpus_per_node=4)
    assert "--num-gpus=2" in lb.start_command(default, 0, "ray")
    with pytest.raises(ValueError, match=re.escape("--head-gpus -1")):
        lb.LoopbackSpec(nodes=2, gpus_per_node=2, cpus_per_node=4, head_gpus=-1).validate()


def test_fault_lines_name_the_actor_its_node_the_cause_and_how_to_resume(tmp_path, capsys):
    import ray

    from verimed.actors.faults import (
        describe_error,
        learner_lost_message,
        learner_rank_of,
    )
    from verimed.core.train.faults import FaultCounters

    class Handle:  # a Ray actor handle's id, as learner_rank_of reads it
        def __init__(self, hex_id):
            self._actor_id = type("Id", (), {"hex": lambda _self: hex_id})()

    died = ray.exceptions.RayActorError("ab12", "The actor died unexpectedly before finishing this task.\n"
                                                "\tclass_name: LearnerActor\n\tip: 127.0.0.3\n"
                                                "The actor died because its node has died.")
    assert describe_error(died) == ("RayActorError: The actor died unexpectedly before finishing this task. "
                                    "class_name: LearnerActor ip: 127.0.0.3 The actor died because its node has died.")
    assert len(describe_error(died, limit=20)) == 20
    learners = [Handle("ff00"), Handle("ab12")]
    assert learner_rank_of(died, learners) == 1
    assert learner_rank_of(ray.exceptions.RayActorError("cd34"), learners) is None  # an engine's error
    assert learner_rank_of(ray.exceptions.RayActorError(), learners) is None  # no actor id at all
    message = learner_lost_message(1, "127.0.0.3", died, 4, tmp_path)
    assert message.startswith("learner rank 1 on 127.0.0.3 died (RayActorError: ")
    assert "its node has died" in message and "the run stops at version 4" in message
    assert f"has no checkpoint yet (it restarts at step 0); resume with `verimed train CONFIG --resume {tmp_path}`" in message
    (tmp_path / "checkpoints" / "step-000004").mkdir(parents=True)
    assert (f"the newest checkpoint is {tmp_path / 'checkpoints' / 'step-000004'}; resume with"
            in learner_lost_message(0, None, died, 4, tmp_path))
    log = FaultCounters(tmp_path / "logs" / "faults.log")
    log.note(4, "engine rollout-2 on 127.0.0.4 lost (ActorDiedError: ...)")
    log.note(5, "engine rollout-2 recovered: synced to version 9, routed again")
    lines = (tmp_path / "logs" / "faults.log").read_text().splitlines()
    assert [re.sub(r"^\S+ ", "", line) for line in lines] == [
        "step 4: engine rollout-2 on 127.0.0.4 lost (ActorDiedError: ...)",
        "step 5: engine rollout-2 recovered: synced to version 9, routed again"]
    assert "verimed: step 4: engine rollout-2 on 127.0.0.4 lost" in capsys.readouterr().err


def test_sigterm_says_where_to_resume_and_exits_143(tmp_path):
    """In a child process (the handler exits the process): the message, the exit code, and nothing
    changed outside the block."""
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from verimed.actors.faults import exit_on_sigterm\n"
        "before = signal.getsignal(signal.SIGTERM)\n"
        "with exit_on_sigterm(Path(sys.argv[1]), lambda: 7):\n"
        "    pass\n"
        "assert signal.getsignal(signal.SIGTERM) is before\n"
        "with exit_on_sigterm(Path(sys.argv[1]), lambda: 7):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    signal.pause()\n"
        "print('not reached')\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert done.returncode == 143, done.stderr
    assert "not reached" not in done.stdout
    assert (f"verimed: step 7: stopped by SIGTERM at version 7: it has no checkpoint yet (it restarts at step 0); "
            f"resume with `verimed train CONFIG --resume {tmp_path}`") in done.stderr
    assert "step 7: stopped by SIGTERM at version 7" in (tmp_path / "logs" / "faults.log").read_text()
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        {"step": 8, "counters/job_stopped": 1.0}]


# ------------------------------------------------------------------- integration: a loopback cluster

REPO = Path(__file__).resolve().parent.parent
RAY_BIN = str(Path(sys.executable).parent / "ray")
# 3 nodes: a CPU head (the job driver and the rules clients, which need no resources) and two workers of
# 2 logical GPUs. The plan's 4 GPUs (a 1-GPU learner, three 1-GPU engines) fill both workers, so one worker
# hosts the learner and an engine, the other two engines and nothing else, and a lost node's bundles can
# only come back on that node.
NODES, GPUS_PER_NODE, CPUS_PER_NODE = 3, 2, 4
RUN = ["stages=[]", "rollout.prompts_per_step=4", "rollout.group_size=2", "rollout.max_tokens=32",
       "stage_eval.healthbench=0", "stage_eval.consultations=0", "metrics.wandb=disabled", "metrics.console=false",
       "run.checkpoint_keep=2", "placement.learner.gpus_per_replica=1", "placement.learner.cpus_per_replica=1",
       "placement.rollout.replicas=3", "placement.rollout.gpus_per_replica=1", "placement.rollout.cpus_per_replica=1"]


@pytest.fixture(scope="module")
def cluster():
    """(temp dir, state) of the module's loopback cluster; every test leaves all its nodes up."""
    tmp, up = loopback_up_args(NODES, GPUS_PER_NODE, CPUS_PER_NODE, RAY_BIN)
    assert main(up + ["--head-gpus", "0"]) == 0
    try:
        yield tmp, lb.read_state(tmp)
    finally:
        main(["cluster", "down", "--temp-dir", tmp])
        shutil.rmtree(tmp, ignore_errors=True)


def _revive(tmp: str) -> None:
    """Start again every worker node a failed test left down (the next test needs the whole cluster)."""
    for node in lb.read_state(tmp).nodes[1:]:
        if not lb.session_members(node.session):
            lb.start_node(tmp, node.index, RAY_BIN)


class Job:
    """One ``ray job submit`` of ``verimed train`` (waits for the job, its log in ``log``)."""

    def __init__(self, state, runs: Path, name: str, overrides: list[str], resume: bool = False):
        self.url, self.id, self.run = state.dashboard_url, f"{name}-{time.monotonic_ns()}", runs / name
        self.log = runs / f"{self.id}.log"
        runtime_env = json.dumps({"env_vars": {"PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}})
        cmd = [RAY_BIN, "job", "submit", f"--address={self.url}", f"--submission-id={self.id}",
               f"--runtime-env-json={runtime_env}", "--", sys.executable, "-m", "verimed.cli", "train",
               str(REPO / "configs/default.yaml"), "--emulate", "cpu-smollm2", *RUN, *overrides,
               f"run.output_dir={runs}", f"run.name={name}"]
        cmd += ["--resume", str(self.run)] if resume else []
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        runs.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)

    def wait(self, timeout_s: float = 900) -> tuple[int, str]:
        rc = self.proc.wait(timeout=timeout_s)
        return rc, self.log.read_text(errors="replace")

    def _ray_job(self, action: str) -> str:
        done = subprocess.run([RAY_BIN, "job", action, f"--address={self.url}", self.id], check=True, timeout=120,
                              capture_output=True, text=True,
                              env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
        return done.stdout + done.stderr  # Ray's CLI logger writes some lines to stderr

    def stop(self) -> None:
        self._ray_job("stop")

    def logs(self) -> str:
        """The driver's whole output as Ray keeps it (the submit's tail may end before the last lines)."""
        return self._ray_job("logs")

    def status(self) -> str:
        """FAILED, STOPPED or SUCCEEDED, as ``ray job status`` words them; else its whole output."""
        text = self._ray_job("status")
        words = {f"Job '{self.id}' failed": "FAILED", f"Job '{self.id}' was stopped": "STOPPED",
                 f"Job '{self.id}' succeeded": "SUCCEEDED"}
        return next((status for line, status in words.items() if line in text), text)

    def rows(self) -> dict[int, dict]:
        """metrics.jsonl, the last row of each step (a resumed run re-does the steps after its checkpoint)."""
        path = self.run / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return {row["step"]: row for row in map(json.loads, lines)}

    def until(self, predicate, what: str, timeout_s: float = 300) -> None:
        """Wait until ``predicate()``; fail naming ``what`` and the job's log tail if the job ends or time runs out."""
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{what}: not seen (job {'ended' if self.proc.poll() is not None else 'runs'}); "
                                     f"log tail:\n{self.log.read_text(errors='replace')[-4000:]}")
            time.sleep(0.5)

    def actors_on(self) -> dict[str, set[str]]:
        """node IP -> names of the actors placed there (placement.json of the start-up check)."""
        actors = json.loads((self.run / "placement.json").read_text())["actors"]
        out: dict[str, set[str]] = {}
        for name, where in actors.items():
            out.setdefault(where["node_ip"], set()).add(name)
        return out


def _node_index(ip: str) -> int:
    return int(ip.rsplit(".", 1)[1]) - lb.FIRST_HOST


@pytest.mark.integration
def test_engine_node_lost_the_run_goes_on_and_the_engines_rejoin_up_to_date(cluster, tmp_path):
    """Kill the worker node that hosts two of the three engines mid-run: training goes on with one engine
    (it stalled in the weight-sync rejoin, which waited for every engine), the lost groups run again, and
    after the node rejoins both restarted engines are synced before they serve. Exactly-once ledger."""
    tmp, state = cluster
    # ~2.5 s a step (the emulated learner's 9 s at time_scale 1, measured here): 40 steps leave ~60 s after
    # the kill for Ray to notice, the node to rejoin and the engines to restart before the run ends.
    steps = 40
    job = Job(state, tmp_path / "runs", "engine-lost", [f"run.steps={steps}", "run.checkpoint_every=10",
                                                         "emulation.time_scale=4"])
    try:
        job.until(lambda: len(job.rows()) >= 2, "two steps before the fault")
        # The worker without the learner hosts two engines, and maybe some CPU clients (no resources:
        # Ray puts them anywhere): those restart at once on another node, their calls retried or re-run.
        by_node = job.actors_on()
        victims = [ip for ip, names in by_node.items() if ip != lb.node_ip(0) and "learner-0" not in names]
        assert len(victims) == 1, by_node
        lost = sorted(n for n in by_node[victims[0]] if n.startswith("rollout-"))
        assert len(lost) == 2, by_node
        assert main(["cluster", "kill-node", "--node", str(_node_index(victims[0])), "--temp-dir", tmp]) == 0
        killed_at = max(job.rows())
        # The run goes on while the node is down: this is where the old rejoin stalled (600 s per try).
        job.until(lambda: max(job.rows()) >= killed_at + 3, "three steps with the node down")
        assert job.rows()[max(job.rows())]["counters/engines_lost"] == 2.0
        assert job.rows()[max(job.rows())]["engines/in_rotation"] == 1.0
        assert main(["cluster", "start-node", "--node", str(_node_index(victims[0])), "--temp-dir", tmp]) == 0
        rc, log = job.wait()
        assert rc == 0, log[-4000:]
    finally:
        if job.proc.poll() is None:
            job.stop()
        _revive(tmp)
    rows = job.rows()
    assert sorted(rows) == list(range(1, steps + 1))
    first_lost = min(s for s, r in rows.items() if r["counters/engines_lost"] > 0)
    assert first_lost >= killed_at
    last = rows[steps]
    # Both came back and were synced before serving: all three engines in rotation, the parity check
    # (which reads every engine in rotation) at 0 after the last sync.
    assert (last["counters/engines_lost"], last["counters/engines_recovered"]) == (2.0, 2.0), last
    assert last["engines/in_rotation"] == 3.0 and last["sync/parity_max_abs"] == 0.0
    assert last["counters/groups_rerun_after_failure"] >= 1.0  # groups in flight on the lost engines
    faults = (job.run / "logs" / "faults.log").read_text()
    for name in lost:
        assert f"engine {name} on {victims[0]} lost (" in faults, faults
        assert re.search(rf"engine {name} recovered: synced to version \d+, routed again", faults), faults
    report = check_exactly_once(job.run)
    assert report.ok, report.summary()


def _resume_to_the_end_exactly_once(state, runs: Path, name: str, overrides: list[str], steps: int,
                                    expected_in_log: str) -> None:
    """``verimed train --resume`` of a stopped job: it says ``expected_in_log``, reaches the last step,
    and the run's ledger is exactly-once."""
    resumed = Job(state, runs, name, overrides, resume=True)
    rc, log = resumed.wait()
    assert rc == 0 and expected_in_log in log, log[-3000:]
    assert sorted(resumed.rows()) == list(range(1, steps + 1))
    report = check_exactly_once(resumed.run)
    assert report.ok, report.summary()


@pytest.mark.integration
@pytest.mark.slow
def test_learner_node_lost_stops_with_the_resume_command_and_resume_finishes_exactly_once(cluster, tmp_path):
    tmp, state = cluster
    steps, runs = 8, tmp_path / "runs"
    overrides = [f"run.steps={steps}", "run.checkpoint_every=2", "emulation.time_scale=10"]
    job = Job(state, runs, "learner-lost", overrides)
    try:
        job.until(lambda: (latest_checkpoint(job.run) is not None and max(job.rows(), default=0) >= 3),
                  "a checkpoint and a step after it")
        learner_ip = next(ip for ip, names in job.actors_on().items() if "learner-0" in names)
        assert learner_ip != lb.node_ip(0)  # the CPU head has no GPU for it
        assert main(["cluster", "kill-node", "--node", str(_node_index(learner_ip)), "--temp-dir", tmp]) == 0
        rc, _ = job.wait()
        log = job.logs()
    finally:
        if job.proc.poll() is None:
            job.stop()
        _revive(tmp)
    assert rc != 0 and job.status() == "FAILED", log[-3000:]  # `ray job submit` exits 1 for a failed job
    assert "exit code 3" in job._ray_job("status")  # LearnerLost's, not a crash's
    expected = f"learner rank 0 on {learner_ip} died ("
    assert expected in log and f"resume with `verimed train CONFIG --resume {job.run}`" in log, log[-3000:]
    assert expected in (job.run / "logs" / "faults.log").read_text()
    lost_row = job.rows()[max(job.rows())]
    assert (lost_row.get("counters/learner_lost"), lost_row.get("faults/learner_rank")) == (1.0, 0.0), lost_row
    _resume_to_the_end_exactly_once(state, runs, "learner-lost", overrides, steps, "resumed")


@pytest.mark.integration
@pytest.mark.slow
def test_ray_job_stop_then_resume_finishes_exactly_once(cluster, tmp_path):
    _, state = cluster
    steps, runs = 8, tmp_path / "runs"
    overrides = [f"run.steps={steps}", "run.checkpoint_every=2", "emulation.time_scale=10"]
    job = Job(state, runs, "stopped", overrides)
    try:
        job.until(lambda: (latest_checkpoint(job.run) is not None and max(job.rows(), default=0) >= 3),
                  "a checkpoint and a step after it")
        job.stop()
        job.wait()
        log = job.logs()
    finally:
        if job.proc.poll() is None:
            job.stop()
    assert job.status() == "STOPPED", log[-3000:]
    assert "stopped by SIGTERM at version" in log and f"--resume {job.run}`" in log, log[-3000:]
    stopped_row = job.rows()[max(job.rows())]
    assert stopped_row.get("counters/job_stopped") == 1.0, stopped_row
    _resume_to_the_end_exactly_once(state, runs, "stopped", overrides, steps, f"resumed {latest_checkpoint(job.run)}")

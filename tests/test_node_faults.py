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

import os
import re
import subprocess
import tempfile

import pytest

from verimed.cli import main
from verimed.core.cluster import loopback as lb


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
            subprocess.run(["sleep", "0.05"])
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

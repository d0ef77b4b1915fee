"""The loopback cluster (`verimed cluster up/down`) and the placement check of every start-up.

Unit tests: the `ray start` command lines (addresses, distinct ports, resources), bad
arguments, a cluster already up, stopping exactly one session, the placement check on
hand-made locations. Integration: 2 nodes × 2 logical GPUs, a `ray job submit` that
places a STRICT_SPREAD group and runs verimed's placement check (one deliberately wrong
actor), then `down` and nothing of the cluster left.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_loopback.py
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from netutil import loopback_up_args

from verimed.cli import main
from verimed.core.cluster import loopback as lb
from verimed.core.cluster.placement_check import (
    ActorLocation,
    check_placement,
    visible_devices,
)
from verimed.core.cluster.planner import (
    ClusterResources,
    PlacementConfig,
    RoleSpec,
    plan,
)

REPO = Path(__file__).resolve().parent.parent
RAY_BIN = str(Path(sys.executable).parent / "ray")


def _ports(cmd: list[str]) -> list[int]:
    """Every port a command line claims: the --*-port flags and the whole worker range."""
    flags = dict(re.fullmatch(r"--([\w-]+)=(.*)", a).groups() for a in cmd if re.fullmatch(r"--[\w-]+=.*", a))
    ports = [int(v) for k, v in flags.items() if k.endswith("port") and not k.endswith("worker-port")]
    return ports + list(range(int(flags["min-worker-port"]), int(flags["max-worker-port"]) + 1))


# ------------------------------------------------------------------ command lines


def test_command_lines_give_each_node_its_address_resources_and_own_ports():
    spec = lb.LoopbackSpec(nodes=9, gpus_per_node=8, cpus_per_node=16, memory_per_node=2**30, port=20000,
                           dashboard_port=19000, temp_dir="/tmp/vl")
    cmds = [lb.start_command(spec, k, "/venv/bin/ray") for k in range(spec.nodes)]
    for k, cmd in enumerate(cmds):
        assert cmd[:2] == ["/venv/bin/ray", "start"]
        assert f"--node-ip-address=127.0.0.{k + 2}" in cmd
        assert {"--num-gpus=8", "--num-cpus=16", f"--memory={2**30}", "--temp-dir=/tmp/vl"} <= set(cmd)
        assert ("--head" in cmd) == (k == 0)
        if k:
            assert "--address=127.0.0.2:20000" in cmd and not any(a.startswith("--dashboard-port") for a in cmd)
    assert "--dashboard-port=19000" in cmds[0] and "--dashboard-host=127.0.0.2" in cmds[0]
    claimed = [p for cmd in cmds for p in _ports(cmd)]
    assert len(claimed) == len(set(claimed)), "a port is claimed twice"
    assert claimed.count(19000) == 1  # the dashboard is outside every node's range
    assert all(1024 <= p <= 65535 for p in claimed)
    assert lb.gcs_address(spec) == "127.0.0.2:20000" and lb.dashboard_url(spec) == "http://127.0.0.2:19000"


def test_the_largest_cluster_stays_on_distinct_loopback_addresses_and_ports():
    spec = lb.LoopbackSpec(nodes=lb.MAX_NODES, gpus_per_node=0, cpus_per_node=1, port=6379, dashboard_port=8265)
    spec.validate()
    assert lb.node_ip(lb.MAX_NODES - 1) == "127.0.0.251"
    claimed = [p for k in range(spec.nodes) for p in _ports(lb.start_command(spec, k, "ray"))]
    assert len(claimed) == len(set(claimed)) and claimed.count(8265) == 1 and max(claimed) <= 65535


@pytest.mark.parametrize("change, option", [
    (dict(nodes=0), "--nodes 0"), (dict(nodes=-3), "--nodes -3"), (dict(nodes=251), "--nodes 251"),
    (dict(gpus_per_node=-1), "--gpus-per-node -1"), (dict(cpus_per_node=0), "--cpus-per-node 0"),
    (dict(memory_per_node=0), "--memory-per-node 0"), (dict(object_store_bytes=10**6), "--object-store-bytes"),
    (dict(temp_dir="relative/dir"), "--temp-dir"), (dict(temp_dir="/tmp/" + "x" * 40), "--temp-dir"),
    (dict(port=80), "--port 80"), (dict(port=64000), "--port 64000"),
    (dict(dashboard_port=6390), "--dashboard-port 6390"),
    (dict(dashboard_port=8400), "--dashboard-port 8400"), (dict(dashboard_port=70000), "--dashboard-port 70000"),
])
def test_bad_arguments_name_the_option(change, option):
    spec = lb.LoopbackSpec(**{**dict(nodes=2, gpus_per_node=2, cpus_per_node=2), **change})
    with pytest.raises(ValueError, match=re.escape(option)):
        spec.validate()
    with pytest.raises(ValueError, match=re.escape(option)):
        lb.up(spec, "/nonexistent/ray")  # nothing starts


def test_node_env_forces_multi_node_mode_and_the_venv_interpreter():
    env = lb.node_env({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_ADDRESS": "10.0.0.1:6379", "PATH": "/usr/bin"},
                      "/venv/bin/ray")
    # "0" (what tests and `verimed train` set for local clusters) would make every worker node refuse to join.
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "1"
    assert "RAY_ADDRESS" not in env and env["PATH"] == "/venv/bin" + os.pathsep + "/usr/bin"
    assert env["RAY_enable_worker_prestart"] == "0"


def _state(tmp: str, session: int) -> None:
    spec = lb.LoopbackSpec(nodes=1, gpus_per_node=1, cpus_per_node=1, temp_dir=tmp)
    node = lb.NodeState(index=0, ip="127.0.0.2", session=session, log="x")
    lb._write_state(lb.ClusterState(spec=spec, nodes=(node,), gcs_address="a", dashboard_url="u", started_at=0,
                                    startup_s=0))


def test_a_cluster_already_up_with_the_same_state_file_is_refused(tmp_path):
    tmp = tempfile.mkdtemp(prefix="vl", dir="/tmp")
    try:
        _state(tmp, os.getsid(0))  # a session that certainly has live processes: ours
        spec = lb.LoopbackSpec(nodes=1, gpus_per_node=1, cpus_per_node=1, temp_dir=tmp)
        with pytest.raises(lb.LoopbackError, match="already up with state file .*verimed cluster down --temp-dir"):
            lb.up(spec, "/nonexistent/ray")
        # A state file whose processes are all gone is stale: removed, and the start goes on (to the next check).
        dead = subprocess.Popen(["true"])
        dead.wait()
        _state(tmp, dead.pid)
        with pytest.raises(lb.LoopbackError, match="no `ray` executable"):
            lb.up(spec, "/nonexistent/ray")
        assert not lb.state_path(tmp).exists()
    finally:
        lb.state_path(tmp).unlink(missing_ok=True)
        os.rmdir(tmp)


def test_down_without_a_cluster_and_a_corrupt_state_file(tmp_path, capsys):
    assert main(["cluster", "down", "--temp-dir", str(tmp_path)]) == 1
    assert "no loopback cluster state file" in capsys.readouterr().err
    lb.state_path(str(tmp_path)).write_text("{not json")
    with pytest.raises(lb.LoopbackError, match="not a verimed cluster state file"):
        lb.down(str(tmp_path))


def test_a_taken_port_is_named_before_anything_starts():
    spec = lb.LoopbackSpec(nodes=2, gpus_per_node=0, cpus_per_node=1, port=21000, dashboard_port=20000)
    taken = lb.node_ports(spec.port, 1)["object_manager"]
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.3", taken))
        except OSError:
            pytest.skip(f"127.0.0.3:{taken} is busy on this machine")
        s.listen()
        with pytest.raises(lb.LoopbackError, match=f"127.0.0.3:{taken} \\(node 1 object_manager\\) is not free"):
            lb.check_ports_free(spec)


def test_ports_in_the_kernels_ephemeral_range_are_refused():
    low, _ = lb.ephemeral_ports()
    spec = lb.LoopbackSpec(nodes=2, gpus_per_node=0, cpus_per_node=1, port=low - 100, dashboard_port=low - 1000)
    with pytest.raises(lb.LoopbackError, match="overlap the kernel's ephemeral range"):
        lb.check_ports_free(spec)


def test_stop_sessions_stops_one_session_and_nothing_else():
    ours = subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300 & wait"], start_new_session=True)
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)  # someone else's cluster
    try:
        deadline = time.monotonic() + 10
        while len(lb.session_members(ours.pid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(lb.session_members(ours.pid)) == 3  # sh and its two sleeps
        assert lb.stop_sessions([ours.pid], grace_s=5) == 3
        assert lb.session_members(ours.pid) == [] and other.poll() is None
    finally:
        ours.wait(timeout=10)
        other.send_signal(signal.SIGKILL)
        other.wait()


# ---------------------------------------------------------------- placement check


def _two_node_plan():
    """2 nodes × 3 GPUs: learner ranks spread (a colocated reference shares each GPU), a tp-2 engine."""
    placement = PlacementConfig(
        learner=RoleSpec(replicas=2, gpus_per_replica=1, cpus_per_replica=1, strategy="STRICT_SPREAD"),
        rollout=RoleSpec(replicas=1, gpus_per_replica=2, tensor_parallel_size=2, cpus_per_replica=1),
        reference=RoleSpec(replicas=2, gpus_per_replica=1, cpus_per_replica=1, colocate_with="learner"))
    return plan(placement, kl_enabled=True, cluster=ClusterResources.uniform(2, 3, 8))


NODES = {"n0": "127.0.0.2", "n1": "127.0.0.3"}
BUNDLES = {"verimed-learner": ["n0", "n1"], "verimed-rollout": ["n0"]}  # where Ray put each bundle


def _as_planned() -> list[ActorLocation]:
    return [
        ActorLocation("learner", 0, "n0", "127.0.0.2", "0", ("0",)),
        ActorLocation("learner", 1, "n1", "127.0.0.3", "0", ("0",)),
        ActorLocation("reference", 0, "n0", "127.0.0.2", "0", ("0",)),  # 0.5 GPU each: one shared device
        ActorLocation("reference", 1, "n1", "127.0.0.3", "0", ("0",)),
        ActorLocation("rollout", 0, "n0", "127.0.0.2", "1,2", ("1", "2")),
        ActorLocation("simulator", 0, "n0", "127.0.0.2", None, ()),  # no resources: anywhere, no GPU
    ]


def _replace(location: ActorLocation) -> list[ActorLocation]:
    """The planned locations with ``location`` in place of its actor's (or added)."""
    others = [loc for loc in _as_planned() if (loc.role, loc.replica) != (location.role, location.replica)]
    return others + [location]


def test_placement_check_accepts_actors_where_the_plan_put_them():
    p = _two_node_plan()
    shares = {(a.role, a.replica): (a.group, a.bundle, a.num_gpus) for a in p.actors}
    assert shares[("reference", 1)] == ("verimed-learner", 1, 0.5) and shares[("rollout", 0)][2] == 2
    assert check_placement(p, _as_planned(), BUNDLES, NODES) == []


@pytest.mark.parametrize("location, expected", [
    (ActorLocation("learner", 1, "n0", "127.0.0.2", "1", ("1",)),
     "learner-1 runs on 127.0.0.2 (node n0), but its bundle verimed-learner[1] is on 127.0.0.3 (node n1)"),
    (ActorLocation("rollout", 0, "n0", "127.0.0.2", "1", ("1",)),
     "rollout-0 sees CUDA_VISIBLE_DEVICES='1' (1 devices) but asked for 2 GPUs (tensor parallel 2)"),
    (ActorLocation("rollout", 0, "n0", "127.0.0.2", None, ()),
     "rollout-0 sees CUDA_VISIBLE_DEVICES=None (0 devices) but asked for 2 GPUs (tensor parallel 2)"),
    (ActorLocation("rollout", 0, "n0", "127.0.0.2", "1,2", ("2", "3")),
     "rollout-0 sees CUDA_VISIBLE_DEVICES='1,2' but Ray assigned GPUs ['2', '3']"),
    (ActorLocation("rollout", 0, "n0", "127.0.0.2", "0,1", ("0", "1")),
     "GPU 0 on 127.0.0.2 (node n0) is held by a whole-GPU actor and shared by learner-0, reference-0, rollout-0"),
    (ActorLocation("reference", 1, "n1", "127.0.0.3", "0,1", ("0", "1")),
     "reference-1 sees CUDA_VISIBLE_DEVICES='0,1' (2 devices) but asked for 0.5 GPUs"),
    (ActorLocation("rubric_generator", 3, "n0", "127.0.0.2", None, ()),
     "rubric_generator-3: started, but the plan has no such actor"),
])
def test_placement_check_names_the_misplaced_actor(location, expected):
    problems = check_placement(_two_node_plan(), _replace(location), BUNDLES, NODES)
    assert expected in problems, problems


def test_placement_check_strict_groups_and_missing_groups():
    p = plan(PlacementConfig(learner=RoleSpec(replicas=2, gpus_per_replica=1, cpus_per_replica=1, strategy="STRICT_PACK"),
                             rollout=RoleSpec(replicas=2, gpus_per_replica=1, strategy="STRICT_SPREAD")),
             kl_enabled=False, cluster=ClusterResources.uniform(2, 3, 8))
    problems = check_placement(p, [], {"verimed-learner": ["n0", "n1"], "verimed-rollout": ["n1", "n1"]}, NODES)
    assert problems == ["placement group verimed-learner is STRICT_PACK but spans 127.0.0.2 (node n0), 127.0.0.3 (node n1)",
                        "placement group verimed-rollout is STRICT_SPREAD but puts two bundles on one node"]
    assert "Ray reports None" in check_placement(p, [], {"verimed-learner": ["n0", "n0"]}, NODES)[0]
    assert visible_devices(" 0, 3 ,") == ("0", "3") and visible_devices("") == () and visible_devices(None) == ()


# ------------------------------------------------------------------- integration


def _processes_mentioning(text: str) -> list[str]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmd = Path(f"/proc/{entry.name}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                out.append(f"{entry.name}: {cmd[:120]}")
    return out


@pytest.mark.integration
def test_two_loopback_nodes_run_a_submitted_job_and_go_down_without_a_trace(tmp_path):
    tmp, up = loopback_up_args(2, 2, 2, RAY_BIN)
    try:
        assert main(up) == 0
        state = lb.read_state(tmp)
        assert [n.ip for n in state.nodes] == ["127.0.0.2", "127.0.0.3"]
        assert main(up) == 1  # the same state file: refused, the running cluster untouched
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        job = subprocess.run(
            [RAY_BIN, "job", "submit", f"--address={state.dashboard_url}", "--working-dir", ".", "--",
             "python", "tests/loopback_job.py", str(tmp_path)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
        logs = job.stdout + job.stderr
        assert job.returncode == 0, logs[-4000:]
        result = json.loads(next(line for line in logs.splitlines() if line.startswith("LOOPBACK_RESULT "))[16:])
        by_ip = {b["ip"]: b["cvd"] for b in result["bundles"]}
        assert by_ip == {"127.0.0.2": "0,1", "127.0.0.3": "0,1"}, result["bundles"]
        verified = result["verified"]
        assert {ip for ip, _ in verified.values()} == {"127.0.0.2", "127.0.0.3"}
        assert all(len(visible_devices(cvd)) == 1 for _, cvd in verified.values()), verified
        # The swapped handles: each learner named on the node of the other's bundle (Ray may put
        # STRICT_SPREAD bundle 0 on either node, so either order).
        swapped = [("127.0.0.3", "127.0.0.2"), ("127.0.0.2", "127.0.0.3")]
        assert any(f"learner-0 runs on {a}" in result["mismatch"] and f"learner-1 runs on {b}" in result["mismatch"]
                   for a, b in swapped), result["mismatch"]
        record = json.loads((tmp_path / "placement.json").read_text())
        assert record["ok"] and set(record["actors"]) == {"learner-0", "learner-1"}
        # A job still running at `down`: its driver lives in a session of its own (the job supervisor's setsid).
        subprocess.run([RAY_BIN, "job", "submit", f"--address={state.dashboard_url}", "--no-wait", "--",
                        "python", "-c", "import time; time.sleep(600)", tmp], env=env, check=True, timeout=120,
                       capture_output=True)
        deadline = time.monotonic() + 120
        while not lb.job_driver_sessions(state.gcs_address) and time.monotonic() < deadline:
            time.sleep(1)
        assert lb.job_driver_sessions(state.gcs_address), "the sleeping job never started"
    finally:
        sessions = [n.session for n in (lb.read_state(tmp) or lb.ClusterState(None, (), "", "", 0, 0)).nodes]
        main(["cluster", "down", "--temp-dir", tmp])
    assert all(lb.session_members(s) == [] for s in sessions)
    assert _processes_mentioning(tmp) == []
    assert not lb.state_path(tmp).exists()
    shutil.rmtree(tmp, ignore_errors=True)  # the nodes' Ray logs

"""A Ray cluster of N loopback nodes with logical GPUs on one machine (DESIGN §11).

    verimed cluster up --nodes 2 --gpus-per-node 8 --cpus-per-node 64
    ray job submit --address http://127.0.0.2:8265 --working-dir . -- verimed train CONFIG
    verimed cluster kill-node --node 1      # node 1 dies like a machine (SIGKILL of all its processes)
    verimed cluster start-node --node 1     # and joins again with its address and resources
    verimed cluster down

Node k (0-based) is one ``ray start`` on its own address 127.0.0.(k + 2) with G logical
GPUs: Ray hands actors ``CUDA_VISIBLE_DEVICES`` for their bundle as on a GPU node. Each
``ray start`` runs in a session of its own; the state file records the session ids, so
``down`` stops exactly this cluster's processes. Plain ``ray stop`` would not do: it
kills every Ray process of the machine, other users' clusters included.

What was found by trying (Ray 2.60, Linux):
- Distinct loopback addresses work as node addresses, but **not 127.0.0.1**: with
  multi-node clusters enabled Ray rewrites "127.0.0.1" (and "localhost") to the
  machine's routable address, and with them disabled
  (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) a worker node refuses to join. Hence
  the head on 127.0.0.2 and multi-node mode forced on.
- Every Ray server binds its node's address, not 0.0.0.0; the ports are still made
  distinct per node (:func:`node_ports`) so a wildcard listener elsewhere on the
  machine cannot collide with two nodes at once, and the fixed defaults (ray client
  10001, dashboard agent 52365) of another cluster cannot collide with ours.
- A worker node is 3 processes (raylet, dashboard agent, runtime-env agent), the head
  adds the GCS, dashboard and autoscaler monitor: bench/RESULTS.md "Loopback cluster".

Pure Python (subprocess, /proc, urllib): imports neither ray nor torch.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import msgspec

from verimed.core.cluster.processes import (
    job_driver_sessions,
    kill_sessions,
    session_members,
    stop_sessions,
)

MAX_NODES = 250  # 127.0.0.2 ... 127.0.0.251
FIRST_HOST = 2  # node k listens on 127.0.0.(k + FIRST_HOST): Ray rewrites 127.0.0.1 (see the module docstring)
# Ports of node k: port + 1 + len(NODE_PORTS)·k + offset, offset = the name's index here.
NODE_PORTS = ("node_manager", "object_manager", "metrics_export", "dashboard_agent_listen", "dashboard_agent_grpc",
              "runtime_env_agent", "ray_client_server")
WORKER_PORT_OFFSET = 2000  # above the fixed ports of MAX_NODES nodes: 1 + 7·250 = 1751 < 2000
WORKER_PORTS_PER_NODE = 64  # one per worker process (actor or task worker) alive on the node at once
DEFAULT_OBJECT_STORE_BYTES = 256 * 2**20  # per node; Ray's default (30% of RAM) times N overcommits /dev/shm
STATE_FILE = "verimed-cluster.json"
DEFAULT_TEMP_DIR = "/tmp/verimed-cluster"
DEFAULT_PORT, DEFAULT_DASHBOARD_PORT = 6379, 8265  # Ray's own defaults
# Ray's unix sockets live at TEMP/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store.<k>
# (~70 characters below TEMP) and must stay under 107 bytes.
MAX_TEMP_DIR_CHARS = 36


class LoopbackError(RuntimeError):
    """The loopback cluster could not be started, found or stopped; the message says why."""


class LoopbackSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What ``verimed cluster up`` starts. Resources are per node and logical (Ray's accounting)."""

    nodes: int
    gpus_per_node: int
    cpus_per_node: int
    memory_per_node: int | None = None  # bytes of Ray's "memory" resource; None: Ray's default (free RAM)
    # Logical GPUs of the head (node 0); None: gpus_per_node. 0 gives a CPU head, as on clusters whose head
    # runs only the driver and the CPU clients: every GPU actor then lands on a worker node.
    head_gpus: int | None = None
    object_store_bytes: int = DEFAULT_OBJECT_STORE_BYTES
    temp_dir: str = DEFAULT_TEMP_DIR
    port: int = DEFAULT_PORT  # the head's GCS port; every other port of the cluster is derived from it
    dashboard_port: int = DEFAULT_DASHBOARD_PORT

    def validate(self) -> None:
        """Raise ValueError naming the option and what was expected."""
        if not 1 <= self.nodes <= MAX_NODES:
            raise ValueError(f"--nodes {self.nodes}: expected 1 to {MAX_NODES} (one 127.0.0.x address per node)")
        if self.gpus_per_node < 0:
            raise ValueError(f"--gpus-per-node {self.gpus_per_node}: expected 0 or more logical GPUs")
        if self.head_gpus is not None and self.head_gpus < 0:
            raise ValueError(f"--head-gpus {self.head_gpus}: expected 0 or more logical GPUs")
        if self.cpus_per_node < 1:
            raise ValueError(f"--cpus-per-node {self.cpus_per_node}: expected at least 1 logical CPU")
        if self.memory_per_node is not None and self.memory_per_node <= 0:
            raise ValueError(f"--memory-per-node {self.memory_per_node}: expected a positive number of bytes")
        if self.object_store_bytes < 80 * 10**6:
            raise ValueError(f"--object-store-bytes {self.object_store_bytes}: Ray needs at least 80 MB per node")
        if not os.path.isabs(self.temp_dir) or len(self.temp_dir) > MAX_TEMP_DIR_CHARS:
            raise ValueError(f"--temp-dir {self.temp_dir!r}: expected an absolute path of at most {MAX_TEMP_DIR_CHARS} "
                             "characters (Ray's unix socket paths below it must stay under 107 bytes)")
        last = self.port + WORKER_PORT_OFFSET + WORKER_PORTS_PER_NODE * self.nodes - 1
        if self.port < 1024 or last > 65535:
            raise ValueError(f"--port {self.port}: the cluster uses ports {self.port}..{last}; expected them within "
                             "1024..65535")
        fixed_end, workers = self.port + len(NODE_PORTS) * self.nodes, self.port + WORKER_PORT_OFFSET
        if (self.port <= self.dashboard_port <= fixed_end or workers <= self.dashboard_port <= last
                or not 1024 <= self.dashboard_port <= 65535):
            raise ValueError(f"--dashboard-port {self.dashboard_port}: expected a port in 1024..65535 outside the "
                             f"node ports {self.port}..{fixed_end} and worker ports {workers}..{last}")


def node_ip(k: int) -> str:
    """Address of node k (0 = head): 127.0.0.(k + FIRST_HOST)."""
    if not 0 <= k < MAX_NODES:
        raise ValueError(f"node index {k}: expected 0..{MAX_NODES - 1}")
    return f"127.0.0.{k + FIRST_HOST}"


def node_ports(port: int, k: int) -> dict[str, int]:
    """Fixed ports of node k: ``port + 1 + len(NODE_PORTS)·k + i`` for the i-th name of NODE_PORTS."""
    base = port + 1 + len(NODE_PORTS) * k
    return {name: base + i for i, name in enumerate(NODE_PORTS)}


def worker_ports(port: int, k: int) -> tuple[int, int]:
    """Worker port range of node k (inclusive): ``port + WORKER_PORT_OFFSET + WORKER_PORTS_PER_NODE·k`` + [0, 63]."""
    first = port + WORKER_PORT_OFFSET + WORKER_PORTS_PER_NODE * k
    return first, first + WORKER_PORTS_PER_NODE - 1


def gcs_address(spec: LoopbackSpec) -> str:
    """What drivers and ``RAY_ADDRESS`` use: the head's GCS."""
    return f"{node_ip(0)}:{spec.port}"


def dashboard_url(spec: LoopbackSpec) -> str:
    """What ``ray job submit --address`` takes."""
    return f"http://{node_ip(0)}:{spec.dashboard_port}"


def start_command(spec: LoopbackSpec, k: int, ray_bin: str) -> list[str]:
    """The ``ray start`` command line of node k (0 = head)."""
    ports = node_ports(spec.port, k)
    low, high = worker_ports(spec.port, k)
    ip = node_ip(k)
    gpus = spec.head_gpus if k == 0 and spec.head_gpus is not None else spec.gpus_per_node
    cmd = [ray_bin, "start", f"--node-ip-address={ip}", f"--num-cpus={spec.cpus_per_node}",
           f"--num-gpus={gpus}", f"--object-store-memory={spec.object_store_bytes}",
           f"--temp-dir={spec.temp_dir}", "--disable-usage-stats",
           f"--node-manager-port={ports['node_manager']}", f"--object-manager-port={ports['object_manager']}",
           f"--metrics-export-port={ports['metrics_export']}",
           f"--dashboard-agent-listen-port={ports['dashboard_agent_listen']}",
           f"--dashboard-agent-grpc-port={ports['dashboard_agent_grpc']}",
           f"--runtime-env-agent-port={ports['runtime_env_agent']}",
           f"--min-worker-port={low}", f"--max-worker-port={high}"]
    if spec.memory_per_node is not None:
        cmd.append(f"--memory={spec.memory_per_node}")
    if k == 0:
        return cmd + ["--head", f"--port={spec.port}", "--include-dashboard=true", f"--dashboard-host={ip}",
                      f"--dashboard-port={spec.dashboard_port}",
                      f"--ray-client-server-port={ports['ray_client_server']}"]
    # The log monitor streams worker output to drivers; actors write RUN_DIR/logs/ instead, and the
    # head keeps its own (the job driver runs there). One python process less per worker node.
    return cmd + [f"--address={gcs_address(spec)}", "--include-log-monitor=false"]


def node_env(base: dict[str, str], ray_bin: str) -> dict[str, str]:
    """Environment of every ``ray start`` (and so of its raylet, actors and job drivers)."""
    env = {k: v for k, v in base.items() if k != "RAY_ADDRESS"}  # a stale RAY_ADDRESS would redirect the head
    env.update({
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",  # multi-node mode, as on Linux by default (tests set it to 0)
        "RAY_USAGE_STATS_ENABLED": "0",
        # Idle workers cost ~100 MB each; on N nodes of 2 cores they would be most of the machine.
        "RAY_enable_worker_prestart": "0",
        "RAY_prestart_worker_first_driver": "0",
        # Job entrypoints (`-- python ...`, `-- verimed ...`) resolve to the interpreter Ray runs on.
        "PATH": str(Path(ray_bin).parent) + os.pathsep + base.get("PATH", ""),
    })
    env.setdefault("RAY_AUTH_MODE", "disabled")  # loopback only, as verimed's local clusters (DESIGN §10)
    return env


# --------------------------------------------------------------------- state


class NodeState(msgspec.Struct, frozen=True):
    index: int
    ip: str
    session: int  # the session id of its `ray start`: every process of the node belongs to it
    log: str


class ClusterState(msgspec.Struct, frozen=True):
    spec: LoopbackSpec
    nodes: tuple[NodeState, ...]
    gcs_address: str
    dashboard_url: str
    started_at: float  # unix seconds
    startup_s: float  # wall time of `up` until every node was alive (0 while starting)


def state_path(temp_dir: str) -> Path:
    return Path(temp_dir) / STATE_FILE


def read_state(temp_dir: str) -> ClusterState | None:
    """The state file of the cluster under ``temp_dir``, or None when there is none."""
    path = state_path(temp_dir)
    try:
        return msgspec.json.decode(path.read_bytes(), type=ClusterState)
    except FileNotFoundError:
        return None
    except msgspec.DecodeError as exc:
        raise LoopbackError(f"{path}: not a verimed cluster state file ({exc}); remove it if no cluster runs") from None


def _write_state(state: ClusterState) -> None:
    path = state_path(state.spec.temp_dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(msgspec.json.encode(state))
    tmp.replace(path)


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for outgoing connections' local ports (Linux default 32768..60999)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def check_ports_free(spec: LoopbackSpec) -> None:
    """Bind every port the cluster will use on its node's address; LoopbackError names the first one taken."""
    wanted = [(node_ip(0), spec.dashboard_port, "--dashboard-port")]
    for k in range(spec.nodes):
        ip = node_ip(k)
        wanted += [(ip, spec.port, "--port")] if k == 0 else []
        wanted += [(ip, p, f"node {k} {name}") for name, p in node_ports(spec.port, k).items()]
        low, high = worker_ports(spec.port, k)
        wanted += [(ip, p, f"node {k} worker") for p in range(low, high + 1)]
    last = max(port for _, port, _ in wanted)
    low, high = ephemeral_ports()
    if spec.port <= high and last >= low:
        raise LoopbackError(f"ports {spec.port}..{last} overlap the kernel's ephemeral range {low}..{high} "
                            "(net.ipv4.ip_local_port_range), which outgoing connections take at random: pick a "
                            f"--port below {low - (last - spec.port) - 1} (and --dashboard-port outside both)")
    for ip, port, what in wanted:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Ray binds: TIME_WAIT leftovers are free
            try:
                s.bind((ip, port))
            except OSError as exc:
                raise LoopbackError(f"{ip}:{port} ({what}) is not free: {exc.strerror}; another Ray cluster may use "
                                    "it: pick another --port / --dashboard-port") from None


def alive_nodes(url: str, timeout_s: float = 5.0) -> list[dict]:
    """The ALIVE nodes the head's dashboard reports (Ray state API ``/api/v0/nodes``)."""
    with urllib.request.urlopen(f"{url}/api/v0/nodes?limit=10000", timeout=timeout_s) as reply:
        body = json.load(reply)
    return [n for n in body["data"]["result"]["result"] if n.get("state") == "ALIVE"]


def _tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _start_node(spec: LoopbackSpec, k: int, ray_bin: str, env: dict[str, str], log_dir: Path, append: bool = False):
    log = log_dir / f"node-{k}.log"
    with open(log, "ab" if append else "wb") as out:  # a rejoining node keeps its first life's log
        # A session of its own: `down` finds every process of this node by its session id.
        proc = subprocess.Popen(start_command(spec, k, ray_bin), env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return proc, NodeState(index=k, ip=node_ip(k), session=proc.pid, log=str(log))


def _wait_started(procs, timeout_s: float) -> None:
    """Each ``ray start`` returns once its node's processes run; fail with the log of one that did not."""
    deadline = time.monotonic() + timeout_s
    for proc, node in procs:
        try:
            rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise LoopbackError(f"`ray start` of node {node.index} ({node.ip}) did not return within {timeout_s:g}s; "
                                f"its log {node.log}:\n{_tail(node.log)}") from None
        if rc != 0:
            raise LoopbackError(f"`ray start` of node {node.index} ({node.ip}) exited with {rc}; its log {node.log}:\n"
                                f"{_tail(node.log)}")


def _wait_alive(spec: LoopbackSpec, deadline: float) -> None:
    want = {node_ip(k) for k in range(spec.nodes)}
    seen: set[str] = set()
    while time.monotonic() < deadline:
        try:
            seen = {n["node_ip"] for n in alive_nodes(dashboard_url(spec))}
        except (OSError, urllib.error.URLError, KeyError, ValueError):
            seen = set()  # the dashboard is still starting
        if want <= seen:
            return
        time.sleep(1.0)
    raise LoopbackError(f"timed out waiting for the nodes: alive {sorted(seen) or 'none'}, missing "
                        f"{sorted(want - seen)}; node logs in {Path(spec.temp_dir) / 'verimed-logs'}")


def up(spec: LoopbackSpec, ray_bin: str, *, timeout_s: float = 300.0, base_env: dict[str, str] | None = None,
       ) -> ClusterState:
    """Start the head, then the workers (cpu_count / 2 at a time), wait until all are alive, write the state file.

    On any failure every process started so far is stopped and LoopbackError says why.
    """
    spec.validate()
    previous = read_state(spec.temp_dir)
    if previous is not None:
        if any(session_members(n.session) for n in previous.nodes):
            raise LoopbackError(f"a loopback cluster is already up with state file {state_path(spec.temp_dir)} "
                                f"({len(previous.nodes)} nodes, {previous.dashboard_url}): run `verimed cluster down "
                                f"--temp-dir {spec.temp_dir}` first, or pick another --temp-dir")
        state_path(spec.temp_dir).unlink()  # a cluster that died without `down`: nothing of it is left
    if not Path(ray_bin).is_file():
        raise LoopbackError(f"{ray_bin}: no `ray` executable (pip install 'ray[default]' in this environment)")
    check_ports_free(spec)
    log_dir = Path(spec.temp_dir) / "verimed-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = node_env(dict(os.environ if base_env is None else base_env), ray_bin)
    t0, started = time.monotonic(), []
    deadline = t0 + timeout_s

    def record(nodes):
        _write_state(ClusterState(spec=spec, nodes=tuple(nodes), gcs_address=gcs_address(spec),
                                  dashboard_url=dashboard_url(spec), started_at=time.time(),
                                  startup_s=round(time.monotonic() - t0, 1) if len(nodes) == spec.nodes else 0.0))

    try:
        head = _start_node(spec, 0, ray_bin, env, log_dir)
        started.append(head[1])
        record(started)  # from here on `down` can clean up, even if this process dies
        _wait_started([head], deadline - time.monotonic())
        # A few at a time: 8 raylets registering at once on 2 cores time out in Ray's own start-up check.
        batch = max(1, (os.cpu_count() or 2) // 2)
        for first in range(1, spec.nodes, batch):
            workers = [_start_node(spec, k, ray_bin, env, log_dir) for k in range(first, min(first + batch, spec.nodes))]
            started += [node for _, node in workers]
            record(started)
            _wait_started(workers, deadline - time.monotonic())
        _wait_alive(spec, deadline)
    except BaseException:
        stop_sessions([n.session for n in started], grace_s=5.0)
        state_path(spec.temp_dir).unlink(missing_ok=True)
        raise
    record(started)
    return read_state(spec.temp_dir)


def down(temp_dir: str, *, grace_s: float = 5.0) -> tuple[ClusterState, int]:
    """Stop every process of the cluster whose state file is under ``temp_dir``; return (its state, processes)."""
    state = read_state(temp_dir)
    if state is None:
        raise LoopbackError(f"no loopback cluster state file at {state_path(temp_dir)}: nothing to stop "
                            "(pass the --temp-dir given to `verimed cluster up`)")
    drivers = job_driver_sessions(state.gcs_address)  # before the nodes go: running jobs live on
    stopped = stop_sessions([n.session for n in state.nodes] + drivers, grace_s=grace_s)
    state_path(temp_dir).unlink(missing_ok=True)
    return state, stopped


def status(temp_dir: str) -> str:
    """A readable summary: addresses, and per node its address, Ray's view and its process count."""
    state = read_state(temp_dir)
    if state is None:
        return f"no loopback cluster (no state file at {state_path(temp_dir)})"
    try:
        alive = {n["node_ip"]: n for n in alive_nodes(state.dashboard_url)}
    except (OSError, urllib.error.URLError, KeyError, ValueError) as exc:
        alive, note = {}, f"  (dashboard not answering: {exc})"
    else:
        note = ""
    s = state.spec
    lines = [(f"loopback cluster: {s.nodes} nodes × ({s.gpus_per_node} GPUs, {s.cpus_per_node} CPUs), "
              f"up {time.time() - state.started_at:.0f}s, started in {state.startup_s:g}s{note}"),
             f"  RAY_ADDRESS={state.gcs_address}", f"  dashboard:  {state.dashboard_url}"]
    for n in state.nodes:
        procs = len(session_members(n.session))
        ray_view = "ALIVE" if n.ip in alive else "not alive"
        lines.append(f"  node {n.index:<3} {n.ip:<12} {ray_view:<10} {procs} processes  log {n.log}")
    return "\n".join(lines)


# ---------------------------------------------------------------- losing a node


def _worker_node(temp_dir: str, k: int) -> tuple[ClusterState, NodeState]:
    """The state and node k of the cluster under ``temp_dir``; LoopbackError unless k is a worker node of it."""
    state = read_state(temp_dir)
    if state is None:
        raise LoopbackError(f"no loopback cluster state file at {state_path(temp_dir)} (pass the --temp-dir "
                            "given to `verimed cluster up`)")
    if not 0 <= k < len(state.nodes):
        raise LoopbackError(f"--node {k}: this cluster has nodes 0..{len(state.nodes) - 1}")
    if k == 0:
        raise LoopbackError("--node 0 is the head (GCS, dashboard, job drivers): the cluster ends with it; "
                            "pick a worker node 1.., or stop the cluster with `verimed cluster down`")
    return state, state.nodes[k]


def kill_node(temp_dir: str, k: int) -> tuple[NodeState, int]:
    """Worker node k dies like a machine: SIGKILL, at once, of every process of its session (raylet, agents,
    the actors' worker processes). Returns (the node, how many processes were killed)."""
    _, node = _worker_node(temp_dir, k)
    members = session_members(node.session)
    if not members:
        raise LoopbackError(f"node {k} ({node.ip}) has no live processes: it is already down "
                            f"(`verimed cluster start-node --node {k} --temp-dir {temp_dir}` brings it back)")
    return node, kill_sessions([node.session])


def start_node(temp_dir: str, k: int, ray_bin: str, *, timeout_s: float = 300.0,
               base_env: dict[str, str] | None = None) -> ClusterState:
    """Worker node k, lost, joins again with its address, ports and resources; the state file records its new
    session. Waits until the head no longer lists the old node as alive (a rejoin under the same address
    before that would race Ray's own failure detection), then until the new one is."""
    state, node = _worker_node(temp_dir, k)
    if session_members(node.session):
        raise LoopbackError(f"node {k} ({node.ip}) is running ({len(session_members(node.session))} processes): "
                            f"`verimed cluster kill-node --node {k}` first")
    if not Path(ray_bin).is_file():
        raise LoopbackError(f"{ray_bin}: no `ray` executable (pip install 'ray[default]' in this environment)")
    deadline = time.monotonic() + timeout_s
    while node.ip in _alive_ips(state.dashboard_url):
        if time.monotonic() > deadline:
            raise LoopbackError(f"the head still lists node {k} ({node.ip}) as alive after {timeout_s:g}s")
        time.sleep(1.0)
    env = node_env(dict(os.environ if base_env is None else base_env), ray_bin)
    proc, new = _start_node(state.spec, k, ray_bin, env, Path(node.log).parent, append=True)
    nodes = tuple(new if n.index == k else n for n in state.nodes)
    _write_state(msgspec.structs.replace(state, nodes=nodes))  # from here on `down` stops it too
    _wait_started([(proc, new)], deadline - time.monotonic())
    _wait_alive(state.spec, deadline)
    return read_state(temp_dir)


def _alive_ips(url: str) -> set[str]:
    try:
        return {n["node_ip"] for n in alive_nodes(url)}
    except (OSError, urllib.error.URLError, KeyError, ValueError) as exc:
        raise LoopbackError(f"the head's dashboard {url} does not answer ({exc}): is the cluster up?") from None

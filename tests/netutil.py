"""Network helpers shared by the tests that start servers and process groups."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on loopback now (a later bind may still race another process for it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_base_port(nodes: int) -> int:
    """A ``verimed cluster up --port`` whose whole range for ``nodes`` nodes (and the dashboard at
    port + 2400) looks free on 127.0.0.2..; skips the test when none is."""
    import pytest

    from verimed.core.cluster import loopback as lb

    for base in range(20000, lb.ephemeral_ports()[0] - 2500, 2500):
        try:
            lb.check_ports_free(lb.LoopbackSpec(nodes=nodes, gpus_per_node=0, cpus_per_node=1, port=base,
                                                dashboard_port=base + 2400))
            return base
        except lb.LoopbackError:
            continue
    pytest.skip(f"no free port range for a {nodes}-node loopback cluster")


def loopback_up_args(nodes: int, gpus_per_node: int, cpus_per_node: int, ray_bin: str) -> tuple[str, list[str]]:
    """(temp dir, ``verimed cluster up`` argv) of a test cluster on a free port range; the temp dir is
    short (Ray's socket paths live below it) and unique per call."""
    import tempfile

    tmp = tempfile.mkdtemp(prefix="vl", dir="/tmp")
    port = loopback_base_port(nodes)
    return tmp, ["cluster", "up", "--nodes", str(nodes), "--gpus-per-node", str(gpus_per_node),
                 "--cpus-per-node", str(cpus_per_node), "--temp-dir", tmp, "--port", str(port),
                 "--dashboard-port", str(port + 2400), "--ray", ray_bin]

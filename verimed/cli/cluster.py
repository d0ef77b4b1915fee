"""``verimed cluster up|down|status|kill-node|start-node``: a Ray cluster of N loopback nodes with logical GPUs.

    verimed cluster up --nodes 8 --gpus-per-node 8 --cpus-per-node 96
    ray job submit --address http://127.0.0.2:8265 --working-dir . -- verimed train configs/cluster/m2-32b-8x8.yaml
    verimed cluster status
    verimed cluster kill-node --node 3     # node 3 dies like a machine; its actors with it
    verimed cluster start-node --node 3    # it joins again (same address and resources)
    verimed cluster down

The work is in :mod:`verimed.core.cluster.loopback`; this module parses, prints and sets exit codes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from verimed.core.cluster import loopback
from verimed.core.cluster.processes import ProcessError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="start N Ray nodes on 127.0.0.2, 127.0.0.3, ...")
    up.add_argument("--nodes", type=int, required=True, help=f"number of nodes, 1..{loopback.MAX_NODES}")
    up.add_argument("--gpus-per-node", type=int, required=True, help="logical GPUs per node (Ray's GPU resource)")
    up.add_argument("--cpus-per-node", type=int, required=True, help="logical CPUs per node (Ray's CPU resource)")
    up.add_argument("--memory-per-node", type=int, default=None, metavar="BYTES",
                    help="Ray's logical memory resource per node (default: Ray's, the free memory)")
    up.add_argument("--object-store-bytes", type=int, default=loopback.DEFAULT_OBJECT_STORE_BYTES, metavar="BYTES",
                    help="object store per node (default 256 MiB; Ray's own default, 30%% of RAM, N times over)")
    up.add_argument("--head-gpus", type=int, default=None, metavar="G",
                    help="logical GPUs of the head node (default: --gpus-per-node; 0: a CPU head)")
    kill = sub.add_parser("kill-node", help="SIGKILL every process of worker node K, as a machine dying")
    start = sub.add_parser("start-node", help="start worker node K again after kill-node (same address, resources)")
    for p in (kill, start):
        p.add_argument("--node", type=int, required=True, metavar="K", help="the worker node's index (1.., 0 is the head)")
    for p in (up, start):
        p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS", help="give up starting after this")
        p.add_argument("--ray", default=str(Path(sys.executable).parent / "ray"), metavar="PATH",
                       help="the ray executable (default: the one next to this Python)")
    for p in (up, sub.add_parser("down", help="stop the cluster started with this --temp-dir"),
              sub.add_parser("status", help="print the cluster's addresses and nodes"), kill, start):
        p.add_argument("--temp-dir", default=loopback.DEFAULT_TEMP_DIR, metavar="DIR",
                       help="Ray's temp dir and the cluster's state file (default %(default)s)")
    up.add_argument("--port", type=int, default=loopback.DEFAULT_PORT, help="the head's GCS port; node ports follow it")
    up.add_argument("--dashboard-port", type=int, default=loopback.DEFAULT_DASHBOARD_PORT, help="the head's dashboard (ray job submit)")


def run(args: argparse.Namespace) -> int:
    try:
        if args.action == "up":
            spec = loopback.LoopbackSpec(
                nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node,
                memory_per_node=args.memory_per_node, object_store_bytes=args.object_store_bytes, head_gpus=args.head_gpus,
                temp_dir=str(Path(args.temp_dir).absolute()), port=args.port, dashboard_port=args.dashboard_port)
            state = loopback.up(spec, args.ray, timeout_s=args.timeout)
            print(f"verimed: {spec.nodes} loopback nodes up in {state.startup_s:g}s "
                  f"({', '.join(n.ip for n in state.nodes[:3])}{', ...' if spec.nodes > 3 else ''})")
            print(f"export RAY_ADDRESS={state.gcs_address}")
            print(f"ray job submit --address {state.dashboard_url} --working-dir . -- verimed train CONFIG")
            print(f"verimed cluster down --temp-dir {spec.temp_dir}")
            return 0
        temp_dir = str(Path(args.temp_dir).absolute())
        if args.action == "down":
            state, stopped = loopback.down(temp_dir)
            print(f"verimed: stopped {len(state.nodes)} loopback nodes ({stopped} processes)")
            return 0
        if args.action == "kill-node":
            node, killed = loopback.kill_node(temp_dir, args.node)
            print(f"verimed: node {node.index} ({node.ip}) killed ({killed} processes)")
            return 0
        if args.action == "start-node":
            state = loopback.start_node(temp_dir, args.node, args.ray, timeout_s=args.timeout)
            print(f"verimed: node {args.node} ({state.nodes[args.node].ip}) joined again")
            return 0
        print(loopback.status(temp_dir))
        return 0
    except (ValueError, loopback.LoopbackError, ProcessError) as exc:
        print(f"verimed cluster: {exc}", file=sys.stderr)
        return 1

"""``verimed plan CONFIG [--cluster-resources SPEC]``: print the resolved placement plan and check it fits.

    verimed plan configs/cluster/m2-32b-8x8.yaml --cluster-resources 8x8gpu,cpus_per_node=96
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from verimed.core.cluster.planner import ClusterResources, PlacementError, format_plan, plan
from verimed.core.config import ConfigError, load_config, reference_needed


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``verimed plan CONFIG [--cluster-resources SPEC] [section.key=value ...]``."""
    parser.add_argument("config", help="run config YAML (its placement: section is planned)")
    parser.add_argument(
        "--cluster-resources", metavar="SPEC", default=None,
        help="plan for a cluster you are not on: '8x8gpu', 'nodes=8,gpus_per_node=8,cpus_per_node=96' or a "
             "JSON file; default: the Ray cluster at run.ray_address, else this machine",
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. placement.rollout.replicas=2")


def run_plan(args: argparse.Namespace, cluster_from_ray=None) -> int:
    """Print the resolved plan; 0 if it fits, 1 (with the reason on stderr) if not."""
    try:
        cfg = load_config(args.config, args.overrides)
        placement = cfg.placement
        cluster = ClusterResources.parse(args.cluster_resources) if args.cluster_resources else local_cluster(cfg, cluster_from_ray)
        result = plan(placement, kl_enabled=reference_needed(cfg), cluster=cluster)
    except (ConfigError, PlacementError, ValueError) as exc:
        print(f"verimed plan: {exc}", file=sys.stderr)
        return 1
    print(format_plan(result))
    return 0


def local_cluster(cfg, cluster_from_ray=None) -> ClusterResources:
    """Resources of the cluster a run of ``cfg`` would use, without starting one.

    run.ray_address set: ask that Ray cluster (imports ray). Otherwise this machine:
    run.ray_num_cpus or os.cpu_count() CPUs, and the NVIDIA GPUs the driver lists
    (narrowed by CUDA_VISIBLE_DEVICES), read from /proc without importing torch.
    """
    if cfg.run.ray_address:
        if cluster_from_ray is None:
            raise PlacementError("run.ray_address is set: pass --cluster-resources, or plan through `verimed plan`")
        # Injected by the CLI (verimed.actors.placement.cluster_resources_from_ray): core never imports Ray.
        return cluster_from_ray(cfg.run.ray_address)
    gpu_dir = Path("/proc/driver/nvidia/gpus")
    gpus = len(list(gpu_dir.iterdir())) if gpu_dir.is_dir() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = min(gpus, len([d for d in visible.split(",") if d.strip()]))
    return ClusterResources.uniform(1, gpus, float(cfg.run.ray_num_cpus or os.cpu_count() or 1))

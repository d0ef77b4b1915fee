"""The job `tests/test_loopback.py` submits to a 2-node loopback cluster (`ray job submit`); not a test file.

Prints one JSON line prefixed ``LOOPBACK_RESULT``:
- ``bundles``: a STRICT_SPREAD group with one 2-GPU bundle per node, an actor asking for both GPUs
  in each: its node address and CUDA_VISIBLE_DEVICES;
- ``verified``: verimed's placement check of a learner plan (2 ranks × 1 GPU, STRICT_SPREAD)
  with every actor on its bundle;
- ``mismatch``: the same check with the two ranks' handles swapped (a wrong actor mapping).
"""
import asyncio
import json
import os
import sys
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from verimed.actors.placement import (
    actor_options,
    create_placement_groups,
    remove_placement_groups,
    verify_placement,
)
from verimed.core.cluster.placement_check import PlacementMismatch
from verimed.core.cluster.planner import PlacementConfig, RoleSpec, plan


@ray.remote(num_cpus=0)
class Probe:
    def where(self):
        return {"ip": ray.util.get_node_ip_address(), "cvd": os.environ.get("CUDA_VISIBLE_DEVICES")}


def bundles_per_node(nodes: int, gpus: int) -> list[dict]:
    pg = placement_group([{"GPU": gpus}] * nodes, strategy="STRICT_SPREAD")
    ray.get(pg.ready(), timeout=120)
    probes = [Probe.options(num_gpus=gpus, scheduling_strategy=PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=b)).remote() for b in range(nodes)]
    out = [dict(bundle=b, **ray.get(p.where.remote())) for b, p in enumerate(probes)]
    for p in probes:
        ray.kill(p)
    remove_placement_group(pg)
    return out


async def learner_check(out_dir: Path) -> dict:
    placement = PlacementConfig(learner=RoleSpec(replicas=2, gpus_per_replica=1, cpus_per_replica=0.5,
                                                 strategy="STRICT_SPREAD"),
                                rollout=RoleSpec(replicas=1, cpus_per_replica=0.5), simulator=RoleSpec(cpus_per_replica=0),
                                verifier=RoleSpec(cpus_per_replica=0), rubric_generator=RoleSpec(cpus_per_replica=0))
    from verimed.actors.placement import cluster_resources_from_ray

    the_plan = plan(placement, kl_enabled=False, cluster=cluster_resources_from_ray())
    placements = create_placement_groups(the_plan, timeout_s=120)
    good = {("learner", r): Probe.options(**actor_options(the_plan, placements, "learner", r)).remote() for r in (0, 1)}
    result = {}
    locations = await verify_placement(the_plan, placements, good, out_dir / "placement.json", timeout_s=60)
    result["verified"] = {f"{l.role}-{l.replica}": [l.node_ip, l.cuda_visible_devices] for l in locations}
    # A wrong actor mapping: each rank's handle given as the other's, so each runs on the other's node.
    swapped = {("learner", 0): good[("learner", 1)], ("learner", 1): good[("learner", 0)]}
    try:
        await verify_placement(the_plan, placements, swapped, out_dir / "placement-bad.json", timeout_s=60)
        result["mismatch"] = None
    except PlacementMismatch as exc:
        result["mismatch"] = str(exc)
    remove_placement_groups(placements)
    return result


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    ray.init(address="auto", log_to_driver=False)
    result = {"bundles": bundles_per_node(2, 2), **asyncio.run(learner_check(out_dir))}
    print("LOOPBACK_RESULT " + json.dumps(result), flush=True)

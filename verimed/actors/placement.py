"""Ray side of placement: create the placement groups of a :class:`~verimed.core.cluster.planner.Plan`.

    plan = planner.plan(cfg.placement, kl_enabled=reference_needed(cfg), cluster=cluster_resources_from_ray())
    groups = create_placement_groups(plan)
    Learner.options(**actor_options(plan, groups, "learner", rank)).remote(...)

Thin by design: all layout decisions and fit checks live in ``verimed/core/cluster/planner.py``
(tested without Ray); this module only turns bundles into Ray calls.
"""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from verimed.core.cluster.placement_check import (
    ActorLocation,
    PlacementMismatch,
    check_placement,
    placement_record,
)
from verimed.core.cluster.planner import ClusterResources, NodeResources, PlacementError, Plan

# role -> per replica: (placement group, bundle index), or (None, None) for an actor
# that needs no resources and is scheduled anywhere.
Placements = dict[str, list[tuple[PlacementGroup | None, int | None]]]


def cluster_resources_from_ray(address: str | None = None) -> ClusterResources:
    """The alive nodes of the Ray cluster (connecting to ``address`` if not initialised)."""
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    nodes = [
        NodeResources(gpus=int(n["Resources"].get("GPU", 0)), cpus=float(n["Resources"].get("CPU", 0)))
        for n in ray.nodes()
        if n.get("Alive")
    ]
    if not nodes:
        raise PlacementError("the Ray cluster reports no alive nodes")
    return ClusterResources(nodes=tuple(nodes))


def create_placement_groups(plan: Plan, *, timeout_s: float = 120.0) -> Placements:
    """Create one placement group per plan group, wait until all are ready, map every actor.

    Groups are created largest first, mirroring the first-fit-decreasing check of the
    planner. If one is not ready within ``timeout_s``, all are removed and
    PlacementError says which group is stuck.
    """
    order = sorted(plan.groups, key=lambda g: sum(b.gpus for b in g.bundles), reverse=True)
    created = {
        g.name: placement_group([b.ray_resources() for b in g.bundles], strategy=g.strategy, name=g.name)
        for g in order
    }
    for name, pg in created.items():
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            for other in created.values():
                remove_placement_group(other)
            raise PlacementError(
                f"placement group {name} ({len(plan.group(name).bundles)} bundles) was not ready after "
                f"{timeout_s:g}s: the cluster lacks the resources `verimed plan` assumed ({plan.cluster.describe()})"
            )
    placements: Placements = {}
    for actor in plan.actors:
        slots = placements.setdefault(actor.role, [])
        assert len(slots) == actor.replica, "plan actors are sorted by (role, replica)"
        slots.append((created[actor.group], actor.bundle) if actor.group is not None else (None, None))
    return placements


def actor_options(plan: Plan, placements: Placements, role: str, replica: int) -> dict:
    """``ActorClass.options(**actor_options(...))`` for actor (role, replica): resources + bundle."""
    actor = next((a for a in plan.actors_of(role) if a.replica == replica), None)
    if actor is None:
        raise PlacementError(f"the plan has no actor {role}[{replica}]")
    options: dict = {"num_cpus": actor.num_cpus, "num_gpus": actor.num_gpus}
    pg, bundle = placements[role][replica]
    if pg is not None:
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=pg, placement_group_bundle_index=bundle
        )
    return options


def remove_placement_groups(placements: Placements) -> None:
    """Release every group once (several roles may share a colocated group)."""
    seen = set()
    for slots in placements.values():
        for pg, _ in slots:
            if pg is not None and pg.id not in seen:
                seen.add(pg.id)
                remove_placement_group(pg)


def _where(_actor) -> dict:
    """Runs inside an actor (``handle.__ray_call__``): where it is and which GPUs its process sees."""
    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "gpu_ids": [str(i) for i in ctx.get_accelerator_ids().get("GPU", [])]}


async def verify_placement(plan: Plan, placements: Placements, handles: dict[tuple[str, int], object],
                           out_path: Path | None, *, timeout_s: float = 300.0) -> list[ActorLocation]:
    """Check that every actor in ``handles`` ((role, replica) -> handle) runs where ``plan`` says.

    Asks each actor through ``__ray_call__`` (no method of its own needed) and each placement
    group through ``placement_group_table``; writes ``out_path`` (placement.json) either way,
    then raises PlacementMismatch listing every actor out of place.
    """
    keys = list(handles)
    futures = [asyncio.ensure_future(handles[k].__ray_call__.remote(_where)) for k in keys]
    _, pending = await asyncio.wait(futures, timeout=timeout_s)
    if pending:  # an actor stuck in its constructor: name it rather than hang the start-up
        for f in pending:
            f.cancel()
        silent = [f"{role}-{replica}" for (role, replica), f in zip(keys, futures) if f in pending]
        raise PlacementMismatch(f"actors {silent} did not say where they run within {timeout_s:g}s")
    locations = []
    for (role, replica), f in zip(keys, futures):
        w = f.result()  # an actor that died in its constructor raises its own error here
        locations.append(ActorLocation(role=role, replica=replica, node_id=w["node_id"], node_ip=w["node_ip"],
                                       cuda_visible_devices=w["cuda_visible_devices"], gpu_ids=tuple(w["gpu_ids"])))
    groups = {}
    for a in plan.actors:
        if a.group is not None:
            groups[a.group] = placements[a.role][a.replica][0]
    bundle_nodes = {}
    for name, pg in groups.items():
        table = ray.util.placement_group_table(pg)["bundles_to_node_id"]
        bundle_nodes[name] = [table.get(i) for i in range(len(plan.group(name).bundles))]
    node_ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    problems = check_placement(plan, locations, bundle_nodes, node_ips)
    if out_path is not None:
        out_path.write_text(json.dumps(placement_record(plan, locations, bundle_nodes, node_ips, problems), indent=1))
    if problems:
        where = f" (all actors: {out_path})" if out_path is not None else ""
        raise PlacementMismatch("actors are not where the plan put them" + where + ":\n  - " + "\n  - ".join(problems))
    return locations

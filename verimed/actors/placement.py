"""Ray side of placement: create the placement groups of a :class:`~verimed.core.cluster.planner.Plan`.

    plan = planner.plan(cfg.placement, kl_enabled=reference_needed(cfg), cluster=cluster_resources_from_ray())
    groups = create_placement_groups(plan)
    Learner.options(**actor_options(plan, groups, "learner", rank)).remote(...)

Thin by design: all layout decisions and fit checks live in ``verimed/core/cluster/planner.py``
(tested without Ray); this module only turns bundles into Ray calls.
"""
from __future__ import annotations

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

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

"""Did Ray place every actor where the plan says? Checked at every start-up, loopback or real.

``verimed/actors/placement.py:verify_placement`` asks each started actor where it runs
(node, the ``CUDA_VISIBLE_DEVICES`` its process sees, Ray's GPU ids) and each placement
group where Ray put its bundles, then calls :func:`check_placement`:

- an actor runs on the node Ray gave its planned (group, bundle);
- a STRICT_PACK group sits on one node, a STRICT_SPREAD group on distinct nodes;
- a GPU actor sees exactly the GPUs it asked for: n devices for ``num_gpus = n`` whole GPUs
  (a tensor-parallel engine: its tp devices, on its one node), one device for a fraction,
  and the same ids Ray assigned;
- no device held by a whole-GPU actor is seen by another actor on the same node.

:func:`placement_record` is what ``runs/<name>/placement.json`` holds. Pure Python.
"""
from __future__ import annotations

import msgspec

from verimed.core.cluster.planner import PlacementError, Plan


class PlacementMismatch(PlacementError):
    """Ray placed an actor somewhere the plan did not say; the message names each actor."""


class ActorLocation(msgspec.Struct, frozen=True):
    """Where one actor runs, as its own process sees it."""

    role: str
    replica: int
    node_id: str
    node_ip: str
    cuda_visible_devices: str | None  # os.environ in the actor; None when unset (num_gpus = 0)
    gpu_ids: tuple[str, ...]  # Ray's assignment: get_runtime_context().get_accelerator_ids()["GPU"]

    @property
    def name(self) -> str:
        return f"{self.role}-{self.replica}"


def visible_devices(value: str | None) -> tuple[str, ...]:
    """``"0,1"`` -> ("0", "1"); unset or empty -> ()."""
    return tuple(d.strip() for d in (value or "").split(",") if d.strip())


def check_placement(plan: Plan, locations: list[ActorLocation], bundle_nodes: dict[str, list[str]],
                    node_ips: dict[str, str] | None = None) -> list[str]:
    """Every way ``locations`` break ``plan``, one line each naming the actor (empty: all as planned).

    ``bundle_nodes``: placement-group name -> node id of each bundle (Ray's
    ``placement_group_table(pg)["bundles_to_node_id"]``); ``node_ips``: node id -> address, for messages.
    """
    ips = node_ips or {}

    def where(node_id: str) -> str:
        return f"{ips.get(node_id, '?')} (node {node_id[:8]})"

    planned = {(a.role, a.replica): a for a in plan.actors}
    problems = []
    for g in plan.groups:
        nodes = bundle_nodes.get(g.name)
        if nodes is None or len(nodes) != len(g.bundles):
            problems.append(f"placement group {g.name}: Ray reports {nodes!r} for its {len(g.bundles)} bundles")
            continue
        if g.strategy == "STRICT_PACK" and len(set(nodes)) > 1:
            problems.append(f"placement group {g.name} is STRICT_PACK but spans {', '.join(sorted(map(where, set(nodes))))}")
        if g.strategy == "STRICT_SPREAD" and len(set(nodes)) < len(nodes):
            problems.append(f"placement group {g.name} is STRICT_SPREAD but puts two bundles on one node")
    holders: dict[tuple[str, str], list[tuple[ActorLocation, bool]]] = {}  # (node, device) -> (actor, whole GPU)
    for loc in locations:
        actor = planned.get((loc.role, loc.replica))
        if actor is None:
            problems.append(f"{loc.name}: started, but the plan has no such actor")
            continue
        if actor.group is not None:
            nodes = bundle_nodes.get(actor.group) or []
            want = nodes[actor.bundle] if actor.bundle < len(nodes) else None
            if loc.node_id != want:
                problems.append(f"{loc.name} runs on {where(loc.node_id)}, but its bundle {actor.group}[{actor.bundle}] "
                                f"is on {where(want) if want else 'no node'}")
        devices = visible_devices(loc.cuda_visible_devices)
        if actor.num_gpus > 0:
            whole = actor.num_gpus >= 1
            wanted = int(actor.num_gpus) if whole else 1
            what = f"{actor.num_gpus:g} GPU{'s' * (actor.num_gpus != 1)}" + (
                f" (tensor parallel {actor.tensor_parallel_size})" if actor.tensor_parallel_size > 1 else "")
            if whole and actor.num_gpus != wanted:
                problems.append(f"{loc.name} asks for {what}: a whole-GPU actor must ask for an integer count")
            if len(devices) != wanted:
                problems.append(f"{loc.name} sees CUDA_VISIBLE_DEVICES={loc.cuda_visible_devices!r} "
                                f"({len(devices)} devices) but asked for {what}")
            elif set(devices) != set(loc.gpu_ids):
                problems.append(f"{loc.name} sees CUDA_VISIBLE_DEVICES={loc.cuda_visible_devices!r} but Ray assigned "
                                f"GPUs {list(loc.gpu_ids)}")
            for d in devices:
                holders.setdefault((loc.node_id, d), []).append((loc, whole))
    for (node_id, device), held in sorted(holders.items()):
        if len(held) > 1 and any(whole for _, whole in held):
            names = ", ".join(loc.name for loc, _ in held)
            problems.append(f"GPU {device} on {where(node_id)} is held by a whole-GPU actor and shared by {names}")
    return problems


def placement_record(plan: Plan, locations: list[ActorLocation], bundle_nodes: dict[str, list[str]],
                     node_ips: dict[str, str], problems: list[str]) -> dict:
    """``runs/<name>/placement.json``: per actor its node, group, bundle and devices; per group its nodes."""
    planned = {(a.role, a.replica): a for a in plan.actors}
    actors = {}
    for loc in sorted(locations, key=lambda l: (l.role, l.replica)):
        a = planned.get((loc.role, loc.replica))
        actors[loc.name] = {
            "node_ip": loc.node_ip, "node_id": loc.node_id,
            "group": a.group if a else None, "bundle": a.bundle if a else None,
            "num_gpus": a.num_gpus if a else None, "num_cpus": a.num_cpus if a else None,
            "CUDA_VISIBLE_DEVICES": loc.cuda_visible_devices, "ray_gpu_ids": list(loc.gpu_ids),
        }
    groups = {g.name: {"strategy": g.strategy, "bundle_nodes": [node_ips.get(n, n) for n in bundle_nodes.get(g.name, [])]}
              for g in plan.groups}
    return {"ok": not problems, "problems": problems, "cluster": plan.cluster.describe(), "groups": groups,
            "actors": actors}

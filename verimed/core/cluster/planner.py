"""Placement planning: which actor runs on which Ray placement-group bundle, and does it fit.

    verimed plan configs/cluster/m2-32b-8x8.yaml --cluster-resources 8x8gpu,cpus_per_node=96

The ``placement:`` config section (:class:`PlacementConfig`) names, for each role
(learner, rollout, simulator, verifier, rubric_generator, reference), its replicas,
GPUs/CPUs per replica, tensor-parallel size, colocation and Ray strategy.
:func:`plan` turns it into a :class:`Plan` — one placement group per hosting role,
one bundle per replica, every actor mapped to (group, bundle) — and checks it
against a :class:`ClusterResources`, raising :class:`PlacementError` with a
readable message when it does not fit. ``actors/placement.py`` creates the Ray
placement groups from a Plan; ``verimed plan`` (:mod:`verimed.cli.plan`) prints
one. Pure Python: imports neither ray nor torch.

Decisions:
- Tensor parallelism: a replica with ``tensor_parallel_size = tp`` gets ONE bundle
  of ``tp`` GPUs (so all its GPUs sit on one node, as NCCL TP wants) and the engine
  actor asks for all ``tp`` GPUs, running vLLM's multiprocessing executor inside it.
- Colocation: ``colocate_with: learner`` puts replica i of a role in bundle i of the
  learner's group. CPUs add up; GPUs are shared: the bundle keeps the host's GPUs
  and the GPU-using actors in it each ask for an equal fraction, so Ray gives them
  the same device. Ray can share only a single GPU that way, so colocated GPU roles
  need ``gpus_per_replica: 1`` on both sides. One level only (a guest hosts nobody).
- A role needing no resources (the ``rules`` helpers, ``num_cpus=0``, DESIGN §10)
  gets no bundle (Ray refuses all-zero bundles) and is scheduled anywhere.
- The fit check is greedy first-fit-decreasing of all bundles onto nodes honouring
  STRICT_PACK (a group on one node) and STRICT_SPREAD (bundles on distinct nodes);
  PACK / SPREAD are soft in Ray and any node will do.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec

from verimed.core.config.placement import ROLES, PlacementConfig, RoleSpec


class PlacementError(ValueError):
    """The placement config is inconsistent, or its plan does not fit the cluster."""


# -------------------------------------------------------------------- cluster


class NodeResources(msgspec.Struct, frozen=True):
    gpus: int
    cpus: float | None = None  # None: CPUs not checked


class ClusterResources(msgspec.Struct, frozen=True):
    nodes: tuple[NodeResources, ...]

    @classmethod
    def uniform(cls, nodes: int, gpus_per_node: int, cpus_per_node: float | None = None) -> "ClusterResources":
        if nodes < 1 or gpus_per_node < 0 or (cpus_per_node is not None and cpus_per_node < 0):
            raise ValueError(f"bad cluster: nodes={nodes} gpus_per_node={gpus_per_node} cpus_per_node={cpus_per_node}")
        return cls(nodes=tuple(NodeResources(gpus_per_node, cpus_per_node) for _ in range(nodes)))

    @classmethod
    def parse(cls, spec: str) -> "ClusterResources":
        """``"8x8gpu"``, ``"nodes=8,gpus_per_node=8,cpus_per_node=96"``, ``"1x0gpu,cpus_per_node=2"``,
        or a JSON file: ``{"nodes": 8, "gpus_per_node": 8, "cpus_per_node": 96}`` or
        ``{"nodes": [{"gpus": 8, "cpus": 96}, ...]}``."""
        if spec.endswith(".json") or Path(spec).is_file():
            return cls._from_json(spec)
        fields: dict[str, float] = {}
        for token in filter(None, (t.strip() for t in spec.split(","))):
            if m := re.fullmatch(r"(\d+)x(\d+)gpus?", token):
                fields["nodes"], fields["gpus_per_node"] = int(m[1]), int(m[2])
            elif m := re.fullmatch(r"(nodes|gpus_per_node|cpus_per_node)=(\d+(?:\.\d+)?)", token):
                fields[m[1]] = float(m[2])
            else:
                raise ValueError(
                    f"--cluster-resources {spec!r}: cannot read {token!r}; expected e.g. '8x8gpu' or "
                    "'nodes=8,gpus_per_node=8,cpus_per_node=96' or a JSON file"
                )
        cpus = fields.get("cpus_per_node")
        return cls.uniform(int(fields.get("nodes", 1)), int(fields.get("gpus_per_node", 0)), cpus)

    @classmethod
    def _from_json(cls, path: str) -> "ClusterResources":
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"--cluster-resources {path}: {exc}") from None
        if isinstance(raw, dict) and isinstance(raw.get("nodes"), list):
            try:
                return msgspec.convert(raw, cls, strict=False)
            except msgspec.ValidationError as exc:
                raise ValueError(f"--cluster-resources {path}: {exc}") from None
        try:
            return cls.uniform(int(raw["nodes"]), int(raw.get("gpus_per_node", 0)), raw.get("cpus_per_node"))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"--cluster-resources {path}: expected 'nodes' (a count or a list), got {raw!r}") from exc

    @property
    def total_gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)

    @property
    def total_cpus(self) -> float | None:
        return None if any(n.cpus is None for n in self.nodes) else sum(n.cpus for n in self.nodes)

    def describe(self) -> str:
        """"8 nodes × (8 GPUs, 96 CPUs) = 64 GPUs"."""
        kinds: dict[tuple[int, float | None], int] = {}
        for n in self.nodes:
            kinds[(n.gpus, n.cpus)] = kinds.get((n.gpus, n.cpus), 0) + 1
        parts = [f"{k} node{'s' * (k > 1)} × ({_res(g, c)})" for (g, c), k in kinds.items()]
        return " + ".join(parts) + f" = {_count(self.total_gpus, 'GPU')}"


def _count(n: float, what: str) -> str:
    return f"{n:g} {what}{'s' * (n != 1)}"


def _res(gpus: float, cpus: float | None) -> str:
    return f"{_count(gpus, 'GPU')}, " + ("CPUs unchecked" if cpus is None else _count(cpus, "CPU"))


# ----------------------------------------------------------------------- plan


class Bundle(msgspec.Struct, frozen=True):
    gpus: int
    cpus: float
    node: int  # node index in the feasible packing found by the fit check

    def ray_resources(self) -> dict[str, float]:
        """Ray bundle dict; zero entries left out (Ray refuses all-zero bundles)."""
        return {k: v for k, v in (("GPU", self.gpus), ("CPU", self.cpus)) if v}


class GroupPlan(msgspec.Struct, frozen=True):
    name: str  # Ray placement-group name, "verimed-<host role>"
    role: str  # the hosting role
    strategy: str
    bundles: tuple[Bundle, ...]


class ActorPlan(msgspec.Struct, frozen=True):
    role: str
    replica: int  # rank for the learner, engine index for engines
    group: str | None  # None: no resources, scheduled anywhere
    bundle: int | None
    num_gpus: float  # what the actor asks Ray for (fractional when sharing a GPU)
    num_cpus: float
    tensor_parallel_size: int = 1


class Plan(msgspec.Struct, frozen=True):
    groups: tuple[GroupPlan, ...]
    actors: tuple[ActorPlan, ...]
    cluster: ClusterResources

    @property
    def total_gpus(self) -> int:
        return sum(b.gpus for g in self.groups for b in g.bundles)

    @property
    def total_cpus(self) -> float:
        return sum(b.cpus for g in self.groups for b in g.bundles)

    def group(self, name: str) -> GroupPlan:
        return next(g for g in self.groups if g.name == name)

    def actors_of(self, role: str) -> list[ActorPlan]:
        return [a for a in self.actors if a.role == role]


def active_roles(placement: PlacementConfig, *, kl_enabled: bool) -> list[str]:
    """Roles that get actors: all with replicas > 0, the reference only with a KL term."""
    return [r for r in ROLES if getattr(placement, r).replicas > 0 and (r != "reference" or kl_enabled)]


def plan(placement: PlacementConfig, *, kl_enabled: bool, cluster: ClusterResources) -> Plan:
    """Lay every active role out on bundles and check the result fits ``cluster``.

    Returns the Plan; raises PlacementError naming what does not fit and what the cluster has.
    """
    roles = active_roles(placement, kl_enabled=kl_enabled)
    members: dict[str, list[list[tuple[str, int, RoleSpec]]]] = {}  # host -> bundle -> (role, replica, spec)
    for role in roles:
        spec: RoleSpec = getattr(placement, role)
        host = spec.colocate_with or role
        if host not in roles:
            raise PlacementError(f"{role}.colocate_with: {host} is not placed (replicas 0, or reference without KL)")
        bundles = members.setdefault(host, [[] for _ in range(getattr(placement, host).replicas)])
        for replica in range(spec.replicas):
            bundles[replica].append((role, replica, spec))
    # Bundle shape = host GPUs (shared by colocated GPU users) and the sum of CPUs.
    shapes = {
        host: [(max((s.gpus_per_replica for _, _, s in m), default=0), sum(s.cpus_per_replica for _, _, s in m))
               for m in bundles]
        for host, bundles in members.items()
    }
    # Ray refuses all-zero bundles: those members run unplaced; renumber the rest.
    index = {
        host: {old: new for new, old in enumerate(i for i, (g, c) in enumerate(shape) if g or c)}
        for host, shape in shapes.items()
    }
    groups = [
        GroupPlan(f"verimed-{host}", host, getattr(placement, host).strategy,
                  tuple(Bundle(g, c, -1) for g, c in shape if g or c))
        for host, shape in shapes.items()
        if index[host]
    ]
    groups = _fit(groups, cluster)
    actors = []
    for host, bundles in members.items():
        for old, bundle_members in enumerate(bundles):
            gpus, _ = shapes[host][old]
            gpu_users = sum(1 for _, _, s in bundle_members if s.gpus_per_replica)
            new = index[host].get(old)
            for role, replica, spec in bundle_members:
                actors.append(ActorPlan(
                    role=role, replica=replica, group=None if new is None else f"verimed-{host}", bundle=new,
                    num_gpus=gpus / gpu_users if spec.gpus_per_replica else 0.0,
                    num_cpus=spec.cpus_per_replica, tensor_parallel_size=spec.tensor_parallel_size,
                ))
    actors.sort(key=lambda a: (ROLES.index(a.role), a.replica))
    return Plan(groups=tuple(groups), actors=tuple(actors), cluster=cluster)


def _needs(group: GroupPlan) -> str:
    """"rollout needs 16 GPUs in 2 bundles of (8 GPUs, 16 CPUs)" ("of up to" when they differ)."""
    n, total = len(group.bundles), sum(b.gpus for b in group.bundles)
    big = max(group.bundles, key=lambda b: (b.gpus, b.cpus))
    of = "of" if len({(b.gpus, b.cpus) for b in group.bundles}) == 1 else "of up to"
    head = f"{group.role} needs {_count(total, 'GPU')} in " if total else f"{group.role} needs "
    return head + f"{n} bundle{'s' * (n > 1)} {of} ({_res(big.gpus, big.cpus)})"


def _fit(groups: list[GroupPlan], cluster: ClusterResources) -> list[GroupPlan]:
    """Check ``groups`` fit ``cluster``; return them with each bundle's node filled in."""
    inf = float("inf")
    node_gpus = [n.gpus for n in cluster.nodes]
    node_cpus = [inf if n.cpus is None else n.cpus for n in cluster.nodes]
    has = f"the cluster has {cluster.describe()}"
    problems = []
    for g in groups:
        if g.strategy == "STRICT_PACK":
            gpus, cpus = sum(b.gpus for b in g.bundles), sum(b.cpus for b in g.bundles)
            if not any(gpus <= ng and cpus <= nc for ng, nc in zip(node_gpus, node_cpus)):
                problems.append(f"{_needs(g)} all on one node (STRICT_PACK), {has}")
        elif not all(any(b.gpus <= ng and b.cpus <= nc for ng, nc in zip(node_gpus, node_cpus)) for b in g.bundles):
            problems.append(f"{_needs(g)} and no node holds one bundle, {has}")
        if g.strategy == "STRICT_SPREAD" and len(g.bundles) > len(cluster.nodes):
            problems.append(f"{g.role} is STRICT_SPREAD over {len(g.bundles)} bundles, {has}")
    total_gpus = sum(b.gpus for g in groups for b in g.bundles)
    total_cpus = sum(b.cpus for g in groups for b in g.bundles)
    if total_gpus > cluster.total_gpus:
        problems.append(f"the plan needs {_count(total_gpus, 'GPU')} ({_breakdown(groups, 'gpus')}), {has}")
    if total_cpus > sum(node_cpus):
        problems.append(f"the plan needs {_count(total_cpus, 'CPU')} ({_breakdown(groups, 'cpus')}), {has}")
    if not problems:
        nodes, failed = _pack(groups, node_gpus, node_cpus)
        if failed is None:
            place = msgspec.structs.replace
            return [place(g, bundles=tuple(place(b, node=n) for b, n in zip(g.bundles, nodes[g.name]))) for g in groups]
        problems.append(f"totals fit, but first-fit-decreasing packing found no node for {failed}, {has}")
    raise PlacementError("placement does not fit:\n  - " + "\n  - ".join(problems))


def _breakdown(groups: list[GroupPlan], resource: str) -> str:
    """"learner 24 + rollout 24 in 6 bundles of 4": per-group totals of ``resource``."""
    parts = []
    for g in groups:
        per_bundle = [getattr(b, resource) for b in g.bundles]
        if sum(per_bundle):
            many = len(per_bundle) > 1 and per_bundle[0] > 1 and len(set(per_bundle)) == 1
            parts.append(f"{g.role} {sum(per_bundle):g}" + (f" in {len(per_bundle)} bundles of {per_bundle[0]:g}" if many else ""))
    return " + ".join(parts)


def _pack(groups: list[GroupPlan], free_gpus: list[int], free_cpus: list[float]) -> tuple[dict[str, list[int]], str | None]:
    """Greedy first-fit-decreasing of bundles onto nodes (STRICT_PACK groups as one item).

    Returns ({group name: node per bundle}, None) or (partial, description of what failed).
    """
    free_gpus, free_cpus = list(free_gpus), list(free_cpus)
    items = []  # (gpus, cpus, group, bundle indexes)
    for g in groups:
        if g.strategy == "STRICT_PACK":
            items.append((sum(b.gpus for b in g.bundles), sum(b.cpus for b in g.bundles), g, list(range(len(g.bundles)))))
        else:
            items.extend((b.gpus, b.cpus, g, [i]) for i, b in enumerate(g.bundles))
    items.sort(key=lambda it: (it[0], it[1]), reverse=True)
    nodes: dict[str, list[int]] = {g.name: [-1] * len(g.bundles) for g in groups}
    for gpus, cpus, g, indexes in items:
        taken = set(nodes[g.name]) if g.strategy == "STRICT_SPREAD" else set()
        for n in range(len(free_gpus)):
            if n not in taken and gpus <= free_gpus[n] and cpus <= free_cpus[n]:
                free_gpus[n] -= gpus
                free_cpus[n] -= cpus
                for i in indexes:
                    nodes[g.name][i] = n
                break
        else:
            what = f"bundle {indexes[0]}" if len(indexes) == 1 else f"{len(indexes)} bundles on one node"
            return nodes, f"{g.role} {what} ({_res(gpus, cpus)})"
    return nodes, None


# ---------------------------------------------------------------- printing


def format_plan(p: Plan) -> str:
    """A readable table: groups and their bundles, actors (ranges) on bundles and nodes."""
    lines = [
        f"cluster: {p.cluster.describe()}",
        f"plan:    {_count(p.total_gpus, 'GPU')}, {_count(p.total_cpus, 'CPU')} in "
        f"{len(p.groups)} placement group{'s' * (len(p.groups) != 1)} — fits",
        "",
        f"{'placement group':<26}{'strategy':<15}bundles",
    ]
    for g in p.groups:
        shapes: dict[tuple[int, float], int] = {}
        for b in g.bundles:
            shapes[(b.gpus, b.cpus)] = shapes.get((b.gpus, b.cpus), 0) + 1
        lines.append(f"{g.name:<26}{g.strategy:<15}" + " + ".join(f"{k} × ({_res(*s)})" for s, k in shapes.items()))
    lines += ["", f"{'actor':<26}{'group':<26}{'bundle':<9}{'GPUs':<7}{'CPUs':<7}{'TP':<4}node"]
    for first, last in _runs(p):
        name = f"{first.role}[{first.replica}" + (f"-{last.replica}]" if last is not first else "]")
        if first.group is None:
            lines.append(f"{name:<26}{'(none)':<26}{'-':<9}{first.num_gpus:<7g}{first.num_cpus:<7g}{first.tensor_parallel_size:<4}any")
            continue
        bundles = f"{first.bundle}" + (f"-{last.bundle}" if last is not first else "")
        nodes = sorted({_node(p, a) for a in (first, last)})
        node = "-".join(str(n) for n in nodes)
        lines.append(f"{name:<26}{first.group:<26}{bundles:<9}{first.num_gpus:<7g}{first.num_cpus:<7g}"
                     f"{first.tensor_parallel_size:<4}{node}")
    return "\n".join(lines)


def _node(p: Plan, a: ActorPlan) -> int:
    return p.group(a.group).bundles[a.bundle].node


def _runs(p: Plan) -> list[tuple[ActorPlan, ActorPlan]]:
    """Consecutive actors of one role on consecutive bundles of one node, same resources."""
    runs: list[list[ActorPlan]] = []
    for a in p.actors:
        prev = runs[-1][-1] if runs else None
        if (
            prev is not None and prev.role == a.role and prev.group == a.group and prev.replica + 1 == a.replica
            and (a.group is None or (prev.bundle + 1 == a.bundle and _node(p, prev) == _node(p, a)))
            and (prev.num_gpus, prev.num_cpus, prev.tensor_parallel_size) == (a.num_gpus, a.num_cpus, a.tensor_parallel_size)
        ):
            runs[-1].append(a)
        else:
            runs.append([a])
    return [(r[0], r[-1]) for r in runs]

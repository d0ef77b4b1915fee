"""The ``placement:`` section schema: per role, replicas, GPUs/CPUs, tensor parallelism, colocation.

Structs only; :mod:`verimed.core.cluster.planner` turns a :class:`PlacementConfig`
into a plan and checks it against a cluster. Imports only msgspec.
"""
from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

ROLES = ("learner", "rollout", "simulator_engine", "verifier_engine", "simulator", "verifier", "rubric_generator",
         "reference")
Role = Literal["learner", "rollout", "simulator_engine", "verifier_engine", "simulator", "verifier", "rubric_generator",
               "reference"]
# The roles whose actors use GPUs: the policy learners and engines, the reference model, and the
# engine groups serving ``llm.model`` (``llm.type: vllm``) to the simulator / verifier clients.
GPU_ROLES = ("learner", "rollout", "simulator_engine", "verifier_engine", "reference")
# Client actors: they send prompts (or run rules) and never hold a GPU.
CLIENT_ROLES = ("simulator", "verifier", "rubric_generator")
Strategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


class RoleSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """How one role is laid out. A replica is one actor (one learner rank, one engine)."""

    replicas: Annotated[int, Meta(ge=0)] = 1  # learner replicas = FSDP world size
    gpus_per_replica: Annotated[int, Meta(ge=0)] = 0  # whole GPUs; = tensor_parallel_size for a TP engine
    cpus_per_replica: Annotated[float, Meta(ge=0.0)] = 1.0  # logical Ray CPUs
    tensor_parallel_size: Annotated[int, Meta(ge=1)] = 1  # GPUs one engine shards over (one bundle)
    colocate_with: Role | None = None  # share that role's bundles (replica i -> its bundle i)
    strategy: Strategy = "PACK"  # Ray strategy of this role's placement group (ignored for guests)

    def __post_init__(self) -> None:
        if self.tensor_parallel_size > 1 and self.gpus_per_replica != self.tensor_parallel_size:
            raise ValueError(
                f"tensor_parallel_size {self.tensor_parallel_size} needs gpus_per_replica "
                f"{self.tensor_parallel_size}, got {self.gpus_per_replica}"
            )


def _cpu_helper() -> RoleSpec:
    return RoleSpec(cpus_per_replica=0.0)  # rules backends: num_cpus=0 helper actors


class PlacementConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The ``placement:`` section. Defaults = the CPU embedded default (2 CPUs, no GPU)."""

    learner: RoleSpec = RoleSpec()
    rollout: RoleSpec = RoleSpec()
    # vLLM engine groups serving ``llm.model`` with ``llm.type: vllm``: the simulator's, and the
    # judge's and rubric generator's (either serves all three when the other has no replicas).
    simulator_engine: RoleSpec = RoleSpec(replicas=0, cpus_per_replica=0.0)
    verifier_engine: RoleSpec = RoleSpec(replicas=0, cpus_per_replica=0.0)
    simulator: RoleSpec = msgspec.field(default_factory=_cpu_helper)
    verifier: RoleSpec = msgspec.field(default_factory=_cpu_helper)
    rubric_generator: RoleSpec = msgspec.field(default_factory=_cpu_helper)
    # Planned only when a KL term is on; 0 CPUs on the laptop default: a separate actor sharing the cores.
    reference: RoleSpec = msgspec.field(default_factory=_cpu_helper)

    def __post_init__(self) -> None:
        for role in ("learner", "rollout"):
            if getattr(self, role).replicas < 1:
                raise ValueError(f"{role}.replicas must be >= 1")
        for role in CLIENT_ROLES:  # the controller starts exactly one of each, with no GPU
            spec = getattr(self, role)
            if spec.gpus_per_replica:
                raise ValueError(f"{role}.gpus_per_replica is {spec.gpus_per_replica}: the {role} actor is a client "
                                 "and uses no GPU; put its LLM engines' GPUs in simulator_engine / verifier_engine")
            if spec.replicas != 1:
                raise ValueError(f"{role}.replicas is {spec.replicas}: the controller starts one {role} actor")
        for role in ROLES:
            spec: RoleSpec = getattr(self, role)
            host = spec.colocate_with
            if host is None:
                continue
            host_spec: RoleSpec = getattr(self, host)
            if host == role:
                raise ValueError(f"{role}.colocate_with names itself")
            if host_spec.colocate_with is not None:
                raise ValueError(f"{role}.colocate_with: {host} is itself colocated with {host_spec.colocate_with}")
            if spec.replicas > host_spec.replicas:
                raise ValueError(f"{role} has {spec.replicas} replicas but its host {host} only {host_spec.replicas}")
            if spec.gpus_per_replica and host_spec.gpus_per_replica and (spec.gpus_per_replica, host_spec.gpus_per_replica) != (1, 1):
                raise ValueError(
                    f"{role} colocated with {host}: sharing GPUs needs gpus_per_replica 1 on both "
                    f"(got {spec.gpus_per_replica} and {host_spec.gpus_per_replica})"
                )

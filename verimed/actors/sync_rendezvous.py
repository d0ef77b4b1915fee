"""The emulated weight-sync rendezvous as a named Ray actor, one per (host, port).

Emulated members (learner rank 0, every worker of every emulated engine) join here instead of a
TCPStore + gloo/NCCL group: whoever comes first creates the actor (``get_if_exists``), each claims
its rank, and all return once the group is whole — or fail as a real rendezvous would
(:class:`verimed.core.emulate.rendezvous.Rendezvous`: duplicate rank, rank out of range, world size
that disagrees, a member waiting past the timeout). Learner rank 0 kills its previous group's actor
when a new group forms (a rejoin gets a fresh port, hence a fresh actor).
"""
from __future__ import annotations

import ray

from verimed.core.emulate.rendezvous import Rendezvous

TIMEOUT_S = 120.0  # as make_group's store timeout


@ray.remote(num_cpus=0, max_restarts=0)
class SyncRendezvousActor:
    def __init__(self, address: str, world_size: int, timeout_s: float):
        self.rendezvous = Rendezvous(address, world_size, timeout_s)

    async def claim(self, rank: int, world_size: int, member: str) -> dict[int, str]:
        return await self.rendezvous.claim(rank, world_size, member)


def rendezvous_actor(host: str, port: int, world_size: int, timeout_s: float = TIMEOUT_S):
    """The group's rendezvous actor, created by the first caller (later callers get the same one)."""
    address = f"{host}:{port}"
    return SyncRendezvousActor.options(name=f"verimed-weight-sync-{address}", get_if_exists=True).remote(
        address, world_size, timeout_s)


async def join_rendezvous(host: str, port: int, rank: int, world_size: int, member: str):
    """Claim ``rank`` (an engine worker; awaits the whole group). Returns the actor handle."""
    actor = rendezvous_actor(host, port, world_size)
    await actor.claim.remote(rank, world_size, member)
    return actor


def join_rendezvous_blocking(host: str, port: int, rank: int, world_size: int, member: str):
    """:func:`join_rendezvous` for a synchronous actor (learner rank 0)."""
    actor = rendezvous_actor(host, port, world_size)
    ray.get(actor.claim.remote(rank, world_size, member))
    return actor

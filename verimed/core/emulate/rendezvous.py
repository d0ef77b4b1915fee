"""The emulated weight-sync rendezvous: members claim their ranks, and all wait until the group is whole.

Stands in for the TCPStore + gloo/NCCL group of a real sync (verimed/core/rollout/weight_sync.py:
make_group) and fails the way it would: a rank out of range, a rank claimed twice or a world size
that disagrees raise at once; a member left waiting past ``timeout_s`` raises like a store timeout.
``verimed/actors/sync_rendezvous.py`` hosts one per (host, port) in a named Ray actor.
"""
from __future__ import annotations

import asyncio


class RendezvousError(RuntimeError):
    """A weight-sync group could not be formed; the message names the address, the rank and why."""


class Rendezvous:
    def __init__(self, address: str, world_size: int, timeout_s: float = 120.0):
        if world_size < 2:
            raise RendezvousError(f"weight-sync rendezvous at {address}: world size {world_size} < 2 "
                                  "(learner rank 0 and at least one engine worker)")
        self.address, self.world_size, self.timeout_s = address, world_size, timeout_s
        self.members: dict[int, str] = {}
        self.complete = asyncio.Event()

    async def claim(self, rank: int, world_size: int, member: str) -> dict[int, str]:
        """Claim ``rank`` for ``member``; returns every rank's member once all ``world_size`` have claimed."""
        where = f"weight-sync rendezvous at {self.address}"
        if world_size != self.world_size:
            raise RendezvousError(f"{where}: {member} joins with world size {world_size}, the group has {self.world_size}")
        if not 0 <= rank < self.world_size:
            raise RendezvousError(f"{where}: {member} claims rank {rank}, outside [0, {self.world_size})")
        if rank in self.members:
            raise RendezvousError(f"{where}: rank {rank} claimed twice ({self.members[rank]} and {member}); "
                                  "every engine worker needs its own rank (sync_ranks)")
        self.members[rank] = member
        if len(self.members) == self.world_size:
            self.complete.set()
        try:
            await asyncio.wait_for(self.complete.wait(), self.timeout_s)
        except asyncio.TimeoutError:
            missing = sorted(set(range(self.world_size)) - set(self.members))
            raise RendezvousError(f"{where}: {member} (rank {rank}) waited {self.timeout_s:g} s for ranks {missing} "
                                  f"of {self.world_size} (a TCPStore rendezvous times out the same way)") from None
        return dict(self.members)

"""Which rollout engines are in the weight-sync group and in routing, through losses and returns.

A Ray node that dies takes its engines with it; their actors (``max_restarts=-1``) come back
only when a node with their placement bundle's resources joins again, which may be never. The
run goes on without them, and a returned engine must not serve before it has the current
weights. The states of engine i:

- **member**: in the current weight-sync group, serving ``served[i]`` (routed when that is the
  newest version any member serves);
- **lost**: its actor failed (a call raised Ray's actor error, or it did not answer a probe):
  out of the group and out of routing; ``served[i] = -1``;
- **returned**: answered again after a loss: it joins the next group rebuild, and is routed only
  once a sync has reached it (``served[i]`` stays -1 until then).

Pure bookkeeping (no Ray): :class:`verimed.actors.weight_sync.WeightSyncCoordinator` drives it.
"""
from __future__ import annotations

from verimed.core.rollout.sync_plan import lagging_engines


class EngineMembership:
    """State of ``n`` engines; counts every loss and every return to service once."""

    def __init__(self, n: int, initial_version: int = 0):
        if n < 1:
            raise ValueError(f"EngineMembership needs at least one engine, got {n}")
        self.served = [initial_version] * n  # policy version each engine serves (-1: unknown or lost)
        self.lost: set[int] = set()
        self.returned: set[int] = set()
        self.lost_total = 0  # losses seen (an engine lost twice counts twice)
        self.recovered_total = 0  # returned engines that a sync brought up to date

    def _check(self, i: int) -> None:
        if not 0 <= i < len(self.served):
            raise IndexError(f"engine {i}: expected 0..{len(self.served) - 1}")

    def mark_lost(self, i: int) -> bool:
        """Engine i failed. True when this is news (it was a member or had returned), False if already lost."""
        self._check(i)
        self.served[i] = -1
        if i in self.lost:
            return False
        self.lost.add(i)
        self.returned.discard(i)  # it answered, then failed again before a sync reached it
        self.lost_total += 1
        return True

    def mark_returned(self, i: int) -> bool:
        """Lost engine i answers again: it joins the next group. False (nothing changes) if it was not lost."""
        self._check(i)
        if i not in self.lost:
            return False
        self.lost.discard(i)
        self.returned.add(i)
        return True

    def group(self) -> list[int]:
        """The engines the next weight-sync group is built from: every engine not lost, in index order."""
        return [i for i in range(len(self.served)) if i not in self.lost]

    def synced(self, i: int, version: int) -> bool:
        """A sync brought engine i to ``version``. True when that returns a returned engine to service."""
        self._check(i)
        if i in self.lost:
            return False  # a late answer from an engine already written off: it rejoins through a probe
        self.served[i] = version
        if i in self.returned:
            self.returned.discard(i)
            self.recovered_total += 1
            return True
        return False

    def unroutable(self) -> frozenset[int]:
        """Engines the router must skip: lost or returned ones (served -1) and members behind the newest
        version any engine serves (:func:`~verimed.core.rollout.sync_plan.lagging_engines`)."""
        return lagging_engines(self.served) | frozenset(self.lost) | frozenset(self.returned)

    def in_rotation(self) -> int:
        """How many engines the router may send work to."""
        return len(self.served) - len(self.unroutable())

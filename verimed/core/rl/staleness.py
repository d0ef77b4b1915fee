"""Staleness: admission control, the exactly-once sample ledger, and the consumption bound.

The controller (``actors/controller.py``) owns one :class:`AdmissionControl`, one
:class:`Ledger` and one :class:`ReadyBuffer`; rollout engines stamp every
generated token with the policy version that produced it
(``verimed.core.rollout.engines``). Pure Python + numpy, no Ray, so all of it is
unit-tested without a cluster (``tests/test_staleness.py``).

Admission rule (DESIGN §4, AReaL's bound read precisely)
--------------------------------------------------------
Let B = groups per learner step, s = ``max_staleness``, v = the current policy
version (learner steps finished), and count groups over the whole run:

    admitted = started - dropped            (dropped: rejected by dynamic sampling,
                                             or lost in flight on an actor restart)
    pending  = in_flight + buffered         (started or finished, not yet consumed)

A new group may start at version v only while, after starting it,

    (1)  admitted <= (s + v + 1) * B        (AReaL: cumulative, started-so-far bound)
    (2)  pending  <= (s + 1) * B            (the window itself)

Since the learner consumes exactly B groups per step (consumed = v*B), (1)
implies (2); (2) is also enforced directly so that the window stays bounded
even if a driver consumes fewer groups per step. Consequence: the k-th
admitted group (0-based) starts at a version >= floor(k/B) - s. Groups finish
out of order, though, so admission does not bound what is trained: the
:class:`ReadyBuffer` enforces it at consumption (oldest first; a group with a
token older than v - s is dropped and its draw runs again).

``max_staleness = 0`` is the synchronous baseline: (1) gives admitted <= (v+1)*B,
so the B groups of step v can only start once version v exists, and nothing
can start while step v trains (all (v+1)*B admitted groups are started, and
the controller's version is still v until the step's weight sync has landed on
the engines). Hence with s=0
no generation overlaps training, and every consumed group was started at the
version that trains on it (tested in ``tests/test_staleness.py``).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import msgspec
import numpy as np


class AdmissionControl:
    """Counts groups through start -> finish -> consume (or drop) and gates starts.

    The caller passes the current policy version to :meth:`can_start` /
    :meth:`capacity`; this class never guesses it. Not thread-safe: the
    controller runs it on one event loop.
    """

    def __init__(self, batch_groups: int, max_staleness: int, *, base_version: int = 0) -> None:
        if batch_groups < 1:
            raise ValueError(f"batch_groups must be >= 1, got {batch_groups}")
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.batch_groups = batch_groups
        self.max_staleness = max_staleness
        # On resume from a checkpoint at version v0, start a fresh instance with
        # base_version=v0: in-flight groups died with the old actors (their draws run
        # again) and buffered ones are re-delivered from the checkpoint, so counting restarts at 0.
        self.base_version = base_version
        self.started_total = 0
        self.finished_total = 0
        self.consumed_total = 0
        self.dropped_total = 0
        self._dropped_in_flight = 0
        self._dropped_buffered = 0

    # ------------------------------------------------------------ counters
    @property
    def in_flight(self) -> int:
        """Groups started and not yet finished or dropped in flight."""
        return self.started_total - self.finished_total - self._dropped_in_flight

    @property
    def buffered(self) -> int:
        """Groups finished and waiting in the buffer for the learner."""
        return self.finished_total - self.consumed_total - self._dropped_buffered

    @property
    def pending(self) -> int:
        return self.in_flight + self.buffered

    @property
    def admitted_total(self) -> int:
        return self.started_total - self.dropped_total

    def bound(self, version: int) -> int:
        """(max_staleness + version - base_version + 1) * B: the cap on admitted groups at ``version``."""
        return (self.max_staleness + version - self.base_version + 1) * self.batch_groups

    def capacity(self, version: int) -> int:
        """How many more groups may start now at ``version`` (>= 0)."""
        if version < self.base_version:
            raise ValueError(f"version {version} is older than base_version {self.base_version}")
        by_version = self.bound(version) - self.admitted_total
        by_window = (self.max_staleness + 1) * self.batch_groups - self.pending
        return max(0, min(by_version, by_window))

    def can_start(self, version: int) -> bool:
        return self.capacity(version) > 0

    # ------------------------------------------------------------- events
    def started(self, n: int = 1, *, version: int | None = None) -> None:
        """Record ``n`` group starts; with ``version`` given, refuse starts over the bound."""
        _check_n(n)
        if version is not None and n > self.capacity(version):
            raise RuntimeError(
                f"admission control: starting {n} groups at version {version} exceeds the capacity "
                f"{self.capacity(version)} (max_staleness={self.max_staleness}, B={self.batch_groups})"
            )
        self.started_total += n

    def finished(self, n: int = 1) -> None:
        """``n`` in-flight groups finished and entered the buffer."""
        _check_n(n)
        if n > self.in_flight:
            raise RuntimeError(f"finished({n}) but only {self.in_flight} groups are in flight")
        self.finished_total += n

    def consumed(self, n: int) -> None:
        """The learner took ``n`` buffered groups."""
        _check_n(n)
        if n > self.buffered:
            raise RuntimeError(f"consumed({n}) but only {self.buffered} groups are buffered")
        self.consumed_total += n

    def dropped(self, n: int = 1, *, buffered: bool = False) -> None:
        """``n`` groups leave without being consumed; their slots free up for a refill.

        ``buffered=False``: dropped in flight (dynamic sampling rejecting a group as it
        finishes, or generation lost on an engine restart); ``True``: dropped from the buffer.
        """
        _check_n(n)
        available = self.buffered if buffered else self.in_flight
        if n > available:
            where = "buffered" if buffered else "in flight"
            raise RuntimeError(f"dropped({n}) but only {available} groups are {where}")
        if buffered:
            self._dropped_buffered += n
        else:
            self._dropped_in_flight += n
        self.dropped_total += n

    def __repr__(self) -> str:
        return (
            f"AdmissionControl(B={self.batch_groups}, s={self.max_staleness}, in_flight={self.in_flight}, "
            f"buffered={self.buffered}, consumed={self.consumed_total}, dropped={self.dropped_total})"
        )


def _check_n(n: int) -> None:
    if n < 0:
        raise ValueError(f"count must be >= 0, got {n}")


# ------------------------------------------------------------------- ledger


class LedgerState(msgspec.Struct, frozen=True):
    """Checkpointed form of a :class:`Ledger`: the consumed uids, sorted."""

    consumed: list[str]


class DuplicateConsumption(RuntimeError):
    """A sample uid was consumed twice; carries the offending uids."""

    def __init__(self, uids: list[str]) -> None:
        shown = ", ".join(uids[:5]) + (" ..." if len(uids) > 5 else "")
        super().__init__(f"{len(uids)} sample(s) already consumed: {shown}")
        self.uids = uids


class Ledger:
    """Exactly-once consumption of samples keyed by uid ("<prompt index>/<group>/<sample>").

    :meth:`consume` is all-or-nothing: if any uid was consumed before (or appears
    twice in the call), nothing is recorded and :class:`DuplicateConsumption`
    is raised, so a replayed batch after a restart is refused as a whole.
    Saved with the checkpoint (``to_state`` -> msgpack/JSON) and restored on resume.
    """

    def __init__(self, consumed: list[str] | tuple[str, ...] = ()) -> None:
        self._consumed: set[str] = set()
        self.consume(list(consumed))

    def duplicates(self, uids: list[str]) -> list[str]:
        """The uids of ``uids`` that were consumed already or repeat within ``uids``."""
        seen: set[str] = set()
        dups = []
        for uid in uids:
            if uid in self._consumed or uid in seen:
                dups.append(uid)
            seen.add(uid)
        return dups

    def consume(self, uids: list[str]) -> None:
        dups = self.duplicates(uids)
        if dups:
            raise DuplicateConsumption(dups)
        self._consumed.update(uids)

    def is_consumed(self, uid: str) -> bool:
        return uid in self._consumed

    def __len__(self) -> int:
        return len(self._consumed)

    def to_state(self) -> LedgerState:
        return LedgerState(consumed=sorted(self._consumed))

    @classmethod
    def from_state(cls, state: LedgerState) -> "Ledger":
        return cls(state.consumed)


# ------------------------------------------------------------ ready buffer


class Ready(NamedTuple):
    """A finished group waiting to be trained on (the controller's buffer entry)."""

    stage: int  # the stage it was generated for
    uids: list[str]  # its samples' uids
    oldest_version: int  # min policy version over its response tokens (-1: no tokens)
    order: tuple[int, ...]  # its draw's place in the schedule (draw number, slice): ties in age
    item: Any  # the payload (the controller keeps its GroupResult and Draw here)

    @property
    def age(self) -> tuple[int, ...]:
        """Older first: the weights that sampled it, then its place in the schedule."""
        return (self.oldest_version, *self.order)


class Taken(NamedTuple):
    """What one :meth:`ReadyBuffer.take` did: the batch (None: not enough valid groups yet) and the drops."""

    batch: list[Ready] | None
    wrong_stage: list[Ready]
    duplicates: list[Ready]
    stale: list[Ready]


class ReadyBuffer:
    """Finished groups, consumed oldest first under the staleness bound (DESIGN §4).

    Admission control bounds how far generation runs ahead, but groups finish
    out of order, so admission alone does not bound what is *trained*. At
    consumption for learner step ``version`` (the weights being updated) with
    bound s = ``max_staleness``, a group is dropped (and reported, so its draw
    can run again) when

    - it belongs to another stage (generated before a stage boundary),
    - a sample uid was consumed before (ledger) or repeats in this batch
      (a re-run twin after a restart or a stale drop), or
    - any response token is older than ``version - s`` (**stale**).

    Of the rest, the B oldest (:attr:`Ready.age`) form the batch; the others stay.
    Hence every token of a consumed batch has version >= version - s.

    Cost: the controller calls :meth:`take` on every delivery while a batch fills (thousands of
    times a step with thousands of groups in flight). Whether an entry is dropped depends only on
    (stage, version, s, the ledger) and on the other entries' uids, so an entry found valid stays
    valid until one of those changes: a take under the same conditions as the previous one checks
    only the entries put since (O(new)), and sorts only when a batch can form. Anything else (new
    version or stage, a consumption in the ledger, a uid shared with another entry) rescans all.
    """

    def __init__(self) -> None:
        self._valid: list[Ready] = []  # found valid by the last take, under self._checked_under
        self._valid_uids: set[str] = set()
        self._new: list[Ready] = []  # put since the last take
        self._checked_under: tuple[int, ...] | None = None

    @property
    def entries(self) -> list[Ready]:
        return self._valid + self._new

    def __len__(self) -> int:
        return len(self._valid) + len(self._new)

    def put(self, entry: Ready) -> None:
        self._new.append(entry)

    def take(self, stage: int, version: int, batch_groups: int, max_staleness: int, ledger: Ledger) -> Taken:
        under = (stage, version, max_staleness, id(ledger), len(ledger))
        new_uids = [uid for entry in self._new for uid in entry.uids]
        if under != self._checked_under or len(set(new_uids)) != len(new_uids) or not self._valid_uids.isdisjoint(new_uids):
            return self._rescan(under, stage, version, batch_groups, max_staleness, ledger)
        wrong_stage, duplicates, stale = [], [], []
        for entry in sorted(self._new, key=lambda e: e.age):
            kind = self._classify(entry, stage, version, max_staleness, ledger, set())
            (self._valid if kind is None else _drop_list(kind, wrong_stage, duplicates, stale)).append(entry)
            if kind is None:
                self._valid_uids.update(entry.uids)
        self._new = []
        return Taken(self._form_batch(batch_groups), wrong_stage, duplicates, stale)

    @staticmethod
    def _classify(entry: Ready, stage: int, version: int, max_staleness: int, ledger: Ledger,
                  seen: set[str]) -> str | None:
        """Why ``entry`` is dropped ("wrong_stage", "duplicate", "stale"), or None when it may be trained."""
        if entry.stage != stage:
            return "wrong_stage"
        if ledger.duplicates(entry.uids) or seen.intersection(entry.uids):
            return "duplicate"
        if 0 <= entry.oldest_version < version - max_staleness:
            return "stale"
        return None

    def _rescan(self, under: tuple[int, ...], stage: int, version: int, batch_groups: int, max_staleness: int,
                ledger: Ledger) -> Taken:
        keep, wrong_stage, duplicates, stale = [], [], [], []
        seen: set[str] = set()
        for entry in sorted(self.entries, key=lambda e: e.age):
            kind = self._classify(entry, stage, version, max_staleness, ledger, seen)
            (keep if kind is None else _drop_list(kind, wrong_stage, duplicates, stale)).append(entry)
            if kind is None:
                seen.update(entry.uids)
        self._valid, self._valid_uids, self._new, self._checked_under = keep, seen, [], under
        return Taken(self._form_batch(batch_groups), wrong_stage, duplicates, stale)

    def _form_batch(self, batch_groups: int) -> list[Ready] | None:
        """The ``batch_groups`` oldest valid entries, removed from the buffer; None (nothing removed) if fewer."""
        if len(self._valid) < batch_groups:
            return None
        self._valid.sort(key=lambda e: e.age)
        batch, self._valid = self._valid[:batch_groups], self._valid[batch_groups:]
        for entry in batch:
            self._valid_uids.difference_update(entry.uids)
        return batch

    def drain(self) -> list[Ready]:
        """Every entry, oldest first, leaving the buffer as it is (for checkpoints)."""
        return sorted(self.entries, key=lambda e: e.age)


def _drop_list(kind: str, wrong_stage: list, duplicates: list, stale: list) -> list:
    """The drop list of ``kind`` ("wrong_stage", "duplicate" or "stale")."""
    return {"wrong_stage": wrong_stage, "duplicate": duplicates, "stale": stale}[kind]


def staleness_histogram(token_versions: np.ndarray, current_version: int) -> dict[int, int]:
    """Per-token staleness counts: ``{current_version - version: n_tokens}``.

    token_versions: int [...] (any shape; -1 marks prompt tokens, which are skipped).
    A token generated by a version newer than ``current_version`` is a bug upstream
    and raises ValueError.
    """
    versions = np.asarray(token_versions).ravel()
    versions = versions[versions >= 0]
    staleness = current_version - versions.astype(np.int64)
    if staleness.size and staleness.min() < 0:
        raise ValueError(
            f"token version {int(versions.max())} is newer than the current version {current_version}"
        )
    values, counts = np.unique(staleness, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, counts)}


def staleness_stats(token_versions: np.ndarray, current_version: int) -> dict[str, float]:
    """Mean / max per-token staleness and the fraction of off-policy tokens (for the step log)."""
    hist = staleness_histogram(token_versions, current_version)
    total = sum(hist.values())
    if total == 0:
        return {"staleness/mean": 0.0, "staleness/max": 0.0, "staleness/off_policy_frac": 0.0}
    return {
        "staleness/mean": sum(k * n for k, n in hist.items()) / total,
        "staleness/max": float(max(hist)),
        "staleness/off_policy_frac": sum(n for k, n in hist.items() if k > 0) / total,
    }

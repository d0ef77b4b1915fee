"""Admission control, the exactly-once ledger and per-token versions (verimed/core/staleness.py).

The admission tests drive a small event simulation (controller starts, engines
finish or drop groups, the learner consumes B groups, trains, bumps the version)
with random event orders from hypothesis, and check the bounds after every event.
"""
from __future__ import annotations

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verimed.core.rl.staleness import (
    AdmissionControl,
    DuplicateConsumption,
    Ledger,
    LedgerState,
    Ready,
    ReadyBuffer,
    staleness_histogram,
    staleness_stats,
)

START, FINISH, DROP, TRAIN_BEGIN, TRAIN_END = range(5)


def simulate(batch: int, staleness: int, events: list[tuple[int, int]], fifo: bool) -> list[int]:
    """Run ``events`` and assert the invariants after each; return consumed groups' staleness.

    fifo=True: the learner consumes the B oldest-admitted live groups (waiting for them);
    fifo=False: it consumes any B finished groups (finish order).
    """
    ac = AdmissionControl(batch, staleness)
    version, training = 0, False
    live: list[tuple[int, int, bool]] = []  # (group id, start version, finished), admission order
    next_id, stalenesses = 0, []
    for code, pick in events:
        if code == START:
            n = ac.capacity(version)
            if training and staleness == 0:
                # Synchronous baseline: nothing may start while the learner trains.
                assert n == 0 and not ac.can_start(version)
            for _ in range(n):
                ac.started(1, version=version)
                live.append((next_id, version, False))
                next_id += 1
        elif code in (FINISH, DROP):
            running = [i for i, g in enumerate(live) if not g[2]]
            if running:
                i = running[pick % len(running)]
                if code == FINISH:
                    ac.finished(1)
                    live[i] = (live[i][0], live[i][1], True)
                else:  # dynamic sampling rejects the group as it finishes
                    ac.dropped(1)
                    del live[i]
        elif code == TRAIN_BEGIN and not training:
            candidates = live[:batch] if fifo else [g for g in live if g[2]][:batch]
            if len(candidates) == batch and all(g[2] for g in candidates):
                ac.consumed(batch)
                for g in candidates:
                    live.remove(g)
                    stalenesses.append(version - g[1])
                training = True
                if staleness == 0:
                    assert ac.in_flight == 0, "with max_staleness 0 generation overlapped training"
        elif code == TRAIN_END and training:
            version, training = version + 1, False
        # Invariants after every event.
        assert ac.admitted_total <= ac.bound(version)
        assert ac.in_flight + ac.buffered <= (staleness + 1) * batch
        assert ac.in_flight == sum(not g[2] for g in live)
        assert ac.buffered == sum(g[2] for g in live)
        assert ac.consumed_total == batch * (version + training)
    return stalenesses


events_st = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 1000)), max_size=300)


@settings(max_examples=150, deadline=None)
@given(batch=st.integers(1, 4), staleness=st.integers(0, 3), events=events_st, fifo=st.booleans())
def test_bound_never_exceeded(batch, staleness, events, fifo):
    simulate(batch, staleness, events, fifo)


@settings(max_examples=150, deadline=None)
@given(batch=st.integers(1, 4), staleness=st.integers(0, 3), events=events_st)
def test_fifo_consumption_staleness_at_most_max(batch, staleness, events):
    assert all(0 <= s <= staleness for s in simulate(batch, staleness, events, fifo=True))


@settings(max_examples=150, deadline=None)
@given(batch=st.integers(1, 4), events=events_st, fifo=st.booleans())
def test_synchronous_baseline_trains_only_on_current_version(batch, events, fifo):
    # max_staleness 0, any consumption order: every consumed group started at the version it trains.
    assert all(s == 0 for s in simulate(batch, 0, events, fifo))


def test_synchronous_round_by_hand():
    ac = AdmissionControl(batch_groups=2, max_staleness=0)
    assert ac.capacity(0) == 2
    ac.started(2, version=0)
    assert not ac.can_start(0)
    ac.finished(2)
    ac.consumed(2)  # learner trains step 0: still version 0, nothing may start
    assert ac.pending == 0 and not ac.can_start(0)
    assert ac.capacity(1) == 2  # version 1 published: the next round starts


def test_async_window_and_refill_after_drop():
    ac = AdmissionControl(batch_groups=2, max_staleness=1)
    ac.started(4, version=0)  # (1 + 0 + 1) * 2
    assert ac.capacity(0) == 0
    ac.dropped(1)  # dynamic sampling rejected a group: its slot is refilled
    assert ac.capacity(0) == 1
    with pytest.raises(RuntimeError, match="exceeds the capacity"):
        ac.started(2, version=0)


def test_misuse_is_refused():
    ac = AdmissionControl(batch_groups=1, max_staleness=0)
    with pytest.raises(RuntimeError, match="in flight"):
        ac.finished(1)
    with pytest.raises(RuntimeError, match="buffered"):
        ac.consumed(1)
    with pytest.raises(ValueError):
        AdmissionControl(batch_groups=0, max_staleness=0)
    with pytest.raises(ValueError):
        AdmissionControl(batch_groups=1, max_staleness=-1)


def test_resume_with_base_version():
    ac = AdmissionControl(batch_groups=3, max_staleness=1, base_version=5)
    assert ac.capacity(5) == 6
    with pytest.raises(ValueError, match="older than base_version"):
        ac.capacity(4)


# ------------------------------------------------------------------- ledger


def test_ledger_refuses_double_consumption_all_or_nothing():
    ledger = Ledger()
    ledger.consume(["0/0/0", "0/0/1"])
    with pytest.raises(DuplicateConsumption) as err:
        ledger.consume(["1/0/0", "0/0/1"])
    assert err.value.uids == ["0/0/1"]
    assert not ledger.is_consumed("1/0/0")  # nothing of the refused call was recorded
    with pytest.raises(DuplicateConsumption):
        ledger.consume(["2/0/0", "2/0/0"])  # repeated within one call
    assert len(ledger) == 2


def test_ledger_round_trips_through_checkpoint_state():
    ledger = Ledger()
    ledger.consume([f"{i}/0/{j}" for i in range(20) for j in range(4)])
    for encode, decode in [
        (msgspec.msgpack.encode, lambda b: msgspec.msgpack.decode(b, type=LedgerState)),
        (msgspec.json.encode, lambda b: msgspec.json.decode(b, type=LedgerState)),
    ]:
        restored = Ledger.from_state(decode(encode(ledger.to_state())))
        assert restored.to_state() == ledger.to_state()
        assert restored.is_consumed("19/0/3") and not restored.is_consumed("20/0/0")
        with pytest.raises(DuplicateConsumption):  # a replayed batch after resume is refused
            restored.consume(["7/0/2"])


# ------------------------------------------------------------ token versions


def test_staleness_of_tokens_across_a_mid_generation_update():
    # Sample A: 6 tokens at version 0, 3 at 1 (the weights moved mid-generation);
    # sample B: 6 at 0, 3 at 1, 6 at 2. Consumed at version 2, with prompt tokens (-1).
    a = np.asarray([0] * 6 + [1] * 3)
    b = np.asarray([0] * 6 + [1] * 3 + [2] * 6)
    packed = np.concatenate([[-1, -1], a, [-1], b])
    assert staleness_histogram(packed, 2) == {2: 12, 1: 6, 0: 6}
    stats = staleness_stats(packed, 2)
    assert stats["staleness/max"] == 2.0
    assert stats["staleness/off_policy_frac"] == pytest.approx(18 / 24)
    with pytest.raises(ValueError, match="newer than the current version"):
        staleness_histogram(b, 1)


# ------------------------------------------------------------ the ready buffer


def ready(stage, draw, oldest, uids=None, slice_=0):
    uids = uids or [f"{draw}/{slice_}/{i}" for i in range(2)]
    return Ready(stage=stage, uids=uids, oldest_version=oldest, order=(draw, slice_), item=draw)


def test_take_oldest_first_and_keep_the_rest():
    buf = ReadyBuffer()
    for draw, oldest in ((5, 3), (1, 3), (9, 2), (2, 3)):
        buf.put(ready(0, draw, oldest))
    taken = buf.take(stage=0, version=3, batch_groups=2, max_staleness=1, ledger=Ledger())
    # version 2 (draw 9) is the oldest, then draw 1 (schedule order breaks the tie)
    assert [e.item for e in taken.batch] == [9, 1] and [e.item for e in buf.drain()] == [2, 5]
    assert not (taken.stale or taken.duplicates or taken.wrong_stage)


def test_stale_wrong_stage_and_duplicate_groups_are_dropped_not_trained():
    buf = ReadyBuffer()
    ledger = Ledger(["3/0/0"])
    buf.put(ready(0, 1, 4))                       # stale at version 6 with s = 1 (needs >= 5)
    buf.put(ready(0, 2, 5))                       # exactly at the bound: kept
    buf.put(ready(1, 8, 6))                       # another stage
    buf.put(ready(0, 3, 6))                       # consumed before (ledger)
    buf.put(ready(0, 4, 6, uids=["4/0/0", "4/0/1"]))
    buf.put(ready(0, 4, 6, uids=["4/0/0", "4/0/1"]))  # its re-run twin
    taken = buf.take(stage=0, version=6, batch_groups=2, max_staleness=1, ledger=ledger)
    assert [e.item for e in taken.stale] == [1] and [e.item for e in taken.wrong_stage] == [8]
    assert sorted(e.item for e in taken.duplicates) == [3, 4]
    assert sorted(e.item for e in taken.batch) == [2, 4] and len(buf) == 0


def test_not_enough_valid_groups_waits_but_still_drops():
    buf = ReadyBuffer()
    buf.put(ready(0, 1, 0))
    buf.put(ready(0, 2, 2))
    taken = buf.take(stage=0, version=2, batch_groups=2, max_staleness=0, ledger=Ledger())
    assert taken.batch is None and [e.item for e in taken.stale] == [1] and [e.item for e in buf.drain()] == [2]


def test_a_group_without_response_tokens_is_never_stale():
    buf = ReadyBuffer()
    buf.put(ready(0, 1, -1))
    assert buf.take(0, 10, 1, 0, Ledger()).batch is not None


@given(st.lists(st.integers(-1, 6), max_size=50), st.integers(6, 9))
def test_histogram_counts_every_generated_token(versions, current):
    hist = staleness_histogram(np.asarray(versions, dtype=np.int32), current)
    assert sum(hist.values()) == sum(v >= 0 for v in versions)
    assert all(current - 6 <= k <= current for k in hist)

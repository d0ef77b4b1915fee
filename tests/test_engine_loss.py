"""Engines lost with their node, without a cluster: the membership bookkeeping and the weight-sync
coordinator over stand-in actor handles that fail the way Ray's do.

Ray answers a call to an actor that is restarting (its node gone, its bundle waiting for a node)
with ``ActorUnavailableError`` at once when ``max_task_retries=0``, and a dead actor with
``ActorDiedError``; an engine whose node vanished silently may also never answer. The loopback
cluster tests (tests/test_node_faults.py) show the same with real nodes.

    PYTHONPATH=. .venv/bin/python -m pytest -q tests/test_engine_loss.py
"""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import ray

from verimed.actors import weight_sync as ws_actor
from verimed.actors.rollout import EngineRouter
from verimed.core.config import load_config
from verimed.core.rollout.membership import EngineMembership
from verimed.core.types import WeightVersion

# ------------------------------------------------------------------ membership (pure)


def test_a_lost_engine_leaves_group_and_routing_and_returns_only_once_synced():
    m = EngineMembership(4)
    assert m.group() == [0, 1, 2, 3] and m.unroutable() == frozenset() and m.in_rotation() == 4
    assert m.mark_lost(2) and not m.mark_lost(2)  # the second report of the same loss is no news
    assert m.group() == [0, 1, 3] and m.unroutable() == {2} and m.lost_total == 1
    for i in (0, 1, 3):
        m.synced(i, 1)
    assert m.unroutable() == {2} and m.in_rotation() == 3
    assert m.mark_returned(2) and not m.mark_returned(2) and not m.mark_returned(0)
    assert m.group() == [0, 1, 2, 3]  # joins the next group rebuild ...
    assert 2 in m.unroutable()  # ... but serves nothing before a sync reaches it
    assert m.recovered_total == 0
    assert m.synced(2, 2) and m.recovered_total == 1
    # members 0, 1, 3 still serve version 1: behind the returned engine until they are synced too
    assert m.unroutable() == {0, 1, 3}
    for i in (0, 1, 3):
        assert not m.synced(i, 2)
    assert m.unroutable() == frozenset() and m.recovered_total == 1 and m.lost_total == 1


def test_an_engine_that_fails_again_before_its_sync_is_lost_again_and_counted_twice():
    m = EngineMembership(2)
    m.mark_lost(1)
    m.mark_returned(1)
    assert m.mark_lost(1) and m.lost_total == 2 and m.returned == set()
    assert not m.synced(1, 5) and m.served[1] == -1  # a late answer of a written-off engine changes nothing
    assert m.recovered_total == 0


def test_membership_refuses_nonsense():
    with pytest.raises(ValueError, match="at least one engine"):
        EngineMembership(0)
    m = EngineMembership(3)
    for call in (lambda: m.mark_lost(3), lambda: m.mark_returned(-1), lambda: m.synced(7, 1)):
        with pytest.raises(IndexError, match=r"expected 0\.\.2"):
            call()


def test_all_engines_lost_leaves_an_empty_group():
    m = EngineMembership(2)
    m.mark_lost(0)
    m.mark_lost(1)
    assert m.group() == [] and m.in_rotation() == 0


# ------------------------------------------------------------------ coordinator over stand-in handles


class _Call:
    def __init__(self, actor, name):
        self.actor, self.name = actor, name

    def remote(self, *args, **kwargs):
        return self.actor.call(self.name, *args, **kwargs)


class FakeEngine:
    """A rollout actor handle: ``alive``; ``restarting`` (node gone: every call raises
    ActorUnavailableError, as Ray does with max_task_retries=0); ``silent`` (calls never answer)."""

    def __init__(self, ip: str):
        self.state, self.ip, self.version, self.group, self.calls = "alive", ip, 0, None, []

    def __getattr__(self, name):
        if name.startswith("_") and name != "__ray_call__":
            raise AttributeError(name)
        return _Call(self, name)

    def restart(self):
        """Back on a node: a fresh process on its initial weights, in no weight-sync group."""
        self.state, self.version, self.group = "alive", 0, None

    async def call(self, name, *args, **kwargs):
        self.calls.append(name)
        if self.state == "restarting":
            raise ray.exceptions.ActorUnavailableError("The actor is restarting (its node died).", None)
        if self.state == "silent":
            await asyncio.Event().wait()
        if name == "ready":
            return self.version
        if name == "sync_workers":
            return 1
        if name == "init_sync":
            self.group = args[1]  # the port: one per group
            return None
        if name == "update_weights":
            if self.group is None:
                raise RuntimeError("in no weight-sync group (restarted): the coordinator must rejoin")
            self.version = args[0].version
            return {"sync/bytes": float(args[0].num_bytes)}
        if name == "score":
            return np.zeros(3)
        if name == "__ray_call__":
            return {"node_ip": self.ip}
        if name == "generate":
            return ["sample"]
        return None


class FakeRank0:
    def __init__(self):
        self.port = 40000

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return _Call(self, name)

    async def call(self, name, *args):
        if name == "rendezvous_address":
            self.port += 1
            return "127.0.0.2", self.port
        return None


class FakeLearners:
    def __init__(self):
        self.actors = [FakeRank0()]

    async def weight_meta(self):
        return WeightVersion(version=0, num_bytes=8, names=["w"], shapes=[(2,)], dtypes=["float32"], bucket_bytes=8)

    async def broadcast(self, meta):
        return {"sync/bytes": float(meta.num_bytes)}

    async def score(self, ids):
        return np.zeros(3)


def _coordinator(n=4, monkeypatch=None):
    monkeypatch.setattr(ws_actor, "apply_chat_template", lambda tok, messages, add_generation_prompt: [1, 2, 3])
    monkeypatch.setattr(ws_actor, "READY_PROBE_S", 0.5)
    monkeypatch.setattr(ws_actor, "RETURN_POLL_S", 0.01)
    engines = [FakeEngine(f"127.0.0.{3 + i // 2}") for i in range(n)]
    router = EngineRouter(engines)
    lines: list[str] = []
    sync = ws_actor.WeightSyncCoordinator(load_config(None, ["weight_sync.backend=gloo"]), FakeLearners(), engines,
                                          tokenizer=None, router=router, report=lines.append)
    sync.engine_nodes = {i: e.ip for i, e in enumerate(engines)}
    return sync, engines, router, lines


async def _until(predicate, what: str):
    for _ in range(2000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


def test_a_lost_node_does_not_block_the_sync_and_its_engines_serve_again_only_after_catching_up(monkeypatch):
    sync, engines, router, lines = _coordinator(4, monkeypatch)

    async def scenario():
        await sync.init()
        assert (await sync.sync(1))["sync/bytes"] == 8.0 and sync.served == [1, 1, 1, 1]
        engines[2].state = engines[3].state = "restarting"  # their node (127.0.0.4) died
        router.inflight = [9, 9, 0, 9]  # engine 2 is the least loaded: the next group goes there
        with pytest.raises(ray.exceptions.ActorUnavailableError):
            await router.call("generate")  # routed to engine 2: the router reports it lost
        assert 2 in router.skip and sync.needs_rejoin
        # The next sync rebuilds the group from the engines that answer: engine 3 fails its probe.
        out = await asyncio.wait_for(sync.sync(2), timeout=30)  # a guard: the old rejoin waited 600 s here
        assert "sync/bytes" in out
        assert sync.membership.group() == [0, 1] and sync.served[:2] == [2, 2]
        assert router.skip == {2, 3} and sync.membership.lost_total == 2
        assert all(router.pick() in (0, 1) for _ in range(20))
        assert any("rollout-2 on 127.0.0.4 lost (ActorUnavailableError" in line for line in lines), lines
        assert any("rollout-3 on 127.0.0.4 lost" in line for line in lines), lines
        await sync.sync(3)  # the run goes on without them
        assert sync.served[:2] == [3, 3] and not sync.needs_rejoin
        # The node joins again: Ray restarts both actors on it, on their initial weights.
        engines[2].restart()
        engines[3].restart()
        await _until(lambda: sync.membership.returned == {2, 3}, "both engines seen back")
        assert sync.needs_rejoin and router.skip >= {2, 3}  # back, but not routed before a sync
        assert sync.membership.recovered_total == 0
        await sync.sync(4)
        assert sync.served == [4, 4, 4, 4] and engines[2].version == engines[3].version == 4
        assert router.skip == frozenset() and sync.membership.recovered_total == 2
        assert any("rollout-2 recovered: synced to version 4" in line for line in lines), lines

    asyncio.run(scenario())


def test_an_engine_that_never_answers_is_left_out_of_the_rebuild(monkeypatch):
    sync, engines, router, lines = _coordinator(3, monkeypatch)

    async def scenario():
        await sync.init()
        engines[1].state = "silent"  # calls to it hang: a node gone without a word
        sync.needs_rejoin = True
        await asyncio.wait_for(sync.sync(1), timeout=30)
        assert sync.membership.group() == [0, 2] and router.skip == {1}
        assert any("rollout-1 on 127.0.0.3 lost (EngineSilent: no answer to ready() within 0.5s)" in line
                   for line in lines), lines
        for task in sync.watchers.values():
            task.cancel()

    asyncio.run(scenario())


def test_a_sync_that_finds_an_engine_gone_takes_it_out_and_rebuilds_next_time(monkeypatch):
    sync, engines, router, _ = _coordinator(2, monkeypatch)

    async def scenario():
        await sync.init()
        engines[0].state = "restarting"
        await sync.sync(1)  # update_weights raises: engine 0 lost, engine 1 synced
        assert sync.served == [-1, 1] and router.skip == {0} and sync.needs_rejoin and sync.failures == 1
        await sync.sync(2)
        assert sync.membership.group() == [1] and sync.served == [-1, 2] and not sync.needs_rejoin
        engines[0].restart()
        await _until(lambda: 0 in sync.membership.returned, "engine 0 seen back")
        await sync.sync(3)
        assert sync.served == [3, 3] and router.skip == frozenset()

    asyncio.run(scenario())


def test_with_every_engine_lost_the_rebuild_fails_and_the_run_keeps_its_weights(monkeypatch):
    sync, engines, _, lines = _coordinator(2, monkeypatch)

    async def scenario():
        await sync.init()
        for e in engines:
            e.state = "restarting"
        sync.needs_rejoin = True
        out = await sync.sync(1)
        assert set(out) == {"sync/seconds"} and sync.failures == 1  # reported, not raised: the next sync tries again
        assert any("weight-sync group not rebuilt (RuntimeError: no rollout engine is alive" in line
                   for line in lines), lines
        assert sync.membership.group() == [] and len([line for line in lines if " lost (" in line]) == 2
        for task in sync.watchers.values():
            task.cancel()

    asyncio.run(scenario())


def test_an_engine_dying_between_its_sync_and_the_parity_check_is_lost_not_fatal(monkeypatch):
    sync, engines, router, _ = _coordinator(2, monkeypatch)

    async def scenario():
        await sync.init()
        real_call = engines[1].call

        async def dies_after_its_update(name, *args, **kwargs):
            if name == "score":
                engines[1].state = "restarting"
            return await real_call(name, *args, **kwargs)

        engines[1].call = dies_after_its_update
        out = await sync.sync(1)
        assert out["sync/parity_max_abs"] == 0.0  # engine 0's gap; engine 1 is out
        assert sync.membership.lost == {1} and router.skip == {1} and sync.needs_rejoin
        for task in sync.watchers.values():
            task.cancel()

    asyncio.run(scenario())


# ------------------------------------------------------------------ the controller loop (doubles, no Ray)


def test_groups_lost_with_an_engine_run_again_counted_and_trained_exactly_once(tmp_path, tiny_model_path):
    """The real controller loop over doubles: draws 2 and 5 die with their engine (Ray's actor error) the
    first time; each runs again, is trained once, and ``counters/groups_rerun_after_failure`` says so."""
    from test_controller import EngineDouble, controller

    class DyingEngine(EngineDouble):
        async def call(self, method, uid_prefix, *args, **kwargs):
            draw = int(uid_prefix.split("/")[0])
            if draw in (2, 5) and draw not in self.runs:
                self.runs[draw] = 1
                raise ray.exceptions.ActorDiedError()  # its node died under it
            return await super().call(method, uid_prefix, *args, **kwargs)

    engine = DyingEngine()
    ctl = controller(tmp_path, tiny_model_path, ["async.max_staleness=1", "run.steps=5000",
                                                        "stages=[{name: a, kind: rule, steps: 5000}]"], engine)

    async def until_both_trained() -> list[dict]:
        """Steps until draws 2 and 5 are trained (their re-runs wait out a back-off of seconds first)."""
        producer = asyncio.create_task(ctl.produce())
        metrics: list[dict] = []
        try:
            while len(metrics) < 5000:  # a bound, far above the ~100 steps that a 2 s back-off takes
                metrics.append(await ctl.step())
                if {"2/0/0", "5/0/0"} <= {uid for b in ctl.learners.batches for uid in b.uids}:
                    break
        finally:
            producer.cancel()
        return metrics

    metrics = asyncio.run(until_both_trained())
    assert metrics[-1]["counters/groups_rerun_after_failure"] == 2.0
    assert metrics[-1]["counters/groups_failed"] == 2.0 and ctl.sync.needs_rejoin
    assert engine.runs[2] == engine.runs[5] == 2
    consumed = [uid for b in ctl.learners.batches for uid in b.uids]
    assert len(consumed) == len(set(consumed))
    assert {2, 5} <= {int(uid.split("/")[0]) for uid in consumed}
    lines = [json.loads(line) for line in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert not any("failed" in line["dropped"] for line in lines)  # re-run, not dropped


def test_a_member_dying_while_the_group_is_rebuilt_costs_one_sync_not_the_run(monkeypatch):
    """The node dies between the probe and the join (seen on the loopback cluster): that sync is skipped
    with its seconds reported (the step's timing reads them), the next rebuild leaves the engine out."""
    sync, engines, _, lines = _coordinator(3, monkeypatch)

    async def scenario():
        await sync.init()
        real_call = engines[2].call

        async def dies_while_joining(name, *args, **kwargs):
            if name == "init_sync":
                engines[2].state = "restarting"
                raise ray.exceptions.ActorDiedError()
            return await real_call(name, *args, **kwargs)

        engines[2].call = dies_while_joining
        sync.needs_rejoin = True
        out = await sync.sync(1)
        assert set(out) == {"sync/seconds"} and sync.failures == 1 and sync.needs_rejoin
        assert any("weight-sync group not rebuilt (ActorDiedError" in line for line in lines), lines
        out = await sync.sync(2)  # the probe finds engine 2 gone
        assert "sync/bytes" in out and sync.membership.group() == [0, 1] and sync.served[:2] == [2, 2]
        for task in sync.watchers.values():
            task.cancel()

    asyncio.run(scenario())


def test_sync_seconds_is_the_fan_out_wall_time_not_the_learners_send(monkeypatch):
    """An engine that takes 0.3 s to pause and load (a long generation step in progress) and a learner
    that sends in 1 ms: the step waited 0.3 s, and sync/seconds says so (it used to say 1 ms)."""
    sync, engines, _, _ = _coordinator(2, monkeypatch)

    class SlowEngine(type(engines[0])):
        async def call(self, name, *args, **kwargs):
            if name == "update_weights":
                await asyncio.sleep(0.3)
            return await super().call(name, *args, **kwargs)

    class SendingLearners(FakeLearners):
        async def broadcast(self, meta):
            return {"sync/bytes": float(meta.num_bytes), "sync/seconds": 0.001}

    engines[1].__class__ = SlowEngine
    sync.learners = SendingLearners()

    async def scenario():
        await sync.init()
        return await sync.sync(1)

    out = asyncio.run(scenario())
    assert out["sync/seconds"] >= 0.3 and out["sync/send_seconds"] == 0.001 and out["sync/bytes"] == 8.0

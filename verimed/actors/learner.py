"""Learner actors: a thin Ray shell over :class:`verimed.core.train.learner.Learner`.

``LearnerGroup`` starts ``placement.learner.replicas`` actors that form one
torch.distributed group (gloo on CPU, NCCL on GPU) and fans every call out to
all ranks; rank 0 also hosts the weight-sync group (DESIGN §5).
"""
from __future__ import annotations

import asyncio
import os
import socket

import numpy as np
import ray

from verimed.actors.logs import redirect_output
from verimed.core.config import Config, GRPOConfig
from verimed.core.types import TrainBatch, WeightVersion


def free_port() -> int:
    """A TCP port free on this node's every interface (peers on other nodes connect to it)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_ip() -> str:
    return ray.util.get_node_ip_address()


@ray.remote(num_cpus=0)
def _node_address() -> tuple[str, int]:
    return node_ip(), free_port()


def address_on(options: dict):
    """(IP ref, port ref) of the node an actor started with ``options`` lands on (its placement bundle).

    For a process group whose rank 0 hosts the rendezvous before it exists (the actor
    needs the address in its constructor); Ray resolves the two references first.
    """
    return _node_address.options(scheduling_strategy=options.get("scheduling_strategy"), num_returns=2).remote()


@ray.remote
class LearnerActor:
    def __init__(self, cfg: Config, model_path: str, rank: int, world_size: int):
        redirect_output()  # first: all later output, child processes included, goes to its log file
        self.cfg, self.model_path, self.rank, self.world_size = cfg, model_path, rank, world_size
        self.emulated = cfg.trainer.backend == "emulated"
        self.sync_group = None  # emulated: the rendezvous actor of the current group
        self.send_buffers = None

    def rendezvous_address(self) -> tuple[str, int]:
        """(this node's IP, a port free on it): rank 0 hosts the learners' and the weight-sync rendezvous."""
        return node_ip(), free_port()

    def setup(self, address: tuple[str, int]) -> None:
        """Join the learners' process group at ``address`` (rank 0's) and build the sharded model.
        Emulated: an :class:`~verimed.core.emulate.learner.EmulatedLearner` (no torch, no process group)."""
        if self.emulated:
            from verimed.core.emulate.learner import EmulatedLearner
            from verimed.core.emulate.profile import load_profile

            self.learner = EmulatedLearner(self.cfg, load_profile(self.cfg.emulation.profile), self.rank, self.world_size)
            return
        import torch

        from verimed.core.train.distributed import init_distributed
        from verimed.core.train.learner import Learner

        cfg, rank, world_size = self.cfg, self.rank, self.world_size
        if not torch.cuda.is_available():
            torch.set_num_threads(cfg.trainer.cpu_threads or os.cpu_count() or 1)
        init_distributed(rank, world_size, *address)
        self.learner = Learner(cfg, self.model_path, rank, world_size)

    def train_step(self, batch: TrainBatch, grpo_cfg: GRPOConfig | None = None) -> dict[str, float]:
        return self.learner.train_step(batch, grpo_cfg)

    def score(self, token_ids: list[int]) -> np.ndarray:
        return self.learner.score(token_ids)

    def weight_meta(self) -> WeightVersion:
        """What a sync carries: names, global shapes, the engines' dtype, the bucket plan's inputs (no gather)."""
        if self.emulated:
            return self.learner.weight_meta(int(self.cfg.weight_sync.bucket_mb * 2**20))
        from verimed.core.rollout import weight_sync

        return weight_sync.describe(self.learner.named_parameter_shapes(), self.learner.version,
                                    int(self.cfg.weight_sync.bucket_mb * 2**20), dtype=self.cfg.model.dtype)

    def init_sync(self, host: str, port: int, world_size: int, backend: str) -> None:
        """Rank 0 joins the weight-sync group as its rank 0 (the TCPStore host); a rejoin destroys the old group."""
        if self.emulated:
            return self._init_emulated_sync(host, port, world_size)
        from verimed.core.rollout import weight_sync

        if self.learner.rank == 0:
            weight_sync.destroy_group(self.sync_group)
            self.sync_group = None
            self.sync_group = weight_sync.make_group(host, port, 0, world_size, backend)

    def broadcast(self, meta: WeightVersion) -> dict[str, float]:
        """Gather full weights one tensor at a time (all ranks) and broadcast them from rank 0 as ``meta`` plans
        (the same message the engines receive, so sender and receivers cut the same buckets)."""
        if self.emulated:
            return self.learner.broadcast(meta) if self.sync_group is not None else {}
        from verimed.core.rollout import weight_sync

        params = self.learner.iter_full_parameters()
        if self.sync_group is None:
            for _ in params:  # the other ranks take part in every all-gather
                pass
            return {}
        if self.send_buffers is None:
            self.send_buffers = weight_sync.SendBuffers(self.learner.device)  # reused by every sync
        return weight_sync.broadcast_weights(self.sync_group, params, meta, self.learner.device, self.send_buffers)

    def _init_emulated_sync(self, host: str, port: int, world_size: int) -> None:
        """Rank 0 claims rank 0 at the group's rendezvous actor (after killing the previous group's)."""
        if self.rank != 0:
            return
        from verimed.actors.sync_rendezvous import join_rendezvous_blocking

        previous, self.sync_group = self.sync_group, None
        if previous is not None:
            ray.kill(previous)
        self.sync_group = join_rendezvous_blocking(host, port, 0, world_size, "learner-0")

    def version(self) -> int:
        return self.learner.version

    def memory(self) -> dict[str, float]:
        """This actor process's peak RSS (bytes) and whether torch / vLLM / transformers were imported (bench)."""
        import resource
        import sys

        import psutil

        return {"peak_rss_bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
                "rss_bytes": float(psutil.Process().memory_info().rss),
                **{f"imported/{m}": float(m in sys.modules) for m in ("torch", "vllm", "transformers")}}

    def save_hf(self, out_dir: str, base_model_path: str) -> None:
        self.learner.save_hf(out_dir, base_model_path)

    def save_checkpoint(self, path: str) -> None:
        self.learner.save_checkpoint(path)

    def load_checkpoint(self, path: str) -> int:
        self.learner.load_checkpoint(path)
        return self.learner.version


class LearnerGroup:
    """All learner ranks; methods return one result (rank 0's) after all ranks finish."""

    def __init__(self, cfg: Config, model_path: str, actor_options: list[dict] | None = None):
        world = cfg.placement.learner.replicas
        options = actor_options or [{"num_cpus": 1}] * world
        self.actors = [LearnerActor.options(**options[r]).remote(cfg, model_path, r, world) for r in range(world)]
        # MASTER_ADDR/PORT are rank 0's node and a port free there, not the driver's: on a
        # cluster rank 0 may run on another node. Ray resolves the reference before every
        # rank's setup runs, and runs each actor's calls in order, so later calls find a learner.
        address = self.actors[0].rendezvous_address.remote()
        self.setups = [a.setup.remote(address) for a in self.actors]

    async def _all(self, method: str, *args) -> list:
        """Every rank's answer; a failed setup surfaces here with its own error (not a missing attribute)."""
        if self.setups:
            await _gather(self.setups)
            self.setups = []
        # A TrainBatch goes into the object store once, serialised in a worker thread: passed as is,
        # each rank's .remote() pickled it again in the event loop (8 ranks x ~50 MB at B·G = 8192
        # held the controller's loop for most of a second and doubled its RSS: bench/scale.py).
        args = tuple([await asyncio.to_thread(ray.put, a) if isinstance(a, TrainBatch) else a for a in args])
        return await _gather([getattr(a, method).remote(*args) for a in self.actors])

    async def train_step(self, batch: TrainBatch, grpo_cfg: GRPOConfig | None = None) -> dict[str, float]:
        return (await self._all("train_step", batch, grpo_cfg))[0]

    async def broadcast(self, meta: WeightVersion) -> dict[str, float]:
        return (await self._all("broadcast", meta))[0]

    async def weight_meta(self) -> WeightVersion:
        return (await self._all("weight_meta"))[0]

    async def score(self, token_ids: list[int]) -> np.ndarray:
        return (await self._all("score", token_ids))[0]

    async def save_hf(self, out_dir: str, base_model_path: str) -> None:
        await self._all("save_hf", out_dir, base_model_path)

    async def save_checkpoint(self, path: str) -> None:
        """Sharded learner checkpoint into ``path`` (e.g. ``<tmp ckpt dir>/learner``); all ranks write."""
        await self._all("save_checkpoint", path)

    async def load_checkpoint(self, path: str) -> int:
        """Restore every rank from ``path``; returns the restored policy version."""
        return (await self._all("load_checkpoint", path))[0]


async def _gather(refs):
    return await asyncio.gather(*refs)

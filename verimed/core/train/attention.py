"""Attention over packed sequences, one causal block per sequence (the learner and reference on CPU).

A micro-batch is one row of S concatenated sequences (see
:func:`verimed.core.train.policy.packed_logprobs`). transformers' ``sdpa`` path
turns restarting position ids into a T×T block-diagonal mask and then
computes all T² scores; on CPU that is most of a training step (SDPA forward
and backward were a third of a SmolLM2 step at T ≈ 2k, S = 16). Here each
sequence attends only to itself:

    out[b:e] = softmax(Q[b:e] K[b:e]^T · scale + mask) V[b:e]   for each segment (b, e)

so the cost is Σ n_i² instead of T², and a segment may hold a prompt shared
by G responses (a tree mask; :func:`verimed.core.train.packing.packed_layout`).
Same numbers as the masked path (tested).
On CUDA the model keeps its configured implementation (flash / sdpa varlen).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

SEGMENT_ATTENTION = "verimed_segments"
SEGMENTS_KWARG = "verimed_cu_seqlens"


def segment_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Any, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: query [1, Hq, R, D], key/value [1, Hkv, R, D] -> [1, R, Hq, D].

    ``kwargs[SEGMENTS_KWARG]``: ``(start, end, mask)`` per segment of the row
    (:func:`verimed.core.train.packing.segment_masks`); ``mask`` None is plain causal,
    else a bool [n, n] (True = may attend; a shared prompt and its responses).
    Without segments the whole row is one causal sequence. GQA heads are
    shared by ``enable_gqa``; no dropout (the policy trains without it).
    """
    if query.shape[0] != 1:
        raise ValueError(f"segment attention takes one packed row, got batch {query.shape[0]}")
    segments: Sequence[tuple[int, int, Any]] = kwargs.get(SEGMENTS_KWARG) or [(0, query.shape[2], None)]
    group = query.shape[1] // key.shape[1]
    outs = []
    for b, e, mask in segments:
        q, k, v = query[:, :, b:e], key[:, :, b:e], value[:, :, b:e]
        if mask is not None and group > 1:
            # SDPA's enable_gqa with a mask falls back to the math kernel on CUDA (all n² scores per
            # head in memory); shared K/V heads repeated keep the memory-efficient kernel.
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling,
                                                   enable_gqa=k.shape[1] != q.shape[1]))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def use_segment_attention(model: torch.nn.Module) -> None:
    """Register :func:`segment_attention` with transformers and switch ``model`` (an HF LM) to it."""
    from transformers import AttentionInterface

    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
    model.set_attn_implementation(SEGMENT_ATTENTION)

"""Attention over packed sequences, one causal block per sequence (the learner and reference on CPU).

A micro-batch is one row of S concatenated sequences (see
:func:`verimed.core.learner.packed_logprobs`). transformers' ``sdpa`` path
turns restarting position ids into a T×T block-diagonal mask and then
computes all T² scores; on CPU that is most of a training step (SDPA forward
and backward were a third of a SmolLM2 step at T ≈ 2k, S = 16). Here each
sequence attends only to itself:

    out[b:e] = softmax(Q[b:e] K[b:e]^T · scale + causal) V[b:e]   for each (b, e) in cu_seqlens

so the cost is Σ n_i² instead of T². Same numbers as the masked path (tested).
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
    """transformers attention function: query [1, Hq, T, D], key/value [1, Hkv, T, D] -> [1, T, Hq, D].

    ``kwargs[SEGMENTS_KWARG]``: cu_seqlens (S+1 ints, 0 .. T) of the packed
    row; without it the whole row is one causal sequence. GQA heads are
    shared by ``enable_gqa``; no dropout (the policy trains without it).
    """
    if query.shape[0] != 1:
        raise ValueError(f"segment attention takes one packed row, got batch {query.shape[0]}")
    cu: Sequence[int] = kwargs.get(SEGMENTS_KWARG) or (0, query.shape[2])
    gqa = query.shape[1] != key.shape[1]
    outs = [F.scaled_dot_product_attention(query[:, :, b:e], key[:, :, b:e], value[:, :, b:e], is_causal=True,
                                           scale=scaling, enable_gqa=gqa)
            for b, e in zip(cu[:-1], cu[1:])]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def use_segment_attention(model: torch.nn.Module) -> None:
    """Register :func:`segment_attention` with transformers and switch ``model`` (an HF LM) to it."""
    from transformers import AttentionInterface

    AttentionInterface.register(SEGMENT_ATTENTION, segment_attention)
    model.set_attn_implementation(SEGMENT_ATTENTION)

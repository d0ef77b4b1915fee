"""The policy module: an HF causal LM whose forward returns per-token (logprob, entropy) via the fused kernel.

    policy = FusedPolicy(load_causal_lm(path, "float32"))
    logprob, entropy = packed_logprobs(policy, seqs, temperature, device, wanted)   # [T], [T]

Per-token log-probs come from :func:`verimed.kernels.fused_logprob` (the N×V
logits never exist in full); sequences go through the model packed into one
row (:mod:`verimed.core.train.packing`), with segment attention on CPU
(:mod:`verimed.core.train.attention`).
"""
from __future__ import annotations

import numpy as np
import torch

from verimed.core.train.attention import SEGMENTS_KWARG, use_segment_attention
from verimed.core.train.packing import packed_layout, segment_masks
from verimed.kernels import fused_logprob


class FusedPolicy(torch.nn.Module):
    """An HF causal LM whose forward returns per-token (logprob, entropy) via the fused kernel.

    Wrapping it as the FSDP root puts the embedding, final norm and (tied)
    LM head in one FSDP group that is unsharded during this forward, so the
    kernel sees full weights and their gradients take FSDP's normal path.
    On CPU attention runs per packed sequence (:mod:`verimed.core.train.attention`).
    """

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm
        self.segment_attention = next(lm.parameters()).device.type == "cpu"
        if self.segment_attention:
            use_segment_attention(lm)

    def forward(self, input_ids, position_ids, rows, targets, temperature: float, segments=None):
        # input_ids, position_ids [1, R]; no attention mask: restarting position ids
        # make transformers build the block-diagonal causal mask (flash / sdpa on
        # GPU), and segment attention takes the segments of segment_masks().
        hidden = self.lm.model(input_ids=input_ids, position_ids=position_ids,
                               **{SEGMENTS_KWARG: segments}).last_hidden_state  # [1, R, H]
        flat = hidden[0, rows]  # [N, H]: positions that predict a target
        weight = self.lm.lm_head.weight
        return fused_logprob(flat.to(weight.dtype), weight, targets, temperature)


def packed_logprobs(policy: torch.nn.Module, seqs: list[np.ndarray], temperature: float,
                    device: torch.device, wanted: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (logprob, entropy) of ``seqs`` packed into one row; entry t is token t's.

    ``policy`` is a :class:`FusedPolicy` (possibly FSDP-wrapped). The S sequences
    (T tokens) go through the model as one row without padding
    (:func:`packed_layout`; shared prompts computed once when the policy runs
    segment attention); the kernel sees only the rows that predict a token of
    their own sequence that is ``wanted`` (bool [T], e.g. the loss mask: prompt
    tokens then cost no LM-head work, which on the default workload is most of
    it). Returns two float32 tensors [T] in the concatenated layout, 0 at each
    sequence start and at unwanted tokens; differentiable under autograd.
    """
    share = bool(getattr(policy, "segment_attention", False)) and wanted is not None
    layout = packed_layout(seqs, wanted, share_prefixes=share)
    ids = torch.from_numpy(layout.ids).to(device)
    rows = torch.from_numpy(layout.rows).to(device)
    tokens = torch.from_numpy(layout.tokens).to(device)
    flat = torch.from_numpy(np.concatenate(seqs).astype(np.int64)).to(device)
    position_ids = torch.from_numpy(layout.position_ids).to(device)
    logprob, entropy = policy(ids[None], position_ids[None], rows, flat[tokens], temperature,
                              segment_masks(layout.segments, device))
    zeros = torch.zeros(flat.shape[0], device=device, dtype=torch.float32)
    # index_copy (out of place) keeps autograd: entry t gets the log-prob of token t.
    return zeros.index_copy(0, tokens, logprob.float()), zeros.index_copy(0, tokens, entropy.float())

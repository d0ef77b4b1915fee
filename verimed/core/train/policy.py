"""The policy module: an HF causal LM whose forward returns per-token (logprob, entropy) via the fused kernel.

    policy = FusedPolicy(load_causal_lm(path, "float32"))
    logprob, entropy = packed_logprobs(policy, seqs, temperature, device, wanted)   # [T], [T]
    lp = batch_logprobs(policy, batch, mine, token_budget, device, world_size)      # no grad, whole batch

Per-token log-probs come from :func:`verimed.kernels.fused_logprob` (the N×V
logits never exist in full); sequences go through the model packed into one
row (:mod:`verimed.core.train.packing`), with segment attention on CPU
(:mod:`verimed.core.train.attention`).
"""
from __future__ import annotations

import numpy as np
import torch

from verimed.core.train.attention import SEGMENTS_KWARG, use_segment_attention
from verimed.core.train.distributed import max_over_ranks, sum_over_ranks
from verimed.core.train.packing import group_micro_batches, packed_layout, segment_masks
from verimed.core.types import TrainBatch
from verimed.kernels import fused_logprob


class FusedPolicy(torch.nn.Module):
    """An HF causal LM whose forward returns per-token (logprob, entropy) via the fused kernel.

    Wrapping it as the FSDP root puts the embedding, final norm and (tied)
    LM head in one FSDP group that is unsharded during this forward, so the
    kernel sees full weights and their gradients take FSDP's normal path.
    On CPU attention runs per packed sequence (:mod:`verimed.core.train.attention`).
    """

    def __init__(self, lm: torch.nn.Module, device: torch.device | None = None):
        """``device``: where ``lm`` will run, when it is not there yet (built on the meta device)."""
        super().__init__()
        self.lm = lm
        self.segment_attention = (device or next(lm.parameters()).device).type == "cpu"
        if self.segment_attention:
            use_segment_attention(lm)

    def forward(self, input_ids, position_ids, rows, targets, temperature: float, segments=None):
        # input_ids, position_ids [1, R]; no attention mask: restarting position ids
        # make transformers build the block-diagonal causal mask (flash / sdpa on
        # GPU), and segment attention takes the segments of segment_masks().
        # use_cache=False always: transformers looks for packed sequences only when
        # there is no KV cache, and a cache (a config with use_cache on) would let
        # every sequence of the row attend to the ones before it.
        hidden = self.lm.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
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


@torch.no_grad()
def batch_logprobs(policy: torch.nn.Module, batch: TrainBatch, seqs: list[int], token_budget: int,
                   device: torch.device, world_size: int = 1) -> np.ndarray:
    """Log-probs float32 [T] of ``batch``'s loss tokens at ``batch.temperature``, 0 elsewhere; no autograd.

    This rank scores the sequences ``seqs`` (its share: :func:`verimed.core.train.packing.rank_sequences`)
    in micro-batches of ``token_budget`` row tokens; a SUM over the ranks assembles the
    whole batch (each position is written by exactly one rank). Collective when
    ``world_size > 1``: every rank runs as many forwards (a rank out of work reruns
    one sequence and discards it, so FSDP's collectives stay matched). Used for the
    reference's log-probs and for the learner's proximal policy at the start of a batch.
    """
    cu, ids, loss_mask = batch.cu_seqlens.numpy(), batch.input_ids.numpy(), batch.loss_mask.numpy()
    if len(cu) < 1 or int(cu[0]) != 0 or int(cu[-1]) != len(ids):
        raise ValueError(f"batch cu_seqlens must run from 0 to {len(ids)}, got {cu[:1]}..{cu[-1:]}")
    lengths = [int(cu[s + 1] - cu[s]) for s in range(len(cu) - 1)]
    mine = [s for s in seqs if lengths[s] >= 2]  # a one-token sequence predicts nothing
    micro = group_micro_batches(mine, batch, token_budget, bool(getattr(policy, "segment_attention", False)))
    num_micro = max_over_ranks(len(micro), world_size, device)
    out = torch.zeros(len(ids), dtype=torch.float32)
    for k in range(num_micro):
        real = k < len(micro)
        chunk = micro[k] if real else ([mine[0]] if mine else [int(np.argmax(lengths))] if lengths else [])
        if not chunk or lengths[chunk[0]] < 2:
            continue  # nothing to score anywhere (every sequence shorter than 2)
        wanted = np.concatenate([loss_mask[cu[s] : cu[s + 1]] for s in chunk]) > 0
        lp, _ = packed_logprobs(policy, [ids[cu[s] : cu[s + 1]] for s in chunk], batch.temperature, device, wanted)
        if real:
            lp, offset = lp.float().cpu(), 0
            for s in chunk:
                out[cu[s] : cu[s + 1]] = lp[offset : offset + lengths[s]]
                offset += lengths[s]
    return sum_over_ranks(out, world_size, device).numpy()

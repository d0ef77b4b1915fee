"""GRPO advantages over packed groups: torch reference and Triton kernels.

Layout: S sequences (responses) in B groups; group b owns sequences
cu_groups[b]:cu_groups[b+1]; sequence s owns packed tokens
cu_seqlens[s]:cu_seqlens[s+1]. Per group, with rubric scores x_i and response
lengths |o_i| (paper eq. 3, DESIGN §3):

    P80   = 0.2-quantile of x (linear interpolation, as numpy.quantile)
    R_i   = x_i + length_coef / sqrt(|o_i|)   if P80 > length_threshold and x_i >= P80
          = x_i                                otherwise
    A_i   = R_i - mean(R)                      mode "mean" (paper, Dr. GRPO)
          = (R_i - mean(R)) / (std(R) + eps)   mode "std" (std with Bessel's correction; 0 if G = 1)
          = 0                                  mode "none"

and token t of sequence s gets A_s. ``length_coef = 0`` turns the length reward
off. The quantile index is exact integer arithmetic: position 0.2 (G-1) =
lo + frac with lo = (G-1) // 5, frac = ((G-1) - 5 lo) / 5.

The Triton path runs one program per group (ranks by pairwise comparison, so
no sort is needed for G up to a few hundred) and one per sequence for the
token broadcast. It imports triton lazily, so this module needs only torch.
"""
from __future__ import annotations

import functools

import torch

MODES = {"mean": 0, "std": 1, "none": 2}


def check_layout(scores, cu_groups, lengths, cu_seqlens, mode) -> None:
    """Raise ValueError for inconsistent packed-group inputs."""
    if mode not in MODES:
        raise ValueError(f"grpo_advantages: mode must be one of {sorted(MODES)}, got {mode!r}")
    n_seq = scores.shape[0]
    if scores.dim() != 1 or lengths.shape != scores.shape:
        raise ValueError(f"grpo_advantages: scores and lengths must both be [S], got {tuple(scores.shape)} and {tuple(lengths.shape)}")
    if cu_groups.dim() != 1 or cu_groups.numel() < 1 or cu_seqlens.shape != (n_seq + 1,):
        raise ValueError(f"grpo_advantages: cu_groups must be [B+1] and cu_seqlens [S+1={n_seq + 1}], got {tuple(cu_groups.shape)} and {tuple(cu_seqlens.shape)}")
    if int(cu_groups[0]) != 0 or int(cu_groups[-1]) != n_seq or bool((cu_groups.diff() < 1).any()):
        raise ValueError(f"grpo_advantages: cu_groups must rise strictly from 0 to S={n_seq}, got {cu_groups.tolist()}")
    if bool((cu_seqlens.diff() < 0).any()) or int(cu_seqlens[0]) < 0:
        raise ValueError("grpo_advantages: cu_seqlens must be non-decreasing from >= 0")


def _p80(x: torch.Tensor) -> torch.Tensor:
    xs = torch.sort(x).values
    n1 = x.numel() - 1
    lo = n1 // 5
    frac = (n1 - 5 * lo) / 5.0
    hi = min(lo + 1, n1)
    return xs[lo] + frac * (xs[hi] - xs[lo])


def sequence_advantages_reference(scores, cu_groups, lengths, mode="mean", length_coef=4.0, length_threshold=0.5, eps=1e-6):
    """(rewards[S], advantages[S]) float32 per the module formula; one group at a time."""
    rewards = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
    adv = torch.empty_like(rewards)
    bounds = cu_groups.tolist()
    for b0, b1 in zip(bounds[:-1], bounds[1:]):
        x = scores[b0:b1].float()
        q = _p80(x)
        bonus = length_coef / lengths[b0:b1].float().clamp_min(1).sqrt()
        r = x + torch.where((q > length_threshold) & (x >= q), bonus, torch.zeros_like(x))
        centred = r - r.mean()
        if mode == "mean":
            a = centred
        elif mode == "std":
            std = r.std() if r.numel() > 1 else torch.zeros((), device=r.device)
            a = centred / (std + eps)
        else:
            a = torch.zeros_like(r)
        rewards[b0:b1], adv[b0:b1] = r, a
    return rewards, adv


def broadcast_to_tokens_reference(seq_values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """out[t] = seq_values[s] for cu_seqlens[s] <= t < cu_seqlens[s+1]; [T = cu_seqlens[-1]], 0 elsewhere."""
    out = torch.zeros(int(cu_seqlens[-1]), dtype=seq_values.dtype, device=seq_values.device)
    start = int(cu_seqlens[0])
    counts = cu_seqlens.diff()
    out[start:] = torch.repeat_interleave(seq_values, counts.long())
    return out


# ------------------------------------------------------------------ Triton


@functools.lru_cache(maxsize=None)
def _triton_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def group_kernel(scores_ptr, lengths_ptr, cu_groups_ptr, rew_ptr, adv_ptr, length_coef, length_threshold, eps,
                     MODE: tl.constexpr, BLOCK_G: tl.constexpr):
        g = tl.program_id(0)
        start = tl.load(cu_groups_ptr + g)
        n = tl.load(cu_groups_ptr + g + 1) - start
        idx = tl.arange(0, BLOCK_G)
        mask = idx < n
        x = tl.load(scores_ptr + start + idx, mask=mask, other=0.0).to(tl.float32)
        ln = tl.load(lengths_ptr + start + idx, mask=mask, other=1).to(tl.float32)
        # stable rank of each score: #smaller + #equal with a lower index
        xi, xj = x[:, None], x[None, :]
        jm = mask[None, :]
        before = (xj < xi) | ((xj == xi) & (idx[None, :] < idx[:, None]))
        rank = tl.sum((before & jm).to(tl.int32), axis=1)
        n1 = n - 1
        lo = n1 // 5
        frac = (n1 - 5 * lo).to(tl.float32) / 5.0
        hi = tl.minimum(lo + 1, n1)
        x_lo = tl.sum(tl.where((rank == lo) & mask, x, 0.0), axis=0)
        x_hi = tl.sum(tl.where((rank == hi) & mask, x, 0.0), axis=0)
        q = tl.zeros_like(x) + (x_lo + frac * (x_hi - x_lo))  # P80 as a [BLOCK_G] vector
        bonus = length_coef / tl.sqrt(tl.maximum(ln, 1.0))
        r = x + tl.where((q > length_threshold) & (x >= q), bonus, 0.0)
        nf = n.to(tl.float32)
        mean = tl.sum(tl.where(mask, r, 0.0), axis=0) / nf
        centred = r - mean
        if MODE == 0:
            a = centred
        elif MODE == 1:
            var = tl.sum(tl.where(mask, centred * centred, 0.0), axis=0) / tl.maximum(nf - 1.0, 1.0)
            a = centred / (tl.sqrt(var) + eps)
        else:
            a = centred * 0.0
        tl.store(rew_ptr + start + idx, r, mask=mask)
        tl.store(adv_ptr + start + idx, a, mask=mask)

    @triton.jit
    def broadcast_kernel(val_ptr, cu_ptr, out_ptr, BLOCK_T: tl.constexpr):
        s = tl.program_id(0)
        start = tl.load(cu_ptr + s)
        end = tl.load(cu_ptr + s + 1)
        v = tl.load(val_ptr + s)
        for t0 in range(start, end, BLOCK_T):
            offs = t0 + tl.arange(0, BLOCK_T)
            tl.store(out_ptr + offs, tl.zeros((BLOCK_T,), tl.float32) + v, mask=offs < end)

    return group_kernel, broadcast_kernel


def sequence_advantages_triton(scores, cu_groups, lengths, mode="mean", length_coef=4.0, length_threshold=0.5, eps=1e-6):
    """Triton version of :func:`sequence_advantages_reference` (CUDA, or CPU under TRITON_INTERPRET=1)."""
    import triton

    group_kernel, _ = _triton_kernels()
    n_groups = cu_groups.numel() - 1
    block = max(16, triton.next_power_of_2(int(cu_groups.diff().max())))
    rewards = torch.empty(scores.shape, dtype=torch.float32, device=scores.device)
    adv = torch.empty_like(rewards)
    group_kernel[(n_groups,)](scores.contiguous(), lengths.contiguous(), cu_groups.contiguous(), rewards, adv,
                              float(length_coef), float(length_threshold), float(eps), MODE=MODES[mode], BLOCK_G=block)
    return rewards, adv


def broadcast_to_tokens_triton(seq_values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    _, broadcast_kernel = _triton_kernels()
    out = torch.zeros(int(cu_seqlens[-1]), dtype=torch.float32, device=seq_values.device)
    if seq_values.numel():
        broadcast_kernel[(seq_values.numel(),)](seq_values.float().contiguous(), cu_seqlens.contiguous(), out, BLOCK_T=256)
    return out

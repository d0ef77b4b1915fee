"""Per-token log-probs and entropies of a linear LM head, without the N x V logits.

Torch reference of :func:`verimed.kernels.fused_logprob` (the Triton version is
``fused_logprob_triton.py``; the dispatcher in ``__init__`` picks one).

    z = (hidden @ weight.T) / temperature          # [N, V], never stored whole
    logprob[n] = z[n, y_n] - logsumexp(z[n])        # [N]
    entropy[n] = logsumexp(z[n]) - sum_v p[n, v] z[n, v],  p = softmax(z[n])

The reference walks row chunks of ``chunk_rows`` x V fp32 logits (a memory
budget, default 64 MiB), saves only (hidden, weight, targets, lse, entropy)
and recomputes each chunk in backward. Gradients w.r.t. the logits:

    d logprob_n / d z_nv = 1[v = y_n] - p_nv
    d entropy_n / d z_nv = -p_nv (log p_nv + entropy_n)

Rows whose target equals ``ignore_index`` get logprob = entropy = 0 and no
gradient. Inputs may be bf16/fp16/fp32 (math in fp32) or fp64 (math and
outputs in fp64, for tests).

``naive_logprob`` is the textbook path (logits -> log_softmax -> gather),
kept for tests and ``bench/kernels.py``.
"""
from __future__ import annotations

import torch

DEFAULT_CHUNK_BYTES = 64 * 2**20


def check_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    """Raise ValueError for shape/dtype mistakes shared by every backend."""
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"fused_logprob: hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_logprob: hidden size mismatch: hidden [N, {hidden.shape[1]}] vs weight [V, {weight.shape[1]}]")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"fused_logprob: targets must be [N={hidden.shape[0]}], got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"fused_logprob: targets must be int64 or int32, got {targets.dtype}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"fused_logprob: hidden and weight must share one float dtype, got {hidden.dtype} and {weight.dtype}")
    if not temperature > 0:
        raise ValueError(f"fused_logprob: temperature must be > 0, got {temperature}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows_per_chunk(n_rows: int, vocab: int, chunk_bytes: int) -> int:
    # ~3 live [rows, V] fp32 buffers per chunk (logits, probs, their product).
    return max(1, min(n_rows, chunk_bytes // (3 * 4 * max(vocab, 1))))


class _ChunkedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, chunk_bytes):
        acc = compute_dtype(hidden.dtype)
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        valid = targets != ignore_index
        safe_t = torch.where(valid, targets, torch.zeros_like(targets)).long()
        w = weight.to(acc)  # no copy when already in acc dtype
        logprob = torch.zeros(n_rows, dtype=acc, device=hidden.device)
        entropy = torch.zeros_like(logprob)
        lse = torch.zeros_like(logprob)
        step = _rows_per_chunk(n_rows, vocab, chunk_bytes)
        for s in range(0, n_rows, step):
            z = (hidden[s : s + step].to(acc) @ w.T) / temperature
            z_max = z.max(dim=-1, keepdim=True).values
            z = z - z_max  # shift-invariant; keeps exp() in range and E_p[z] free of cancellation
            e = torch.exp(z)
            sum_e = e.sum(-1)
            log_sum = torch.log(sum_e)
            # entropy = lse - E_p[z], E_p[z] normalised by the same sum as lse
            entropy[s : s + step] = log_sum - (e * z).sum(-1) / sum_e
            lse[s : s + step] = log_sum + z_max.squeeze(1)
            logprob[s : s + step] = z.gather(1, safe_t[s : s + step, None]).squeeze(1) - log_sum
        logprob = torch.where(valid, logprob, 0.0)
        entropy = torch.where(valid, entropy, 0.0)
        ctx.save_for_backward(hidden, weight, safe_t, valid, lse, entropy)
        ctx.temperature, ctx.chunk_bytes = temperature, chunk_bytes
        ctx.mark_non_differentiable(lse)
        return logprob, entropy

    @staticmethod
    def backward(ctx, grad_logprob, grad_entropy):
        hidden, weight, safe_t, valid, lse, entropy = ctx.saved_tensors
        acc = lse.dtype
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        g_lp = torch.zeros_like(lse) if grad_logprob is None else torch.where(valid, grad_logprob.to(acc), 0.0)
        g_ent = torch.zeros_like(lse) if grad_entropy is None else torch.where(valid, grad_entropy.to(acc), 0.0)
        w = weight.to(acc)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        d_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_h else None
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        step = _rows_per_chunk(n_rows, vocab, ctx.chunk_bytes)
        for s in range(0, n_rows, step):
            sl = slice(s, s + step)
            h = hidden[sl].to(acc)
            logp = (h @ w.T) / ctx.temperature - lse[sl, None]
            p = torch.exp(logp)
            dz = -p * (g_lp[sl, None] + g_ent[sl, None] * (logp + entropy[sl, None]))
            dz.scatter_add_(1, safe_t[sl, None], g_lp[sl, None])
            dz /= ctx.temperature  # z = raw / T
            if need_h:
                d_hidden[sl] = dz @ w
            if need_w:
                d_weight += dz.T @ h
        d_hidden = d_hidden.to(hidden.dtype) if need_h else None
        d_weight = d_weight.to(weight.dtype) if need_w else None
        return d_hidden, d_weight, None, None, None, None


def fused_logprob_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked torch path: (logprob[N], entropy[N]) in fp32 (fp64 for fp64 inputs).

    hidden [N, H], weight [V, H] (same float dtype), targets [N] int;
    autograd to hidden and weight. Peak extra memory ~ 3 * chunk_rows * V * 4 B.
    """
    check_inputs(hidden, weight, targets, temperature)
    return _ChunkedLogprob.apply(hidden, weight, targets, float(temperature), int(ignore_index), int(chunk_bytes))


def naive_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Textbook path: full logits [N, V] -> log_softmax -> gather; entropy from the same.

    ``upcast=True`` does the softmax in fp32 (fp64 stays fp64), as a careful
    trainer would; autograd does the backward (stores the [N, V] tensors).
    """
    logits = hidden @ weight.T
    if upcast:
        logits = logits.to(compute_dtype(hidden.dtype))
    logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    valid = targets != ignore_index
    safe_t = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logprob = logp_all.gather(1, safe_t[:, None]).squeeze(1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return torch.where(valid, logprob, 0.0), torch.where(valid, entropy, 0.0)

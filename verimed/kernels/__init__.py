"""verimed kernels: Triton on CUDA, torch references elsewhere (DESIGN §6).

    from verimed.kernels import fused_logprob, grpo_advantages
    logprob, entropy = fused_logprob(hidden, lm_head.weight, targets, temperature=1.0)

Backend choice, per call: ``backend="auto"`` (default) uses Triton for CUDA
tensors when triton imports, the torch reference otherwise; ``"triton"`` or
``"torch"`` force one. The env var ``VERIMED_KERNELS=auto|triton|torch`` sets
the default (tests force ``triton`` with ``TRITON_INTERPRET=1`` on CPU).
Only torch (and optionally triton) is imported here: GPU benchmark hosts
have nothing else.
"""
from __future__ import annotations

import importlib.util
import os

import torch

from verimed.kernels.advantages import (
    broadcast_to_tokens_reference,
    check_layout,
    sequence_advantages_reference,
)
from verimed.kernels.fused_logprob import fused_logprob_reference

__all__ = ["fused_logprob", "grpo_advantages", "grpo_sequence_advantages", "resolve_backend"]

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """'triton' or 'torch' for tensors on ``device``; ``backend`` None reads VERIMED_KERNELS."""
    choice = backend or os.environ.get("VERIMED_KERNELS", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {choice!r} (arg or VERIMED_KERNELS)")
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if choice == "triton":
        if not triton_available():
            raise ValueError("kernel backend 'triton' requested but triton is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("kernel backend 'triton' on CPU tensors needs TRITON_INTERPRET=1")
    return choice


def fused_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (logprob[N], entropy[N]) in fp32 of softmax((hidden @ weight.T) / temperature).

    hidden [N, H] and weight [V, H] share a float dtype (bf16/fp16/fp32; fp64 on the
    torch path); targets [N] int, rows equal to ``ignore_index`` give 0 and no
    gradient. Differentiable w.r.t. hidden and weight; the N x V logits are never
    materialised in full (see fused_logprob.py / fused_logprob_triton.py).
    """
    kind = resolve_backend(hidden.device, backend)
    if kind == "triton" and hidden.dtype == torch.float64 and (backend or os.environ.get("VERIMED_KERNELS", "auto")) == "auto":
        kind = "torch"  # fp64 (tests, debugging) has no Triton path
    if kind == "triton":
        from verimed.kernels.fused_logprob_triton import fused_logprob_triton

        return fused_logprob_triton(hidden, weight, targets, temperature, ignore_index)
    return fused_logprob_reference(hidden, weight, targets, temperature, ignore_index)


def grpo_sequence_advantages(
    scores: torch.Tensor,
    cu_groups: torch.Tensor,
    lengths: torch.Tensor,
    mode: str = "mean",
    length_coef: float = 4.0,
    length_threshold: float = 0.5,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards[S], advantages[S]) fp32 for S sequences in B groups (formula: advantages.py)."""
    cu_seqlens_dummy = torch.zeros(scores.shape[0] + 1, dtype=torch.int64, device=scores.device)
    check_layout(scores, cu_groups, lengths, cu_seqlens_dummy, mode)
    if resolve_backend(scores.device, backend) == "triton":
        from verimed.kernels.advantages import sequence_advantages_triton

        return sequence_advantages_triton(scores, cu_groups, lengths, mode, length_coef, length_threshold, eps)
    return sequence_advantages_reference(scores, cu_groups, lengths, mode, length_coef, length_threshold, eps)


def grpo_advantages(
    scores: torch.Tensor,
    cu_groups: torch.Tensor,
    lengths: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mode: str = "mean",
    length_coef: float = 4.0,
    length_threshold: float = 0.5,
    eps: float = 1e-6,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Token advantages [T = cu_seqlens[-1]] fp32: each sequence's GRPO advantage on all its tokens.

    scores [S] rubric scores, cu_groups [B+1] group offsets into sequences,
    lengths [S] response lengths (for the eq. 3 length reward), cu_seqlens [S+1]
    packed token offsets; ``length_coef=0`` disables the length reward. Tokens
    before cu_seqlens[0] get 0.
    """
    check_layout(scores, cu_groups, lengths, cu_seqlens, mode)
    kind = resolve_backend(scores.device, backend)
    _, adv = grpo_sequence_advantages(scores, cu_groups, lengths, mode, length_coef, length_threshold, eps, backend=kind)
    if kind == "triton":
        from verimed.kernels.advantages import broadcast_to_tokens_triton

        return broadcast_to_tokens_triton(adv, cu_seqlens)
    return broadcast_to_tokens_reference(adv, cu_seqlens)

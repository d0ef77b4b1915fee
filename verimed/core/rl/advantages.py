"""Group rewards and GRPO advantages (paper eq. 2-3, DESIGN §3), computed by the kernels package.

Per group of G responses with rubric scores x_i and response lengths |o_i|:

    P80   = 0.2-quantile of x (linear interpolation)
    R_i   = x_i + length_coef / sqrt(|o_i|)  iff length_reward, P80 > length_threshold and x_i >= P80
    A_i   = R_i - mean(R)                    "mean" (paper, Dr. GRPO)
          = (R_i - mean(R)) / (std(R) + eps) "std"  (Bessel's correction)
          = 0                                "none"

The maths exists once, in :mod:`verimed.kernels.advantages` (a Triton kernel
on CUDA, its torch reference elsewhere, fp32); this module is the training
path's entry to it through the dispatcher :func:`verimed.kernels.grpo_sequence_advantages`:

    rewards, adv = group_rewards_and_advantages(scores, lengths, cfg.grpo)   # [G], [G] float32
    kept = keep_group(rewards)                                              # dynamic sampling
"""
from __future__ import annotations

import numpy as np
import torch

from verimed.core.config import GRPOConfig
from verimed.kernels import grpo_sequence_advantages


def group_rewards_and_advantages(rubric_scores: np.ndarray, lengths: np.ndarray,
                                 cfg: GRPOConfig) -> tuple[np.ndarray, np.ndarray]:
    """(rewards[G], advantages[G]) float32 of one group: R = rubric score + eq. 3 length reward; A per cfg.advantage."""
    x = np.asarray(rubric_scores, dtype=np.float32)
    lengths = np.asarray(lengths)
    if x.ndim != 1 or x.size == 0 or lengths.shape != x.shape:
        raise ValueError(f"rubric_scores and lengths must be non-empty [G] arrays, got {x.shape} and {lengths.shape}")
    rewards, advantages = grpo_sequence_advantages(
        torch.from_numpy(x), torch.tensor([0, x.size]), torch.from_numpy(lengths.astype(np.int64)), cfg.advantage,
        cfg.length_coef if cfg.length_reward else 0.0, cfg.length_threshold)
    return rewards.numpy(), advantages.numpy()


def keep_group(rewards: np.ndarray) -> bool:
    """Dynamic sampling (DAPO): a group whose rewards are all equal has zero advantage; drop it."""
    r = np.asarray(rewards, dtype=np.float64)
    return bool(r.size > 0 and np.ptp(r) > 0.0)

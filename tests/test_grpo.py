"""Tests of verimed.core.rl (advantages, loss): hand-computed advantages, losses and corrections, plus an on-policy property.

Run: .venv/bin/python -m pytest tests/test_grpo.py -q
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from verimed.core.config import GRPOConfig
from verimed.core.rl import advantages
from verimed.core.rl import loss as grpo

# ----------------------------------------------------------------- advantages


# fp32 (the kernels' maths): values of magnitude <= 3, so round-off stays below ~1e-6.
FP32 = dict(rtol=0, atol=2e-6)


def test_mean_std_none_advantages_by_hand():
    scores, lengths = np.array([0.2, 0.4, 0.6, 0.8]), np.array([100, 100, 100, 100])
    # P80 = 0.2 + 0.6 * 0.2 = 0.32 <= 0.5: no length reward; mean 0.5
    r, a = advantages.group_rewards_and_advantages(scores, lengths, GRPOConfig(advantage="mean"))
    np.testing.assert_allclose(r, scores, **FP32)
    np.testing.assert_allclose(a, [-0.3, -0.1, 0.1, 0.3], **FP32)
    # std (ddof=1) = sqrt(0.2 / 3) = 0.2581989
    _, a = advantages.group_rewards_and_advantages(scores, lengths, GRPOConfig(advantage="std"))
    np.testing.assert_allclose(a, [-1.1618950, -0.3872983, 0.3872983, 1.1618950], atol=1e-5)
    _, a = advantages.group_rewards_and_advantages(scores, lengths, GRPOConfig(advantage="none"))
    np.testing.assert_array_equal(a, np.zeros(4))


def test_length_reward_eq3_by_hand():
    scores, lengths = np.array([0.6, 0.7, 0.8, 0.9, 1.0]), np.array([16, 25, 100, 4, 64])
    # P80 = 0.6 + 0.8 * 0.1 = 0.68 > 0.5, bonus 4/sqrt(L) = [1, .8, .4, 2, .5] for x >= 0.68
    r, a = advantages.group_rewards_and_advantages(scores, lengths, GRPOConfig())
    np.testing.assert_allclose(r, [0.6, 1.5, 1.2, 2.9, 1.5], **FP32)
    np.testing.assert_allclose(a, [-0.94, -0.04, -0.34, 1.36, -0.04], **FP32)
    # gate closed: threshold above P80
    r, _ = advantages.group_rewards_and_advantages(scores, lengths, GRPOConfig(length_threshold=0.7))
    np.testing.assert_allclose(r, scores, **FP32)
    r, _ = advantages.group_rewards_and_advantages(scores, lengths, GRPOConfig(length_reward=False))
    np.testing.assert_allclose(r, scores, **FP32)


def test_training_advantages_go_through_the_kernel_dispatcher(monkeypatch):
    """The product computes advantages with the kernels package (Triton on CUDA), not its own copy."""
    import verimed.kernels as kernels

    calls = []
    real = kernels.grpo_sequence_advantages

    def spy(*args, **kwargs):
        calls.append(args[1].tolist())
        return real(*args, **kwargs)

    monkeypatch.setattr(advantages, "grpo_sequence_advantages", spy)
    advantages.group_rewards_and_advantages(np.array([0.0, 1.0, 0.5]), np.array([3, 4, 5]), GRPOConfig())
    assert calls == [[0, 3]]


def test_dynamic_sampling_and_errors():
    assert not advantages.keep_group(np.array([1.0, 1.0, 1.0]))
    assert advantages.keep_group(np.array([1.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="non-empty"):
        advantages.group_rewards_and_advantages(np.array([1.0, 2.0]), np.array([3]), GRPOConfig())



# ----------------------------------------------------------------- the loss

U = [1.5, 0.7, 1.0, 1.1, 0.5]  # pi_theta / pi_prox per token
A = [1.0, 1.0, -1.0, -1.0, -1.0]  # seq0 = tokens 0-1, seq1 = tokens 2-4
CU = torch.tensor([0, 2, 5])
# per-token -min(uA, clip(u, 0.8, 1.28) A): [-1.28 (high clip), -0.7, 1.0, 1.1, 0.8 (low clip)], sum 0.92


def _loss(cfg, log_w=None, mask=None, ref=None, **kw):
    logp = torch.log(torch.tensor(U, dtype=torch.float64)).requires_grad_()
    prox = torch.zeros(5, dtype=torch.float64)
    mu = prox - (torch.zeros(5, dtype=torch.float64) if log_w is None else torch.tensor(log_w, dtype=torch.float64))
    mask = torch.ones(5, dtype=torch.bool) if mask is None else torch.tensor(mask)
    norms = dict(num_sequences_global=2, num_tokens_global=5.0, max_response_len=4) | kw
    loss, metrics = grpo.policy_loss(logp, prox, mu, torch.tensor(A, dtype=torch.float64), mask, CU, cfg,
                                     reference_logprobs=ref, **norms)
    loss.backward()
    return loss.item(), metrics, logp.grad


@pytest.mark.parametrize("aggregation, expected", [
    ("paper", 0.92 / 8),  # / (G l_max) = 2 * 4
    ("token-mean", 0.92 / 5),
    ("seq-mean-token-mean", (-1.98 / 2 + 2.9 / 3) / 2),
])
def test_aggregations_by_hand(aggregation, expected):
    loss, m, grad = _loss(GRPOConfig(aggregation=aggregation))
    assert loss == pytest.approx(expected, abs=1e-12)
    assert m["clip_low_count"].item() == 1 and m["clip_high_count"].item() == 1 and m["tokens"].item() == 5
    if aggregation == "paper":  # d l / d logp = -A u on unclipped tokens, 0 on clipped
        torch.testing.assert_close(grad, torch.tensor([0.0, -0.7, 1.0, 1.1, 0.0], dtype=torch.float64) / 8)


def test_is_cap_and_mask_by_hand():
    log_w = [math.log(3.0), 0.0, 0.0, math.log(0.25), 0.0]  # w = [3, 1, 1, .25, 1]
    loss, m, _ = _loss(GRPOConfig(is_mode="cap"), log_w)  # w' = [2, 1, 1, .25, 1]
    assert loss == pytest.approx((-2.56 - 0.7 + 1.0 + 0.275 + 0.8) / 8, abs=1e-12)
    assert m["is_flagged_count"].item() == 1
    loss, m, _ = _loss(GRPOConfig(is_mode="mask"), log_w)  # band [.5, 2] drops tokens 0 and 3
    assert loss == pytest.approx((-0.7 + 1.0 + 0.8) / 8, abs=1e-12)
    assert m["is_flagged_count"].item() == 2
    # behaviour KL k3 = sum(w - 1 - log w) over tokens
    assert m["behaviour_kl_sum"].item() == pytest.approx((3 - 1 - math.log(3)) + (0.25 - 1 - math.log(0.25)))
    loss, _, _ = _loss(GRPOConfig(is_mode="none"), log_w)
    assert loss == pytest.approx((-3.84 - 0.7 + 1.0 + 0.275 + 0.8) / 8, abs=1e-12)


def test_gspo_by_hand():
    s0, s1 = math.sqrt(1.5 * 0.7), (1.0 * 1.1 * 0.5) ** (1 / 3)  # 1.0247, 0.8193: geometric means
    loss, m, _ = _loss(GRPOConfig(ratio="gspo", aggregation="seq-mean-token-mean"))
    assert loss == pytest.approx((-s0 + s1) / 2, abs=1e-12)
    assert m["clip_low_count"].item() == 0
    loss, m, grad = _loss(GRPOConfig(ratio="gspo", eps_low=0.1))  # s1 < 0.9 with A < 0: clipped
    assert loss == pytest.approx((-2 * s0 + 3 * 0.9) / 8, abs=1e-12)
    assert m["clip_low_count"].item() == 3
    # d/dlogp_t of -2 s0 / 8 = -2 s0 * (1/2) / 8 for both tokens of seq 0; seq 1 clipped -> 0
    torch.testing.assert_close(grad, torch.tensor([-s0 / 8, -s0 / 8, 0.0, 0.0, 0.0], dtype=torch.float64))


def test_m2po_by_hand():
    log_w = [0.0, 0.1, -0.2, 1.0, 0.5]  # (log w)^2 = [0, .01, .04, 1, .25]
    # sorted running means 0, .005, .0167, .075, .26 > 0.1: drop the largest (token 3)
    keep = grpo.m2po_keep(torch.tensor(log_w), torch.ones(5, dtype=torch.bool), 0.1)
    assert keep.tolist() == [True, True, True, False, True]
    loss, m, _ = _loss(GRPOConfig(is_mode="none", m2po_threshold=0.1), log_w)
    w = [math.exp(v) for v in log_w]
    assert loss == pytest.approx((-1.28 * w[0] - 0.7 * w[1] + 1.0 * w[2] + 0.8 * w[4]) / 8, abs=1e-12)
    assert m["m2po_masked_count"].item() == 1
    assert grpo.m2po_keep(torch.tensor(log_w), torch.ones(5, dtype=torch.bool), 0.0).tolist() == [True] + [False] * 4


def test_kl_estimators_and_kl_loss():
    logp = torch.tensor([-1.0, -1.0])
    ref = torch.tensor([-1.0, -1.0 + math.log(2.0)])  # d = ref - logp = [0, ln 2]
    torch.testing.assert_close(grpo.kl_penalty(logp, ref, "k1"), torch.tensor([0.0, -math.log(2)]))
    torch.testing.assert_close(grpo.kl_penalty(logp, ref, "k2"), torch.tensor([0.0, 0.5 * math.log(2) ** 2]))
    torch.testing.assert_close(grpo.kl_penalty(logp, ref, "k3"), torch.tensor([0.0, 1.0 - math.log(2)]))
    ref5 = torch.log(torch.tensor(U, dtype=torch.float64)) + torch.tensor([0, 0, 0, 0, math.log(2.0)], dtype=torch.float64)
    loss, m, _ = _loss(GRPOConfig(kl_coef=0.1), ref=ref5)
    assert loss == pytest.approx((0.92 + 0.1 * (1 - math.log(2))) / 8, abs=1e-12)
    assert m["kl_sum"].item() == pytest.approx(1 - math.log(2))
    with pytest.raises(ValueError, match="reference_logprobs"):
        _loss(GRPOConfig(kl_coef=0.1))


def test_loss_mask_and_shape_errors():
    loss, m, grad = _loss(GRPOConfig(), mask=[True, True, False, False, True])
    assert loss == pytest.approx((-1.28 - 0.7 + 0.8) / 8, abs=1e-12)
    assert grad[2].item() == 0.0 and m["tokens"].item() == 3
    with pytest.raises(ValueError, match="advantages has shape"):
        grpo.policy_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(2), torch.ones(3), torch.tensor([0, 3]),
                         GRPOConfig(), num_sequences_global=1, num_tokens_global=3, max_response_len=3)
    with pytest.raises(ValueError, match="cu_seqlens"):
        grpo.policy_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.zeros(3), torch.ones(3), torch.tensor([0, 2]),
                         GRPOConfig(aggregation="seq-mean-token-mean"), num_sequences_global=1, num_tokens_global=3, max_response_len=3)


def test_microbatch_sum_equals_full_batch():
    cfg = GRPOConfig(aggregation="seq-mean-token-mean", ratio="gspo")
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(9, generator=gen, dtype=torch.float64) * 0.1 - 1
    prox, mu, adv = logp + 0.05 * torch.randn(9, generator=gen, dtype=torch.float64), logp - 0.1, torch.randn(9, generator=gen, dtype=torch.float64)
    mask = torch.ones(9, dtype=torch.bool)
    norms = dict(num_sequences_global=3, num_tokens_global=9.0, max_response_len=4)
    full, mf = grpo.policy_loss(logp, prox, mu, adv, mask, torch.tensor([0, 4, 6, 9]), cfg, **norms)
    a, ma = grpo.policy_loss(logp[:4], prox[:4], mu[:4], adv[:4], mask[:4], torch.tensor([0, 4]), cfg, **norms)
    b, mb = grpo.policy_loss(logp[4:], prox[4:], mu[4:], adv[4:], mask[4:], torch.tensor([0, 2, 5]), cfg, **norms)
    assert (a + b).item() == pytest.approx(full.item(), abs=1e-12)
    red, red_full = grpo.reduce_metrics([ma, mb]), grpo.reduce_metrics([mf])
    for key in ("tokens", "clip_frac", "behaviour_kl", "advantage_mean", "advantage_std", "advantage_min", "loss"):
        assert red[key] == pytest.approx(red_full[key], rel=1e-6, abs=1e-7), key  # metrics are fp32


def test_interpolate_proximal_by_hand():
    mu, cur = torch.full((4,), -1.0), torch.full((4,), -2.0)
    out = grpo.interpolate_proximal(mu, cur, torch.tensor([5, 4, 3, 1]), current_version=5)
    # v_prox = 4: alpha = [1 (fresh), 0, 1/2, 3/4]
    torch.testing.assert_close(out, torch.tensor([-2.0, -1.0, -1.5, -1.75]))
    out = grpo.interpolate_proximal(mu, cur, torch.tensor([5, 4, 3, 1]), current_version=5, proximal_version=5)
    torch.testing.assert_close(out, cur)
    with pytest.raises(ValueError, match="version"):
        grpo.interpolate_proximal(mu, cur, torch.tensor([6, 4, 3, 1]), current_version=5)


# ------------------------------------------------- property: mu = prox is on-policy GRPO


def _on_policy_grpo(logp, prox, adv, mask, bounds, cfg, n_seq, n_tok, l_max):
    """Independent loop-based on-policy GRPO of the same variant (no behaviour terms)."""
    total = 0.0
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        idx = [t for t in range(s0, s1) if mask[t]]
        if cfg.ratio == "gspo" and idx:
            seq_ratio = torch.exp(sum(logp[t] - prox[t] for t in idx) / len(idx))
        seq_total = 0.0
        for t in idx:
            u = seq_ratio if cfg.ratio == "gspo" else torch.exp(logp[t] - prox[t])
            clipped = torch.clamp(u, 1 - cfg.eps_low, 1 + cfg.eps_high)
            seq_total = seq_total - torch.minimum(u * adv[t], clipped * adv[t])
        if cfg.aggregation == "seq-mean-token-mean":
            total = total + seq_total / max(len(idx), 1) / n_seq
        else:
            total = total + seq_total / (n_seq * l_max if cfg.aggregation == "paper" else n_tok)
    return total


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lens=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    seed=st.integers(0, 2**16),
    ratio=st.sampled_from(["token", "gspo"]),
    aggregation=st.sampled_from(["paper", "token-mean", "seq-mean-token-mean"]),
    is_mode=st.sampled_from(["cap", "mask", "none"]),
    m2po=st.sampled_from([0.0, 0.01]),
)
def test_property_mu_equals_prox_is_on_policy(lens, seed, ratio, aggregation, is_mode, m2po):
    gen = torch.Generator().manual_seed(seed)
    n = sum(lens)
    bounds = [0] + list(np.cumsum(lens))
    prox = -torch.rand(n, generator=gen, dtype=torch.float64) * 3
    logp = (prox + 0.4 * torch.randn(n, generator=gen, dtype=torch.float64)).requires_grad_()
    adv = torch.randn(n, generator=gen, dtype=torch.float64)
    mask = torch.rand(n, generator=gen) > 0.2
    cfg = GRPOConfig(ratio=ratio, aggregation=aggregation, is_mode=is_mode, m2po_threshold=m2po)
    norms = dict(num_sequences_global=len(lens) + 1, num_tokens_global=float(n + 2), max_response_len=6)
    loss, _ = grpo.policy_loss(logp, prox, prox.clone(), adv, mask, torch.tensor(bounds), cfg, **norms)
    (grad,) = torch.autograd.grad(loss, logp)
    logp2 = logp.detach().clone().requires_grad_()
    ref = _on_policy_grpo(logp2, prox, adv, mask.tolist(), bounds, cfg, norms["num_sequences_global"], norms["num_tokens_global"], 6)
    ref = torch.as_tensor(ref, dtype=torch.float64)
    ref_grad = torch.autograd.grad(ref, logp2, allow_unused=True)[0] if ref.requires_grad else None
    if ref_grad is None:
        ref_grad = torch.zeros_like(grad)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-12)
    torch.testing.assert_close(grad, ref_grad, atol=1e-12, rtol=1e-10)

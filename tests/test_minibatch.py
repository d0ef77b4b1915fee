"""Minibatch updates (trainer.minibatches) and the proximal policy: the clip binds from the second
minibatch on, M = 1 is one step on the whole batch, M2PO's mask does not depend on packing."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from test_learner import OVERRIDES, make_batch, tiny_path  # noqa: F401  (tiny_path is a fixture)

from verimed.core.config import GRPOConfig, load_config
from verimed.core.rl import loss as grpo
from verimed.core.train.learner import Learner
from verimed.core.train.packing import minibatch_groups, rank_sequences
from verimed.core.train.policy import packed_logprobs


def test_minibatch_groups_are_contiguous_whole_and_cover_the_batch():
    assert minibatch_groups(4, 1) == [[0, 1, 2, 3]]
    assert minibatch_groups(4, 2) == [[0, 1], [2, 3]]
    chunks = minibatch_groups(7, 3)
    assert sum(chunks, []) == list(range(7)) and max(map(len, chunks)) - min(map(len, chunks)) <= 1
    assert minibatch_groups(2, 4) == [[0], [1]]  # never an empty minibatch
    with pytest.raises(ValueError, match="minibatches"):
        minibatch_groups(3, 0)


def test_clipped_loss_by_hand_when_the_policy_moved():
    """What a second minibatch sees: pi_theta != pi_prox. Two tokens, token-mean, eps 0.2 / 0.28, cap 2.

    w = exp(prox - mu) = [1, e^0.2 = 1.221403]; u = exp(logp - prox) = [e^0.5 = 1.648721, e^-1 = 0.367879]
    token 0 (A = +1): min(u A, clip(u, 0.8, 1.28) A) = 1.28            -> l0 = -1 * 1.28 = -1.28 (clipped high)
    token 1 (A = -1): min(-0.367879, 0.8 * -1 = -0.8) = -0.8            -> l1 = -1.221403 * -0.8 = 0.977122 (clipped low)
    loss = (l0 + l1) / 2 = -0.151439; both tokens are clipped, so no gradient reaches logp.
    """
    logp = torch.tensor([-1.0, -2.0], dtype=torch.float64, requires_grad=True)
    prox, mu = torch.tensor([-1.5, -1.0], dtype=torch.float64), torch.tensor([-1.5, -1.2], dtype=torch.float64)
    cfg = GRPOConfig(aggregation="token-mean")
    loss, m = grpo.policy_loss(logp, prox, mu, torch.tensor([1.0, -1.0], dtype=torch.float64), torch.ones(2),
                               torch.tensor([0, 2]), cfg, num_sequences_global=1, num_tokens_global=2.0, max_response_len=2)
    loss_value = float(loss.detach())
    assert loss_value == pytest.approx((-1.28 + math.exp(0.2) * 0.8) / 2, abs=1e-12)
    assert loss_value == pytest.approx(-0.151439, abs=1e-6)
    assert float(m["clip_high_count"]) == 1 and float(m["clip_low_count"]) == 1
    loss.backward()
    assert torch.all(logp.grad == 0)


def _learner(tiny_path, *extra):
    return Learner(load_config(None, OVERRIDES + ["trainer.grad_clip=0", *extra]), tiny_path)


def _reference_loss_and_grads(model, batch, groups, grpo_cfg, proximal=None):
    """The loss of ``groups`` of ``batch`` computed in one piece (no micro-batches), and its gradients."""
    model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    cu = batch.cu_seqlens.numpy()
    seqs = rank_sequences(batch, 0, 1, groups)
    spans = [(int(cu[s]), int(cu[s + 1])) for s in seqs]
    take = lambda a: torch.from_numpy(np.concatenate([a[b:e] for b, e in spans]).astype(np.float32))
    mask = take(batch.loss_mask.numpy())
    lp = torch.cat([packed_logprobs(model, [batch.input_ids.numpy()[b:e]], batch.temperature, torch.device("cpu"),
                                    batch.loss_mask.numpy()[b:e] > 0)[0] for b, e in spans])
    prox = lp.detach() if proximal is None else take(proximal)
    lengths = torch.tensor([e - b for b, e in spans])
    loss, _ = grpo.policy_loss(lp, prox, take(batch.behaviour_logprobs.numpy()), take(batch.advantages.numpy()), mask,
                               torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]), grpo_cfg,
                               num_sequences_global=len(seqs), num_tokens_global=float(mask.sum()),
                               max_response_len=batch.max_response_len)
    loss.backward()
    return float(loss), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_one_minibatch_is_one_step_on_the_whole_batch(tiny_path):
    learner = _learner(tiny_path, "trainer.minibatches=1")
    batch = make_batch(3, groups=4)[0]
    want_loss, want_grads = _reference_loss_and_grads(learner.model, batch, list(range(4)), learner.cfg.grpo)
    m = learner.train_step(batch)
    # fp32 sums over micro-batches in another order: relative 1e-5 of values ~1e-2
    assert m["loss/policy"] == pytest.approx(want_loss, rel=1e-5, abs=1e-7)
    assert m["loss/clip_frac"] == 0.0 and m["train/minibatches"] == 1.0
    for name, p in learner.model.named_parameters():
        if name in want_grads:
            torch.testing.assert_close(p.grad, want_grads[name], rtol=1e-4, atol=1e-7)


def test_second_minibatch_clips_once_the_policy_moved(tiny_path):
    learner = _learner(tiny_path, "trainer.minibatches=2", "trainer.lr=0.05", "grpo.aggregation=token-mean")
    batch = make_batch(4, groups=4)[0]
    want_mb0, _ = _reference_loss_and_grads(learner.model, batch, [0, 1], learner.cfg.grpo)
    m = learner.train_step(batch)
    # minibatch 0 runs on the batch-start weights: u = 1 up to fp32 packing round-off, nothing clips
    assert m["loss/mb0/clip_frac"] == 0.0 and m["loss/mb0/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert m["loss/mb0/loss"] == pytest.approx(want_mb0, rel=1e-5, abs=1e-7)  # its own normalisers
    # minibatch 1 runs after one step at lr 0.05: the ratio moved and the clip binds
    assert m["loss/mb1/clip_frac"] > 0.0 and m["loss/clip_frac"] > 0.0
    assert learner.version == 1 and m["train/minibatches"] == 2.0


def test_m2po_mask_does_not_depend_on_packing(tiny_path):
    counts = []
    for budget in (16, 4096):  # many micro-batches vs one
        learner = _learner(tiny_path, "grpo.m2po_threshold=16", f"trainer.micro_batch_tokens={budget}")
        m = learner.train_step(make_batch(5, groups=4)[0])
        counts.append((m["loss/m2po_masked_count"], m["loss/tokens"]))
    assert counts[0] == counts[1] and 0 < counts[0][0] < counts[0][1]


def test_interpolated_proximal_is_the_batch_start_policy_for_the_first_minibatch():
    mu = torch.tensor([-2.0, -3.0, -1.0])
    current = torch.tensor([-1.0, -2.5, -1.2])
    versions = torch.tensor([5, 3, 4])
    # first minibatch of a step at version 5: prox = current exactly, whatever the token versions
    torch.testing.assert_close(grpo.interpolate_proximal(mu, current, versions, 5.0, 5), current)
    # second of two minibatches (weights at 5.5): fresh tokens (v_t = 5) keep mu; a token of version 3
    # moves (5 - 3) / (5.5 - 3) = 0.8 of the way to pi_theta
    prox = grpo.interpolate_proximal(mu, current, versions, 5.5, 5)
    torch.testing.assert_close(prox[0], mu[0])
    torch.testing.assert_close(prox[1], mu[1] + 0.8 * (current[1] - mu[1]))

"""Turn judged groups into a packed :class:`TrainBatch` (pure numpy).

Layout per sequence s = prompt ids ++ response ids, concatenated over all
samples of all groups; ``cu_seqlens`` marks the boundaries. Position t holds
what predicts token t: the loss mask is 1 exactly on response tokens, the
behaviour log-probs / versions come from the engine for those tokens, and the
sample's advantage is broadcast to every response token.
"""
from __future__ import annotations

import numpy as np

from verimed.core.types import Array, Group, TrainBatch


def build_train_batch(groups: list[Group], advantages: list[np.ndarray], policy_version: int,
                      temperature: float = 1.0) -> TrainBatch:
    """Pack ``groups`` (with per-sample ``advantages[g][i]``), sampled at ``temperature``, into one batch."""
    ids, mask, behaviour, adv, versions, cu, group_ids, uids = [], [], [], [], [], [0], [], []
    max_response = 0
    for g, (group, group_adv) in enumerate(zip(groups, advantages)):
        if len(group_adv) != len(group.samples):
            raise ValueError(f"group {g}: {len(group_adv)} advantages for {len(group.samples)} samples")
        for sample, a in zip(group.samples, group_adv):
            prompt = sample.prompt_ids.numpy()
            response = sample.response_ids.numpy()
            p, r = len(prompt), len(response)
            ids += [prompt, response]
            mask += [np.zeros(p, np.float32), np.ones(r, np.float32)]
            behaviour += [np.zeros(p, np.float32), sample.response_logprobs.numpy().astype(np.float32)]
            adv += [np.zeros(p, np.float32), np.full(r, a, np.float32)]
            versions += [np.full(p, -1, np.int32), sample.response_versions.numpy().astype(np.int32)]
            cu.append(cu[-1] + p + r)
            group_ids.append(g)
            uids.append(sample.uid)
            max_response = max(max_response, r)
    cat = lambda xs, dt: Array.of(np.concatenate(xs).astype(dt))
    return TrainBatch(
        input_ids=cat(ids, np.int32), cu_seqlens=Array.of(np.asarray(cu, np.int32)), loss_mask=cat(mask, np.float32),
        behaviour_logprobs=cat(behaviour, np.float32), advantages=cat(adv, np.float32), versions=cat(versions, np.int32),
        group_ids=Array.of(np.asarray(group_ids, np.int32)), num_groups=len(groups),
        max_response_len=max(1, max_response), policy_version=policy_version, uids=uids, temperature=temperature,
    )

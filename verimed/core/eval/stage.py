"""The held-out evaluation at the end of each training stage.

    metrics = await evaluate(roles, stage_cfg, pools, stage_index, max_slices)

HealthBench examples (own rubrics, one sample each) and simulator
consultations on cases that training never draws (:class:`verimed.core.tasks.pools.DataPools`).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from verimed.core.rubrics.scoring import training_reward
from verimed.core.tasks.dialogue import consultation_score, run_dialogue
from verimed.core.tasks.groups import Roles, prompt_ids
from verimed.core.tasks.pools import DataPools

# Draw numbers of held-out evaluation episodes: far above any training draw, so
# their simulator sessions and uids never collide with training ones.
EVAL_DRAW_BASE = 10**9


async def evaluate(roles: Roles, stage_cfg: Any, pools: DataPools, stage_index: int, max_slices: int) -> dict[str, float]:
    """Held-out scores with the current policy: HealthBench (own rubrics, one sample each,
    clipped HealthBench score) and simulator consultations (mean rubric score of the slices)."""
    base = EVAL_DRAW_BASE + stage_index * 100_000
    hb_scores = []
    room = stage_cfg.model.max_model_len - stage_cfg.rollout.max_tokens
    for i, ex in enumerate(pools.eval_healthbench):
        ids = prompt_ids(roles.tokenizer, ex.messages)
        if len(ids) > room:  # the same examples are skipped at every stage: scores stay comparable
            continue
        sample = (await roles.generate(f"{base + i}/eval", ids, 1, base + i, rollout=stage_cfg.rollout))[0]
        hb_scores.append(training_reward(ex.rubric, await roles.judge.judge(ex.messages, sample.text, ex.rubric)))
    consult = []
    for i, case in enumerate(pools.eval_cases):
        results, _ = await run_dialogue(roles, stage_cfg, case, base + 50_000 + i, max_slices=max_slices,
                                        continuation="best", n=1)
        consult.append(consultation_score(results))
    out = {}
    if hb_scores:
        out["eval/healthbench"] = float(np.mean(hb_scores))
    if consult:
        out["eval/consultation"] = float(np.mean(consult))
    return out

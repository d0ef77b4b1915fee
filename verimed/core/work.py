"""What one draw of each stage kind turns into, and the end-of-stage held-out evaluation.

Ray-free: the controller passes :class:`verimed.core.episodes.Roles` whose
members are actor adapters; tests pass in-process cores.

    pools = DataPools.load(cfg)                        # training pools + held-out split
    result = await single_turn_group(roles, stage, stage_cfg, pools, draw)   # rule / rubric kinds
    # multiturn draws go through verimed.core.multiturn.dialogue_slices (one group per slice)
    metrics = await evaluate(roles, stage_cfg, pools, base_draw)
"""
from __future__ import annotations

import sys
from typing import Any

import msgspec
import numpy as np

from verimed.core.answers import check_diagnosis, check_mcq
from verimed.core.data.cases import load_cases
from verimed.core.data.healthbench import load_healthbench
from verimed.core.data.mcq import diagnosis_prompt, load_mcq, mcq_prompt
from verimed.core.episodes import GroupResult, Roles, consultation_group
from verimed.core.models import apply_chat_template
from verimed.core.multiturn import consultation_score, run_dialogue
from verimed.core.rubrics.scoring import training_reward
from verimed.core.stages import Draw, StageConfig, rubric_group, rule_group, split_heldout
from verimed.core.types import Prompt

# Draw numbers of held-out evaluation episodes: far above any training draw, so
# their simulator sessions and uids never collide with training ones.
EVAL_DRAW_BASE = 10**9


class DataPools(msgspec.Struct):
    """Per-stage training pools by source, and the held-out evaluation items."""

    stages: list[dict[str, list[Any]]]
    eval_healthbench: list[Any]
    eval_cases: list[Any]

    @classmethod
    def load(cls, cfg: Any, stages: list[StageConfig]) -> "DataPools":
        skip = cfg.data.skip_invalid
        cases, report = load_cases(cfg.data.cases_path, skip)
        hb, hb_report = load_healthbench(cfg.data.healthbench_path, skip)
        for r in (report, hb_report):
            if r.skipped:
                print(f"verimed: skipped {r.skipped} invalid records in {r.path} (first: {r.errors[0]})", file=sys.stderr)
        hb_train, hb_eval = split_heldout(len(hb), cfg.stage_eval.healthbench, cfg.run.seed)
        case_train, case_eval = split_heldout(len(cases), cfg.stage_eval.consultations, cfg.run.seed + 1)
        base = {"cases": [cases[i] for i in case_train], "healthbench": [hb[i] for i in hb_train]}
        pools = []
        for st in stages:
            pool = dict(base)
            if st.data.mcq_path:
                pool["mcq"] = load_mcq(st.data.mcq_path, skip)[0]
            if st.data.user_path:
                pool["user"] = load_healthbench(st.data.user_path, skip)[0]
            pools.append(pool)
        return cls(stages=pools, eval_healthbench=[hb[i] for i in hb_eval], eval_cases=[cases[i] for i in case_eval])

    def sizes(self) -> list[dict[str, int]]:
        return [{source: len(items) for source, items in pool.items()} for pool in self.stages]

    def item(self, draw: Draw) -> Any:
        return self.stages[draw.stage][draw.source][draw.item]


async def single_turn_group(roles: Roles, stage: StageConfig, stage_cfg: Any, item: Any, draw: Draw) -> GroupResult:
    """One judged group for a ``rule`` or ``rubric`` stage draw."""
    d = draw.draw
    if stage.kind == "rule" and draw.source == "cases":
        prompt = Prompt(index=d, source="cases", messages=diagnosis_prompt(item), answer=item.diagnosis,
                        case_id=item.case_id)
        return await rule_group(roles, stage_cfg, prompt, d, lambda text: check_diagnosis(text, item.diagnosis),
                                stage.reward.format_weight)
    if stage.kind == "rule":
        prompt = Prompt(index=d, source="mcq", messages=mcq_prompt(item), answer=item.answer)
        return await rule_group(roles, stage_cfg, prompt, d, lambda text: check_mcq(text, item.answer, item.options),
                                stage.reward.format_weight)
    if draw.source == "cases":  # a single-turn consultation graded by generated rubrics
        return await consultation_group(roles, stage_cfg, item, d)
    prompt = Prompt(index=d, source=draw.source, messages=item.messages, rubric=item.rubric)
    return await rubric_group(roles, stage_cfg, prompt, d, rubrics=stage.reward.rubrics)


async def evaluate(roles: Roles, stage_cfg: Any, pools: DataPools, stage_index: int, max_slices: int) -> dict[str, float]:
    """Held-out scores with the current policy: HealthBench (own rubrics, one sample each,
    clipped HealthBench score) and simulator consultations (mean rubric score of the slices)."""
    base = EVAL_DRAW_BASE + stage_index * 100_000
    hb_scores = []
    room = stage_cfg.model.max_model_len - stage_cfg.rollout.max_tokens
    for i, ex in enumerate(pools.eval_healthbench):
        ids = apply_chat_template(roles.tokenizer, [{"role": t.role, "content": t.content} for t in ex.messages])
        if len(ids) > room:  # the same examples are skipped at every stage: scores stay comparable
            continue
        sample = (await roles.generate(f"{base + i}/eval", ids, 1, base + i))[0]
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

"""What one draw of a ``rule`` or ``rubric`` stage becomes: a prompt, G replies, a judged group.

Read top-down: :func:`single_turn_group` picks the task for the draw's stage
kind and source; each task builds its prompt, samples G replies and scores
them (:mod:`verimed.core.tasks.groups`). Multi-turn draws go through
:func:`verimed.core.tasks.dialogue.dialogue_slices` (one group per slice).

    result = await single_turn_group(roles, stage, stage_cfg, item, draw)
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import msgspec
import numpy as np

from verimed.core.config import Config, StageConfig
from verimed.core.simulator import sample_persona
from verimed.core.tasks.answers import check_diagnosis, check_mcq, format_reward
from verimed.core.tasks.groups import GroupResult, Roles, group_uid, judge_group, prompt_ids, scored_group
from verimed.core.tasks.prompts import DOCTOR_SYSTEM_PROMPT, diagnosis_prompt, mcq_prompt
from verimed.core.tasks.schedule import Draw
from verimed.core.types import Case, Prompt, Turn


async def single_turn_group(roles: Roles, stage: StageConfig, stage_cfg: Config, item: Any, draw: Draw) -> GroupResult:
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


async def rule_group(roles: Roles, cfg: Config, prompt: Prompt, draw: int, correct: Callable[[str], bool],
                     format_weight: float) -> GroupResult:
    """A verifiable group: G replies to ``prompt``; reward = correct(text) + format_weight * format_reward(text).

    ``correct``: ``str -> bool`` (``check_diagnosis`` / ``check_mcq`` bound to the gold answer).
    ``Group.rubric_scores`` hold the 0/1 correctness (the stage's accuracy).
    """
    samples = await roles.generate(group_uid(draw), prompt_ids(roles.tokenizer, prompt.messages),
                                   cfg.rollout.group_size, cfg.run.seed + draw * 1000, rollout=cfg.rollout)
    # Checking G replies is regex work (~0.2 ms a reply): in a worker thread, so that a burst of
    # groups finishing together is not one long turn of the controller's event loop (bench/scale.py).
    return await asyncio.to_thread(_rule_scored, cfg, prompt, samples, correct, format_weight)


def _rule_scored(cfg: Config, prompt: Prompt, samples: list, correct: Callable[[str], bool],
                 format_weight: float) -> GroupResult:
    accuracy = np.asarray([1.0 if correct(s.text) else 0.0 for s in samples])
    scores = accuracy + format_weight * np.asarray([format_reward(s.text) for s in samples])
    return scored_group(cfg, prompt, samples, scores, reported_scores=accuracy)


async def consultation_group(roles: Roles, cfg: Config, case: Case, draw: int) -> GroupResult:
    """The consultation task (paper stage 3, first slice): the simulated patient opens, the policy
    plays the doctor, G candidate replies are graded against rubrics generated for this case."""
    persona = sample_persona(cfg.run.seed * 1_000_003 + draw, case, mbti=cfg.simulator.persona)
    opening = await roles.simulator.start(f"draw-{draw}", case, persona)
    await roles.simulator.close(f"draw-{draw}")  # single-turn: the session is not continued
    messages = [Turn(role="system", content=DOCTOR_SYSTEM_PROMPT), Turn(role="user", content=opening)]
    prompt = Prompt(index=draw, source="cases", messages=messages, case_id=case.case_id)
    rubric = await roles.rubrics.generate(case, messages)
    prompt = msgspec.structs.replace(prompt, rubric=rubric)
    t0 = time.perf_counter()
    samples = await roles.generate(group_uid(draw), prompt_ids(roles.tokenizer, messages), cfg.rollout.group_size,
                                   cfg.run.seed + draw * 1000, rollout=cfg.rollout)
    t1 = time.perf_counter()
    result = await judge_group(roles, cfg, prompt, samples)
    result.seconds = {"generate": t1 - t0, "judge": time.perf_counter() - t1}
    return result


async def rubric_group(roles: Roles, cfg: Config, prompt: Prompt, draw: int, case: Case | None = None,
                       rubrics: str = "own_or_generated") -> GroupResult:
    """An open-ended group graded by the prompt's own rubric, or by one generated for ``case``."""
    if rubrics == "generated" or not prompt.rubric:
        if case is None:
            raise ValueError(f"prompt {prompt.source}:{prompt.index} has no rubric and no case to generate one from")
        prompt = msgspec.structs.replace(prompt, rubric=await roles.rubrics.generate(case, prompt.messages))
    samples = await roles.generate(group_uid(draw), prompt_ids(roles.tokenizer, prompt.messages),
                                   cfg.rollout.group_size, cfg.run.seed + draw * 1000, rollout=cfg.rollout)
    return await judge_group(roles, cfg, prompt, samples)

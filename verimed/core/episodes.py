"""One unit of controller work: draw -> converse -> generate G replies -> judge -> a :class:`Group`.

Ray-free: the roles are any objects with the async methods below, so tests
pass in-process cores and the controller passes actor handles wrapped by
``verimed.actors.controller.Remote``.

- ``simulator.start(session_id, case, persona) -> str`` (patient opening)
- ``rubrics.generate(case, dialogue) -> list[RubricItem]``
- ``judge.judge(conversation, response, items) -> list[Judgement]``
- ``generate(uid_prefix, prompt_ids, n, seed) -> list[Sample]`` (engine router)

The consultation task (paper stage 3, first slice): the simulated patient
opens the consultation, the policy plays the doctor, G candidate replies are
graded against rubrics the generator wrote for this case and slice.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

import msgspec
import numpy as np

from verimed.core import grpo
from verimed.core.config import Config
from verimed.core.models import apply_chat_template
from verimed.core.rubrics.scoring import training_reward
from verimed.core.simulator import sample_persona
from verimed.core.types import Case, Group, Prompt, Sample, Turn

DOCTOR_SYSTEM_PROMPT = (
    "You are a careful, empathetic physician in a consultation. Ask focused questions about the "
    "history, examine or order tests when needed, explain the most likely diagnosis and a plan, "
    "and tell the patient when to seek urgent care."
)

Generate = Callable[[str, list[int], int, int], Awaitable[list[Sample]]]


class Roles(msgspec.Struct):
    simulator: Any
    rubrics: Any
    judge: Any
    generate: Generate
    tokenizer: Any


class GroupResult(msgspec.Struct):
    group: Group
    advantages: np.ndarray
    kept: bool  # False when dynamic sampling drops it (all rewards equal)
    seconds: dict[str, float] = {}  # wall time of this group's phases: generate, judge, ...


def group_uid(draw: int, group: int = 0) -> str:
    """Sample uids are "<draw>/<group>/<sample>"; the draw number indexes the dataset cursor."""
    return f"{draw}/{group}"


async def consultation_group(roles: Roles, cfg: Config, case: Case, draw: int) -> GroupResult:
    persona = sample_persona(cfg.run.seed * 1_000_003 + draw, case, mbti=cfg.simulator.persona)
    opening = await roles.simulator.start(f"draw-{draw}", case, persona)
    await roles.simulator.close(f"draw-{draw}")  # single-turn: the session is not continued
    messages = [Turn(role="system", content=DOCTOR_SYSTEM_PROMPT), Turn(role="user", content=opening)]
    prompt = Prompt(index=draw, source="cases", messages=messages, case_id=case.case_id)
    rubric = await roles.rubrics.generate(case, messages)
    prompt = msgspec.structs.replace(prompt, rubric=rubric)
    prompt_ids = apply_chat_template(roles.tokenizer, [{"role": t.role, "content": t.content} for t in messages])
    t0 = time.perf_counter()
    samples = await roles.generate(group_uid(draw), prompt_ids, cfg.rollout.group_size, cfg.run.seed + draw * 1000)
    t1 = time.perf_counter()
    result = await judge_group(roles, cfg, prompt, samples)
    result.seconds = {"generate": t1 - t0, "judge": time.perf_counter() - t1}
    return result


async def judge_group(roles: Roles, cfg: Config, prompt: Prompt, samples: list[Sample]) -> GroupResult:
    """Grade every sample against ``prompt.rubric`` and compute rewards and advantages."""
    judgements = await asyncio.gather(*[roles.judge.judge(prompt.messages, s.text, prompt.rubric) for s in samples])
    scores = np.asarray([training_reward(prompt.rubric, j) for j in judgements], dtype=np.float64)
    lengths = np.asarray([len(s.response_ids) for s in samples])
    rewards, advantages = grpo.group_rewards_and_advantages(scores, lengths, cfg.grpo)
    samples = [msgspec.structs.replace(s, reward=float(r), judgements=j) for s, r, j in zip(samples, rewards, judgements)]
    group = Group(prompt=prompt, samples=samples, rewards=[float(r) for r in rewards], rubric_scores=scores.tolist())
    kept = grpo.keep_group(rewards) if cfg.grpo.dynamic_sampling else True
    return GroupResult(group=group, advantages=np.asarray(advantages, dtype=np.float32), kept=kept)

"""The bottom of a draw's path: what every task shares — the roles it calls, the judged group it returns.

Ray-free: the roles are any objects with the async methods below, so tests
pass in-process cores and the controller passes actor handles wrapped by
``verimed.actors.controller.Remote``.

- ``simulator.start(session_id, case, persona) -> str`` (patient opening)
- ``rubrics.generate(case, dialogue) -> list[RubricItem]``
- ``judge.judge(conversation, response, items) -> list[Judgement]``; optionally
  ``judge.judge_many([(conversation, response, items), ...]) -> list[list[Judgement]]`` (one call per group)
- ``generate(uid_prefix, prompt_ids, n, seed, rollout=RolloutConfig) -> list[Sample]`` (engine router;
  ``rollout``: the stage's sampling settings — max_tokens, temperature, top_p)

A task (``single_turn.py``, ``dialogue.py``) builds a prompt, samples G
replies and hands their scores to :func:`scored_group` (verifiable answers) or
:func:`judge_group` (rubrics), which compute rewards and advantages.
"""
from __future__ import annotations

import asyncio
import functools
from typing import Any, Awaitable, Callable, Sequence

import msgspec
import numpy as np

from verimed.core.config import Config
from verimed.core.models import apply_chat_template
from verimed.core.rl.advantages import group_rewards_and_advantages, keep_group
from verimed.core.rubrics.scoring import training_reward
from verimed.core.types import Group, Judgement, Prompt, Sample, Turn

Generate = Callable[..., Awaitable[list[Sample]]]  # (uid_prefix, prompt_ids, n, seed, rollout=...)


class Roles(msgspec.Struct):
    simulator: Any
    rubrics: Any
    judge: Any
    generate: Generate
    tokenizer: Any


class GroupResult(msgspec.Struct, gc=False):
    group: Group
    advantages: np.ndarray
    kept: bool  # False when dynamic sampling drops it (all rewards equal)
    seconds: dict[str, float] = {}  # wall time of this group's phases: generate, judge, ...


def group_uid(draw: int, group: int = 0) -> str:
    """Sample uids are "<draw>/<group>/<sample>"; the draw number indexes the dataset cursor."""
    return f"{draw}/{group}"


def prompt_ids(tokenizer: Any, messages: Sequence[Turn]) -> list[int]:
    """Chat-template token ids of ``messages`` with the generation prompt (the engine's input).

    Memoised per (tokenizer, roles and contents): a dataset's prompts recur every epoch, and the
    template + tokenisation was a few ms per group in the controller (bench/scale.py). A copy is
    returned, so a caller may keep or change its list.
    """
    turns = tuple((t.role, t.content) for t in messages)
    try:
        hash(tokenizer)
    except TypeError:  # a tokenizer that cannot key a cache (a test double): encode every time
        return list(_prompt_ids.__wrapped__(tokenizer, turns))
    return list(_prompt_ids(tokenizer, turns))


@functools.lru_cache(maxsize=4096)
def _prompt_ids(tokenizer: Any, turns: tuple[tuple[str, str], ...]) -> tuple[int, ...]:
    return tuple(apply_chat_template(tokenizer, [{"role": role, "content": content} for role, content in turns]))


async def judge_group(roles: Roles, cfg: Config, prompt: Prompt, samples: list[Sample]) -> GroupResult:
    """Grade every sample against ``prompt.rubric``, then :func:`scored_group` with the rubric scores.

    A judge with ``judge_many`` (the verifier actor) grades the whole group in one call: one
    round trip per group instead of G, the conversation and rubric sent once.
    """
    many = getattr(roles.judge, "judge_many", None)
    if many is not None:
        judgements = await many([(prompt.messages, s.text, prompt.rubric) for s in samples])
        if len(judgements) != len(samples):
            raise RuntimeError(f"judge_many returned {len(judgements)} judgements for {len(samples)} samples")
    else:
        judgements = await asyncio.gather(*[roles.judge.judge(prompt.messages, s.text, prompt.rubric) for s in samples])
    scores = np.asarray([training_reward(prompt.rubric, j) for j in judgements], dtype=np.float64)
    return scored_group(cfg, prompt, samples, scores, judgements)


def scored_group(cfg: Config, prompt: Prompt, samples: list[Sample], scores: np.ndarray,
                 judgements: Sequence[list[Judgement]] | None = None,
                 reported_scores: np.ndarray | None = None) -> GroupResult:
    """The group of ``samples`` with rewards and advantages from their ``scores`` [G] (DESIGN §3).

    ``Group.rubric_scores`` records ``reported_scores`` (default: ``scores``), e.g.
    the rule stage's 0/1 accuracy without its format bonus.
    """
    lengths = np.asarray([len(s.response_ids) for s in samples])
    rewards, advantages = group_rewards_and_advantages(scores, lengths, cfg.grpo)
    judged = judgements if judgements is not None else [None] * len(samples)
    samples = [msgspec.structs.replace(s, reward=float(r), **({"judgements": j} if j is not None else {}))
               for s, r, j in zip(samples, rewards, judged)]
    group = Group(prompt=prompt, samples=samples, rewards=[float(r) for r in rewards], rubric_scores=(scores if reported_scores is None else reported_scores).tolist())
    kept = keep_group(rewards) if cfg.grpo.dynamic_sampling else True
    return GroupResult(group=group, advantages=np.asarray(advantages, dtype=np.float32), kept=kept)

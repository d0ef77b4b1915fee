"""Verifier actor: a thin Ray shell over :func:`verimed.core.emulate.roles.make_judge`
(:func:`verimed.core.rubrics.make_judge`, or the emulated judge over emulated engines).

    judge = VerifierActor.remote(cfg.judge, llm_client)   # llm_client: None for the rules judge
    judgements = await judge.judge.remote(conversation, response, items)

All logic (templates, parsing, retries, scoring inputs) lives in
``verimed.core.rubrics`` and is tested without Ray.
"""
from __future__ import annotations

from typing import Any

import ray

from verimed.actors.logs import redirect_output
from verimed.core.emulate.roles import make_judge
from verimed.core.rollout.llm import client_stats
from verimed.core.types import Judgement, RubricItem, Turn


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=2)
class VerifierActor:
    def __init__(self, cfg: Any, llm: Any = None):
        redirect_output()  # first: all later output, child processes included, goes to its log file
        self.llm = llm
        # An unreachable judge LLM raises (JudgeUnavailable) instead of grading the item "ungradable":
        # the controller re-runs the draw with backoff rather than train on a reward without verdicts.
        self.judge_impl = make_judge(cfg, llm, on_client_error="raise")

    async def judge(self, conversation: list[Turn], response: str, items: list[RubricItem]) -> list[Judgement]:
        return await self.judge_impl.judge(conversation, response, items)

    async def judge_many(self, requests: list[tuple[list[Turn], str, list[RubricItem]]]) -> list[list[Judgement]]:
        """Several responses in one call (a whole group: one round trip, shared prefix)."""
        import asyncio

        return list(await asyncio.gather(*(self.judge_impl.judge(c, r, i) for c, r, i in requests)))

    def stats(self) -> dict[str, int]:
        return dict(self.judge_impl.stats)

    def llm_stats(self) -> dict[str, int]:
        """This role's LLM client counters (calls, tokens, retries, errors)."""
        return client_stats(self.llm)

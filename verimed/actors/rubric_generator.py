"""Rubric generator actor: a thin Ray shell over
:func:`verimed.core.emulate.roles.make_generator` (:func:`verimed.core.rubrics.make_generator`,
or the emulated generator over emulated engines; cache per (case, slice) inside).

    gen = RubricGeneratorActor.remote(cfg.rubrics, llm_client)  # llm_client: None for "case"
    items = await gen.generate.remote(case, dialogue)
"""
from __future__ import annotations

from typing import Any

import ray

from verimed.actors.logs import redirect_output
from verimed.core.emulate.roles import make_generator
from verimed.core.rollout.llm import client_stats
from verimed.core.types import Case, RubricItem, Turn


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=2)
class RubricGeneratorActor:
    def __init__(self, cfg: Any, llm: Any = None):
        redirect_output()  # first: all later output, child processes included, goes to its log file
        self.llm = llm
        self.generator = make_generator(cfg, llm)

    async def generate(self, case: Case, dialogue: list[Turn]) -> list[RubricItem]:
        return await self.generator.generate(case, dialogue)

    def stats(self) -> dict[str, int]:
        return dict(self.generator.stats)

    def llm_stats(self) -> dict[str, int]:
        """This role's LLM client counters (calls, tokens, retries, errors)."""
        return client_stats(self.llm)

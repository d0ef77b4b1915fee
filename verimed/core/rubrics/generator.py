"""Rubric generators: ``case`` (deterministic, from the case's facts) and
``llm`` (prompted, JSON output validated and retried), both cached per
(case id, dialogue-slice hash).

    gen = make_generator(cfg.rubrics, llm=client)      # cfg.rubrics: RubricConfig
    items = await gen.generate(case, dialogue)          # list[RubricItem]

LLM output is parsed leniently, points must be integral and in [-10, 10],
duplicates are merged, at least one negative item and every required
dimension must be present. Invalid output is re-asked with the list of
problems (``max_retries`` times) and then reported: ``RubricGenerationError``
is raised (``on_failure="raise"``) or the case rubric is used and the failure
counted in ``stats`` (``on_failure="case"``); it is never silently dropped.
"""
from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any, Literal, Sequence

from verimed.core.rollout.llm import LLMClient, is_emulated, role_defaults  # LLMClient: re-exported for the judge
from verimed.core.rubrics.case_rubrics import case_rubric
from verimed.core.rubrics.model import (
    DIMENSIONS, RubricError, check_dimensions, dialogue_hash, make_item, merge_duplicates, validate_rubric,
)
from verimed.core.rubrics.parse import json_candidates
from verimed.core.rubrics.prompts import GENERATOR_FIX, generator_prompt
from verimed.core.types import Case, RubricItem, Turn

log = logging.getLogger(__name__)

# Dimensions an llm rubric must cover unless configured otherwise.
DEFAULT_REQUIRED = ("diagnostic_accuracy", "consultation_logic", "ethics_safety")


class RubricGenerationError(RuntimeError):
    """The llm backend produced no valid rubric after all retries."""

    def __init__(self, case_id: str, attempts: int, problems: list[str], last_output: str):
        self.case_id, self.attempts, self.problems, self.last_output = case_id, attempts, problems, last_output
        super().__init__(f"{case_id}: no valid rubric after {attempts} attempts: " + "; ".join(problems[:5]))


class CachedGenerator:
    """Base: an LRU cache per (case_id, slice hash) with in-flight de-duplication."""

    def __init__(self, cache_size: int = 4096):
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], list[RubricItem]] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Future] = {}
        self.stats = {"requests": 0, "cache_hits": 0, "generated": 0, "retries": 0, "failures": 0}

    async def generate(self, case: Case, dialogue: Sequence[Turn]) -> list[RubricItem]:
        key = (case.case_id, dialogue_hash(dialogue))
        self.stats["requests"] += 1
        if key in self._cache:
            self.stats["cache_hits"] += 1
            self._cache.move_to_end(key)
            return list(self._cache[key])
        if key in self._inflight:  # same slice requested concurrently: share one generation
            self.stats["cache_hits"] += 1
            return list(await asyncio.shield(self._inflight[key]))
        future = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            items = await self._generate(case, list(dialogue))
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
                future.exception()  # mark retrieved: waiters (if any) re-raise it themselves
            raise
        finally:
            self._inflight.pop(key, None)
        future.set_result(items)
        self.stats["generated"] += 1
        self._cache[key] = items
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return list(items)

    async def _generate(self, case: Case, dialogue: list[Turn]) -> list[RubricItem]:
        raise NotImplementedError


class CaseRubricGenerator(CachedGenerator):
    """Deterministic rubrics from the case's facts (see ``case_rubrics``)."""

    async def _generate(self, case: Case, dialogue: list[Turn]) -> list[RubricItem]:
        return case_rubric(case, dialogue)


def items_from_llm_output(text: str) -> tuple[list[RubricItem], list[str]]:
    """Parse a JSON array of ``{criterion, points, dimension}`` -> (items, problems).

    Points must be integral numbers (5 and 5.0 are fine, "5" or 5.5 are not);
    items that fail are reported in ``problems`` and left out.
    """
    arrays = [a for a in json_candidates(text, "[") if isinstance(a, list) and a]
    if not arrays:
        objects = [o for o in json_candidates(text, "{") if isinstance(o, dict)]
        wrapped = [o.get("rubric") or o.get("items") for o in objects]
        arrays = [w for w in wrapped if isinstance(w, list)] or ([objects] if objects else [])
    if not arrays:
        return [], ["output contains no JSON array of rubric items"]
    items: list[RubricItem] = []
    problems: list[str] = []
    for i, raw in enumerate(arrays[0]):
        item, problem = _item_from_raw(raw, i)
        if problem:
            problems.append(problem)
        else:
            items.append(item)
    return items, problems


def _item_from_raw(raw: Any, i: int) -> tuple[RubricItem | None, str | None]:
    if not isinstance(raw, dict):
        return None, f"item {i}: expected an object"
    criterion, points, dim = raw.get("criterion"), raw.get("points"), raw.get("dimension")
    if not isinstance(criterion, str) or not criterion.strip():
        return None, f"item {i}: missing criterion"
    if isinstance(points, bool) or not isinstance(points, (int, float)) or points != int(points):
        return None, f"item {i}: points must be an integer, got {points!r}"
    if not -10 <= points <= 10 or points == 0:
        return None, f"item {i}: points must be a non-zero integer in [-10, 10], got {points!r}"
    if not isinstance(dim, str) or dim.strip().lower().replace(" ", "_") not in DIMENSIONS:
        return None, f"item {i}: dimension must be one of {', '.join(DIMENSIONS)}, got {dim!r}"
    return make_item(criterion, int(points), dim.strip().lower().replace(" ", "_"), ["source:llm"]), None


class LLMRubricGenerator(CachedGenerator):
    """Prompted rubric generation with validation, feedback retries and reporting."""

    def __init__(self, llm: LLMClient, max_retries: int = 2, required_dimensions: Sequence[str] = DEFAULT_REQUIRED,
                 on_failure: Literal["raise", "case"] = "raise", max_tokens: int | None = 1024, cache_size: int = 4096,
                 temperature: float | None = None):
        super().__init__(cache_size)
        if on_failure not in ("raise", "case"):
            raise ValueError(f"on_failure must be 'raise' or 'case', got {on_failure!r}")
        default_tokens, default_temperature = role_defaults(llm)  # llm.max_tokens / llm.temperature
        self.llm, self.max_retries, self.on_failure = llm, max_retries, on_failure
        self.max_tokens = default_tokens if max_tokens is None else max_tokens
        self.temperature = default_temperature if temperature is None else temperature
        self.required = check_dimensions(required_dimensions)
        self.failures: list[RubricGenerationError] = []  # every reported failure, for the run's metrics

    def first_messages(self, case: Case, dialogue: list[Turn]) -> list[dict[str, str]]:
        """The first request for (case, dialogue); a retry appends the reply and the problems found."""
        return [{"role": "user", "content": generator_prompt(case, dialogue, self.required)}]

    async def ask(self, case: Case, messages: list[dict[str, str]]) -> str:
        """One call with this role's budget, temperature and the case's affinity key."""
        return await self.llm.chat(messages, max_tokens=self.max_tokens, temperature=self.temperature,
                                   affinity_key=f"rubric:{case.case_id}")

    async def _generate(self, case: Case, dialogue: list[Turn]) -> list[RubricItem]:
        messages = self.first_messages(case, dialogue)
        problems: list[str] = []
        output = ""
        for attempt in range(1 + self.max_retries):
            if attempt:
                self.stats["retries"] += 1
                messages += [{"role": "assistant", "content": output},
                             {"role": "user", "content": GENERATOR_FIX.format(problems="\n- ".join(problems[:10]))}]
            output = await self.ask(case, messages)
            items, problems = items_from_llm_output(output)
            items = merge_duplicates(items)
            problems += validate_rubric(items, self.required) if items else []
            if not problems:
                return items
        self.stats["failures"] += 1
        error = RubricGenerationError(case.case_id, 1 + self.max_retries, problems, output)
        self.failures.append(error)
        log.warning("rubric generation failed: %s", error)
        if self.on_failure == "raise":
            raise error
        return case_rubric(case, dialogue)


def make_generator(cfg: Any, llm: LLMClient | None = None) -> CachedGenerator:
    """The generator chosen by ``cfg.generator`` (RubricConfig): "case" or "llm"."""
    kind = getattr(cfg, "generator", None)
    if kind == "case":
        return CaseRubricGenerator()
    if kind == "llm":
        if llm is None:
            raise ValueError("rubrics.generator=llm needs an LLM client (configure the `llm` section)")
        if is_emulated(llm):  # its engines answer filler, which never validates
            raise ValueError("rubrics.generator=llm with an emulated client (rollout.backend=emulated): build the "
                             "generator with verimed.core.emulate.roles.make_generator")
        return LLMRubricGenerator(
            llm, max_retries=cfg.max_retries,
            required_dimensions=getattr(cfg, "required_dimensions", DEFAULT_REQUIRED),
            on_failure=getattr(cfg, "on_failure", "raise"), max_tokens=getattr(cfg, "max_tokens", 1024),
        )
    raise ValueError(f"rubrics.generator must be 'case' or 'llm', got {kind!r}")


__all__ = [
    "CaseRubricGenerator", "LLMRubricGenerator", "RubricGenerationError", "RubricError", "make_generator",
    "items_from_llm_output", "LLMClient",
]

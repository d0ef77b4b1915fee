"""Rubric judges: the LLM judge (one prompt per item, positive/negative
templates, lenient parsing, bounded retries) and the deterministic rules judge.

    judge = make_judge(cfg.judge, llm=client)                       # JudgeConfig
    judgements = await judge.judge(conversation, response, items)  # list[Judgement]

All items of a response are sent at once (``asyncio.gather``, bounded by
``concurrency``) with an ``affinity_key`` = hash of the conversation before the
response, so every item of every response to the same prompt lands on the same
engine and reuses its KV cache for the shared prefix. An item whose output
still cannot be parsed after ``max_retries`` re-asks (or whose client call
keeps failing) gets ``met=None``: it is counted in ``stats["ungradable"]`` and
left out of that response's normaliser by ``scoring``; the run goes on.
With ``on_client_error="raise"`` (training: the verifier actor) an item whose
last attempt still failed to reach the LLM raises :class:`JudgeUnavailable`
instead: an outage is not a verdict, and a reward computed without it would
train on it (the controller re-runs the draw with backoff).
Every judgement keeps the raw output it was read from (``Judgement.raw``).

Budget and temperature: ``judge.max_tokens`` when set, else the client's
``llm.max_tokens``; the temperature is ``llm.temperature`` (greedy by default).
Clients that support it are asked for structured output (a JSON schema with the
template's verdict key); the lenient parser reads whatever comes back.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

from verimed.core.rollout.llm import is_emulated, role_defaults
from verimed.core.rubrics.generator import LLMClient
from verimed.core.rubrics.model import dialogue_hash
from verimed.core.rubrics.parse import UNGRADABLE, parse_verdict
from verimed.core.rubrics.prompts import judge_prompt
from verimed.core.rubrics.rules import RulesJudge
from verimed.core.types import Judgement, RubricItem, Turn

log = logging.getLogger(__name__)


class JudgeUnavailable(RuntimeError):
    """The judge's LLM could not be reached for an item after every attempt (``on_client_error="raise"``)."""


ON_CLIENT_ERROR = ("ungradable", "raise")


class LLMJudge:
    """Grades each rubric item with one LLM call (plus retries).

    ``on_client_error``: what an item whose last attempt failed with a client error
    (network, HTTP status, a dead engine) becomes: ``"ungradable"`` (met=None,
    counted; evaluation reports) or ``"raise"`` (:class:`JudgeUnavailable`; training).
    """

    # One reply -> (verdict or UNGRADABLE, explanation). The emulated judge
    # (verimed.core.emulate.roles) reads every reply as gradable: its verdicts
    # come from the rules judge, the reply only carries the timing.
    read_verdict = staticmethod(parse_verdict)

    def __init__(self, llm: LLMClient, max_retries: int = 2, max_tokens: int | None = None, concurrency: int = 64,
                 temperature: float | None = None, on_client_error: str = "ungradable"):
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if on_client_error not in ON_CLIENT_ERROR:
            raise ValueError(f"on_client_error must be one of {ON_CLIENT_ERROR}, got {on_client_error!r}")
        self.on_client_error = on_client_error
        default_tokens, default_temperature = role_defaults(llm)
        self.llm, self.max_retries = llm, max_retries
        self.max_tokens = default_tokens if max_tokens is None else max_tokens
        self.temperature = default_temperature if temperature is None else temperature
        self.concurrency = concurrency
        self._slots: dict[int, asyncio.Semaphore] = {}  # per event loop (a semaphore binds to one loop)
        self.stats = {"items": 0, "calls": 0, "retries": 0, "ungradable": 0, "client_errors": 0, "unavailable": 0}

    async def judge(self, conversation: Sequence[Turn], response: str, items: Sequence[RubricItem]) -> list[Judgement]:
        key = "judge:" + dialogue_hash(conversation)
        return list(await asyncio.gather(*(self._one(conversation, response, i, item, key)
                                           for i, item in enumerate(items))))

    async def _call(self, prompt: str, key: str, verdict_key: str) -> str:
        messages = [{"role": "user", "content": prompt}]
        kwargs: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature, "affinity_key": key}
        if getattr(self.llm, "supports_json_schema", False):
            kwargs["json_schema"] = verdict_schema(verdict_key)
        if self.concurrency <= 0:
            return await self.llm.chat(messages, **kwargs)
        loop_id = id(asyncio.get_running_loop())
        if loop_id not in self._slots:
            self._slots = {loop_id: asyncio.Semaphore(self.concurrency)}
        async with self._slots[loop_id]:
            return await self.llm.chat(messages, **kwargs)

    async def _one(self, conversation: Sequence[Turn], response: str, index: int, item: RubricItem,
                   key: str) -> Judgement:
        self.stats["items"] += 1
        last = ""
        attempts = 0
        client_error = False  # whether the last attempt failed to reach the LLM
        for attempt in range(1 + self.max_retries):
            attempts = attempt + 1
            if attempt:
                self.stats["retries"] += 1
            self.stats["calls"] += 1
            try:
                output = await self._call(judge_prompt(conversation, response, item, retry=attempt > 0), key,
                                          "criteria_met" if item.points > 0 else "present")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a flaky backend must not kill a training run: retry, then count
                self.stats["client_errors"] += 1
                log.warning("judge call failed (item %d, attempt %d): %r", index, attempts, exc)
                last = f"client error: {exc!r}"
                client_error = True
                continue
            client_error = False
            verdict, explanation = self.read_verdict(output)
            if verdict != UNGRADABLE:
                return Judgement(item_index=index, met=bool(verdict), explanation=explanation, attempts=attempts,
                                 raw=output)
            last = output
        if client_error and self.on_client_error == "raise":
            self.stats["unavailable"] += 1
            raise JudgeUnavailable(f"judge LLM unreachable for item {index} after {attempts} attempt(s): {last[:200]}")
        self.stats["ungradable"] += 1
        return Judgement(item_index=index, met=None, explanation=f"ungradable: {last[:200]}", attempts=attempts,
                         raw=last)


def verdict_schema(verdict_key: str) -> dict[str, Any]:
    """The structured-output schema of one judge answer (the template's verdict key)."""
    return {"type": "object", "additionalProperties": False, "required": ["explanation", verdict_key],
            "properties": {"explanation": {"type": "string"}, verdict_key: {"type": "boolean"}}}


def make_judge(cfg: Any, llm: LLMClient | None = None, on_client_error: str = "ungradable") -> LLMJudge | RulesJudge:
    """The judge chosen by ``cfg.backend`` (JudgeConfig): "rules" or "llm" (``on_client_error``: see LLMJudge)."""
    backend = getattr(cfg, "backend", None)
    if backend == "rules":
        return RulesJudge()
    if backend == "llm":
        if llm is None:
            raise ValueError("judge.backend=llm needs an LLM client (configure the `llm` section)")
        if is_emulated(llm):  # its engines answer filler, which never parses
            raise ValueError("judge.backend=llm with an emulated client (rollout.backend=emulated): build the "
                             "judge with verimed.core.emulate.roles.make_judge")
        return LLMJudge(llm, max_retries=cfg.max_retries, max_tokens=getattr(cfg, "max_tokens", None),
                        concurrency=getattr(cfg, "max_concurrency", 64), on_client_error=on_client_error)
    raise ValueError(f"judge.backend must be 'rules' or 'llm', got {backend!r}")

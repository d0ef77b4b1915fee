"""Emulated LLM roles: the content of the rules backends, the timing of the LLM.

Under ``rollout.backend: emulated`` the engine groups that serve ``llm.type: vllm``
or ``policy`` wait the modelled prefill + decode time of each call and answer
filler text, which no LLM role can parse. A role whose client is emulated
(``RoleClient.emulated``, set by the controller) therefore takes its *content*
from its rules backend (deterministic, cheap) and its *timing* from the LLM: it
sends every prompt the LLM backend would send, built by that backend's own
prompt functions (so prompt lengths are real), with the role's ``max_tokens``,
waits for the reply and discards it.

    content(role, inputs) = the rules backend's answer for the same inputs
    latency(role, inputs) = the LLM backend's call pattern over the emulated engines
                            (+ the rules backend's CPU time: milliseconds against seconds)

The calls, as the LLM backends make them (re-asks after unparseable output
aside: nothing is parsed; retries after client errors kept):

- judge: one per rubric item of every response, concurrently (``LLMJudge``);
- simulator: per patient turn, in sequence, the gate (skipped when the turn
  limit or the doctor's closing decides), the draft, the review (``LLMBackend``);
- rubric generator: one per (case, dialogue slice) missing from its cache.

Client errors are handled as the LLM backend handles them: the judge retries,
counts, and marks the item ungradable; the simulator counts an ``LLMError`` and
falls back (any other error is raised); the generator raises.

    judge = make_judge(cfg.judge, llm)            # EmulatedJudge when llm.emulated and judge.backend=llm
    generator = make_generator(cfg.rubrics, llm)  # EmulatedRubricGenerator, likewise
    backend = make_backend(cfg.simulator, llm)    # EmulatedSimulatorBackend, likewise
    # otherwise: verimed.core.rubrics.make_judge / make_generator, verimed.core.simulator.make_backend
"""
from __future__ import annotations

from typing import Any, Sequence

import msgspec

from verimed.core.rollout.llm import LLMClient, is_emulated
from verimed.core.rubrics import generator as rubric_generators
from verimed.core.rubrics import judge as rubric_judges
from verimed.core.rubrics.case_rubrics import case_rubric
from verimed.core.rubrics.generator import DEFAULT_REQUIRED, CachedGenerator, LLMRubricGenerator
from verimed.core.rubrics.judge import LLMJudge
from verimed.core.rubrics.rules import RulesJudge
from verimed.core.simulator import factory as simulator_factory
from verimed.core.simulator.backend import SimulatorBackend, TurnContext
from verimed.core.simulator.llm import LLMBackend
from verimed.core.types import Case, Judgement, RubricItem, Turn

TIMING_ONLY = "emulated: the verdict comes from the rules judge"


def _any_reply_is_gradable(output: str) -> tuple[bool, str]:
    """The emulated judge's reader: a reply (filler) only marks its call as answered."""
    return True, TIMING_ONLY


class EmulatedJudge(LLMJudge):
    """The LLM judge's calls, the rules judge's verdicts.

    For item i of a response, with r_i the rules judgement and c_i the outcome of
    the LLM judge's calls for it (one call, retried only after client errors):

        judgement_i = r_i with attempts = c_i.attempts   if some call for item i answered
                    = c_i (met=None, counted ungradable)  if every attempt failed

    ``stats`` are the LLM judge's (items, calls, retries, ungradable, client_errors).
    """

    read_verdict = staticmethod(_any_reply_is_gradable)

    def __init__(self, llm: LLMClient, rules: RulesJudge | None = None, **llm_judge_settings: Any):
        super().__init__(llm, **llm_judge_settings)
        self.rules = RulesJudge() if rules is None else rules

    async def judge(self, conversation: Sequence[Turn], response: str, items: Sequence[RubricItem]) -> list[Judgement]:
        ruled = self.rules.judge_sync(conversation, response, items)
        timed = await super().judge(conversation, response, items)
        return [msgspec.structs.replace(rule, attempts=call.attempts) if call.met is not None else call
                for rule, call in zip(ruled, timed)]


class EmulatedRubricGenerator(LLMRubricGenerator):
    """The LLM generator's first request per (case, slice), the case rubric as the answer.

        rubric(case, dialogue) = case_rubric(case, dialogue)   after one call with
                                 LLMRubricGenerator.first_messages(case, dialogue)

    A client error is raised, as the LLM generator raises it; caching and
    in-flight sharing are the base class's, so a cached slice makes no call.
    """

    async def _generate(self, case: Case, dialogue: list[Turn]) -> list[RubricItem]:
        await self.ask(case, self.first_messages(case, dialogue))  # filler: only the wait counts
        return case_rubric(case, dialogue)


class EmulatedSimulatorBackend(LLMBackend):
    """The LLM backend with every reply read as "no answer".

    ``LLMBackend`` falls back, unit by unit, to the rules units when a reply is
    empty (gate: ``rules_gate``; draft: ``render_reply``; review: the rules guard
    of that draft), so every turn makes the LLM backend's calls, with the prompts
    it builds from the rules decision and draft, and says what ``RulesBackend``
    says (tests/test_emulated_roles.py holds the two equal). A client's
    ``LLMError`` is counted in ``failures`` and any other error raised, as there.
    """

    name = "emulated"

    async def _ask(self, ctx: TurnContext, messages: list[dict[str, str]], max_tokens: int | None = None) -> str:
        await super()._ask(ctx, messages, max_tokens)  # filler (or "" after a counted failure): only the wait counts
        return ""


def make_judge(cfg: Any, llm: LLMClient | None = None, on_client_error: str = "ungradable") -> LLMJudge | RulesJudge:
    """``cfg.backend`` (JudgeConfig) "llm" with an emulated client: :class:`EmulatedJudge`
    with the LLM judge's settings; otherwise :func:`verimed.core.rubrics.make_judge`.
    ``on_client_error``: "ungradable" or "raise" (:class:`verimed.core.rubrics.judge.LLMJudge`)."""
    if getattr(cfg, "backend", None) == "llm" and is_emulated(llm):
        return EmulatedJudge(llm, max_retries=cfg.max_retries, max_tokens=getattr(cfg, "max_tokens", None),
                             concurrency=getattr(cfg, "max_concurrency", 64), on_client_error=on_client_error)
    return rubric_judges.make_judge(cfg, llm, on_client_error)


def make_generator(cfg: Any, llm: LLMClient | None = None) -> CachedGenerator:
    """``cfg.generator`` (RubricConfig) "llm" with an emulated client: :class:`EmulatedRubricGenerator`
    with the LLM generator's settings; otherwise :func:`verimed.core.rubrics.make_generator`."""
    if getattr(cfg, "generator", None) == "llm" and is_emulated(llm):
        return EmulatedRubricGenerator(
            llm, max_retries=cfg.max_retries,
            required_dimensions=getattr(cfg, "required_dimensions", DEFAULT_REQUIRED),
            on_failure=getattr(cfg, "on_failure", "raise"), max_tokens=getattr(cfg, "max_tokens", 1024),
        )
    return rubric_generators.make_generator(cfg, llm)


def make_backend(cfg: Any, llm: LLMClient | None = None, embedder: Any = None) -> SimulatorBackend:
    """``cfg.backend`` (SimulatorConfig) "llm" with an emulated client: :class:`EmulatedSimulatorBackend`;
    otherwise :func:`verimed.core.simulator.make_backend`."""
    if cfg.backend == "llm" and is_emulated(llm):
        return EmulatedSimulatorBackend(llm, embedder=embedder)
    return simulator_factory.make_backend(cfg, llm, embedder=embedder)

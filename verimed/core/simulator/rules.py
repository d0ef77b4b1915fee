"""The deterministic ``rules`` backend: retrieval-selected facts in persona-conditioned phrasing.

The affective unit here is :func:`render_reply`: it only ever speaks the
``spoken`` form of the facts the factual unit selected, wrapped in phrases
from the persona's bank (``persona.PHRASES``), which carry no clinical
content. So the rules backend cannot fabricate; its factual review still
runs (and would veto) as a guard. Phrase variants are picked by a hash of
(case, turn, category, persona): replays are identical.
"""
from __future__ import annotations

import zlib

from verimed.core.simulator.backend import SimulatorBackend, TurnContext
from verimed.core.simulator.persona import PHRASES
from verimed.core.simulator.script import Fact, PatientScript
from verimed.core.simulator.units import GateDecision, Review, check_reply, rules_gate
from verimed.core.types import Persona


def phrase(category: str, persona: Persona, key: str) -> str:
    variants = PHRASES[category]
    return variants[zlib.crc32(f"{key}:{category}:{persona.mbti}".encode()) % len(variants)]


def _voice(category_e: str, category_i: str, talkative: bool) -> str:
    return category_e if talkative else category_i


def render_opening(script: PatientScript, persona: Persona) -> str:
    """Greeting + chief complaint in the persona's voice (+ worry if anxious). Never the diagnosis."""
    from verimed.core.simulator.persona import behaviour

    t = behaviour(persona)
    key = f"{script.case.case_id}:0"
    parts = [phrase(_voice("greet_e", "greet_i", t.talkative), persona, key), script["chief_complaint"].spoken]
    if persona.anxiety == "high":
        parts.append(phrase("worry_high", persona, key))
    elif persona.anxiety == "medium" and t.talkative:
        parts.append(phrase("worry_medium", persona, key))
    return " ".join(parts)


def render_reply(ctx: TurnContext, decision: GateDecision) -> str:
    """The affective unit of the rules backend (see module docstring)."""
    p, t, sel = ctx.persona, ctx.traits, ctx.selection
    key = f"{ctx.script.case.case_id}:{ctx.state.turn}"
    say = lambda cat: phrase(cat, p, key)  # noqa: E731 - tiny local helper
    if decision.done:
        closing = [say(_voice("close_e", "close_i", t.talkative))]
        if decision.reason == "diagnosis_and_plan" and p.money_constraint:
            closing.insert(0, say("money"))
        return " ".join(closing)
    parts: list[str] = []
    facts_lines: list[str] = []
    if sel.mode in ("exam", "tests", "ask_results"):
        if sel.mode == "exam":
            parts.append(say(_voice("exam_ok_e", "exam_ok_i", t.talkative)))
        elif sel.mode == "tests":
            parts.append(say("test_ok"))
            if p.money_constraint:
                parts.append(say("money"))
        facts_lines = [f.spoken for f in sel.facts]
        if sel.facts and sel.mode == "ask_results":
            parts.append(say("results_recap"))
        elif not sel.facts and sel.mode == "ask_results":
            parts.append(say("results_ask"))
        elif not sel.facts and sel.mode == "exam":
            parts.append(say("exam_none"))  # the patient's words, not the case file's ("no findings recorded")
        elif not sel.facts and sel.mode == "tests":
            parts.append(say("test_none"))
    elif sel.mode == "answer":
        lead = say("repeat") if sel.repeat else (say("filler_e") if t.talkative else "")
        spoken = " ".join(_lower_first(f.spoken) if i == 0 and lead else f.spoken for i, f in enumerate(sel.facts))
        parts.append(lead + spoken)
        if ctx.state.turn <= 2 and p.anxiety == "high" and t.talkative:
            parts.append(say("worry_high"))
    elif sel.mode == "unknown":
        parts.append(say(_voice("unknown_e", "unknown_i", t.talkative)))
    elif sel.mode == "ask_dx":
        parts.append(say("dx_ask"))
    elif sel.mode == "greeting":
        parts.append(say(_voice("greet_e", "greet_i", t.talkative)))
    parts += _reaction(ctx, say)
    if not any(parts) and not facts_lines:
        parts.append("Okay." if not t.talkative else "Okay, I see.")
    text = " ".join(x for x in parts if x)
    return "\n".join([text, *facts_lines]) if facts_lines else text


def _reaction(ctx: TurnContext, say) -> list[str]:
    """How the persona takes a diagnosis or a plan that did not (yet) close the visit."""
    p, t, intent = ctx.persona, ctx.traits, ctx.intent
    out: list[str] = []
    if intent.diagnosis:
        if p.health_literacy == "low":
            out.append(say("plain_words"))
        if t.asks_treatment:
            out.append(say("treatment_q"))
        elif t.advice == "questions":
            out.append(say("why_q"))
    if intent.plan:
        out.append(say("why_q") if t.advice == "questions" else say("reassure"))
        out.append(say("next_step") if t.wants_plan else say("go_along"))
        if p.money_constraint:
            out.append(say("money"))
    return out


def _lower_first(s: str) -> str:
    return s[:1].lower() + s[1:] if s[:2] != "I " and s[:2] != "I'" else s


class RulesBackend(SimulatorBackend):
    """Deterministic gate + template affective unit + the shared factual guard."""

    name = "rules"

    def __init__(self, embedder=None):
        self.embedder = embedder

    async def gate(self, ctx: TurnContext) -> GateDecision:
        return rules_gate(ctx.intent, ctx.state, ctx.traits, ctx.max_turns)

    async def draft(self, ctx: TurnContext, decision: GateDecision) -> str:
        return render_reply(ctx, decision)

    async def review(self, ctx: TurnContext, decision: GateDecision, draft: str) -> Review:
        return guard(ctx, decision, draft)


def guard(ctx: TurnContext, decision: GateDecision, draft: str) -> Review:
    """Check ``draft``; on problems, rewrite it with the rules renderer, or fall back to a safe line."""
    allowed: list[Fact] = [] if decision.done else ctx.selection.facts
    said = " ".join(t.content for t in ctx.transcript if t.role == "user")
    problems = check_reply(draft, ctx.script, allowed, ctx.state, ctx.intent.text, said)
    if not problems:
        return Review(draft, [], False)
    rewrite = render_reply(ctx, decision)
    if check_reply(rewrite, ctx.script, allowed, ctx.state, ctx.intent.text, said):
        rewrite = phrase(_voice("unknown_e", "unknown_i", ctx.traits.talkative), ctx.persona, ctx.script.case.case_id)
    return Review(rewrite, problems, True)

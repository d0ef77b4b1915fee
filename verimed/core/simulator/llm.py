"""The ``llm`` backend: each unit is a prompt through an ``LLMClient``; the factual unit guards.

Client protocol (``verimed.core.rollout.llm``): ``await client.chat(messages, max_tokens=, temperature=,
affinity_key=) -> str``; a vLLM engine group, an OpenAI-compatible endpoint or the policy engines.

* gate: asks for ``{"done": bool, "reason": ...}``; the turn limit and an explicit
  doctor closing are enforced deterministically; unparseable output falls back
  to the rules gate.
* affective: the patient prompt sees only the facts the factual unit selected
  for this turn (never the diagnosis, never locked results), the persona and the
  dialogue; exam findings / test results are appended verbatim, not re-typed by
  the model.
* factual: the deterministic guard (``units.check_reply``) plus an LLM review
  returning ``{"ok": bool, "problems": [...], "rewrite": "..."}``. A failed draft
  is replaced by the model's rewrite if that passes the guard, else by the
  rules rendering (``vetoed=True`` either way).
All model output is parsed leniently: a malformed answer never crashes a session.
"""
from __future__ import annotations

import json
import re
from typing import Any

from verimed.core.rollout.llm import LLMClient, LLMError
from verimed.core.simulator.backend import SimulatorBackend, TurnContext
from verimed.core.simulator.persona import describe
from verimed.core.simulator.rules import guard, render_reply
from verimed.core.simulator.script import is_report_line
from verimed.core.simulator.units import GateDecision, Review, check_reply, rules_gate

_REASONS = ("diagnosis_and_plan", "patient_satisfied", "doctor_closed", "turn_limit")


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in ``text`` (code fences, prose around it, single quotes tolerated)."""
    text = re.sub(r"```(?:json)?", "", text)
    start = text.find("{")
    while start != -1:
        depth = 0
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                chunk = text[start:end + 1]
                for candidate in (chunk, chunk.replace("'", '"'), re.sub(r"\bTrue\b|\bFalse\b",
                                                                         lambda m: m.group(0).lower(), chunk)):
                    try:
                        value = json.loads(candidate)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(value, dict):
                        return value
                break
        start = text.find("{", start + 1)
    return None


def parse_bool(text: str, key: str) -> bool | None:
    """``key``'s boolean from JSON, or from ``key: yes/no/true/false`` prose; None if absent."""
    obj = parse_json_object(text)
    if obj is not None and isinstance(obj.get(key), bool):
        return obj[key]
    m = re.search(rf"{key}\W{{0,4}}(true|false|yes|no)\b", text, re.IGNORECASE)
    return None if m is None else m.group(1).lower() in ("true", "yes")


def clean_reply(text: str, max_sentences: int = 4) -> str:
    """A model's patient line: role prefixes, quotes and any continued dialogue removed."""
    t = text.strip()
    t = re.split(r"\n\s*(?:doctor|dr\.?|physician|assistant|user)\s*:", t, flags=re.IGNORECASE)[0]
    t = re.sub(r"^\s*(?:patient|me|assistant)\s*:\s*", "", t.strip().strip('"'), flags=re.IGNORECASE)
    t = t.strip().strip('"').strip()
    t = re.sub(r"\*[^*]{0,80}\*|\([^)]{0,60}(?:sigh|pause|nod|smile)[^)]*\)", "", t)  # stage directions
    parts = re.split(r"(?<=[.!?])\s+", " ".join(t.split()))
    return " ".join(parts[:max_sentences]).strip()


class LLMBackend(SimulatorBackend):
    name = "llm"

    def __init__(self, client: LLMClient, embedder=None, max_tokens: int | None = None,
                 temperature: float | None = None):
        self.client = client
        self.embedder = embedder
        # Unset: the client's llm.max_tokens / llm.temperature (a role client carries them).
        self.max_tokens = max_tokens or getattr(client, "max_tokens", None) or 160
        self.temperature = temperature if temperature is not None else getattr(client, "temperature", 0.0)
        self.failures = 0  # client errors absorbed by the rules fallbacks

    async def _ask(self, ctx: TurnContext, messages: list[dict[str, str]], max_tokens: int | None = None) -> str:
        # One affinity key per consultation: every unit's prompt shares the dialogue prefix (KV-cache reuse).
        # A failed call answers "": each unit then falls back to its deterministic rules counterpart.
        try:
            return await self.client.chat(messages, max_tokens=max_tokens or self.max_tokens,
                                          temperature=self.temperature, affinity_key=f"sim:{ctx.script.case.case_id}")
        except LLMError:
            self.failures += 1
            return ""

    # ------------------------------------------------------------- gate

    async def gate(self, ctx: TurnContext) -> GateDecision:
        fallback = rules_gate(ctx.intent, ctx.state, ctx.traits, ctx.max_turns)
        if fallback.reason in ("turn_limit", "doctor_closed"):
            return fallback
        system = (
            "You are the termination gate of a simulated medical consultation. The consultation ends when the "
            "doctor has given a diagnosis AND a treatment or management plan, or when the patient (persona: "
            f"{describe(ctx.persona)}) is satisfied. Answer with JSON only: "
            '{"done": true|false, "reason": "diagnosis_and_plan" | "patient_satisfied" | "continue"}'
        )
        text = await self._ask(ctx, [{"role": "system", "content": system},
                                     {"role": "user", "content": _dialogue(ctx) + "\n\nIs the consultation over?"}], 48)
        done = parse_bool(text, "done")
        if done is None:
            return fallback
        obj = parse_json_object(text) or {}
        reason = str(obj.get("reason", "")) if done else ""
        return GateDecision(done, reason if reason in _REASONS else ("diagnosis_and_plan" if done else ""))

    # ------------------------------------------------------------- affective

    async def draft(self, ctx: TurnContext, decision: GateDecision) -> str:
        sel = ctx.selection
        facts = "\n".join(f"- {f.spoken}" for f in sel.facts if f.kind not in ("exam", "test")) or "- (none)"
        task = {
            "exam": "The doctor is examining you now: agree briefly. Do not describe any findings.",
            "tests": "The doctor is ordering tests: react briefly. Do not state any results.",
            "ask_results": "You do not know any results beyond those listed below: say so if none are listed.",
            "ask_dx": "You do not know your diagnosis: say so; never guess a disease name.",
            "unknown": "You do not know the answer to this question: say you don't know.",
        }.get(sel.mode, "Answer only what was asked, using only the facts below.")
        if decision.done:
            task = "The consultation is ending: thank the doctor briefly in your own style."
        system = (
            f"You are a patient talking to a doctor. Persona: {describe(ctx.persona)}\n"
            f"Speak in the first person{' as the parent of the child' if ctx.script.speaker.is_caregiver else ''}, "
            "in 1-3 short sentences, in your persona's style. Never name a diagnosis, never invent symptoms, "
            f"numbers or results.\n{task}\nFacts you may use this turn:\n{facts}"
        )
        messages = [{"role": "system", "content": system}]
        for turn in ctx.transcript:  # the model plays the patient: patient = assistant, doctor = user
            messages.append({"role": "assistant" if turn.role == "user" else "user", "content": turn.content})
        messages.append({"role": "user", "content": ctx.intent.text})
        text = clean_reply(await self._ask(ctx, messages))
        if not text:
            return render_reply(ctx, decision)
        lines = [f.spoken for f in sel.facts if f.kind in ("exam", "test")] if not decision.done else []
        return "\n".join([text, *lines])

    # ------------------------------------------------------------- factual

    async def review(self, ctx: TurnContext, decision: GateDecision, draft: str) -> Review:
        allowed = [] if decision.done else ctx.selection.facts
        said = " ".join(t.content for t in ctx.transcript if t.role == "user")
        problems = check_reply(draft, ctx.script, allowed, ctx.state, ctx.intent.text, said)
        facts = "\n".join(f"- {f.spoken}" for f in allowed) or "- (none)"
        system = (
            "You check a simulated patient's reply against the case. The reply may only state facts from the list, "
            "must not name a diagnosis, must not invent symptoms, numbers or results, and must not contradict "
            "earlier replies. Answer with JSON only: "
            '{"ok": true|false, "problems": ["..."], "rewrite": "corrected reply or empty"}\n'
            f"Allowed facts:\n{facts}"
        )
        text = await self._ask(ctx, [{"role": "system", "content": system},
                                     {"role": "user", "content": f"Doctor: {ctx.intent.text}\nPatient reply: {draft}"}])
        verdict = parse_json_object(text) or {}
        ok = parse_bool(text, "ok")
        llm_problems = [f"reviewer: {p}" for p in verdict.get("problems", []) if isinstance(p, str) and p.strip()]
        if not problems and ok is not False:
            return Review(draft, [], False)
        rewrite = clean_reply(str(verdict.get("rewrite") or ""))
        if rewrite and not check_reply(rewrite, ctx.script, allowed, ctx.state, ctx.intent.text, said):
            lines = [ln for ln in draft.splitlines() if is_report_line(ln)]
            return Review("\n".join([rewrite, *lines]), problems + llm_problems, True)
        fallback = guard(ctx, decision, render_reply(ctx, decision))
        return Review(fallback.text, problems + llm_problems, True)


def _dialogue(ctx: TurnContext) -> str:
    lines = [f"{'Doctor' if t.role == 'assistant' else 'Patient'}: {t.content}" for t in ctx.transcript[-8:]]
    return "\n".join(lines + [f"Doctor: {ctx.intent.text}"])

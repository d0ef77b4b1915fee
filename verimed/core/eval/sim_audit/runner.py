"""Run the independent audit: play the probe dialogues against any simulator session, score the replies.

    new_session = lambda case: PatientSimulator(case, sample_persona(0, case), RulesBackend(), 60)
    report = asyncio.run(run_independent_audit(cases, "heldout", new_session))
    print(format_independent(report))

The simulator is reached only through the session protocol below (``persona``,
``opening()``, ``await respond(text)`` returning an object with ``text`` and
``done``); the caller (the CLI, a test) builds the sessions, so this package
imports nothing of the simulator.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable, Protocol, Sequence

import msgspec

from verimed.core.eval.sim_audit import scorer as sc
from verimed.core.eval.sim_audit.probes import Probe, dialogues, load_bank
from verimed.core.types import Case, Persona


class Session(Protocol):
    persona: Persona

    def opening(self) -> str: ...

    def respond(self, text: str) -> Awaitable[Any]: ...  # -> reply with .text and .done


class TurnResult(msgspec.Struct):
    case_id: str
    category: str
    doctor: str
    reply: str
    problems: list[str]
    done: bool = False
    answerable: bool = False  # a history question the case has the answer to


class IndependentReport(msgspec.Struct):
    split: str
    cases: int
    turns: int
    finding_leak_rate: float  # share of turns showing an exam / test value not examined / ordered
    diagnosis_leaks: int  # turns naming the diagnosis (or saying yes to it) before the doctor did
    case_file_wording: int  # turns in the case file's voice ("[Result]", "not provided", ...)
    broken_sentences: int
    invented: int  # turns with a number the case does not have
    absent_order_ok: float  # orders of a test the case lacks that returned no result at all
    answered: float  # answerable history questions answered
    answerable: int
    close_rate: float  # closings (diagnosis + plan, with or without a trailing question) that closed
    close_with_question: float
    premature_close: int  # sessions closed on a turn that was not a closing
    attribution_checked: int  # reply sentences matched to a case sentence and checked for whose fact it is
    attribution_errors: int
    persona: float  # turns in character (the scorer's own rules)
    by_category: dict[str, dict[str, float]]
    failures: list[TurnResult]


def score_turn(view: sc.CaseView, probe: Probe, reply: str, allowed: set[str], doctor_said: str,
               persona: Persona) -> tuple[list[str], int]:
    """(problems, attribution facts checked) of one reply; each problem is "<class>: detail"."""
    problems = [f"finding: {k}" for k in sc.finding_leaks(view, reply, allowed, doctor_said)]
    problems += [f"diagnosis: {t}" for t in sc.diagnosis_leaks(view, reply, doctor_said)]
    if probe.category == "dx_leading_right" and sc.affirms(reply):
        problems.append("diagnosis: confirmed the named diagnosis")
    problems += [f"casefile: {w}" for w in sc.case_file_wording(reply)]
    problems += [f"broken: {w}" for w in sc.broken_sentences(reply)]
    problems += [f"invented: {n}" for n in sc.invented_numbers(view, reply, doctor_said)]
    if probe.category == "unmentioned_symptom" and sc.affirms(reply):
        problems.append("invented: claims a symptom the case does not have")
    if probe.field and probe.source and not sc.answered(probe.source, reply, probe.text, probe.field == "age"):
        problems.append("unanswered")
    checked, errors = sc.attribution(view, reply)
    problems += [f"attribution: {e}" for e in errors]
    problems += [f"persona: {p}" for p in sc.persona_problems(persona, reply)]
    return problems, checked


async def audit_case(case: Case, bank: dict[str, list[str]], new_session: Callable[[Case], Session]):
    """Play the case's dialogues; returns (turn results, attribution facts checked)."""
    view = sc.CaseView.from_case(case)
    results: list[TurnResult] = []
    checked = 0
    for plan in dialogues(case, bank):
        sim = new_session(case)
        opening = sim.opening()
        problems, n = score_turn(view, Probe("opening", ""), opening, set(), "", sim.persona)
        results.append(TurnResult(case.case_id, "opening", "", opening, problems))
        checked += n
        allowed: set[str] = set()
        said = ""
        for i, probe in enumerate(plan):
            reply = await sim.respond(probe.text)
            allowed |= probe.unlocks
            said += " " + probe.text
            problems, n = score_turn(view, probe, reply.text, allowed, said, sim.persona)
            checked += n
            closing = probe.category.startswith("close_")
            if closing and not reply.done:
                problems.append("gate: did not close after diagnosis and plan")
            if reply.done and not closing:
                problems.append("gate: closed early")
            results.append(TurnResult(case.case_id, probe.category, probe.text, reply.text, problems, reply.done,
                                      bool(probe.field and probe.source)))
            if reply.done:
                break
    return results, checked


async def run_independent_audit(cases: Sequence[Case], split: str, new_session: Callable[[Case], Session],
                                max_failures: int = 60) -> IndependentReport:
    if not cases:
        raise ValueError("the audit needs at least one case")
    bank = load_bank(split)
    per_case = [await audit_case(c, bank, new_session) for c in cases]
    turns = [t for res, _ in per_case for t in res]
    has = lambda t, cls: any(p.startswith(cls + ":") or p == cls for p in t.problems)  # noqa: E731
    rate = lambda xs: sum(xs) / len(xs) if xs else 1.0  # noqa: E731
    of = lambda *cats: [t for t in turns if t.category in cats]  # noqa: E731
    answerable = [t for t in turns if t.answerable]
    by_cat: dict[str, dict[str, float]] = {}
    for cat in dict.fromkeys(t.category for t in turns):
        sub = of(cat)
        by_cat[cat] = {"n": len(sub), **{cls: sum(has(t, cls) for t in sub) for cls in
                                         ("finding", "diagnosis", "casefile", "unanswered", "gate")}}
    return IndependentReport(
        split=split, cases=len(cases), turns=len(turns),
        finding_leak_rate=rate([has(t, "finding") for t in turns]),
        diagnosis_leaks=sum(has(t, "diagnosis") for t in turns), case_file_wording=sum(has(t, "casefile") for t in turns),
        broken_sentences=sum(has(t, "broken") for t in turns), invented=sum(has(t, "invented") for t in turns),
        absent_order_ok=rate([not has(t, "finding") and not has(t, "casefile") for t in of("order_absent")]),
        answered=rate([not has(t, "unanswered") for t in answerable]), answerable=len(answerable),
        close_rate=rate([t.done for t in of("close_plain", "close_question")]),
        close_with_question=rate([t.done for t in of("close_question")]),
        premature_close=sum(has(t, "gate: closed early") for t in turns),
        attribution_checked=sum(n for _, n in per_case), attribution_errors=sum(
            sum(p.startswith("attribution") for p in t.problems) for t in turns),
        persona=rate([not has(t, "persona") for t in turns]), by_category=by_cat,
        failures=[t for t in turns if t.problems][:max_failures],
    )


def format_independent(r: IndependentReport, title: str = "") -> str:
    pct = lambda x: f"{100 * x:6.2f}%"  # noqa: E731
    lines = [
        f"independent audit ({title or r.split}): probes={r.split} cases={r.cases} turns={r.turns}",
        f"  unordered-finding leaks {pct(r.finding_leak_rate)} of turns   (target <= 0.5%)",
        f"  diagnosis leaks         {r.diagnosis_leaks:7d}   case-file wording {r.case_file_wording}   "
        f"broken sentences {r.broken_sentences}   invented numbers/symptoms {r.invented}",
        f"  absent test order clean {pct(r.absent_order_ok)}   (target 100%)",
        f"  history answered        {pct(r.answered)} of {r.answerable}   (target >= 98%)",
        f"  gate closes on dx+plan  {pct(r.close_rate)}   with trailing question {pct(r.close_with_question)}"
        f"   closed early {r.premature_close}   (target >= 95%)",
        f"  attribution errors      {r.attribution_errors:7d} of {r.attribution_checked} facts checked   "
        f"persona {pct(r.persona)}",
    ]
    for t in r.failures[:8]:
        lines.append(f"    {t.case_id} {t.category}: {'; '.join(t.problems)[:110]}")
    return "\n".join(lines)

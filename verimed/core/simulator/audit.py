"""Audit the simulator with a scripted doctor: the paper's privacy, fact and persona metrics.

This is the OLD, circular audit (it reuses the simulator's own tables); the independent
one is :mod:`verimed.core.eval.sim_audit`. ``verimed simulate --audit N`` prints both.

    report = asyncio.run(run_audit(cases[:20], RulesBackend(), seed=0))
    print(format_report(report)); msgspec.json.encode(report)

For every case the scripted doctor asks questions the case answers, questions
it does not, tries to extract the diagnosis and results without examining or
ordering, repeats a question, then examines, orders tests, and closes with a
diagnosis + plan. Each patient turn is scored from the reply *text* against
the script (not from what the simulator claims it disclosed):

* privacy  — no unprompted disclosure: no diagnosis words, no exam finding /
  test value before the doctor examined / ordered, no new fact unrelated to
  the question (kind outside the question's topic and no shared word);
* fact     — no fabricated number, no unsupported clinical word, no denial of
  the case's symptoms, and a repeated question is answered consistently;
* persona  — no out-of-character marker (persona.persona_violations);
* gate     — the consultation closes on the diagnosis + plan, not before.
"""
from __future__ import annotations

import asyncio
from typing import Sequence

import msgspec

from verimed.core.simulator.backend import SimulatorBackend
from verimed.core.simulator.intent import TOPIC_KINDS
from verimed.core.simulator.persona import persona_violations, sample_persona
from verimed.core.simulator.retrieval import expand
from verimed.core.simulator.script import GATED_KINDS, PATIENT_KINDS, PatientScript
from verimed.core.simulator.session import PatientSimulator, detect_disclosed
from verimed.core.simulator.text import content_stems, coverage, numbers
from verimed.core.simulator.units import _contradictions
from verimed.core.types import Case, Persona


class Probe(msgspec.Struct, frozen=True):
    name: str
    text: str
    kinds: frozenset[str] = frozenset()  # fact kinds this question may be answered from
    unlocks: str = ""  # "exam" / "test": gated facts become legitimate from this turn on


def probes(case: Case) -> list[Probe]:
    """The scripted doctor for one case (the last probe gives diagnosis + plan)."""
    k = {t: frozenset(v) for t, v in TOPIC_KINDS.items()}
    out = [
        Probe("complaint", "What brings you in today?", k["complaint"]),
        Probe("onset", "When did this start, and has it changed since?", k["course"]),
        Probe("symptoms", "Have you noticed any other symptoms?", k["symptoms"]),
    ]
    if case.secondary_symptoms:
        out.append(Probe("specific", f"Do you have any {case.secondary_symptoms[0].lower()}?", frozenset(PATIENT_KINDS)))
    out += [
        Probe("past", "Do you have any past medical problems or surgeries?", k["past"] | {"hpi"}),
        Probe("medications", "Are you currently taking any medications?", k["medications"]),
        Probe("social", "Do you smoke, drink alcohol or use drugs? What do you do for work?", k["social"]),
        Probe("family", "Does anyone in your family have medical problems?", k["family"]),
        Probe("unanswerable", "Have you travelled abroad recently, or do you keep any pets?"),
        Probe("extract_dx", "What do you think you have? Just tell me the diagnosis."),
        Probe("extract_dx_named", f"Is it {case.diagnosis}?"),
        Probe("extract_results", "What did your blood tests show? What were your lab values?"),
        Probe("extract_vitals", "What is your blood pressure and heart rate?"),
        Probe("repeat", "When did this start, and has it changed since?", k["course"]),
        Probe("exam", "Let me examine you now.", unlocks="exam"),
        Probe("order", "We'll run some blood tests and imaging.", unlocks="test"),
        Probe("results", "What did the tests show?", frozenset({"test", "exam"})),
        Probe("close", f"I think you have {case.diagnosis}. We'll start treatment and follow up in two weeks."),
    ]
    return out


class TurnScore(msgspec.Struct):
    case_id: str
    probe: str
    reply: str
    private: bool
    factual: bool
    in_persona: bool
    problems: list[str]
    vetoed: bool = False


class AuditReport(msgspec.Struct):
    backend: str
    cases: int
    turns: int
    privacy: float  # share of turns with no unprompted disclosure
    fact: float  # share of turns with no fabricated or contradicted fact
    persona: float  # share of turns in character
    gate: float  # share of cases closed by the diagnosis + plan turn, not before
    veto_rate: float  # share of turns whose draft the factual unit rejected
    unknown_ok: float  # share of unanswerable probes answered without disclosure
    by_probe: dict[str, dict[str, float]]
    failures: list[TurnScore]  # the first failing turns, for inspection


def _gated_leaks(text: str, script: PatientScript, legit: set[str]) -> list[str]:
    """Exam / test facts whose value shows up in ``text`` though not yet examined / ordered.

    Numbers / words that the patient's story or an already legitimate finding
    also contains prove nothing and are ignored.
    """
    shown = [f for f in script.facts if f.kind in PATIENT_KINDS or f.kind in legit]
    ok_numbers = numbers(" ".join(f.text for f in shown))
    ok_stems = set(content_stems(" ".join(f.text for f in shown)))
    reply_numbers, reply_stems = numbers(text), set(content_stems(text))
    out = []
    for f in script.facts:
        if f.kind not in GATED_KINDS or f.kind in legit:
            continue
        own = numbers(f.text) - ok_numbers
        distinct = set(content_stems(f.text)) - ok_stems
        if own and own <= reply_numbers:
            out.append(f.key)
        elif not own and len(distinct) >= 2 and distinct <= reply_stems:
            out.append(f.key)
    return out


def _related(fact_text: str, question: str) -> bool:
    return bool(set(expand(content_stems(question))) & set(content_stems(fact_text)))


def _unprompted(detected: list[str], new: set[str], probe: Probe, script: PatientScript, legit: set[str]) -> list[str]:
    """Newly disclosed facts that the question did not ask for.

    A fact is prompted if its kind answers the question's topic or it shares a
    word with the question; a fact whose words are all inside a prompted fact
    of the same reply (a symptom named in the history sentence that was asked
    for) is implied by it, not volunteered.
    """
    prompted = [k for k in detected if script[k].kind in probe.kinds | legit or _related(script[k].text, probe.text)]
    said = " ".join(f"{script[k].label} {script[k].text}" for k in prompted)
    return [k for k in detected if k in new and k not in prompted and coverage(script[k].text, said) < 0.6]


async def audit_case(case: Case, persona: Persona, backend: SimulatorBackend) -> tuple[list[TurnScore], bool]:
    """Play the probes for one case; returns per-turn scores and whether the gate behaved."""
    plan = probes(case)
    sim = PatientSimulator(case, persona, backend, max_turns=len(plan) + 1)
    script = sim.script
    scores: list[TurnScore] = []
    known: set[str] = set()
    legit: set[str] = set()
    answers: dict[str, bool] = {}
    opening = sim.opening()
    turns = [(Probe("opening", "", frozenset({"chief_complaint", "symptom_primary"})), opening, False)]
    gate_ok = True
    for probe in plan:
        reply = await sim.respond(probe.text)
        turns.append((probe, reply.text, reply.vetoed))
        if reply.done != (probe.name == "close"):
            gate_ok = False
        if reply.done:
            gate_ok = gate_ok and reply.reason == "diagnosis_and_plan"
            break
    said = ""
    for probe, text, vetoed in turns:
        legit |= {probe.unlocks} - {""}
        candidates = [f for f in script.facts if f.kind in PATIENT_KINDS or f.kind in legit]
        detected = detect_disclosed(text, candidates)
        new = [k for k in detected if k not in known]
        problems: list[str] = []
        if script.leaks_diagnosis(text, probe.text):  # never, not even from an ordered report
            problems.append("privacy: diagnosis")
        problems += [f"privacy: locked {k}" for k in _gated_leaks(text, script, legit)]
        problems += [f"privacy: unprompted {k}" for k in _unprompted(detected, set(new), probe, script, legit)]
        invented = numbers(text) - script.all_numbers - numbers(probe.text)
        problems += [f"fact: invented number {n}" for n in sorted(invented)]
        problems += [f"fact: {c}" for c in _contradictions(text, script)]
        answered = bool(detected)
        if probe.name == "repeat" and answers.get("onset") is not None and answers["onset"] != answered:
            problems.append("fact: repeated question answered inconsistently")
        answers[probe.name] = answered
        own_words = text
        for key in detected:
            own_words = own_words.replace(script[key].spoken, " ")
        problems += [f"persona: {v}" for v in persona_violations(own_words, persona)]
        known |= set(new)
        said += " " + text
        scores.append(TurnScore(case.case_id, probe.name, text, not any(p.startswith("privacy") for p in problems),
                                not any(p.startswith("fact") for p in problems),
                                not any(p.startswith("persona") for p in problems), problems, vetoed))
    return scores, gate_ok


async def run_audit(cases: Sequence[Case], backend: SimulatorBackend, seed: int = 0, mbti: str | None = None,
                    concurrency: int = 16, max_failures: int = 50) -> AuditReport:
    """Audit ``cases`` (personas sampled per case from ``seed``; ``mbti`` fixes the type)."""
    if not cases:
        raise ValueError("audit needs at least one case")
    sem = asyncio.Semaphore(concurrency)

    async def one(case: Case):
        async with sem:
            return await audit_case(case, sample_persona(seed, case, mbti), backend)

    results = await asyncio.gather(*(one(c) for c in cases))
    turns = [t for scores, _ in results for t in scores]
    mean = lambda xs: sum(xs) / len(xs) if xs else 1.0  # noqa: E731
    by_probe: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(t.probe for t in turns):
        sub = [t for t in turns if t.probe == name]
        by_probe[name] = {"n": len(sub), "privacy": mean([t.private for t in sub]),
                          "fact": mean([t.factual for t in sub]), "persona": mean([t.in_persona for t in sub])}
    unanswerable = [t for t in turns if t.probe == "unanswerable"]
    return AuditReport(
        backend=getattr(backend, "name", type(backend).__name__), cases=len(cases), turns=len(turns),
        privacy=mean([t.private for t in turns]), fact=mean([t.factual for t in turns]),
        persona=mean([t.in_persona for t in turns]), gate=mean([ok for _, ok in results]),
        veto_rate=mean([t.vetoed for t in turns]),
        unknown_ok=mean([not any("unprompted" in p for p in t.problems) for t in unanswerable]),
        by_probe=by_probe, failures=[t for t in turns if t.problems][:max_failures],
    )


def format_report(report: AuditReport) -> str:
    """A readable table of the headline metrics and the per-probe breakdown."""
    pct = lambda x: f"{100 * x:6.1f}%"  # noqa: E731
    lines = [
        f"simulator audit: backend={report.backend} cases={report.cases} turns={report.turns}",
        f"  privacy score  {pct(report.privacy)}   (turns with no unprompted disclosure; paper 98.3%)",
        f"  fact score     {pct(report.fact)}   (turns with no fabricated / contradicted fact; paper 84.0%)",
        f"  persona        {pct(report.persona)}   (turns in character)",
        f"  gate           {pct(report.gate)}   (closed on diagnosis + plan, not before)",
        f"  veto rate      {pct(report.veto_rate)}   unanswerable handled {pct(report.unknown_ok)}",
        "", f"  {'probe':<18}{'n':>5}{'privacy':>10}{'fact':>9}{'persona':>10}",
    ]
    for name, m in report.by_probe.items():
        lines.append(f"  {name:<18}{int(m['n']):>5}{pct(m['privacy']):>10}{pct(m['fact']):>9}{pct(m['persona']):>10}")
    if report.failures:
        lines += ["", f"  first {len(report.failures)} failing turns:"]
        for t in report.failures[:10]:
            lines.append(f"    {t.case_id} {t.probe}: {'; '.join(t.problems)[:120]}")
    return "\n".join(lines)

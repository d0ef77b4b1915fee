"""The prompts a draw is turned into: the doctor's system prompt, diagnosis vignettes, MCQ questions.

    messages = mcq_prompt(item)          # [Turn]; check with check_mcq(text, item.answer, item.options)
    messages = diagnosis_prompt(case)    # [Turn]; check with check_diagnosis(text, case.diagnosis)

A diagnosis vignette never names the diagnosis (or an alternate / abbreviation of it).
"""
from __future__ import annotations

import re

from verimed.core.data.mcq import MCQItem
from verimed.core.tasks.answers import canonical_repeated, gold_alternates
from verimed.core.types import Case, Turn

DOCTOR_SYSTEM_PROMPT = (
    "You are a careful, empathetic physician in a consultation. Ask focused questions about the "
    "history, examine or order tests when needed, explain the most likely diagnosis and a plan, "
    "and tell the patient when to seek urgent care."
)
FINAL_ANSWER_INSTRUCTION = 'End your reply with one line of the form "Final answer: <{what}>".'
DIAGNOSIS_SYSTEM_PROMPT = "You are an expert physician. Read the case and give the single most likely diagnosis."
MCQ_SYSTEM_PROMPT = "You are an expert physician answering a multiple-choice medical exam question."


def mcq_prompt(item: MCQItem) -> list[Turn]:
    """System + user turn: the question, the lettered options, the final-answer instruction."""
    options = "\n".join(f"{k}. {v}" for k, v in item.options.items())
    text = f"{item.question}\n\n{options}\n\n{FINAL_ANSWER_INSTRUCTION.format(what='letter')}"
    return [Turn(role="system", content=MCQ_SYSTEM_PROMPT), Turn(role="user", content=text)]


def _mentions(text: str, names: list[str]) -> bool:
    words = f" {canonical_repeated(text)} "  # a case's sentences recur every epoch
    return any(f" {n} " in words for n in names)


def vignette(case: Case, max_findings: int = 8) -> str:
    """A case vignette from demographics, history, symptoms, exam and tests — never the diagnosis.

    Sentences and findings that name the diagnosis (or an alternate /
    abbreviation of it, e.g. a test "indicative of PML") are left out.
    """
    names = [n for n in (canonical_repeated(a) for a in gold_alternates(case.diagnosis)) if n]

    def clean(text: str) -> str:
        sentences = re.split(r"(?<=[.!?])\s+", text.strip())
        return " ".join(x for x in sentences if not _mentions(x, names)).strip()

    parts = [f"Patient: {clean(case.demographics)}", f"History: {clean(case.history)}"]
    symptoms = [clean(x) for x in [case.primary_symptom] + case.secondary_symptoms]
    parts.append("Symptoms: " + "; ".join(x.rstrip(".") for x in symptoms if x) + ".")
    for label, text in (("Past medical history", case.past_medical_history), ("Social history", case.social_history),
                        ("Review of systems", case.review_of_systems)):
        if clean(text):
            parts.append(f"{label}: {clean(text)}")
    for label, findings in (("Examination", case.exam_findings), ("Tests", case.test_results)):
        shown = [f"{k.replace('_', ' ')}: {v.rstrip('.')}" for k, v in findings.items()
                 if not _mentions(f"{k} {v}", names)][:max_findings]
        if shown:
            parts.append(f"{label}: " + "; ".join(shown) + ".")
    return "\n".join(p for p in parts if not p.endswith(": "))


# id(case) -> (case, its diagnosis prompt): a case is drawn again and again, and its vignette costs
# ~0.3 ms of regex work (bench/scale.py). The case is kept beside its prompt, so a reused id of a
# freed case never hits (Case holds dicts: it cannot be a hash key itself).
_DIAGNOSIS_PROMPTS: dict[int, tuple[Case, tuple[Turn, ...]]] = {}
_DIAGNOSIS_PROMPTS_MAX = 4096


def diagnosis_prompt(case: Case) -> list[Turn]:
    """System + user turn asking for the most likely diagnosis of the case vignette."""
    hit = _DIAGNOSIS_PROMPTS.get(id(case))
    if hit is not None and hit[0] is case:
        return list(hit[1])
    text = f"{vignette(case)}\n\nWhat is the most likely diagnosis? {FINAL_ANSWER_INSTRUCTION.format(what='diagnosis')}"
    turns = (Turn(role="system", content=DIAGNOSIS_SYSTEM_PROMPT), Turn(role="user", content=text))
    if len(_DIAGNOSIS_PROMPTS) >= _DIAGNOSIS_PROMPTS_MAX:
        _DIAGNOSIS_PROMPTS.clear()
    _DIAGNOSIS_PROMPTS[id(case)] = (case, turns)
    return list(turns)

"""Verifiable questions for the rule-based stage: MCQ JSONL items and diagnosis questions from cases.

    items, report = load_mcq("data/my_mcq.jsonl")        # [MCQItem], LoadReport
    messages = mcq_prompt(items[0])                      # [Turn]; check with check_mcq(text, item.answer, item.options)
    messages = diagnosis_prompt(case)                    # [Turn]; check with check_diagnosis(text, case.diagnosis)

MCQ record shape (the common MedQA / MedMCQA-style JSONL):
``{"question": str, "options": {"A": str, ...} or [str, ...], "answer": "C"}``
(a list of options is lettered A, B, C, ...). Optional ``"id"``. Malformed
records raise ``DataError("FILE:LINE: FIELD: problem")`` (or are skipped and
counted with ``skip_invalid``). No MCQ data ships with verimed.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec

from verimed.core.answers import canonical, gold_alternates
from verimed.core.data import LoadReport, RecordError, read_jsonl, require
from verimed.core.types import Case, Turn

FINAL_ANSWER_INSTRUCTION = 'End your reply with one line of the form "Final answer: <{what}>".'
DIAGNOSIS_SYSTEM_PROMPT = "You are an expert physician. Read the case and give the single most likely diagnosis."
MCQ_SYSTEM_PROMPT = "You are an expert physician answering a multiple-choice medical exam question."


class MCQItem(msgspec.Struct, frozen=True):
    item_id: str
    question: str
    options: dict[str, str]  # letter -> option text, in order
    answer: str  # the correct letter


def parse_mcq(record: dict[str, Any], line_no: int) -> MCQItem:
    question = require(record, "question", str)
    if not question.strip():
        raise RecordError("question", "must not be empty")
    raw = require(record, "options", (dict, list))
    if isinstance(raw, list):
        raw = {chr(ord("A") + i): v for i, v in enumerate(raw)}
    if len(raw) < 2:
        raise RecordError("options", f"expected at least 2 options, got {len(raw)}")
    options: dict[str, str] = {}
    for key, text in raw.items():
        letter = str(key).strip().upper()
        if len(letter) != 1 or not letter.isalpha():
            raise RecordError(f"options.{key}", "option keys must be single letters")
        if not isinstance(text, str) or not text.strip():
            raise RecordError(f"options.{key}", "expected a non-empty string")
        options[letter] = text.strip()
    answer = require(record, "answer", str).strip().upper()
    if answer not in options:
        raise RecordError("answer", f"{answer!r} is not one of the option letters {', '.join(options)}")
    return MCQItem(item_id=str(record.get("id", f"line-{line_no}")), question=question.strip(), options=options,
                   answer=answer)


def load_mcq(path: str | Path, skip_invalid: bool = False) -> tuple[list[MCQItem], LoadReport]:
    return read_jsonl(path, parse_mcq, skip_invalid)


def mcq_prompt(item: MCQItem) -> list[Turn]:
    """System + user turn: the question, the lettered options, the final-answer instruction."""
    options = "\n".join(f"{k}. {v}" for k, v in item.options.items())
    text = f"{item.question}\n\n{options}\n\n{FINAL_ANSWER_INSTRUCTION.format(what='letter')}"
    return [Turn(role="system", content=MCQ_SYSTEM_PROMPT), Turn(role="user", content=text)]


def _mentions(text: str, names: list[str]) -> bool:
    words = f" {canonical(text)} "
    return any(f" {n} " in words for n in names)


def vignette(case: Case, max_findings: int = 8) -> str:
    """A case vignette from demographics, history, symptoms, exam and tests — never the diagnosis.

    Sentences and findings that name the diagnosis (or an alternate /
    abbreviation of it, e.g. a test "indicative of PML") are left out.
    """
    names = [n for n in (canonical(a) for a in gold_alternates(case.diagnosis)) if n]

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


def diagnosis_prompt(case: Case) -> list[Turn]:
    """System + user turn asking for the most likely diagnosis of the case vignette."""
    text = f"{vignette(case)}\n\nWhat is the most likely diagnosis? {FINAL_ANSWER_INSTRUCTION.format(what='diagnosis')}"
    return [Turn(role="system", content=DIAGNOSIS_SYSTEM_PROMPT), Turn(role="user", content=text)]

"""The ``case`` rubric backend: deterministic rubrics from a case's facts.

Positives: naming the diagnosis, asking the key history questions, examining
the abnormal system, ordering the decisive test, a management plan, linking
findings to the diagnosis, empathy, safety-netting. Negatives: a premature
definitive diagnosis, an unsupported prescription, a wrong diagnosis, an
empty/off-topic reply. Weights follow the consultation stage: before the
doctor has spoken twice, history taking weighs most and a definitive
diagnosis is penalised; later, the diagnosis, tests and plan weigh most.
Criteria use phrasings the ``rules`` judge recognises (see ``rules.grade``).
"""
from __future__ import annotations

import re
from typing import Sequence

from verimed.core.rubrics.model import make_item, merge_duplicates
from verimed.core.types import Case, RubricItem, Turn

EARLY_DOCTOR_TURNS = 2  # a slice with fewer doctor turns is "early" in the consultation
_GENERIC_KEYS = {
    "findings", "finding", "result", "results", "value", "values", "report", "interpretation", "impression",
    "imaging", "blood_tests", "blood_test", "laboratory", "labs", "lab_tests", "other", "details", "observation",
}
_ABNORMAL = re.compile(
    r"\b(elevated|raised|high|low|decreased|reduced|increased|positive|present|prolonged|abnormal|consistent with|"
    r"confirm\w*|indicative|compatible|shows?|reveals?|demonstrat\w*|suggest\w*|detected|enlarged|mass|lesion|"
    r"diminished|weak\w*|tender\w*|swell\w*|swollen|distended|absent|irregular|murmur|rash|edema|oedema|ptosis|"
    r"worsens|presence)\b", re.I)
_NORMAL = re.compile(r"\b(normal|negative|unremarkable|within normal limits|no abnormalit\w*|not detected)\b", re.I)


def _label(key: str, parts: int = 2) -> str:
    """``"Blood_Tests / Acetylcholine_Receptor_Antibodies"`` -> ``"acetylcholine receptor antibodies"``."""
    comps = [c for c in (p.strip() for p in key.split("/")) if c and not c.isdigit() and c.lower() not in _GENERIC_KEYS]
    return " ".join(c.replace("_", " ") for c in comps[-parts:]).strip()


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]{4,}", text.lower())}


def _abnormality(key: str, value: str, diagnosis: str) -> int:
    """How decisive a finding looks: mentions of the diagnosis, abnormal words, not 'normal'."""
    score = 3 * len(_words(value) & _words(diagnosis))
    if _ABNORMAL.search(value):
        score += 2
    if _NORMAL.search(value) and not _ABNORMAL.search(value):
        score -= 3
    return score


def decisive_tests(case: Case, limit: int = 2) -> list[str]:
    """Names of the most decisive tests (best first), deduplicated."""
    ranked = sorted(case.test_results.items(), key=lambda kv: -_abnormality(kv[0], kv[1], case.diagnosis))
    names: list[str] = []
    for key, value in ranked:
        name = _label(key)
        if name and name.lower() not in (n.lower() for n in names) and _abnormality(key, value, case.diagnosis) > 0:
            names.append(name)
        if len(names) == limit:
            break
    return names


def abnormal_exam(case: Case) -> str | None:
    """The system/part of the most abnormal non-vital-sign exam finding."""
    best = None
    for key, value in case.exam_findings.items():
        if key.lower().startswith("vital"):
            continue
        score = _abnormality(key, value, case.diagnosis)
        if score > 0 and (best is None or score > best[0]):
            best = (score, _label(key))
    return best[1] if best and best[1] else None


def _symptom(text: str) -> str:
    text = re.sub(r"^(no|denies|absence of)\s+", "", text.strip().rstrip("."), flags=re.I)
    return text[0].lower() + text[1:] if text else text


def case_rubric(case: Case, dialogue: Sequence[Turn]) -> list[RubricItem]:
    """The deterministic rubric of ``case`` for the doctor's next reply after ``dialogue``."""
    early = sum(t.role == "assistant" for t in dialogue) < EARLY_DOCTOR_TURNS
    dx, primary = case.diagnosis, _symptom(case.primary_symptom)
    tests = decisive_tests(case)
    tag = ["source:case", f"stage:{'early' if early else 'late'}"]
    items = [
        make_item(f"Names {dx} as the most likely diagnosis.", 3 if early else 10, "diagnostic_accuracy", tag),
        make_item(f"Asks about the onset and duration of the {primary}.", 4 if early else 2, "consultation_logic", tag),
    ]
    for symptom in case.secondary_symptoms[:3]:
        items.append(make_item(f"Asks about {_symptom(symptom)}.", 5 if early else 2, "consultation_logic", tag))
    if case.other_history or case.past_medical_history:
        items.append(make_item("Asks about current medications and allergies.", 3, "consultation_logic", tag))
    exam = abnormal_exam(case)
    if exam:
        items.append(make_item(f"Performs or requests a focused examination of the {exam}.", 3, "consultation_logic", tag))
    for rank, test in enumerate(tests):
        items.append(make_item(f"Orders or recommends {test} to confirm the diagnosis.",
                               (3 if early else 6) - rank, "evidence_clarity", tag))
    if not early or not tests:
        findings = ", ".join([primary] + tests[:1])
        items.append(make_item(f"Supports the diagnosis of {dx} with findings such as {findings}.", 4, "evidence_clarity", tag))
    if not early:
        items.append(make_item(f"Proposes a management plan for {dx}.", 5, "treatment_rationality", tag))
    items += [
        make_item("Acknowledges the patient's concerns with empathy.", 3, "communication_empathy", tag),
        make_item(f"Gives safety-netting advice: tells the patient to seek urgent care if the {primary} worsens.",
                  4, "ethics_safety", tag),
        make_item("Prescribes a medication before a diagnosis is established or without checking allergies.",
                  -6, "treatment_rationality", tag),
        make_item("Gives an empty, incoherent or off-topic reply.", -3, "communication_empathy", tag),
    ]
    if early:
        items.append(make_item("Gives a definitive diagnosis before taking a history (premature closure).",
                               -5, "diagnostic_accuracy", tag))
    else:
        items.append(make_item(f"Names an incorrect diagnosis instead of {dx}.", -4, "diagnostic_accuracy", tag))
    return merge_duplicates(items)

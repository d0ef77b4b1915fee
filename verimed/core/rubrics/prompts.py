"""Prompt templates of the rubric generator and the rubric judge.

The judge has two templates (paper §2.2): one for positive items (is the
desired behaviour present?) and one for negative items (is the *undesirable*
behaviour present?), because a single template made judges misread negative
items as "is the response good". Both put the shared header and the
conversation first and the item last, so all items of one response (and all
responses of one group) share a long token prefix an engine can cache.
"""
from __future__ import annotations

import json
from typing import Sequence

from verimed.core.rubrics.model import DIMENSIONS
from verimed.core.types import Case, RubricItem, Turn

JUDGE_HEADER = (
    "You are a meticulous physician grading the last assistant turn (the doctor's reply) "
    "of a medical conversation against one rubric item.\n\n# Conversation\n"
)

POSITIVE_INSTRUCTIONS = """
# Rubric item (desirable behaviour, worth {points} points)
{criterion}

# Instructions
Decide whether the final assistant reply does what the rubric item asks.
If the item lists several requirements, all must be met; examples introduced by
"such as", "for example" or "including" need not all appear.
Return only a JSON object:
{{"explanation": "<one sentence>", "criteria_met": true or false}}
""".strip()

NEGATIVE_INSTRUCTIONS = """
# Rubric item (UNDESIRABLE behaviour, costs {points} points when present)
{criterion}

# Instructions
This item describes something a doctor should NOT do. Decide whether the final
assistant reply actually exhibits this undesirable behaviour. Answer true only
if the bad behaviour is present; a good reply that avoids it gets false.
Return only a JSON object:
{{"explanation": "<one sentence>", "present": true or false}}
""".strip()

RETRY_NOTE = "\n\nYour previous answer could not be parsed. Reply with the JSON object only."


def render_conversation(conversation: Sequence[Turn], response: str) -> str:
    lines = [f"{t.role}: {t.content}" for t in conversation]
    lines.append(f"assistant: {response}")
    return "\n\n".join(lines)


def judge_prompt(conversation: Sequence[Turn], response: str, item: RubricItem, retry: bool = False) -> str:
    """The full judge prompt for one item: header + conversation + item-specific tail."""
    template = POSITIVE_INSTRUCTIONS if item.points > 0 else NEGATIVE_INSTRUCTIONS
    tail = template.format(points=abs(item.points), criterion=item.criterion.strip())
    return JUDGE_HEADER + render_conversation(conversation, response) + "\n\n" + tail + (RETRY_NOTE if retry else "")


# -------------------------------------------------------------- generator

GENERATOR_TEMPLATE = """
You write grading rubrics for a doctor's NEXT reply in a clinical consultation.

# Case (hidden from the doctor)
{case}

# Consultation so far
{dialogue}

# Task
Write {min_items} to {max_items} rubric items for the doctor's next reply. Each item is a
JSON object with:
- "criterion": one concrete, checkable behaviour (e.g. "Asks whether the weakness worsens with activity");
- "points": an integer from -10 to 10, never 0; positive for desirable behaviour, negative
  for undesirable behaviour (e.g. a premature diagnosis, an unsupported prescription);
- "dimension": one of {dimensions}.
Include at least one negative item and cover these dimensions: {required}.
Return only a JSON array of such objects.
""".strip()

GENERATOR_FIX = (
    "Your rubric was rejected for these reasons:\n- {problems}\n"
    "Return the corrected rubric as a JSON array only."
)


def render_case(case: Case) -> str:
    parts = [
        f"Patient: {case.demographics}",
        f"Presenting complaint: {case.primary_symptom}",
        f"History: {case.history}",
    ]
    if case.secondary_symptoms:
        parts.append("Other symptoms: " + "; ".join(case.secondary_symptoms))
    for label, text in (("Past history", case.past_medical_history), ("Social history", case.social_history),
                        ("Review of systems", case.review_of_systems)):
        if text:
            parts.append(f"{label}: {text}")
    if case.exam_findings:
        parts.append("Examination: " + "; ".join(f"{k}: {v}" for k, v in case.exam_findings.items()))
    if case.test_results:
        parts.append("Tests: " + "; ".join(f"{k}: {v}" for k, v in case.test_results.items()))
    parts.append(f"Correct diagnosis: {case.diagnosis}")
    return "\n".join(parts)


def generator_prompt(
    case: Case, dialogue: Sequence[Turn], required: Sequence[str], min_items: int = 5, max_items: int = 12
) -> str:
    dialogue_text = "\n".join(f"{'doctor' if t.role == 'assistant' else 'patient'}: {t.content}"
                              for t in dialogue if t.role != "system") or "(the consultation has not started)"
    return GENERATOR_TEMPLATE.format(
        case=render_case(case), dialogue=dialogue_text, min_items=min_items, max_items=max_items,
        dimensions=json.dumps(list(DIMENSIONS)), required=", ".join(required) or "any",
    )

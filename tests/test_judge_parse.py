"""Adversarial judge outputs for :func:`verimed.core.rubrics.parse.parse_verdict`.

Hand-written before the parser was rewritten, from the misread classes seen with
real judges (an echoed format template, a format example before the answer,
``criteria_not_met``, "unmet: true", "No doubt ... meets", ``null`` verdicts) and
careless outputs (fences, trailing prose, two objects, truncation, YAML, case,
Chinese). Rule under test (DESIGN §8): a verdict is read only from the answer
itself; anything else is ungradable (the judge re-asks, then counts it).

    pytest -q tests/test_judge_parse.py
"""
from __future__ import annotations

import pytest

from verimed.core.rubrics.parse import UNGRADABLE, parse_verdict

T, F, U = True, False, UNGRADABLE

CASES = [
    # --- plain answers
    ('{"explanation": "Asks about onset.", "criteria_met": true}', T),
    ('{"explanation": "Never asks about onset.", "criteria_met": false}', F),
    ('{"explanation": "Recommends antibiotics without indication.", "present": true}', T),
    ('{"explanation": "Avoids a premature diagnosis.", "present": false}', F),
    # --- echoed format template: never a verdict
    ('{"explanation": "<one sentence>", "criteria_met": true or false}', U),
    ('{"explanation": "<one sentence>", "present": true or false}', U),
    ('Return only a JSON object:\n{"explanation": "<one sentence>", "criteria_met": true or false}', U),
    ('"criteria_met": true/false', U),
    ('criteria_met: <true|false>', U),
    # --- the echoed template followed by the real answer: the answer counts
    ('Format: {"explanation": "<one sentence>", "criteria_met": true or false}\n'
     '{"explanation": "The reply never asks about fever.", "criteria_met": false}', F),
    # --- a format example before the real answer
    ('For example: {"explanation": "...", "criteria_met": true}\n'
     'My answer: {"explanation": "The reply omits red flags.", "criteria_met": false}', F),
    ('Example output: {"criteria_met": false}\n\nAnswer: {"explanation": "It asks.", "criteria_met": true}', T),
    ('An example of the format is {"explanation": "<one sentence>", "present": true}. '
     'Here: {"explanation": "No dosing given.", "present": false}', F),
    # --- negated keys
    ('{"explanation": "No onset question.", "criteria_not_met": true}', F),
    ('criteria_not_met: true', F),
    ('unmet: true', F),
    ('{"unmet": false}', T),
    ('"not_met": true', F),
    # --- the verdict key inside the explanation is not the answer
    ('{"explanation": "one could argue criteria_met: true, but it does not", "criteria_met": false', F),
    ('The judge notes: "met: yes would require a question about onset", which is absent.', U),
    # --- first-word rules
    ('No doubt the response asks about onset, so it meets the criterion.', U),
    ('No, the response does not mention red flags.', F),
    ('Yes. It advises seeking urgent care.', T),
    ('Nothing in the reply addresses the allergy.', U),
    # --- null / non-boolean verdicts are not replaced by words from the explanation
    ('{"explanation": "yes, the criterion is met", "criteria_met": null}', U),
    ('{"explanation": "true", "criteria_met": "partially"}', U),
    ('{"explanation": "met", "criteria_met": None}', U),
    # --- careless formatting
    ('```json\n{"explanation": "Asks about onset.", "criteria_met": true}\n```', T),
    ('```\n{"explanation": "ok", "present": false}\n```\nLet me know if you need more detail!', F),
    ('{"explanation": "ok", "criteria_met": true}\n\nI hope this helps; the grading was careful.', T),
    ("{'explanation': 'ok', 'criteria_met': False}", F),
    ('{"explanation": "ok", "criteria_met": TRUE}', T),
    ('{"explanation": "ok", "criteria_met": "yes"}', T),
    ('{"explanation": "ok", "criteria_met": true,}', T),
    # --- two answers: agreeing is fine, conflicting is a guess
    ('{"criteria_met": true}\n{"criteria_met": true}', T),
    ('{"explanation": "a", "criteria_met": true}\n{"explanation": "b", "criteria_met": false}', U),
    # --- truncated JSON
    ('{"explanation": "The reply asks about the onset and', U),
    ('{"explanation": "The reply asks about the onset.", "criteria_met": tr', U),
    ('{"explanation": "The reply asks about the onset.", "criteria_met": true', T),
    # --- YAML-ish
    ('explanation: the reply asks about onset\ncriteria_met: yes', T),
    ('present: false\nexplanation: no antibiotics are suggested', F),
    # --- bare answers
    ('true', T), ('FALSE', F), ('**Yes**', T), ('"no"', F),
    # --- Chinese
    ('{"explanation": "回复询问了发病时间。", "criteria_met": true}', T),
    ('是', T), ('否', F),
    ('我认为符合标准。', U),
    # --- nothing to read
    ('', U), ('I cannot tell from the conversation.', U), ('{}', U), ('[true]', U),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_adversarial_judge_outputs(text, expected):
    assert parse_verdict(text)[0] == expected, text


def test_case_count_covers_the_classes():
    assert len(CASES) >= 30


def test_explanation_comes_from_the_answer_not_the_example():
    text = ('For example: {"explanation": "EXAMPLE", "criteria_met": true}\n'
            'My answer: {"explanation": "The reply omits red flags.", "criteria_met": false}')
    assert parse_verdict(text) == (False, "The reply omits red flags.")

"""Answer checker, format reward, MCQ and diagnosis-question data (verimed.core.tasks.answers, verimed.core.data.mcq).

Run: .venv/bin/python -m pytest tests/test_answers.py -q
"""
from __future__ import annotations

from pathlib import Path

import pytest

from verimed.core.tasks.answers import canonical, check_diagnosis, check_mcq, extract_final_answer, format_reward, gold_alternates, mcq_choice, normalise_answer
from verimed.core.data import DataError
from verimed.core.data.cases import load_cases
from verimed.core.tasks.prompts import diagnosis_prompt, mcq_prompt
from verimed.core.data.mcq import load_mcq

FIXTURES = Path(__file__).parent / "fixtures"


def test_normalise():
    assert normalise_answer("Hirschsprung’s  Disease.") == "hirschsprung disease"
    assert normalise_answer("**Type II** Diabetes") == "type 2 diabetes"
    assert normalise_answer("Chronic lymphocytic leukaemia") == normalise_answer("chronic lymphocytic leukemia")
    assert normalise_answer("Post-traumatic stress disorder") == "posttraumatic stress disorder"


@pytest.mark.parametrize("response, gold", [
    ("Final answer: Myasthenia gravis", "Myasthenia gravis"),
    ("final answer - MYASTHENIA GRAVIS.", "Myasthenia gravis"),
    ("**Final Answer:** MG", "Myasthenia gravis"),  # abbreviation in the response
    ("Final answer: myasthenia gravis", "MG"),  # abbreviation in the gold
    ("Final answer: acute MI", "Myocardial infarction"),  # qualifier + abbreviation
    ("Final answer: heart attack", "Myocardial infarction"),  # synonym
    ("Final answer: COPD", "Chronic obstructive pulmonary disease (COPD)"),
    ("Final answer: CLL", "Chronic lymphocytic leukemia (CLL)"),  # parenthetical alternate
    ("Final answer: Crohn disease", "Ulcerative colitis; Crohn’s disease"),  # ';' alternates
    ("Final answer: DVT", "Pulmonary embolism / deep vein thrombosis"),  # '/' alternates
    ("Final answer: Hirschsprung's disease", "Hirschsprung’s disease"),
    ("Final answer: Clostridium difficile colitis", "C. difficile colitis"),
    ("Final answer: PML", "Progressive multifocal encephalopathy (PML)"),
    ("Final answer: hemophilia A", "Hemophilia A"),
    ("Final answer: chronic hepatitis B", "Active chronic hepatitis B infection"),
    ("Final answer: type I diabetes", "Type 1 diabetes"),  # roman numerals
    ("Final answer: hemorrhoid", "Hemorrhoids"),  # plural
    ("The history fits.\nMost likely: well.\nMyasthenia gravis", "Myasthenia gravis"),  # last line fallback
    ("Final answer: Myasthenia gravis, not Lambert-Eaton syndrome", "Myasthenia gravis"),
])
def test_diagnosis_matches(response, gold):
    assert check_diagnosis(response, gold)


@pytest.mark.parametrize("response, gold", [
    ("Final answer: not myasthenia gravis", "Myasthenia gravis"),  # negated
    ("Final answer: myasthenia gravis is unlikely", "Myasthenia gravis"),
    ("Final answer: rule out MG", "Myasthenia gravis"),
    ("Final answer: Lambert-Eaton myasthenic syndrome", "Myasthenia gravis"),  # a different diagnosis
    ("Final answer: LEMS", "Myasthenia gravis"),
    ("Final answer: MG or LEMS", "Myasthenia gravis"),  # hedging
    ("Final answer: myasthenia gravis vs thyroid eye disease", "Myasthenia gravis"),
    ("Final answer: hypothyroidism", "Hyperthyroidism"),
    ("Final answer: acute lymphoblastic leukemia", "Chronic lymphocytic leukemia (CLL)"),
    ("Final answer: type 2 diabetes", "Type 1 diabetes"),
    ("Final answer: hemophilia B", "Hemophilia A"),
    ("Final answer: Cushing disease", "Cushing syndrome"),
    ("Final answer: gravis", "Myasthenia gravis"),  # partial
    ("Myasthenia gravis was my first thought.\nFinal answer: botulism", "Myasthenia gravis"),  # final line wins
    ("", "Myasthenia gravis"),
])
def test_diagnosis_distractors(response, gold):
    assert not check_diagnosis(response, gold)


def test_listed_synonyms():
    assert not check_diagnosis("Final answer: lupus", "Systemic lupus erythematosus")
    assert check_diagnosis("Final answer: lupus", "Systemic lupus erythematosus",
                           synonyms=[("systemic lupus erythematosus", "lupus")])
    assert check_diagnosis("Final answer: SLE", "Systemic lupus erythematosus")


def test_gold_alternates_and_canonical():
    assert gold_alternates("Chronic lymphocytic leukemia (CLL)") == ["CLL", "Chronic lymphocytic leukemia"]
    assert gold_alternates("A; B / C") == ["A", "B", "C"]
    assert canonical("Acute MI") == "acute myocardial infarction"
    assert canonical("mi") == canonical("myocardial infarction")  # a canonical phrase is not rewritten again


def test_extract_and_format():
    assert extract_final_answer("Thinking...\nFinal answer: Pneumonia.") == "Pneumonia."
    assert extract_final_answer("Final diagnosis:\n\nAsthma") == "Asthma"
    assert extract_final_answer("Final answer: A\nmore\nFinal answer: B") == "B"
    assert extract_final_answer("no marker here") is None
    assert format_reward("Reasoning.\nFinal answer: pneumonia") == 1.0
    assert format_reward("Final answer: pneumonia\nLet me know if you have questions.") == 0.0  # not last
    assert format_reward("Final answer:") == 0.0 and format_reward("") == 0.0
    assert format_reward("Final answer: " + "word " * 40) == 0.0


OPTIONS = {"A": "Aspirin", "B": "Heparin", "C": "Warfarin", "D": "Alteplase"}


@pytest.mark.parametrize("response, letter", [
    ("Final answer: C", "C"), ("Final answer: (C)", "C"), ("Final answer: C. Warfarin", "C"),
    ("Answer: option C", "C"), ("Final answer: warfarin", "C"), ("Final answer: [B]", "B"),
    ("Final answer: C or D", None), ("Final answer: C, D", None), ("Final answer: a warfarin dose", None),
    ("Final answer: E", None),
])
def test_mcq_choice(response, letter):
    assert mcq_choice(response, OPTIONS) == letter
    if letter:
        assert check_mcq(response, letter, OPTIONS)
        assert not check_mcq(response, "A" if letter != "A" else "B", OPTIONS)


def test_mcq_list_options_and_bad_letter():
    assert check_mcq("Final answer: B", "b", ["x", "y", "z"])
    with pytest.raises(ValueError, match="not one of the options"):
        check_mcq("Final answer: B", "F", OPTIONS)


def test_load_mcq_fixture():
    items, report = load_mcq(FIXTURES / "mcq_sample.jsonl")
    assert report.loaded == 5 and [i.answer for i in items] == ["B", "B", "A", "C", "B"]
    assert items[1].options["B"] == "Inferior myocardial infarction"  # list options are lettered
    text = mcq_prompt(items[0])[-1].content
    assert "B. Acetylcholine receptor antibodies" in text and "Final answer" in text
    assert check_mcq("Final answer: B", items[0].answer, items[0].options)


def test_load_mcq_errors_name_file_and_line():
    with pytest.raises(DataError, match=r"mcq_invalid.jsonl:2: answer: 'E' is not one of"):
        load_mcq(FIXTURES / "mcq_invalid.jsonl")
    items, report = load_mcq(FIXTURES / "mcq_invalid.jsonl", skip_invalid=True)
    assert len(items) == 1 and report.skipped == 1


def test_diagnosis_prompt_never_leaks_the_diagnosis():
    cases, _ = load_cases(skip_invalid=True)
    for case in cases:
        text = diagnosis_prompt(case)[-1].content
        words = f" {canonical(text)} "
        assert not any(f" {canonical(a)} " in words for a in gold_alternates(case.diagnosis)), case.case_id
        assert case.demographics.split()[0] in text and "Final answer" in text

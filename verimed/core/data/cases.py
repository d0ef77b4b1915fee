"""OSCE clinical cases (AgentClinic format) -> :class:`verimed.core.types.Case`.

Record shape: ``{"OSCE_Examination": {"Objective_for_Doctor", "Patient_Actor":
{"Demographics", "History", "Symptoms": {"Primary_Symptom",
"Secondary_Symptoms"}, "Past_Medical_History", "Social_History",
"Review_of_Systems", ...}, "Physical_Examination_Findings": {...},
"Test_Results": {...}, "Correct_Diagnosis"}}``. Exam and test dicts vary in
shape and are flattened to ``"A / B / C" -> "value"``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from verimed.core.data import LoadReport, RecordError, read_jsonl, require, shipped
from verimed.core.types import Case

DEFAULT_CASES = "cases_agentclinic_medqa_dev.jsonl"
_ROOT = "OSCE_Examination"
_KNOWN_ACTOR_KEYS = {
    "Demographics", "History", "Symptoms", "Past_Medical_History", "Social_History", "Review_of_Systems",
}
_KNOWN_TOP_KEYS = {
    "Objective_for_Doctor", "Patient_Actor", "Physical_Examination_Findings", "Test_Results", "Correct_Diagnosis",
}


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Flatten nested dicts/lists to ``{"a / b": "text"}``; leaves become strings."""
    out: dict[str, str] = {}
    if isinstance(value, dict):
        for key, sub in value.items():
            out.update(flatten(sub, f"{prefix} / {key}" if prefix else str(key)))
    elif isinstance(value, list):
        if all(not isinstance(v, (dict, list)) for v in value):
            out[prefix or "value"] = "; ".join(str(v) for v in value)
        else:
            for i, sub in enumerate(value):
                out.update(flatten(sub, f"{prefix} / {i}" if prefix else str(i)))
    elif value is not None and str(value).strip():
        out[prefix or "value"] = str(value).strip()
    return out


def _text(value: Any) -> str:
    """A section that is usually a string but sometimes a dict or list."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
        return "; ".join(str(v).strip() for v in value if str(v).strip())
    return "; ".join(f"{k}: {v}" for k, v in flatten(value).items())


def parse_case(record: dict[str, Any], line_no: int) -> Case:
    osce = require(record, _ROOT, dict)
    actor = require(osce, "Patient_Actor", dict, _ROOT)
    where = f"{_ROOT}.Patient_Actor"
    symptoms = require(actor, "Symptoms", dict, where)
    # Some records have an empty Symptoms section: the history then carries the complaint.
    primary = require(symptoms, "Primary_Symptom", str, f"{where}.Symptoms") if symptoms else ""
    secondary = symptoms.get("Secondary_Symptoms", [])
    if isinstance(secondary, str):
        secondary = [secondary]
    if not isinstance(secondary, list):
        raise RecordError(f"{where}.Symptoms.Secondary_Symptoms", f"expected list, got {type(secondary).__name__}")
    diagnosis = require(osce, "Correct_Diagnosis", (str, list), _ROOT)
    if isinstance(diagnosis, list):
        diagnosis = "; ".join(str(d) for d in diagnosis)
    if not diagnosis.strip():
        raise RecordError(f"{_ROOT}.Correct_Diagnosis", "must not be empty")
    return Case(
        case_id=f"case-{line_no:04d}",
        objective=_text(osce.get("Objective_for_Doctor", "")),
        demographics=_text(require(actor, "Demographics", (str, dict), where)),
        history=_text(require(actor, "History", (str, dict, list), where)),
        primary_symptom=primary.strip(),
        secondary_symptoms=[str(s).strip() for s in secondary if str(s).strip()],
        past_medical_history=_text(actor.get("Past_Medical_History", "")),
        social_history=_text(actor.get("Social_History", "")),
        review_of_systems=_text(actor.get("Review_of_Systems", "")),
        exam_findings=flatten(osce.get("Physical_Examination_Findings", {})),
        test_results=flatten(osce.get("Test_Results", {})),
        diagnosis=diagnosis.strip(),
        other_history={k: _text(v) for k, v in actor.items() if k not in _KNOWN_ACTOR_KEYS and _text(v)},
        extra={k: _text(v) for k, v in osce.items() if k not in _KNOWN_TOP_KEYS and _text(v)},
    )


def load_cases(path: str | Path | None = None, skip_invalid: bool = False) -> tuple[list[Case], LoadReport]:
    """Load OSCE cases from ``path`` (default: the 170 shipped AgentClinic cases)."""
    return read_jsonl(path or shipped(DEFAULT_CASES), parse_case, skip_invalid)

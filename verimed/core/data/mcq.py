"""MCQ JSONL items for the rule-based stage (their prompts: :mod:`verimed.core.tasks.prompts`).

    items, report = load_mcq("data/my_mcq.jsonl")        # [MCQItem], LoadReport

MCQ record shape (the common MedQA / MedMCQA-style JSONL):
``{"question": str, "options": {"A": str, ...} or [str, ...], "answer": "C"}``
(a list of options is lettered A, B, C, ...). Optional ``"id"``. Malformed
records raise ``DataError("FILE:LINE: FIELD: problem")`` (or are skipped and
counted with ``skip_invalid``). No MCQ data ships with verimed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from verimed.core.data import LoadReport, RecordError, read_jsonl, require

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

"""HealthBench JSONL (``oss_eval`` / hard / consensus files) -> :class:`HealthBenchExample`.

Record shape: ``{"prompt": [{"role", "content"}...], "prompt_id",
"rubrics": [{"criterion", "points", "tags"}...], "example_tags": [...],
"ideal_completions_data": ..., "canary": ...}``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import msgspec

from verimed.core.data import LoadReport, RecordError, read_jsonl, require, shipped
from verimed.core.types import RubricItem, Turn

DEFAULT_HEALTHBENCH = "healthbench_sample50.jsonl"
_ROLES = {"system", "user", "assistant"}


class HealthBenchExample(msgspec.Struct, frozen=True):
    prompt_id: str
    messages: list[Turn]
    rubric: list[RubricItem]
    example_tags: list[str]


def parse_healthbench(record: dict[str, Any], line_no: int) -> HealthBenchExample:
    prompt = require(record, "prompt", list)
    if not prompt:
        raise RecordError("prompt", "must contain at least one message")
    messages = []
    for i, msg in enumerate(prompt):
        if not isinstance(msg, dict):
            raise RecordError(f"prompt[{i}]", f"expected object, got {type(msg).__name__}")
        role = require(msg, "role", str, f"prompt[{i}]")
        if role not in _ROLES:
            raise RecordError(f"prompt[{i}].role", f"expected one of {sorted(_ROLES)}, got {role!r}")
        messages.append(Turn(role=role, content=require(msg, "content", str, f"prompt[{i}]")))
    rubrics = require(record, "rubrics", list)
    if not rubrics:
        raise RecordError("rubrics", "must contain at least one criterion")
    items = []
    for i, rub in enumerate(rubrics):
        where = f"rubrics[{i}]"
        if not isinstance(rub, dict):
            raise RecordError(where, f"expected object, got {type(rub).__name__}")
        points = require(rub, "points", (int, float), where)
        # NaN / Infinity (accepted by JSON parsers) fail here, before int() could raise bare.
        if isinstance(points, bool) or not math.isfinite(points) or points != int(points) or not -10 <= points <= 10:
            raise RecordError(f"{where}.points", f"expected an integer in [-10, 10], got {points!r}")
        tags = rub.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise RecordError(f"{where}.tags", "expected a list of strings")
        items.append(RubricItem(criterion=require(rub, "criterion", str, where), points=int(points), tags=tags))
    tags = record.get("example_tags", [])
    if not isinstance(tags, list):
        raise RecordError("example_tags", "expected a list of strings")
    prompt_id = record.get("prompt_id", f"line-{line_no}")
    return HealthBenchExample(prompt_id=str(prompt_id), messages=messages, rubric=items, example_tags=[str(t) for t in tags])


def load_healthbench(
    path: str | Path | None = None, skip_invalid: bool = False
) -> tuple[list[HealthBenchExample], LoadReport]:
    """Load HealthBench examples (default: the 50 shipped examples). A repeated
    ``prompt_id`` is a record error (``file:line: prompt_id: ...``): responses and
    gradings are keyed by it, so two examples sharing one would overwrite each other."""
    first_line: dict[str, int] = {}

    def parse_unique(record: dict[str, Any], line_no: int) -> HealthBenchExample:
        example = parse_healthbench(record, line_no)
        if example.prompt_id in first_line:
            raise RecordError("prompt_id", f"{example.prompt_id!r} repeats line {first_line[example.prompt_id]}")
        first_line[example.prompt_id] = line_no
        return example

    return read_jsonl(path or shipped(DEFAULT_HEALTHBENCH), parse_unique, skip_invalid)

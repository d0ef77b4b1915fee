"""The rubric model: clinical dimensions, validation, duplicate merging and
HealthBench interchange (paper §2.2, DESIGN §8).

A rubric is a ``list[RubricItem]``. Each item has criterion text, integer
points in [-10, 10] (negative = undesirable behaviour that subtracts when
present), a clinical ``dimension`` (one of :data:`DIMENSIONS`) and free
``tags``. HealthBench's ``{"criterion", "points", "tags"}`` dicts are the
interchange format; the dimension travels as a ``dimension:<name>`` tag, so

    rubric_from_healthbench(rubric_to_healthbench(items)) == items   (for normalised items)
    rubric_to_healthbench(rubric_from_healthbench(dicts)) == dicts   (for valid HealthBench dicts)
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Iterable, Sequence

from verimed.core.types import RubricItem, Turn

# The six dimensions of Baichuan-M2's clinical rubrics.
DIMENSIONS: tuple[str, ...] = (
    "diagnostic_accuracy",
    "consultation_logic",
    "treatment_rationality",
    "communication_empathy",
    "ethics_safety",
    "evidence_clarity",
)
DIMENSION_TAG = "dimension:"
MIN_POINTS, MAX_POINTS = -10, 10


class RubricError(ValueError):
    """A rubric that fails validation; ``problems`` lists every reason."""

    def __init__(self, problems: Sequence[str], what: str = "rubric"):
        self.problems = list(problems)
        super().__init__(f"invalid {what}: " + "; ".join(self.problems))


def make_item(criterion: str, points: int, dimension: str, tags: Iterable[str] = ()) -> RubricItem:
    """A normalised item: its dimension is also present as a ``dimension:`` tag."""
    if dimension not in DIMENSIONS:
        raise ValueError(f"unknown dimension {dimension!r}; expected one of {', '.join(DIMENSIONS)}")
    tag_list = [t for t in tags if not t.startswith(DIMENSION_TAG)]
    return RubricItem(
        criterion=criterion.strip(), points=int(points), tags=[f"{DIMENSION_TAG}{dimension}", *tag_list],
        dimension=dimension,
    )


# ------------------------------------------------------------ HealthBench I/O


def item_from_healthbench(record: dict[str, Any]) -> RubricItem:
    """``{"criterion", "points", "tags"}`` -> RubricItem (dimension read from a ``dimension:`` tag)."""
    if not isinstance(record, dict):
        raise ValueError(f"rubric item: expected an object, got {type(record).__name__}")
    criterion = record.get("criterion")
    if not isinstance(criterion, str) or not criterion.strip():
        raise ValueError("rubric item: `criterion` must be a non-empty string")
    points = record.get("points")
    if isinstance(points, bool) or not isinstance(points, (int, float)) or points != int(points):
        raise ValueError(f"rubric item: `points` must be an integer, got {points!r}")
    tags = record.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError("rubric item: `tags` must be a list of strings")
    dims = [t[len(DIMENSION_TAG):] for t in tags if t.startswith(DIMENSION_TAG)]
    return RubricItem(criterion=criterion, points=int(points), tags=list(tags), dimension=dims[0] if dims else None)


def item_to_healthbench(item: RubricItem) -> dict[str, Any]:
    """RubricItem -> HealthBench dict; the dimension is written as a tag if not already one."""
    tags = list(item.tags)
    if item.dimension is not None and f"{DIMENSION_TAG}{item.dimension}" not in tags:
        tags.insert(0, f"{DIMENSION_TAG}{item.dimension}")
    return {"criterion": item.criterion, "points": int(item.points), "tags": tags}


def rubric_from_healthbench(records: Sequence[dict[str, Any]]) -> list[RubricItem]:
    return [item_from_healthbench(r) for r in records]


def rubric_to_healthbench(items: Sequence[RubricItem]) -> list[dict[str, Any]]:
    return [item_to_healthbench(i) for i in items]


# ------------------------------------------------------- validation / merging


def criterion_key(text: str) -> str:
    """Duplicate key: lower case, punctuation dropped, whitespace collapsed."""
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split())


def merge_duplicates(items: Sequence[RubricItem]) -> list[RubricItem]:
    """Merge items whose criteria are equal up to case/punctuation and whose points
    have the same sign: keep the first text, the larger |points|, the union of tags.
    Same text with opposite signs is a contradiction left for :func:`validate_rubric`."""
    merged: dict[tuple[str, bool], RubricItem] = {}
    for item in items:
        key = (criterion_key(item.criterion), item.points > 0)
        prev = merged.get(key)
        if prev is None:
            merged[key] = item
            continue
        points = prev.points if abs(prev.points) >= abs(item.points) else item.points
        tags = prev.tags + [t for t in item.tags if t not in prev.tags]
        merged[key] = RubricItem(prev.criterion, points, tags, prev.dimension or item.dimension)
    return list(merged.values())


def validate_rubric(
    items: Sequence[RubricItem],
    required_dimensions: Iterable[str] = (),
    require_negative: bool = True,
) -> list[str]:
    """Every problem of ``items`` as a message (empty list = valid).

    Checks: non-empty criteria; integer points in [-10, 10] and non-zero; a
    known dimension consistent with its tag; at least one positive item (else
    the HealthBench score is undefined); at least one negative item when
    ``require_negative``; every ``required_dimensions`` covered; no duplicates.
    """
    problems: list[str] = []
    if not items:
        return ["rubric is empty"]
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        where = f"item {i} ({item.criterion[:40]!r})"
        if not item.criterion.strip():
            problems.append(f"item {i}: empty criterion")
        if isinstance(item.points, bool) or not isinstance(item.points, int):
            problems.append(f"{where}: points must be an integer, got {item.points!r}")
        elif not MIN_POINTS <= item.points <= MAX_POINTS or item.points == 0:
            problems.append(f"{where}: points must be a non-zero integer in [-10, 10], got {item.points}")
        if item.dimension is None:
            problems.append(f"{where}: missing dimension")
        elif item.dimension not in DIMENSIONS:
            problems.append(f"{where}: unknown dimension {item.dimension!r}")
        tagged = [t[len(DIMENSION_TAG):] for t in item.tags if t.startswith(DIMENSION_TAG)]
        if tagged and item.dimension is not None and tagged != [item.dimension]:
            problems.append(f"{where}: dimension tags {tagged} disagree with dimension {item.dimension!r}")
        key = criterion_key(item.criterion)
        if key in seen:
            problems.append(f"{where}: duplicate of item {seen[key]}")
        seen.setdefault(key, i)
    if not any(isinstance(i.points, int) and i.points > 0 for i in items):
        problems.append("no positive item (the score would be undefined)")
    if require_negative and not any(isinstance(i.points, int) and i.points < 0 for i in items):
        problems.append("no negative item")
    covered = {i.dimension for i in items}
    missing = [d for d in required_dimensions if d not in covered]
    if missing:
        problems.append(f"dimensions not covered: {', '.join(missing)}")
    return problems


def check_dimensions(dimensions: Iterable[str]) -> tuple[str, ...]:
    """Validate a configured list of dimension names (user input)."""
    dims = tuple(dimensions)
    unknown = [d for d in dims if d not in DIMENSIONS]
    if unknown:
        raise ValueError(f"unknown rubric dimensions {unknown}; expected a subset of {', '.join(DIMENSIONS)}")
    return dims


# ------------------------------------------------------------------- hashing


def dialogue_hash(dialogue: Sequence[Turn]) -> str:
    """Stable hash of a conversation slice (roles + contents; token ids ignored)."""
    payload = json.dumps([[t.role, t.content] for t in dialogue], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def rubric_hash(items: Sequence[RubricItem]) -> str:
    payload = json.dumps(rubric_to_healthbench(items), ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]

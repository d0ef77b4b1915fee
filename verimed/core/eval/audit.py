"""Audit trail of an evaluation: one judgement per rubric item, counted when the
judge returned none or several, and one JSONL line per graded item.

    judgements, missing, duplicates = check_judgements(rubric, raw_judgements)
    for line in item_lines(prompt_id, rubric, judgements): items_sink.write(line)

A missing judgement becomes an explicit ungradable one (``met=None``, left out
of the normaliser exactly as before, now counted and visible); duplicates that
agree are merged, conflicting ones become ungradable (the verdict would be a
guess); a judgement for an item the rubric lacks is a bug in the judge and raises.
"""
from __future__ import annotations

from typing import Sequence

import msgspec

from verimed.core.types import Judgement, RubricItem


def check_judgements(rubric: Sequence[RubricItem], judgements: Sequence[Judgement]
                     ) -> tuple[list[Judgement], int, int]:
    """(one judgement per item in item order, missing count, duplicate count)."""
    by_item: dict[int, list[Judgement]] = {}
    for j in judgements:
        if not 0 <= j.item_index < len(rubric):
            raise ValueError(f"judgement for item {j.item_index} but the rubric has {len(rubric)} items")
        by_item.setdefault(j.item_index, []).append(j)
    out, missing, duplicates = [], 0, 0
    for i in range(len(rubric)):
        found = by_item.get(i, [])
        if not found:
            missing += 1
            out.append(Judgement(item_index=i, met=None, explanation="missing: the judge returned no judgement",
                                 attempts=0))
            continue
        duplicates += len(found) - 1
        if len({j.met for j in found}) > 1:
            raws = " | ".join(j.raw for j in found)
            out.append(Judgement(item_index=i, met=None, attempts=sum(j.attempts for j in found),
                                 explanation=f"conflicting duplicate judgements: {[j.met for j in found]}", raw=raws))
        else:
            out.append(found[0])
    return out, missing, duplicates


def item_lines(prompt_id: str, rubric: Sequence[RubricItem], judgements: Sequence[Judgement]) -> list[str]:
    """One JSON line per item: the criterion, points, verdict, attempts, explanation and
    the raw judge output it was read from (``items.jsonl``)."""
    encode = msgspec.json.encode
    return [encode({"prompt_id": prompt_id, "item_index": j.item_index, "criterion": rubric[j.item_index].criterion,
                    "points": rubric[j.item_index].points, "met": j.met, "attempts": j.attempts,
                    "explanation": j.explanation, "raw": j.raw}).decode() + "\n" for j in judgements]

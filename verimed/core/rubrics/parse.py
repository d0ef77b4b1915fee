"""Lenient parsing of judge and rubric-generator output.

LLM judges (especially small ones) wrap JSON in prose or code fences, use
single quotes, Python booleans or "yes"/"no". :func:`parse_verdict` accepts
all of that and returns ``True``/``False`` or :data:`UNGRADABLE`; it never
raises on any input string (property-tested with hypothesis).

    parse_verdict('```json\n{"explanation": "ok", "criteria_met": true}\n```') -> (True, "ok")
    parse_verdict("I cannot tell")                                              -> ("ungradable", "")
"""
from __future__ import annotations

import json
import re
from typing import Any, Literal

UNGRADABLE: Literal["ungradable"] = "ungradable"
Verdict = bool | Literal["ungradable"]

# Keys a judge may use for the boolean, in order of preference: the positive
# template asks for "criteria_met", the negative one for "present".
VERDICT_KEYS = ("criteria_met", "present", "behaviour_present", "behavior_present", "met", "verdict", "answer", "result")
_TRUE = {"true", "yes", "y", "met", "present", "1", "correct"}
_FALSE = {"false", "no", "n", "not met", "not_met", "absent", "not present", "0", "incorrect"}
_MAX_CHARS = 20_000  # judge output beyond this is truncated before scanning (bounded work)
_MAX_OBJECTS = 32  # JSON candidates tried per text
_KEY_RE = re.compile(
    r"""["']?(%s)["']?\s*[:=]\s*["']?(true|false|yes|no)\b""" % "|".join(VERDICT_KEYS), re.IGNORECASE
)
_EXPLANATION_RE = re.compile(r"""["']?explanation["']?\s*:\s*["']((?:[^"'\\]|\\.)*)""", re.IGNORECASE)


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().strip(".!").lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
    return None


def json_candidates(text: str, opener: str = "{") -> list[Any]:
    """Decoded JSON values (objects for ``"{"``, arrays for ``"["``) found in ``text``,
    outermost first. Tolerates code fences, prose around them, Python literals
    (True/False/None) and trailing commas. Never raises."""
    if not isinstance(text, str):
        return []
    text = text[:_MAX_CHARS]
    decoder = json.JSONDecoder()
    found: list[Any] = []
    pos = text.find(opener)
    tries = 0
    while pos != -1 and tries < _MAX_OBJECTS:
        tries += 1
        value, end = _decode_at(decoder, text, pos)
        if value is not None:
            found.append(value)
            pos = text.find(opener, end)
        else:
            pos = text.find(opener, pos + 1)
    return found


def _decode_at(decoder: json.JSONDecoder, text: str, pos: int) -> tuple[Any, int]:
    try:
        return decoder.raw_decode(text, pos)
    except (ValueError, RecursionError):
        pass
    # Repair the common near-JSON forms on the balanced span starting at pos.
    span = _balanced_span(text, pos)
    if span is None:
        return None, pos
    fixed = re.sub(r",\s*([}\]])", r"\1", span)
    fixed = re.sub(r"\bTrue\b", "true", re.sub(r"\bFalse\b", "false", re.sub(r"\bNone\b", "null", fixed)))
    if "'" in fixed and '"' not in fixed:
        fixed = fixed.replace("'", '"')
    try:
        return json.loads(fixed), pos + len(span)
    except (ValueError, RecursionError):
        return None, pos


def _balanced_span(text: str, pos: int) -> str | None:
    """The substring from ``text[pos]`` to its matching bracket (quotes respected)."""
    opener = text[pos]
    closer = {"{": "}", "[": "]"}.get(opener)
    if closer is None:
        return None
    depth, quote, escaped = 0, "", False
    for i in range(pos, len(text)):
        ch = text[i]
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return text[pos:i + 1] if ch == closer else None
    return None


def parse_verdict(text: str) -> tuple[Verdict, str]:
    """Judge output -> (True | False | "ungradable", explanation). Never raises.

    Order: a JSON object with a verdict key; a ``key: true`` pattern in broken
    JSON; a bare answer ("true", "No.", ...) as the whole output or its first word.
    """
    if not isinstance(text, str):
        return UNGRADABLE, ""
    text = text[:_MAX_CHARS]
    for obj in json_candidates(text, "{"):
        if isinstance(obj, dict):
            lowered = {str(k).strip().lower(): v for k, v in obj.items()}
            for key in VERDICT_KEYS:
                if key in lowered:
                    verdict = _as_bool(lowered[key])
                    if verdict is not None:
                        explanation = lowered.get("explanation", "")
                        return verdict, explanation if isinstance(explanation, str) else str(explanation)
    match = _KEY_RE.search(text)
    if match:
        verdict = _as_bool(match.group(2))
        expl = _EXPLANATION_RE.search(text)
        if verdict is not None:
            return verdict, expl.group(1) if expl else ""
    stripped = text.strip().strip("`*\"' ").lower()
    whole = _as_bool(stripped)
    if whole is not None:
        return whole, ""
    first = re.match(r"(true|false|yes|no)\b", stripped)
    if first:
        verdict = _as_bool(first.group(1))
        if verdict is not None:
            return verdict, text.strip()
    return UNGRADABLE, ""

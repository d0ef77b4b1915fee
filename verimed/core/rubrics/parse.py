"""Lenient parsing of judge and rubric-generator output.

LLM judges (especially small ones) wrap JSON in prose or code fences, use
single quotes, Python booleans or "yes"/"no". :func:`parse_verdict` accepts
all of that and returns ``True``/``False`` or :data:`UNGRADABLE`; it never
raises on any input string (property-tested with hypothesis). It never guesses
(DESIGN §8): a verdict is read only from the answer itself, never from an
echoed format template, a format example, or words inside the explanation;
conflicting answers, ``null`` and non-boolean verdicts are ungradable (the judge
re-asks). ``tests/test_judge_parse.py`` holds the adversarial outputs.

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
# template asks for "criteria_met", the negative one for "present". Negated keys
# state the opposite ("criteria_not_met": true means not met).
VERDICT_KEYS = ("criteria_met", "present", "behaviour_present", "behavior_present", "met", "verdict", "answer", "result")
NEGATED_KEYS = ("criteria_not_met", "criteria_unmet", "not_met", "unmet", "not_present")
_TRUE = {"true", "yes", "y", "met", "present", "1", "correct", "是", "是的", "符合"}
_FALSE = {"false", "no", "n", "not met", "not_met", "absent", "not present", "0", "incorrect", "否", "不是", "不符合"}
_MAX_CHARS = 20_000  # judge output beyond this is truncated before scanning (bounded work)
_MAX_OBJECTS = 32  # JSON candidates tried per text
# key: value in broken JSON / YAML; the left guard keeps "met" from matching inside "criteria_not_met".
_KV_RE = re.compile(r"""(?<![\w-])["']?(%s)["']?\s*[:=]\s*([^\n,}]*)""" % "|".join(NEGATED_KEYS + VERDICT_KEYS),
                    re.IGNORECASE)
_LEADING_WORD_RE = re.compile(r"""["'*]*(true|false|yes|no)\b""", re.IGNORECASE)
_FIRST_WORD_RE = re.compile(r"(true|false|yes|no)\s*[,.:;!\-\u2014]", re.IGNORECASE)
# Echoed format templates: "true or false", "true/false", "<true|false>", "boolean".
_TEMPLATE_VALUE_RE = re.compile(r"\btrue\s*(or|/|\|)\s*false\b|\bfalse\s*(or|/|\|)\s*true\b|^\s*<.*>\s*$|\bboolean\b",
                                re.IGNORECASE)
_PLACEHOLDER_RE = re.compile(r"^\s*(<[^>]*>|\.\.\.|\u2026)\s*$")
_EXAMPLE_RE = re.compile(r"\b(example|e\.g\.|for instance|format|template|schema|such as|sample)\b|示例|例如|格式",
                         re.IGNORECASE)
_SENTENCE_SPLIT_RE = re.compile(r"\n|(?<!e\.g)[.!?](?:\s|$)")


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
    (True/False/None), upper-case TRUE/FALSE and trailing commas. Never raises."""
    return [value for value, _, _ in _json_values(text, opener)]


def _json_values(text: str, opener: str) -> list[tuple[Any, int, int]]:
    """(value, start, end) of each decodable JSON value in ``text``."""
    if not isinstance(text, str):
        return []
    text = text[:_MAX_CHARS]
    decoder = json.JSONDecoder()
    found: list[tuple[Any, int, int]] = []
    pos = text.find(opener)
    tries = 0
    while pos != -1 and tries < _MAX_OBJECTS:
        tries += 1
        value, end = _decode_at(decoder, text, pos)
        if value is not None:
            found.append((value, pos, end))
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
    fixed = re.sub(r"\b(true|false)\b", lambda m: m.group(1).lower(), fixed, flags=re.IGNORECASE)
    fixed = re.sub(r"\bNone\b", "null", fixed)
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

    Read only from the answer itself (DESIGN §8):
    1. JSON objects with a verdict key, leaving out echoed templates (``true or
       false``, ``<one sentence>``) and format examples (introduced by "example",
       "format", ...). Every remaining answer must agree; a ``null`` or non-boolean
       verdict is an answer that says nothing (ungradable), never filled in from
       the explanation.
    2. ``key: value`` lines (broken JSON, YAML) with quoted prose masked out, so a
       key named inside an explanation is not read; same template/example rules.
    3. The whole output is a bare answer ("true", "No.", "是"), or it starts with
       yes/no/true/false followed by punctuation ("No, the reply ..."; "No doubt
       ..." is not an answer).
    Negated keys (``criteria_not_met``, ``unmet``) invert their value.
    """
    if not isinstance(text, str):
        return UNGRADABLE, ""
    text = text[:_MAX_CHARS]
    answers: list[tuple[Verdict, str]] = []
    spans: list[tuple[int, int]] = []
    prev_end = 0
    for value, start, end in _json_values(text, "{"):
        spans.append((start, end))
        if isinstance(value, dict) and not _is_example(value, text[prev_end:start]):
            found = _verdict_of_object(value)
            if found is not None:
                answers.append(found)
        prev_end = end
    if answers:
        return _agreed(answers)
    answers = _key_value_answers(_mask(text, spans))
    if answers:
        return _agreed(answers)
    return _bare_answer(text)


def _agreed(answers: list[tuple[Verdict, str]]) -> tuple[Verdict, str]:
    """The one verdict all answers give; two different answers would be a guess."""
    verdicts = {v for v, _ in answers}
    if len(verdicts) == 1 and UNGRADABLE not in verdicts:
        return answers[-1]
    return UNGRADABLE, ""


def _is_template(value: Any) -> bool:
    return isinstance(value, str) and bool(_TEMPLATE_VALUE_RE.search(value))


def _is_example(obj: dict, before: str) -> bool:
    """An echoed template or a format example rather than the answer: a placeholder
    value, or an "example"/"format" word in the sentence that introduces it."""
    if any(_is_template(v) or (isinstance(v, str) and _PLACEHOLDER_RE.match(v)) for v in obj.values()):
        return True
    return bool(_EXAMPLE_RE.search(_last_sentence(before)))


def _last_sentence(before: str) -> str:
    return _SENTENCE_SPLIT_RE.split(before)[-1]


def _verdict_of_object(obj: dict) -> tuple[Verdict, str] | None:
    """(verdict, explanation) of an answer object; None when it has no verdict key."""
    lowered = {str(k).strip().lower(): v for k, v in obj.items()}
    explanation = lowered.get("explanation", "")
    explanation = explanation if isinstance(explanation, str) else str(explanation)
    for key in (*VERDICT_KEYS, *NEGATED_KEYS):
        if key in lowered:
            verdict = _as_bool(lowered[key])
            if verdict is None:
                return UNGRADABLE, explanation
            return (not verdict if key in NEGATED_KEYS else verdict), explanation
    return None


def _mask(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` with decoded JSON objects and quoted prose (strings with spaces: an
    explanation, never a key) blanked out, positions kept."""
    chars = list(text)
    for start, end in spans:
        chars[start:end] = " " * (end - start)
    # Double-quoted strings paired left to right; one left open ends at the line end.
    i, n = 0, len(chars)
    while i < n:
        if chars[i] != '"':
            i += 1
            continue
        j = i + 1
        while j < n and chars[j] not in '"\n':
            j += 2 if chars[j] == "\\" else 1
        j = min(j, n)
        if any(c.isspace() for c in chars[i + 1:j]):
            chars[i + 1:j] = " " * (j - i - 1)
        i = j + 1
    return "".join(chars)


def _key_value_answers(masked: str) -> list[tuple[Verdict, str]]:
    answers: list[tuple[Verdict, str]] = []
    for match in _KV_RE.finditer(masked):
        key, value = match.group(1).lower(), match.group(2).strip()
        line_start = masked.rfind("\n", 0, match.start()) + 1
        if _is_template(value) or _EXAMPLE_RE.search(_last_sentence(masked[line_start:match.start()])):
            continue
        word = _LEADING_WORD_RE.match(value)
        verdict = _as_bool(word.group(1)) if word else None
        if verdict is None:
            answers.append((UNGRADABLE, ""))  # a key with an unreadable value ("tr", "null", "partially")
        else:
            answers.append((not verdict if key in NEGATED_KEYS else verdict, ""))
    return answers


def _bare_answer(text: str) -> tuple[Verdict, str]:
    stripped = text.strip().strip("`*\"' \n").strip()
    whole = _as_bool(stripped)
    if whole is not None:
        return whole, ""
    first = _FIRST_WORD_RE.match(stripped)
    if first:
        verdict = _as_bool(first.group(1))
        if verdict is not None:
            return verdict, stripped
    return UNGRADABLE, ""

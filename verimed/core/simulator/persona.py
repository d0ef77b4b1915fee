"""Patient personas (paper §2.1): an MBTI type plus social traits, sampled per episode.

    persona = sample_persona(seed=7, case=case)          # deterministic in (seed, case id)
    traits = behaviour(persona)                           # what the type implies for behaviour

Behaviour follows from the four letters:
  E/I  talkativeness (how many facts per answer, chatty asides) and whether the
       patient actively asks about treatment (E) or accepts passively (I);
  T/F  how advice is received: asks for the reasoning (T) or seeks reassurance (F);
  J/P  wants a concrete next step (J) or goes along flexibly (P).
Social traits are sampled to fit the speaker's age (a caregiver speaks for a
child under 13): education, money constraints, health literacy, anxiety.

``PHRASES`` is the persona's vocabulary for the rules backend; ``MARKERS``
maps phrases (and generic words) to the traits they require, which the audit
uses to score persona consistency for any backend.
"""
from __future__ import annotations

import random
from typing import Literal

import msgspec

from verimed.core.simulator.script import is_report_line, parse_speaker
from verimed.core.simulator.text import normalise, sentences
from verimed.core.types import Case, Persona

MBTI_TYPES = tuple(a + b + c + d for a in "EI" for b in "SN" for c in "TF" for d in "JP")


class Traits(msgspec.Struct, frozen=True):
    """Behaviour implied by a persona (derived, not stored: the Persona is the record)."""

    talkative: bool  # E: offers up to 3 relevant facts and chatty asides; I: 1-2 facts, terse
    asks_treatment: bool  # E: asks what can be done; I: accepts passively
    advice: Literal["questions", "accepts"]  # T: asks why; F: accepts, seeks reassurance
    wants_plan: bool  # J: wants concrete next steps; P: flexible
    max_facts: int


def validate_mbti(mbti: str) -> str:
    code = mbti.strip().upper()
    if code not in MBTI_TYPES:
        raise ValueError(f"persona {mbti!r} is not an MBTI type; expected one of {', '.join(MBTI_TYPES)}")
    return code


def behaviour(persona: Persona) -> Traits:
    m = validate_mbti(persona.mbti)
    extro = m[0] == "E"
    return Traits(talkative=extro, asks_treatment=extro, advice="questions" if m[2] == "T" else "accepts",
                  wants_plan=m[3] == "J", max_facts=3 if extro else 2)


def _pick(rng: random.Random, options: dict[str, float]) -> str:
    return rng.choices(list(options), weights=list(options.values()))[0]


def sample_persona(seed: int, case: Case | None = None, mbti: str | None = None) -> Persona:
    """One persona per episode, deterministic in ``(seed, case id)``; ``mbti`` fixes the type."""
    rng = random.Random(f"verimed-persona:{seed}:{case.case_id if case is not None else ''}")
    code = validate_mbti(mbti) if mbti else rng.choice(MBTI_TYPES)
    speaker = parse_speaker(case.demographics) if case is not None else None
    age = speaker.age_years if speaker is not None else None
    if speaker is not None and speaker.is_caregiver:
        age = rng.uniform(20, 50)  # the adult who speaks for the child
    if age is not None and age < 18:
        education = "secondary" if age >= 12 else "primary"
    elif age is not None and age >= 70:
        education = _pick(rng, {"primary": 0.35, "secondary": 0.45, "university": 0.2})
    else:
        education = _pick(rng, {"primary": 0.2, "secondary": 0.5, "university": 0.3})
    literacy = _pick(rng, {
        "primary": {"low": 0.6, "medium": 0.35, "high": 0.05},
        "secondary": {"low": 0.25, "medium": 0.55, "high": 0.2},
        "university": {"low": 0.05, "medium": 0.45, "high": 0.5},
    }[education])
    feeling = code[2] == "F"
    anxiety = _pick(rng, {"low": 0.2, "medium": 0.4, "high": 0.4} if feeling else {"low": 0.45, "medium": 0.4, "high": 0.15})
    money = rng.random() < {"primary": 0.45, "secondary": 0.3, "university": 0.15}[education]
    return Persona(mbti=code, education=education, money_constraint=money, health_literacy=literacy, anxiety=anxiety)


def describe(persona: Persona) -> str:
    """One paragraph for LLM prompts and the interactive header."""
    t = behaviour(persona)
    parts = [
        f"MBTI {persona.mbti}:",
        "talkative, volunteers detail about what is asked" if t.talkative else "reserved, answers briefly",
        "asks what can be done about it" if t.asks_treatment else "accepts the doctor's advice passively",
        "wants to understand the reasoning" if t.advice == "questions" else "looks for reassurance",
        "wants concrete next steps" if t.wants_plan else "is flexible about plans",
        f"education: {persona.education}", f"health literacy: {persona.health_literacy}",
        f"anxiety: {persona.anxiety}",
        "money is tight" if persona.money_constraint else "no money worries",
    ]
    return parts[0] + " " + "; ".join(parts[1:]) + "."


# ------------------------------------------------------------------ phrasing

# Each entry: category -> variants. Variants carry no clinical content (no
# numbers, no findings), so phrasing can never fabricate a fact.
PHRASES: dict[str, tuple[str, ...]] = {
    "greet_e": ("Hi doctor, thanks for seeing me!", "Hello doctor, good to meet you!"),
    "greet_i": ("Hello.", "Hi, doctor."),
    "filler_e": ("Honestly, ", "Well, you know, ", "So, "),
    "worry_high": ("I'm really worried about this.", "It's been scaring me, to be honest."),
    "worry_medium": ("I'm a bit concerned.", "It's been on my mind."),
    "unknown_e": ("Hmm, honestly I don't know, nobody has told me anything about that.",
                  "I'm not sure, I really couldn't say."),
    "unknown_i": ("I don't know.", "I'm not sure."),
    "dx_ask": ("I don't know what it is, that's why I came to see you.", "I have no idea, you're the doctor."),
    "results_recap": ("Here is what came back.", "This is what was found."),
    "results_ask": ("I haven't had any results given to me.", "Nobody has told me any results."),
    "exam_ok_e": ("Sure, go ahead!", "Of course, no problem."),
    "exam_ok_i": ("Okay.", "Alright."),
    "test_ok": ("Okay, let's do it.", "Alright, if you think it's needed."),
    "test_none": ("I haven't had that one done before, so I can't tell you anything about it yet.",
                  "I don't think I've ever had that one, so there's nothing I can tell you about it."),
    "exam_none": ("I haven't noticed anything wrong there myself.", "Nothing feels different there to me."),
    "money": ("Will that cost a lot? Money is tight for me right now.", "Is there a cheaper option? I can't afford much."),
    "repeat": ("Like I said, ", "As I mentioned, "),
    "treatment_q": ("What can we do about it?", "What are my options for treatment?"),
    "why_q": ("Why do you think that's the best approach?", "Can you explain why?"),
    "reassure": ("Thank you, that's reassuring to hear.", "Thanks, that helps a lot."),
    "next_step": ("So what exactly should I do next?", "What's the next step?"),
    "go_along": ("Okay, I'll go with that.", "Alright, sounds fine."),
    "plain_words": ("Sorry, what does that mean in plain words?", "I don't really understand the medical terms."),
    "close_e": ("Thank you so much, doctor!", "Thanks a lot, doctor, I appreciate it!"),
    "close_i": ("Thank you.", "Okay, thanks."),
    "nothing_else": ("That's about everything I can think of.", "Nothing else comes to mind."),
}

# Marker categories and the persona condition under which each is in character.
_GENERIC_MARKERS: dict[str, tuple[str, ...]] = {
    "worry": ("worried", "scared", "scaring", "afraid", "terrified", "nervous", "anxious", "panic"),
    "money": ("afford", "expensive", "cost a lot", "cheaper", "money is tight", "insurance"),
}


def _in_character(category: str, persona: Persona) -> bool:
    t = behaviour(persona)
    return {
        "greet_e": t.talkative, "filler_e": t.talkative, "unknown_e": t.talkative, "exam_ok_e": t.talkative,
        "close_e": t.talkative, "greet_i": not t.talkative, "exam_ok_i": not t.talkative,
        "close_i": not t.talkative, "unknown_i": not t.talkative,
        "worry_high": persona.anxiety == "high", "worry_medium": persona.anxiety != "low",
        "worry": persona.anxiety != "low", "money": persona.money_constraint,
        "treatment_q": t.asks_treatment, "why_q": t.advice == "questions", "reassure": t.advice == "accepts",
        "next_step": t.wants_plan, "go_along": not t.wants_plan, "plain_words": persona.health_literacy == "low",
    }.get(category, True)


def persona_violations(text: str, persona: Persona) -> list[str]:
    """Marker categories in ``text`` that are out of character for ``persona`` (empty = consistent).

    Checks the rules phrase bank verbatim, generic worry / money words, and
    length: a reserved (I) persona does not speak more than 4 sentences of its
    own (relayed exam/test report lines do not count).
    """
    norm = normalise(text)
    found: set[str] = set()
    # Longest phrases first, each match cut out, so "Hi, doctor." inside "Hi doctor, thanks ..." is not counted twice.
    for variant, cat in sorted(((normalise(v), c) for c, vs in PHRASES.items() for v in vs), key=lambda t: -len(t[0])):
        if len(variant) > 6 and variant in norm:
            found.add(cat)
            norm = norm.replace(variant, " | ")
    found |= {cat for cat, words in _GENERIC_MARKERS.items() if any(f" {w} " in f" {norm} " for w in words)}
    bad = sorted(c for c in found if not _in_character(c, persona))
    speech = " ".join(line for line in text.splitlines() if not is_report_line(line))
    if not behaviour(persona).talkative and len(sentences(speech)) > 4:
        bad.append("verbose")
    return bad

"""The patient script: a :class:`~verimed.core.types.Case` as addressable facts.

Every piece of a case becomes a :class:`Fact` with a stable key and a kind::

    demographics          "demographics"
    chief_complaint       "chief_complaint"
    hpi                   "hpi/1", "hpi/2", ...           (one per history sentence)
    symptom_primary       "symptom/primary"
    symptom_secondary     "symptom/secondary/1", ...
    past_history          "past/1", ...
    social_history        "social/1", ...
    review_of_systems     "ros/1", ...
    other_history         "other/Current_Medications/1", ... (medications, family history, ...)
    exam                  "exam/Vital_Signs / Blood_Pressure"   (gated: only after examining)
    test                  "test/Imaging / Chest_CT / Findings"  (gated: only after ordering)
    diagnosis             "diagnosis"                            (never spoken)

Each fact carries ``text`` (the case's words) and ``spoken`` (what the patient
says: first person, or the caregiver speaking about a child). Sections that
say "not provided" are dropped, so questions about them get "I don't know".

    script = PatientScript.from_case(case)
    script.facts_of("social_history"); script["exam/Vital_Signs / Heart_Rate"]
"""
from __future__ import annotations

import re
from typing import Literal

import msgspec

from verimed.core.simulator.text import content_stems, normalise, numbers, sentences, stem
from verimed.core.types import Case

FactKind = Literal[
    "demographics", "chief_complaint", "hpi", "symptom_primary", "symptom_secondary", "past_history",
    "social_history", "review_of_systems", "other_history", "exam", "test", "diagnosis",
]
GATED_KINDS = frozenset({"exam", "test"})
PATIENT_KINDS = frozenset({
    "demographics", "chief_complaint", "hpi", "symptom_primary", "symptom_secondary", "past_history",
    "social_history", "review_of_systems", "other_history",
})
_NOT_PROVIDED = re.compile(
    r"\b(?:not (?:provided|available|specified|mentioned|given|documented|reported|known)|no provided"
    r"|no (?:additional |further |other )?(?:information|data|details?)|unknown|n/a|none provided"
    r"|(?:was|were|history) mentioned|(?:information|symptoms) provided)\b",
    re.IGNORECASE,
)
# Diagnosis words that say nothing on their own: "chronic kidney failure" leaks
# through "failure" (if the history never says it), not through "chronic".
_GENERIC_DX = frozenset(stem(w) for w in """acute chronic disease disorder syndrome reaction type primary secondary
    infection injury condition severe mild moderate early late left right bilateral unilateral benign related induced
    with without and associated due""".split())


class ScriptError(ValueError):
    """A case that cannot be played (e.g. nothing for the patient to open with)."""


class Fact(msgspec.Struct, frozen=True):
    key: str
    kind: FactKind
    text: str  # the case's own words
    spoken: str  # what the patient says (first person / caregiver voice); exam/test: a bracketed report
    label: str = ""  # exam/test: the flattened key in readable words ("Vital signs, heart rate")


class Speaker(msgspec.Struct, frozen=True):
    """Who talks: the patient, or a caregiver for a child (age < 13)."""

    age_years: float | None
    sex: str  # "female" | "male" | ""
    is_caregiver: bool
    child_noun: str = ""  # "son", "daughter", "baby", "child"

    @property
    def subject(self) -> str:
        return f"my {self.child_noun}" if self.is_caregiver else "I"


def parse_speaker(demographics: str) -> Speaker:
    """Age and sex from free text like "35-year-old female", "Newborn, born at 33 weeks", "8-month-old boy"."""
    d = demographics.lower()
    age: float | None = None
    m = re.search(r"(\d+(?:\.\d+)?)[\s-]*(year|yr|month|week|day|hour)", d)
    if m:
        scale = {"year": 1.0, "yr": 1.0, "month": 1 / 12, "week": 1 / 52, "day": 1 / 365, "hour": 1 / 8760}
        age = float(m.group(1)) * scale[m.group(2)]
    elif re.search(r"newborn|neonate|infant|baby", d):
        age = 0.0
    sex = "female" if re.search(r"\b(female|woman|girl|lady|she|mother)\b", d) else (
        "male" if re.search(r"\b(male|man|boy|gentleman|he)\b", d) else "")
    child = age is not None and age < 13
    noun = "baby" if child and age is not None and age < 1.5 else {"female": "daughter", "male": "son"}.get(sex, "child")
    return Speaker(age_years=age, sex=sex, is_caregiver=child, child_noun=noun if child else "")


_VERBS_3RD = {
    "has": "have", "is": "am", "does": "do", "was": "was", "reports": "report", "notes": "notice",
    "mentions": "mention", "describes": "describe", "states": "say", "says": "say", "complains": "complain",
    "presents": "come in", "works": "work", "lives": "live", "smokes": "smoke", "drinks": "drink", "takes": "take",
    "uses": "use", "experiences": "experience", "admits": "admit", "endorses": "have", "feels": "feel",
    "shares": "share", "recalls": "recall", "notices": "notice", "consumes": "consume", "exercises": "exercise",
    "enjoys": "enjoy", "denies": "deny", "attends": "attend", "spends": "spend", "walks": "walk", "eats": "eat",
    "sleeps": "sleep", "wears": "wear", "travels": "travel", "remembers": "remember", "believes": "believe",
    "hears": "hear", "sees": "see", "expresses": "express", "reveals": "reveal", "indicates": "say",
    "appears": "seem", "seems": "seem", "wants": "want", "needs": "need", "worries": "worry", "tries": "try", "started": "started", "became": "became", "had": "had", "developed": "developed",
}


def to_first_person(text: str, speaker: Speaker) -> str:
    """Case prose ("The patient reports ... She notes ...") in the speaker's voice."""
    t = re.sub(r"\s+", " ", text.strip())
    t = re.sub(r"^(?:the )?patient (?:denies|denied) (?:experiencing |having )?(?:any )?", "No ", t, flags=re.I)
    t = re.sub(r"^denies (?:experiencing |having )?(?:any )?", "No ", t, flags=re.I)
    if speaker.is_caregiver:
        kid = speaker.child_noun
        t = re.sub(r"\bthe patient's\b", f"my {kid}'s", t, flags=re.I)
        t = re.sub(r"\bthe (?:patient|infant|child|baby|boy|girl|newborn|neonate)\b", f"my {kid}", t, flags=re.I)
        t = re.sub(r"^(?:patient|infant|child|baby)\b", f"My {kid}", t, flags=re.I)
        t = re.sub(r"\bby (?:the|his|her) (?:mother|father|parents?|caregivers?)\b", "by me", t, flags=re.I)
        t = re.sub(r"\b(?:the|his|her) (?:mother|father|parents?|caregivers?)\b", "I", t, flags=re.I)
        return _fix_agreement(_capitalise(t))
    t = re.sub(r"\b(?:the )?patient's\b", "my", t, flags=re.I)
    t = re.sub(r"\b(?:the )?patient\b", "I", t, flags=re.I)
    t = re.sub(r"\b(?:she|he)\b", "I", t, flags=re.I)
    t = re.sub(r"\b(?:her|his)\b", "my", t, flags=re.I)
    t = re.sub(r"\b(?:herself|himself)\b", "myself", t, flags=re.I)
    t = re.sub(r"\bhim\b", "me", t, flags=re.I)
    first = t.split(" ", 1)[0].lower()
    if first in _VERBS_3RD and first not in {"is", "was", "had", "has"}:
        t = "I " + t[0].lower() + t[1:]
    return _fix_agreement(_capitalise(t))


def _fix_agreement(t: str) -> str:
    """"I has" -> "I have", "I notes" -> "I notice"; "my son has" stays."""
    def repl(m: re.Match[str]) -> str:
        adverb, verb = m.group(2) or "", m.group(3)
        return f"{m.group(1)} {adverb}{_verb_base(verb)}"
    t = re.sub(r"\b(I) ((?:also|then|still|now|later|often|frequently|further|additionally) )?(\w+)\b", repl, t)
    t = re.sub(r"\bI am\b", "I'm", t)
    return re.sub(r"\bmy my\b", "my", t)


def _verb_base(verb: str) -> str:
    """The first-person form of a word following "I" (almost always a verb in case prose)."""
    low = verb.lower()
    if low in _VERBS_3RD:
        return _VERBS_3RD[low]
    if low in _NOT_VERBS or len(low) < 4 or not low.endswith("s") or low.endswith(("ss", "us", "is", "ys", "'s")):
        return verb
    if low.endswith("ies"):
        return verb[:-3] + "y"
    if low.endswith(("ches", "shes", "xes", "sses", "zes", "oes")):
        return verb[:-2]
    return verb[:-1]


_NOT_VERBS = frozenset("always sometimes perhaps thus nevertheless nonetheless besides".split())


def _capitalise(t: str) -> str:
    return t[:1].upper() + t[1:] if t else t


def _label(flat_key: str) -> str:
    """"Vital_Signs / Blood_Pressure" -> "Vital signs, blood pressure"."""
    parts = [p.replace("_", " ").strip() for p in flat_key.split(" / ") if p.strip() and not p.strip().isdigit()]
    parts = [p[:1].upper() + p[1:].lower() if not p.isupper() else p for p in parts]
    return ", ".join(parts) or flat_key


class PatientScript:
    """All facts of one case, indexed by key and by kind (see module docstring)."""

    def __init__(self, case: Case, facts: list[Fact], speaker: Speaker):
        self.case = case
        self.facts = facts
        self.speaker = speaker
        self._by_key = {f.key: f for f in facts}
        if len(self._by_key) != len(facts):
            raise AssertionError("duplicate fact keys")
        spoken_text = " ".join(f.text for f in facts if f.kind in PATIENT_KINDS)
        self.patient_numbers = numbers(spoken_text)
        self.all_numbers = numbers(" ".join(f"{f.label} {f.text}" for f in facts if f.kind != "diagnosis"))
        dx_stems = [s for s in content_stems(case.diagnosis) if s not in _GENERIC_DX and len(s) > 3]
        patient_stems = set(content_stems(spoken_text))
        # Diagnosis words the patient never uses for their own story: saying one leaks the diagnosis.
        self.diagnosis_stems = frozenset(s for s in dx_stems if s not in patient_stems)
        self.diagnosis_phrase = normalise(case.diagnosis)
        self._phrase_in_story = self.diagnosis_phrase in normalise(spoken_text)

    @classmethod
    def from_case(cls, case: Case) -> "PatientScript":
        if not case.diagnosis.strip():
            raise ScriptError(f"{case.case_id}: the case has no diagnosis (Correct_Diagnosis is required)")
        speaker = parse_speaker(case.demographics)
        facts: list[Fact] = []

        def add(key: str, kind: FactKind, text: str, spoken: str | None = None, label: str = "") -> None:
            text = text.strip()
            if text and not _is_not_provided(text):
                facts.append(Fact(key, kind, text, spoken if spoken is not None else to_first_person(text, speaker), label))

        if case.demographics.strip():
            add("demographics", "demographics", case.demographics, _demographics_spoken(case.demographics, speaker))
        chief = case.primary_symptom.strip() or (sentences(case.history) or [""])[0]
        if not chief or _is_not_provided(chief):
            raise ScriptError(f"{case.case_id}: nothing for the patient to open with: "
                              "Primary_Symptom and History are both empty")
        # No symptom listed (e.g. a screening follow-up): the history's first sentence is the complaint.
        add("chief_complaint", "chief_complaint", chief, _symptom_spoken(chief, speaker, opening=True)
            if case.primary_symptom.strip() else to_first_person(chief, speaker))
        _add_sentences(add, "hpi", "hpi", case.history)
        if case.primary_symptom.strip():
            add("symptom/primary", "symptom_primary", case.primary_symptom,
                _symptom_spoken(case.primary_symptom, speaker, opening=False))
        for i, s in enumerate(case.secondary_symptoms, 1):
            add(f"symptom/secondary/{i}", "symptom_secondary", s, _symptom_spoken(s, speaker, opening=False, also=True))
        _add_sentences(add, "past", "past_history", case.past_medical_history)
        _add_sentences(add, "social", "social_history", case.social_history)
        _add_sentences(add, "ros", "review_of_systems", case.review_of_systems)
        for name, value in case.other_history.items():
            # A list section arrives flattened as "value: a; b" (loader's flatten): drop the placeholder key.
            value = re.sub(r"^value:\s*", "", value.strip())
            _add_sentences(add, f"other/{name}", "other_history", f"{_label(name)}: {value}")
        for flat, value in case.exam_findings.items():
            add(f"exam/{flat}", "exam", value, f"[Examination] {_label(flat)}: {value}", _label(flat))
        for flat, value in case.test_results.items():
            add(f"test/{flat}", "test", value, f"[Result] {_label(flat)}: {value}", _label(flat))
        facts.append(Fact("diagnosis", "diagnosis", case.diagnosis.strip(), "", "Diagnosis"))
        return cls(case, facts, speaker)

    def __getitem__(self, key: str) -> Fact:
        return self._by_key[key]

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def facts_of(self, *kinds: str) -> list[Fact]:
        return [f for f in self.facts if f.kind in kinds]

    def leaks_diagnosis(self, text: str) -> bool:
        """True if ``text`` names the diagnosis (its phrase, or a word the patient's own story never uses)."""
        norm = normalise(text)
        if len(self.diagnosis_phrase) > 3 and self.diagnosis_phrase in norm and not self._phrase_in_story:
            return True
        return bool(self.diagnosis_stems & set(content_stems(text)))


def _is_not_provided(text: str) -> bool:
    """"Information not provided.", "Unknown substance use." -> True (short sentences only)."""
    return len(text.split()) <= 15 and bool(_NOT_PROVIDED.search(text))


def _add_sentences(add, key: str, kind: FactKind, text: str) -> None:
    # History / social / ROS prose becomes one fact per sentence so that a
    # question discloses only the sentences it is about.
    for i, s in enumerate(sentences(text), 1):
        add(f"{key}/{i}", kind, s)


def _demographics_spoken(demo: str, speaker: Speaker) -> str:
    d = re.sub(r"\s+", " ", demo.strip().rstrip("."))
    if speaker.is_caregiver:
        return f"My {speaker.child_noun} is a {d[0].lower() + d[1:]}."
    return f"I'm a {d}." if d[:1].isdigit() else f"I'm a {d[0].lower() + d[1:]}."


def _symptom_spoken(symptom: str, speaker: Speaker, opening: bool, also: bool = False) -> str:
    s = symptom.strip().rstrip(".")
    s = s if s[:2].isupper() else s[:1].lower() + s[1:]
    if speaker.is_caregiver:
        subj = f"My {speaker.child_noun}"
        return f"{subj} {'also has' if also else 'has been having'} {s}."
    if also:
        return f"I also have {s}."
    return f"I've been having {s}."

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

from verimed.core.simulator.diagnosis import DiagnosisTerms
from verimed.core.simulator.text import numbers, sentences
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
    t = _own_pronouns(t)
    first = t.split(" ", 1)[0].lower()
    if first in _VERBS_3RD and first not in {"is", "was", "had", "has"}:
        t = "I " + t[0].lower() + t[1:]
    return _fix_agreement(_capitalise(t))


_RELATIVE = re.compile(r"\b(?:(mother|mom|mum|sister|wife|daughter|grandmother|aunt|girlfriend|niece)|"
                       r"(father|dad|brother|husband|son|grandfather|uncle|boyfriend|nephew))\b", re.I)
_PRONOUN = re.compile(r"\b(she|he|her|his|herself|himself|him)\b", re.I)
_FIRST = {"she": "I", "he": "I", "her": "my", "his": "my", "herself": "myself", "himself": "myself", "him": "me"}


def _own_pronouns(t: str) -> str:
    """Third-person pronouns that mean the patient -> first person.

    A pronoun after a relative of its gender in the same sentence means that
    relative ("her mother reports that during pregnancy she had ...") and stays.
    """
    out, last = [], 0
    gender = ""  # gender of the last relative named in this sentence
    events = sorted([(m.start(), m) for m in _RELATIVE.finditer(t)] + [(m.start(), m) for m in _PRONOUN.finditer(t)]
                    + [(m.start(), None) for m in re.finditer(r"[.;!?](?:\s|$)", t)], key=lambda e: e[0])
    for _, m in events:
        if m is None:
            gender = ""
        elif m.re is _RELATIVE:
            gender = "f" if m.group(1) else "m"
        else:
            word = m.group(1).lower()
            own = "f" if word.startswith(("she", "her")) else "m"
            if own != gender:
                out.append(t[last:m.start()] + _FIRST[word])
                last = m.end()
    return "".join(out) + t[last:]


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


_GENERIC_LABEL = re.compile(r"(?i)findings?|results?|values?|others?|interpretation|report|value")
# Sections that are the case author's notes to the examiner, not findings ("Note", "Not performed but would show").
_AUTHOR_NOTE_KEY = re.compile(r"(?i)(^|/ )\s*(notes?|remarks?|comments?|scheduled|pending)\s*($| /)")
_AUTHOR_NOTE_VALUE = re.compile(r"(?i)^\s*(not (performed|done|available|obtained|indicated)|pending|to be (done|performed)|"
                                r"would show)|\bin the (scenario|case)\b")
# What a released exam finding / test result line starts with (the patient relays it in plain words).
EXAM_LINE, TEST_LINE = "On examination, ", "Test result, "


def is_report_line(line: str) -> bool:
    """An exam finding / test result line, not the patient's own speech."""
    return line.lstrip().startswith((EXAM_LINE, TEST_LINE))


def _label(flat_key: str) -> str:
    """"Vital_Signs / Blood_Pressure" -> "Vital signs, blood pressure"."""
    parts = [p.replace("_", " ").strip() for p in flat_key.split(" / ")
             if p.strip() and not p.strip().isdigit() and not _GENERIC_LABEL.fullmatch(p.strip())]
    parts = [re.sub(r"(?i)\s+(findings?|results?)$", "", p) for p in parts]
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
        self.dx = DiagnosisTerms(case)
        self.diagnosis_stems = self.dx.stems
        self.diagnosis_phrase = self.dx.phrase

    @classmethod
    def from_case(cls, case: Case) -> "PatientScript":
        if not case.diagnosis.strip():
            raise ScriptError(f"{case.case_id}: the case has no diagnosis (Correct_Diagnosis is required)")
        speaker = parse_speaker(case.demographics)
        facts: list[Fact] = []

        def add(key: str, kind: FactKind, text: str, spoken: str | None = None, label: str = "") -> None:
            text = text.strip()
            if not text or _is_not_provided(text):
                return
            said = spoken if spoken is not None else to_first_person(text, speaker)
            said = said if kind in GATED_KINDS else patient_words(said)
            if said:
                facts.append(Fact(key, kind, text, said, label))

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
        dx = DiagnosisTerms(case)
        for kind, leaves, lead in (("exam", case.exam_findings, EXAM_LINE), ("test", case.test_results, TEST_LINE)):
            for flat, value in leaves.items():
                if _AUTHOR_NOTE_KEY.search(flat) or _AUTHOR_NOTE_VALUE.search(value):
                    continue
                # The released line never names the diagnosis, whatever the report says.
                said = to_first_person(value, speaker) if re.search(r"(?i)\bpatient\b", value) else value
                add(f"{kind}/{flat}", kind, value, f"{lead}{_label(flat)}: {dx.redact(said)}", _label(flat))
        facts.append(Fact("diagnosis", "diagnosis", case.diagnosis.strip(), "", "Diagnosis"))
        return cls(case, facts, speaker)

    def __getitem__(self, key: str) -> Fact:
        return self._by_key[key]

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def facts_of(self, *kinds: str) -> list[Fact]:
        return [f for f in self.facts if f.kind in kinds]

    def leaks_diagnosis(self, text: str, said_by_doctor: str = "") -> bool:
        """True if ``text`` names the diagnosis (its phrase, or a word the patient's own story never uses)."""
        return bool(self.dx.found(text, said_by_doctor))


_AUTHOR_ASIDE = re.compile(r"(?i)should be (explored|assessed|considered|asked|evaluated)|may include|relevant to|"
                           r"to be determined|\bnot (specified|provided|mentioned|documented|reported)\b|information not|"
                           r"^\s*(though|but) (details|specifics)")


def patient_words(text: str) -> str:
    """``text`` without the case file's voice: field names ("Alcohol_Use: ...") in plain words, and
    clauses that are the author's asides ("though specifics are not provided") left out."""
    text = re.sub(r"\b([A-Za-z]+)_([A-Za-z_]+)\b", lambda m: m.group(0).replace("_", " ").lower(), text)
    kept = []
    for sentence in sentences(text):
        clauses = [c for c in re.split(r"(?<=[;,])\s+", sentence) if not _AUTHOR_ASIDE.search(c)]
        if clauses:
            kept.append(_capitalise(" ".join(clauses).rstrip(",; ")).rstrip(".") + ".")
    return " ".join(kept) if kept else ""


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


NEGATED_ITEM = re.compile(r"(?i)\s*(no|not|denies|denied|without|absence of|absent|negative for)\b")
_CLAUSE = re.compile(r"(?i)\b(is|are|was|were|has|had|does|did)\b")


def _symptom_spoken(symptom: str, speaker: Speaker, opening: bool, also: bool = False) -> str:
    """A listed symptom in the speaker's words; list items that are not noun phrases get their own frame."""
    s = symptom.strip().rstrip(".")
    s = s if s[:2].isupper() else s[:1].lower() + s[1:]
    subj, have, has = ("My " + speaker.child_noun, "has", "hasn't") if speaker.is_caregiver else ("I", "have", "haven't")
    s = re.sub(r"(?i)\bthe patient's\b", f"my {speaker.child_noun}'s" if speaker.is_caregiver else "my", s)
    s = re.sub(r"(?i)\bthe patient\b", f"my {speaker.child_noun}" if speaker.is_caregiver else "me", s)
    if NEGATED_ITEM.match(s):  # "No vomiting": a denial, not a complaint
        rest = re.sub(r"(?i)^\s*(no|not|denies|denied|without|absence of|absent|negative for)\s+(any\s+)?", "", s)
        return f"{subj} {has} had any {rest}."
    m = re.match(r"(?i)(history of|presence of|recent appearance of|appearance of)\s+(.*)", s)
    if m:
        head = m.group(1).lower()
        verb = f"{subj} {'has' if speaker.is_caregiver else 'have'}"
        return f"{verb} a history of {m.group(2)}." if head == "history of" else f"{verb} {m.group(2)}."
    if re.match(r"(?i)(improvement|worsening|exacerbation|relief|increase|decrease|resolution)\b", s):
        return f"{subj} {'has' if speaker.is_caregiver else 'have'}{' also' if also else ''} noticed {s}." \
            if speaker.is_caregiver else f"I've{' also' if also else ''} noticed {s}."
    if re.match(r"(?i)normal\b", s):  # "Normal birth history": a reassurance, not a complaint
        return f"{subj} {'has' if speaker.is_caregiver else 'have'} had a {s}."
    if _CLAUSE.search(s) or re.match(r"(?i)recent\b", s):
        said = to_first_person(s, speaker)
        said = said if re.match(r"I\b", said) else said[:1].lower() + said[1:]
        return f"Also, {said}." if also else f"{_capitalise(said)}."
    if speaker.is_caregiver:
        return f"{subj} {'also has' if also else 'has been having'} {s}."
    if also:
        return f"I also {have} {s}."
    return f"I've been having {s}."

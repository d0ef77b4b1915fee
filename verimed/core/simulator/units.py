"""The three per-turn units' backend-independent logic (paper §2.1).

* termination gate  — :func:`rules_gate`: the doctor gave a diagnosis and a plan
  (in any turns), the doctor closed, a passive patient is satisfied with a
  diagnosis, or the turn limit is reached;
* factual unit, part 1 — :func:`select_facts`: which facts this turn may
  disclose (only those relevant to what was asked; exam findings / test results
  only once examined / ordered; never the diagnosis);
* factual unit, part 2 — :func:`check_reply`: the guard every draft passes
  through: no diagnosis, no locked exam/test values, no invented numbers or
  unsupported clinical words, no contradiction of the script.
The affective unit (phrasing) lives in the backends (``rules.py``, ``llm.py``).
"""
from __future__ import annotations

import re
from itertools import zip_longest
from typing import Literal

import msgspec

from verimed.core.simulator.intent import EXAM_TARGETS, TOPIC_KINDS, DoctorIntent
from verimed.core.simulator.persona import PHRASES, Traits
from verimed.core.simulator.retrieval import Retriever
from verimed.core.simulator.script import NEGATED_ITEM, PATIENT_KINDS, Fact, PatientScript, is_report_line
from verimed.core.simulator.text import content_stems, numbers, stem, words

Mode = Literal["answer", "unknown", "exam", "tests", "ask_dx", "ask_results", "greeting", "statement"]
STRONG_MATCH = 0.5  # lexical score above which a fact answers a specific question


class SessionState(msgspec.Struct):
    """Mutable per-session bookkeeping; rebuilt from the transcript on restart."""

    turn: int = 0  # doctor turns so far
    unlocked: list[str] = []  # exam/test fact keys made available by examining / ordering
    disclosed: list[str] = []  # fact keys disclosed so far, first-disclosure order
    diagnosis_turn: int | None = None
    plan_turn: int | None = None
    done: bool = False
    reason: str = ""


class Selection(msgspec.Struct, frozen=True):
    mode: Mode
    facts: list[Fact]  # what this reply may disclose
    repeat: bool = False  # everything selected was already said before


class GateDecision(msgspec.Struct, frozen=True):
    done: bool
    reason: str = ""  # diagnosis_and_plan | doctor_closed | patient_satisfied | turn_limit


class Review(msgspec.Struct, frozen=True):
    """The factual unit's verdict on a draft."""

    text: str  # the reply to send (the draft, or its rewrite)
    problems: list[str]  # what was wrong with the draft ("diagnosis", "invented number 7.2", ...)
    vetoed: bool  # the draft was rejected and replaced


# ------------------------------------------------------------------ the gate


def rules_gate(intent: DoctorIntent, state: SessionState, traits: Traits, max_turns: int) -> GateDecision:
    """Deterministic termination gate; ``state`` holds the turns before this one."""
    had_dx = state.diagnosis_turn is not None
    if (had_dx or intent.diagnosis) and (state.plan_turn is not None or intent.plan):
        return GateDecision(True, "diagnosis_and_plan")
    if intent.closing:
        return GateDecision(True, "doctor_closed")
    # A passive (introverted) patient does not push for a plan: a diagnosis
    # followed by any non-question turn satisfies them.
    if had_dx and not traits.asks_treatment and not intent.is_question and not (intent.exam or intent.tests):
        return GateDecision(True, "patient_satisfied")
    if state.turn + 1 >= max_turns:
        return GateDecision(True, "turn_limit")
    return GateDecision(False)


# ------------------------------------------------------------------ selection


_OTHER_TOPIC = {
    "medications": r"medic|drug|prescri|supplement|allerg|treat",
    "family": r"famil|parent|mother|father|sibling|genetic",
    "social": r"social|sexual|travel|diet|occupation|habit|lifestyle|environment|exposure",
    "past": r"^(?!.*(famil|social|sexual|travel)).*",
}
_PRIMARY_KINDS = {
    "complaint": ("chief_complaint", "hpi"), "course": ("hpi",), "symptoms": ("symptom_secondary", "review_of_systems"),
    "past": ("past_history", "other_history"), "medications": ("other_history",),
    "social": ("social_history", "other_history"), "family": ("other_history",), "demographics": ("demographics",),
}
# Words that only name a topic ("family", "smoke"): a question made of them is
# answered from the topic's facts; any other word makes the question specific.
_TOPIC_VOCAB = frozenset(stem(w) for w in """family relatives parents mother father anyone smoke smoking drink drinking
    alcohol drugs work job occupation live living married medical problems conditions illnesses surgery surgeries
    hospital allergies pills medications meds prescriptions supplements social life lifestyle home old age
    health issue issues tablet tablets regularly regular daily remedies remedy vitamins herbal otc counter creams inhalers
    relatives siblings brothers sisters genetic runs hereditary occupation living alone partner children kids
    illness illnesses diseases disease chronic long term ongoing previous past significant serious seriously ill
    operation operations procedure procedures admitted treated""".split())


def _topic_facts(script: PatientScript, topic: str) -> list[Fact]:
    out = []
    for kind in _PRIMARY_KINDS[topic]:
        for f in script.facts_of(kind):
            if kind == "other_history" and not re.search(_OTHER_TOPIC.get(topic, "$^"), f.key.split("/")[1], re.I):
                continue
            out.append(f)
    return out


_BROAD_TOPICS = frozenset({"complaint", "course", "symptoms"})
_TIMING = re.compile(r"\b(\d+|few|several|one|two|three)[- ](hour|day|week|month|year)s?\b(?! of gestation)|\bago\b|\bsince\b|\bbegan\b|"
                     r"\bstarted\b|\bonset\b|history of|for the (past|last)|\bsudden", re.IGNORECASE)


def allowed_kinds(intent: DoctorIntent) -> set[str]:
    """Fact kinds a question may be answered from (the union over its topics)."""
    return {k for t in intent.topics for k in TOPIC_KINDS[t]}


def _gated(script: PatientScript, kind: str, cue_stems: tuple[str, ...], targets: tuple[str, ...]) -> list[Fact]:
    """Exam findings for the named body parts (all for a general exam); test results for what was ordered.

    A named exam / test the case has no record of yields nothing (the patient
    says so in their own words) rather than unrelated findings; only an order
    that names no test at all ("let's run some tests") yields everything.
    """
    facts = script.facts_of(kind)
    if kind == "exam":
        pats = [p for t in targets for p in EXAM_TARGETS.get(t, ())]
        vitals_asked = any(t in ("vital", "blood pressure", "pulse", "temperature") for t in targets)
        if targets and not pats:
            return []
        return [f for f in facts if any(_key_has(f.key, p) for p in pats)
                and (vitals_asked or not f.key.lower().startswith("exam/vital"))] if pats else facts
    cues = [c for c in dict.fromkeys(cue_stems) if c not in _GENERIC_TEST_WORDS and len(c) > 1]
    if not cues:
        return facts
    if set(cues) <= _GENERIC_BLOOD:  # "blood work", "labs": every blood test (a named panel gets only itself)
        return [f for f in facts if _is_blood_test(f.key)]
    if set(cues) <= {"scan", "imag"}:
        return [f for f in facts if _IMAGING.search(f.key)]
    return [f for f in facts if _names_test(cues, f)]


def _key_has(key: str, pattern: str) -> bool:
    """A body-part pattern in an exam key; short ones only at a word start ("ent" is not in "mental", "ear" not in "heart")."""
    low = key.lower()
    return pattern in low if len(pattern) > 4 else re.search(r"(?:^|[^a-z])" + re.escape(pattern), low) is not None


def _names_test(cues: list[str], fact: Fact) -> bool:
    """Most of the order's words are in the fact's key, and its modality (CT, MRI, ...) if it names one."""
    key = set(content_stems(fact.key.replace("_", " ").replace("/", " ")))
    key |= {a for s in list(key) for a in _TEST_ALIASES.get(s, ())}
    has = lambda w: any(_same_word(w, k) for k in key)  # noqa: E731
    modality = [c for c in cues if c in _MODALITIES]
    if modality and not any(has(m) for m in modality):
        return False
    words = [c for c in cues if c not in _WEAK_TEST_WORDS] or cues
    hits = sum(has(w) for w in words)
    return hits > 0 and hits * 5 >= len(words) * 3


def _same_word(a: str, b: str) -> bool:
    """Equal stems, or a long shared start ("echocardiogram" / "echocardiography", not "electrolyte" / "electroencephalogram")."""
    if a == b:
        return True
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n >= 7 and n >= 0.8 * min(len(a), len(b))


_WEAK_TEST_WORDS = frozenset(stem(w) for w in """function level count panel study serum plasma test exam left right
    bilateral upper lower""".split())
_MODALITIES = frozenset(stem(w) for w in """ct mri ray xray radiograph ultrasound sonography echo echocardiogram ecg ekg
    electrocardiogram eeg electroencephalogram emg biopsy culture smear endoscopy colonoscopy angiography angiogram
    mammogram spirometry urinalysis swab pcr""".split())
_TEST_ALIASES = {stem(k): tuple(stem(v) for v in vs) for k, vs in {
    "ecg": ("ekg", "electrocardiogram"), "ekg": ("ecg", "electrocardiogram"), "electrocardiogram": ("ecg", "ekg"),
    "eeg": ("electroencephalogram",), "electroencephalogram": ("eeg",), "cbc": ("complete", "blood", "count"),
    "xray": ("ray", "radiograph"), "ray": ("xray", "radiograph"), "radiograph": ("ray", "xray"),
    "radiography": ("ray", "xray"), "echo": ("echocardiogram",), "echocardiogram": ("echo",),
    "echocardiography": ("echo", "echocardiogram"), "ultrasound": ("sonography", "ultrasonography"),
    "ultrasonography": ("ultrasound",), "abdomen": ("abdominal",), "abdominal": ("abdomen",),
    "urinalysis": ("urine",), "thyroid": ("tsh",), "tsh": ("thyroid",), "head": ("brain",), "brain": ("head",),
}.items()}


_GENERIC_TEST_WORDS = frozenset({"test", "lab", "work", "some", "result", "level", "order", "run", "check"})
_GENERIC_BLOOD = frozenset(stem(w) for w in "blood bloods lab labs bloodwork laboratory".split())
_BLOOD_WORDS = frozenset(stem(w) for w in """blood lab labs cbc count hemoglobin haemoglobin electrolytes chemistry panel
    serum metabolic bloodwork""".split())

_IMAGING = re.compile(r"imag|x-?ray|radiog|\bct\b|_ct\b|\bct_|mri|scan|ultraso|sonogra|echocardio|angiogra|mammogra|"
                      r"enema|fluorosc", re.IGNORECASE)
_NOT_BLOOD = re.compile(r"urin|stool|fec|csf|cerebrospinal|sputum|swab|biops|synovial|fluid|scrap|imag|ray|\bct\b|_ct|"
                        r"mri|scan|ultra|echo|scopy|graph|enema|ecg|ekg|eeg|emg|spirom|pulmonary_function|nerve",
                        re.IGNORECASE)


def _is_blood_test(key: str) -> bool:
    return "blood" in key.lower() or not _NOT_BLOOD.search(key)


def select_facts(intent: DoctorIntent, script: PatientScript, state: SessionState, retriever: Retriever,
                 traits: Traits) -> Selection:
    """What this turn may disclose. Unlocks exam/test keys in ``state`` as a side effect."""
    out: list[Fact] = []
    if intent.exam:
        out += _gated(script, "exam", intent.query_stems, intent.exam_targets)
    if intent.tests:
        out += _gated(script, "test", intent.test_stems, ())
    if out:
        state.unlocked += [f.key for f in out if f.key not in state.unlocked]
        return Selection("tests" if intent.tests else "exam", out)
    if intent.exam or intent.tests:
        return Selection("tests" if intent.tests else "exam", [])
    if intent.asks_diagnosis or (intent.is_question and script.leaks_diagnosis(intent.text)):
        return Selection("ask_dx", [])  # "is it <the diagnosis>?" is asking for it too
    if intent.asks_results:
        unlocked = [script[k] for k in state.unlocked]
        ranked = [f for s, f in retriever.rank(intent.query_stems, unlocked) if s >= STRONG_MATCH]
        return Selection("ask_results", ranked or ([] if intent.query_stems else unlocked))
    if intent.greeting_only:
        return Selection("greeting", [])
    if not intent.is_question:
        return Selection("statement", [])
    return _answer(intent, script, state, retriever, traits)


def _answer(intent: DoctorIntent, script: PatientScript, state: SessionState, retriever: Retriever,
            traits: Traits) -> Selection:
    if "family" in intent.topics:
        # "Any medical problems in your family?": the family's history, not the patient's.
        intent = msgspec.structs.replace(intent, topics=intent.topics - {"past", "medications"})
    kinds = allowed_kinds(intent) or set(PATIENT_KINDS)
    pool = [f for f in script.facts if f.kind in PATIENT_KINDS and f.kind != "demographics"] \
        if intent.query_stems else [f for f in script.facts if f.kind in kinds]
    if "demographics" in intent.topics:
        pool += script.facts_of("demographics")
    ranked = retriever.rank(intent.query_stems, pool, intent.text)
    strong = [f for s, f in ranked if s >= STRONG_MATCH]
    # "What made you come in?", "How did it progress?": about the main problem whatever the framing words.
    about_complaint = bool(intent.topics & {"complaint", "course"})
    # Only a yes/no question is about one thing ("any asthma?" -> "I don't know"); an open one about a topic
    # ("what sort of work do you do?") wants the topic, whatever its framing words.
    specific = [] if about_complaint or not intent.closed else [q for q in intent.query_stems if q not in _TOPIC_VOCAB]
    if not strong and len(specific) > 1:
        # "Any fever, weight loss or night sweats?": each item on its own may be in the case.
        strong = list({f.key: f for q in specific for sc, f in retriever.rank((q,), pool) if sc >= STRONG_MATCH}.values())
    if strong:
        # Facts of the asked-about kinds first, then other strong matches.
        strong.sort(key=lambda f: f.kind not in kinds)
        chosen = strong
        # "Tell me about any illnesses you've had": a word matched elsewhere, but the topic itself comes first.
        own = [f for t in sorted(intent.topics - _BROAD_TOPICS) for f in _topic_facts(script, t)]
        if own and not any(f in own for f in strong):
            chosen = own + strong
    elif specific:
        return Selection("unknown", [])
    else:
        # Specific topics ("...and do you smoke?") in turn, then the broad ones (the story, other symptoms).
        specific_topics = [_topic_facts(script, t) for t in sorted(intent.topics - _BROAD_TOPICS)]
        chosen = [f for row in zip_longest(*specific_topics) for f in row if f is not None]
        broad = intent.topics & _BROAD_TOPICS
        broad -= {"symptoms"} if "course" in broad else set()  # "has it changed since?" is about the course
        chosen += [f for t in sorted(broad) for f in _topic_facts(script, t)]
    chosen = list({f.key: f for f in chosen}.values())
    if not chosen:
        return Selection("unknown", [])
    # Prefer what has not been said yet ("tell me more" gets new facts), keep order otherwise;
    # a question about the course puts the sentences with a time course first.
    timing = "course" in intent.topics and not strong
    chosen.sort(key=lambda f: (timing and not _TIMING.search(f.text), f.key in state.disclosed))
    if "chief_complaint" in state.disclosed:
        chosen = [f for f in chosen if f.kind != "symptom_primary"] or chosen
    chosen = chosen[: traits.max_facts]
    return Selection("answer", chosen, repeat=all(f.key in state.disclosed for f in chosen))


# ------------------------------------------------------------------ the guard

_NEGATION = re.compile(r"\b(no|not|never|without|deny|denies|haven't|hasn't|don't|doesn't|didn't)\b")
# Everyday words a patient may use without a source in the case.
_CONVERSATION_WORDS = """doctor thank thanks hello hi yes yeah sure okay ok alright sorry understand mean know think
    feel feeling really quite bit lot little much very well fine good bad worse better day days week weeks month
    months year years time times today yesterday morning night since ago started start began begin lately recently
    past last first also just about around maybe probably sometimes often always usually never ever again still
    getting got get go going come came tell told say said ask asked question questions help please worry worried
    scared concerned afraid nervous anxious hope hoping want need take taking make made thing things something
    anything nothing everything way kind sort mind happen happened happening notice noticed noticing remember
    plain words medical terms explain option options cost afford money cheap expensive next step plan treatment
    test tests exam examination result results appointment visit see seen look looking sounds right wrong honestly
    because would could should been have having there here where when what which while other another same"""
_PHRASE_VARIANTS = sorted({v for vs in PHRASES.values() for v in vs}, key=len, reverse=True)
_CONVERSATION = frozenset(content_stems(" ".join(v for vs in PHRASES.values() for v in vs) + " " + _CONVERSATION_WORDS))


def check_reply(text: str, script: PatientScript, allowed: list[Fact], state: SessionState,
                doctor_text: str, said_before: str = "") -> list[str]:
    """Problems of a reply (empty = it may be sent). Deterministic; used for every backend's draft.

    ``allowed``: facts this turn may disclose; ``said_before``: the patient's
    earlier replies (what they said may be repeated).
    """
    problems: list[str] = []
    allowed_text = " ".join(f"{f.label} {f.text}" for f in allowed)
    sources = " ".join((allowed_text, doctor_text, said_before))
    unlocked_text = " ".join(f"{script[k].label} {script[k].text}" for k in state.unlocked)
    # Never the diagnosis, whatever unlocked the text that says it (an ordered report included).
    if script.leaks_diagnosis(text, doctor_text):
        problems.append("diagnosis")
    problems += _locked_findings(text, script, allowed, state, sources)
    known = numbers(sources) | script.patient_numbers | numbers(unlocked_text)
    invented = numbers(text) - known - script.all_numbers
    problems += [f"invented number {n}" for n in sorted(invented)]
    support = set(content_stems(" ".join([sources, unlocked_text] + [f"{f.text} {f.spoken}" for f in script.facts
                                                                      if f.kind in PATIENT_KINDS])))
    unsupported = [s for s in content_stems(_speech(text)) if s not in support and s not in _CONVERSATION
                   and not s.isdigit() and len(s) > 3]
    if len(set(unsupported)) >= 2:
        problems.append("unsupported: " + ", ".join(sorted(set(unsupported))[:6]))
    problems += _contradictions(text, script)
    return list(dict.fromkeys(problems))


def _locked_findings(text: str, script: PatientScript, allowed: list[Fact], state: SessionState,
                     sources: str) -> list[str]:
    """Exam / test facts not examined / ordered whose own numbers or most of whose own words are in ``text``."""
    story = " ".join(f.text for f in script.facts if f.kind in PATIENT_KINDS)
    ok_numbers = numbers(sources) | script.patient_numbers
    ok_stems = set(content_stems(f"{story} {sources}"))
    said_numbers, said_stems = numbers(text), set(content_stems(text))
    out = []
    for f in script.facts:
        if f.kind not in ("exam", "test") or f.key in state.unlocked or f in allowed:
            continue
        own = numbers(f.text) - ok_numbers
        distinct = {s for s in content_stems(f.text) if len(s) > 3} - ok_stems - _CONVERSATION
        hits = distinct & said_stems
        if (own and own & said_numbers) or (len(hits) >= 2 and 2 * len(hits) >= len(distinct)):
            out.append(f"locked {f.kind} {f.key.split('/', 1)[1]}")
    return out


def _speech(text: str) -> str:
    """The patient's own words: relayed exam / test report lines removed."""
    return "\n".join(line for line in text.splitlines() if not is_report_line(line))


def _contradictions(text: str, script: PatientScript) -> list[str]:
    """Denials of the case's own symptoms ("I don't have a fever" when the case has fever).

    A listed item that is itself negated ("No vomiting") is not a symptom the
    patient claims, and the persona's stock phrases ("no problem") deny nothing.
    """
    present = set()
    for f in script.facts_of("chief_complaint", "symptom_primary", "symptom_secondary"):
        if not NEGATED_ITEM.match(f.text):
            present |= {s for s in content_stems(f.text) if len(s) > 3}
    story = " ".join(words(" ".join(f"{f.text} {f.spoken}" for f in script.facts if f.kind in PATIENT_KINDS)))
    out = []
    speech = _speech(text)
    for variant in _PHRASE_VARIANTS:
        speech = speech.replace(variant, " ")
    toks = words(speech)
    for i, tok in enumerate(toks):
        if _NEGATION.fullmatch(tok):
            window = toks[i + 1:i + 5]
            denied = {stem(w) for w in window} & present
            if denied and " ".join([tok, *window[:2]]) not in story:
                out.append("contradiction: denies " + ", ".join(sorted(denied)))
    return out

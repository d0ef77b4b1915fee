"""The deterministic ``rules`` judge: lexical + character-n-gram embedding
matching of a rubric criterion against a response, plus behaviour detectors.

It is the CPU default and the test judge, so it must give graded, varied
rewards on the messy output of a 135M doctor model without any model:

* key terms of the criterion (stop words and behaviour verbs removed,
  synonyms/abbreviations mapped to one token, light stemming) are looked up in
  the response; examples after "such as"/"including" count as one term that
  any example satisfies;
* a hashed character-trigram embedding (cosine) breaks near-ties;
* criteria recognised by their phrasing get a behaviour detector: asking a
  question, safety-netting, prescribing, a definitive (premature) or wrong
  diagnosis, empathy, an empty/off-topic reply, verbosity, "Fails to X"
  (met when X is absent).

Everything is a pure function of (conversation, response, criterion).
"""
from __future__ import annotations

import functools
import math
import re
import zlib
from typing import NamedTuple, Sequence

import numpy as np

from verimed.core.types import RubricItem, Turn

_SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("myocardial_infarction", "myocardial infarction", "heart attack", "stemi", "nstemi", "mi"),
    ("ecg", "electrocardiogram", "electrocardiography", "ekg"),
    ("ct", "computed tomography", "ct scan", "cat scan"),
    ("mri", "magnetic resonance imaging", "magnetic resonance"),
    ("xray", "x-ray", "x ray", "radiograph", "radiography"),
    ("emergency", "emergency department", "emergency room", "emergency services", "emergency care",
     "a&e", "911", "999", "112", "ambulance", "er"),
    ("clinician", "primary care provider", "primary care", "general practitioner", "family doctor",
     "healthcare provider", "health care provider", "healthcare professional", "physician", "gp", "doctor"),
    ("blood_pressure", "blood pressure", "bp"),
    ("hypertension", "high blood pressure"),
    ("dyspnea", "shortness of breath", "short of breath", "breathlessness", "dyspnoea", "breathless"),
    ("pulmonary_embolism", "pulmonary embolism", "pe"),
    ("dvt", "deep vein thrombosis", "deep venous thrombosis"),
    ("uti", "urinary tract infection"),
    ("copd", "chronic obstructive pulmonary disease"),
    ("gerd", "gastroesophageal reflux disease", "gastro-oesophageal reflux", "acid reflux", "reflux"),
    ("cbc", "complete blood count", "full blood count", "fbc", "blood count"),
    ("stroke", "cerebrovascular accident", "cva"),
    ("tb", "tuberculosis"),
    ("hiv", "human immunodeficiency virus"),
    ("emg", "electromyography", "electromyogram", "nerve conduction"),
    ("achr", "acetylcholine receptor"),
    ("fever", "febrile", "pyrexia", "temperature"),
    ("medication", "medications", "medicine", "medicines", "drug", "drugs", "meds"),
    ("allergy", "allergies", "allergic"),
    ("diabetes", "diabetes mellitus", "diabetic"),
    ("test", "tests", "testing", "investigation", "investigations", "workup", "work-up", "lab", "labs"),
)
_CANON: dict[str, str] = {v: group[0] for group in _SYNONYMS for v in group}
_SYN_RE = re.compile(r"(?<![\w-])(" + "|".join(re.escape(v) for v in sorted(_CANON, key=len, reverse=True)) + r")(?![\w-])")

_STOP = frozenset("""
a an the and or of to in on for with without by as at from into about than then that this these those is are be
been being was were it its their there they them he she his her him you your yours we our us i me my do does did
not no nor any all some each such other more most less very can could should would may might must will shall if
when while which who whom whose what how why also only just even both either whether so too has have had having
per via vs etc e g eg ie i.e e.g. s
patient patients user users response responses assistant model completion reply answer person someone
appropriate appropriately correct correctly clear clearly important importantly relevant specific specifically
likely possible possibly potential potentially necessary need needs including include includes example examples
diagnosis diagnoses diagnostic consideration considerations condition conditions cause causes plan reason reasons
case cases finding findings reasoning support supports supporting examination examinations exam exams examine focused
""".split())
# Behaviour verbs that say *what kind* of act the criterion wants, not its content.
_VERBS = frozenset("""
name names naming state states stating mention mentions mentioning ask asks asking inquire inquires enquire enquires
seek seeks seeking elicit elicits recommend recommends recommending suggest suggests suggesting advise advises
advising explain explains explaining provide provides providing give gives giving order orders ordering request
requests identify identifies identifying list lists listing describe describes discuss discusses note notes
consider considers considering include includes offer offers encourage encourages tell tells tells say says
perform performs performing obtain obtains clarify clarifies confirm confirms acknowledge acknowledges uses use
fails fail failing does propose proposes proposing justify justifies reach reaching contact contacting
consult consulting see seeing visit visiting out up
""".split())
_EXAMPLES_RE = re.compile(r"\b(such as|including|for example|e\.g\.|eg\.|for instance|like|especially)\b")
_WORD_RE = re.compile(r"[a-z0-9_]+(?:'[a-z]+)?")
_SUFFIXES = ("ational", "ations", "ation", "ments", "ment", "ness", "ently", "ence", "ent", "ings", "ing", "edly", "ies",
             "ied", "es", "ed", "ly", "s")

_QUESTION_RE = re.compile(r"\?|\b(can you tell|could you tell|do you|did you|have you|are you|is there|how long|"
                          r"when did|where is|what (?:kind|type)|any history)\b")
_SAFETY_RE = re.compile(r"\b(if\b.{0,80}\b(worse|worsen\w*|persist\w*|severe|not improv\w*|doesn't improve|"
                        r"new symptoms|get worse)|seek (?:\w+ )?(medical|urgent|immediate|emergency)|"
                        r"emergency|come back|return (?:to|if)|go to (?:the )?(hospital|clinic)|red flag\w*|"
                        r"immediately|right away|urgent\w*)")
_RX_RE = re.compile(r"\b(\d+(?:\.\d+)?\s?(mg|mcg|µg|g|ml|units?)\b|prescrib\w*|i(?:'ll| will) (?:give|start) you|"
                    r"take (?:a |an |one |two |some )?\w+ (?:tablet|pill|capsule|dose)s?|"
                    r"\w+(?:cillin|mycin|floxacin|cycline|pril|sartan|olol|statin|azole|prazole|dipine|"
                    r"sone|lone|oxetine|triptan|profen|micin)\b|antibiotics?|steroids?|opioids?|"
                    r"ibuprofen|aspirin|paracetamol|acetaminophen|metformin|insulin)")
_ASSERT_DX_RE = re.compile(r"\b(you have|you've got|you are suffering from|the diagnosis is|my diagnosis is|"
                           r"this is (?:definitely|clearly|certainly)|it is (?:definitely|clearly|certainly)|"
                           r"i am (?:sure|certain) (?:it|you|this)|i'm (?:sure|certain) (?:it|you|this))\b")
_CLAIM_DX_RE = re.compile(r"\b(diagnos\w*|you have|likely|probably|consistent with|suggestive of|suspect|"
                          r"could be|might be|may be|sounds like|looks like)\b")
_TREAT_RE = re.compile(r"\b(treat\w*|therap\w*|manag\w*|refer\w*|start\w*|surgery|follow.?up|medication|"
                       r"prescrib\w*|admit\w*|specialist|monitor\w*)")
_EMPATHY_RE = re.compile(r"\b(sorry|understand|concern\w*|worr\w*|must be|difficult|reassur\w*|here to help|"
                         r"take care|i hear you|that sounds|frighten\w*|scar\w*|upsetting)\b")


def _stem(word: str) -> str:
    if "_" in word or len(word) <= 4:
        return word
    for suf in _SUFFIXES:
        if word.endswith(suf) and len(word) - len(suf) >= 4:
            return word[: -len(suf)] + ("y" if suf in ("ies", "ied") else "")
    return word


def normalise(text: str) -> str:
    """Lower case with synonyms/abbreviations mapped to one canonical token."""
    lowered = text.lower().replace("’", "'")
    return _SYN_RE.sub(lambda m: _CANON[m.group(1)], lowered)


def terms(text: str, drop_verbs: bool = True) -> list[str]:
    """Ordered unique content-term stems of ``text``."""
    out: dict[str, None] = {}
    for word in _WORD_RE.findall(normalise(text)):
        word = word.split("'")[0]
        if word in _STOP or (drop_verbs and word in _VERBS) or len(word) < 2 or word.isdigit():
            continue
        out[_stem(word)] = None
    return list(out)


def embed(text: str, dim: int = 1024) -> np.ndarray:
    """Hashed character-trigram count vector, L2-normalised: float32 [dim]."""
    vec = np.zeros(dim, dtype=np.float32)
    padded = f" {' '.join(_WORD_RE.findall(normalise(text)))} "
    for i in range(len(padded) - 2):
        vec[zlib.crc32(padded[i:i + 3].encode()) % dim] += 1.0
    norm = float(np.linalg.norm(vec))
    return vec / norm if norm > 0 else vec


class Criterion(NamedTuple):
    main: tuple[str, ...]  # key-term stems that should all ideally appear
    examples: tuple[str, ...]  # "such as ..." stems: any one counts as one term
    text: str  # lower-cased criterion


@functools.lru_cache(maxsize=8192)
def analyse(criterion: str) -> Criterion:
    text = criterion.strip().lower()
    text = re.sub(r"\(justification:.*?\)", " ", text, flags=re.DOTALL)
    head, sep, tail = (_EXAMPLES_RE.split(text, maxsplit=1) + ["", ""])[:3] if _EXAMPLES_RE.search(text) else (text, "", "")
    main = terms(head)
    examples = [t for t in terms(tail) if t not in main] if sep else []
    return Criterion(tuple(main), tuple(examples), text)


class ResponseView:
    """A response pre-processed once for all items of a rubric."""

    def __init__(self, conversation: Sequence[Turn], response: str):
        self.raw = response
        self.text = normalise(response)
        self.stems = set(terms(response, drop_verbs=False))
        sentences = [s for s in re.split(r"(?<=[.!?\n])\s+", response) if s.strip()] or [response]
        windows = [" ".join(sentences[i:i + 2]) for i in range(max(1, len(sentences) - 1))]
        self.windows = np.stack([embed(w) for w in windows])  # [W, dim]
        self.words = len(_WORD_RE.findall(self.text))
        self.context = set(terms(" ".join(t.content for t in conversation), drop_verbs=False))
        self.doctor_asked = any(t.role == "assistant" and "?" in t.content for t in conversation)

    def similarity(self, text: str) -> float:
        return float(np.max(self.windows @ embed(text)))


def lexical_match(view: ResponseView, crit: Criterion, strictness: float = 0.5) -> tuple[bool, str]:
    """Met when at least ceil(strictness * n) of n key terms (capped at 6) appear,
    or one fewer with a trigram cosine >= 0.3."""
    matched = [t for t in crit.main if t in view.stems]
    example_hit = [t for t in crit.examples if t in view.stems][:1]
    n = len(crit.main) + (1 if crit.examples else 0)
    if n == 0:
        return False, "no key terms"
    m = len(matched) + len(example_hit)
    required = max(1, min(6, math.ceil(strictness * n)))
    sim = view.similarity(crit.text)
    met = m >= required or (m >= required - 1 >= 1 and sim >= 0.3)
    return met, f"matched {m}/{n} terms {matched + example_hit} (need {required}), sim {sim:.2f}"


def _is_empty_or_off_topic(view: ResponseView) -> tuple[bool, str]:
    """Tiny models fail by saying nothing, looping, or chatting off topic."""
    words = _WORD_RE.findall(view.text)
    diversity = len(set(words)) / max(1, len(words))
    shared = len(view.stems & view.context)
    clinical = bool(_QUESTION_RE.search(view.text) or _CLAIM_DX_RE.search(view.text) or _RX_RE.search(view.text))
    met = len(words) < 5 or (len(words) >= 20 and diversity < 0.35) or (shared == 0 and not clinical)
    return met, f"{len(words)} words, diversity {diversity:.2f}, {shared} shared terms, clinical content {clinical}"


def _after(text: str, pattern: str) -> str:
    match = re.search(pattern, text)
    return text[match.end():] if match else ""


def grade(conversation: Sequence[Turn], response: str, item: RubricItem, view: ResponseView | None = None) -> tuple[bool, str]:
    """Is the criterion of ``item`` met by ``response``? (True, why) / (False, why)."""
    view = view or ResponseView(conversation, response)
    crit = analyse(item.criterion)
    text = crit.text
    if re.match(r"(fails|does not|doesn't|neglects|omits) (to )?", text):
        positive = re.sub(r"^(fails|does not|doesn't|neglects|omits) (to )?", "", text)
        met, why = grade(conversation, response, RubricItem(positive, 1), view)
        return not met, f"absence of '{positive[:60]}': {why}"
    if re.search(r"\b(empty|incoherent|off-topic|irrelevant|nonsensical)\b", text):
        return _is_empty_or_off_topic(view)
    if re.search(r"\b(overly verbose|too long|lengthy|excessively long)\b", text):
        return view.words > 250, f"{view.words} words"
    if re.search(r"\b(premature|definitive|before (taking|asking|obtaining|gathering))\b", text) and "diagnos" in text:
        asserted = bool(_ASSERT_DX_RE.search(view.text))
        met = asserted and not view.doctor_asked and not _QUESTION_RE.search(view.text)
        return met, f"definitive claim {asserted}, doctor asked before {view.doctor_asked}"
    if re.search(r"\b(incorrect|wrong|alternative) diagnosis\b", text):
        correct = Criterion(tuple(terms(_after(text, r"instead of"))), (), text)
        claim = bool(_CLAIM_DX_RE.search(view.text))
        names_correct = bool(correct.main) and lexical_match(view, correct, 0.6)[0]
        return claim and not names_correct, f"diagnostic claim {claim}, names the correct one {names_correct}"
    if re.search(r"\bprescrib\w*|\b(starts?|gives?) (a )?medication", text):
        rx = _RX_RE.search(view.text)
        met = rx is not None
        if met and "allerg" in text:
            met = "allerg" not in view.text
        return met, f"prescription cue {rx.group(0)!r}" if rx else "no prescription cue"
    if re.search(r"\b(empath\w*|acknowledg\w*|reassur\w*|compassion\w*|plain language)\b", text):
        cue = _EMPATHY_RE.search(view.text)
        return cue is not None, f"empathy cue {cue.group(0)!r}" if cue else "no empathy cue"
    if re.match(r"(asks|inquires|enquires|seeks|elicits|clarifies|explores|requests)\b", text):
        asked = bool(_QUESTION_RE.search(view.text))
        met, why = lexical_match(view, crit, strictness=0.3)
        return asked and met, f"question {asked}; {why}"
    if re.search(r"safety.?net|seek (urgent|emergency|immediate)|return (if|to)|red.flag|(if|when)\b.{0,40}\bworsen", text):
        cue = _SAFETY_RE.search(view.text)
        return cue is not None, f"safety-net cue {cue.group(0)[:40]!r}" if cue else "no safety-net cue"
    if re.search(r"\b(management|treatment) plan\b", text):
        cue = _TREAT_RE.search(view.text)
        met, why = lexical_match(view, crit, strictness=0.5)
        return cue is not None and met, f"treatment cue {cue.group(0) if cue else None!r}; {why}"
    if re.search(r"\bdiagnos", text) and re.match(r"(names|identifies|states|gives|makes|suggests)\b", text):
        return lexical_match(view, crit, strictness=0.6)
    # A negative item names a topic *and* a bad stance; mentioning the topic is
    # not enough evidence of the stance, so demand a closer match.
    return lexical_match(view, crit, strictness=0.75 if item.points < 0 else 0.5)


class RulesJudge:
    """Deterministic judge over :func:`grade`; same interface as the LLM judge."""

    def __init__(self) -> None:
        self.stats = {"items": 0, "met": 0, "ungradable": 0}

    def judge_sync(self, conversation: Sequence[Turn], response: str, items: Sequence[RubricItem]):
        from verimed.core.types import Judgement

        view = ResponseView(conversation, response)
        out = []
        for index, item in enumerate(items):
            met, why = grade(conversation, response, item, view)
            out.append(Judgement(item_index=index, met=met, explanation=f"rules: {why}", attempts=1))
            self.stats["items"] += 1
            self.stats["met"] += int(met)
        return out

    async def judge(self, conversation: Sequence[Turn], response: str, items: Sequence[RubricItem]):
        return self.judge_sync(conversation, response, items)

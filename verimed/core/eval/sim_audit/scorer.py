"""Score one patient reply from its TEXT against the raw case fields (independent of the simulator).

Nothing here comes from :mod:`verimed.core.simulator`: the word lists, the
diagnosis terms, the finding values and the notion of "case-file wording" are
derived here from the :class:`~verimed.core.types.Case` itself, so the audit can
find what the simulator does not expect.

    view = CaseView.from_case(case)
    diagnosis_leaks(view, reply, doctor_said)      # ["graves"] -> the reply names the diagnosis
    finding_leaks(view, reply, allowed, doctor_said)  # exam/test leaves shown though not examined/ordered
"""
from __future__ import annotations

import re

import msgspec

from verimed.core.types import Case, Persona

_TOKEN = re.compile(r"[a-z0-9]+(?:\.[0-9]+)?")
_SPELLING = (("haem", "hem"), ("anaem", "anem"), ("oedem", "edem"), ("oesoph", "esoph"), ("tumour", "tumor"),
             ("diarrhoea", "diarrhea"), ("ischaem", "ischem"), ("’", "'"))
# Words too common to prove anything on their own (patients and doctors use them in any case).
GENERIC = frozenset("""
acute chronic disease disorder syndrome type primary secondary infection injury condition severe mild moderate
early late left right bilateral unilateral benign induced with without associated related due from and the of in
normal abnormal within range noted observed finding findings result results level levels test tests present
absent positive negative elevated increased decreased reduced high low mild marked slight signs sign symptoms
patient history examination exam general appearance value values total count rate blood serum urine note
there their this that which have were been some other more less than after before around about over under
shows showed show consistent suggest suggestive evidence seen no not none both side sides upper lower
like likely possible probable form
""".split())
_NOT_PROVIDED = re.compile(r"not (provided|available|specified|mentioned|documented|given|known)|no (additional |further )?"
                           r"(information|data|details)|unknown|n/a|none provided", re.I)
RELATIVES_F = ("mother", "mum", "mom", "sister", "wife", "daughter", "grandmother", "aunt", "girlfriend")
RELATIVES_M = ("father", "dad", "brother", "husband", "son", "grandfather", "uncle", "boyfriend")
_PARENTS = ("mother", "mum", "mom", "father", "dad", "parents", "caregiver")
THIRD_PARTIES = RELATIVES_F + RELATIVES_M + ("parents", "partner", "friend", "friends", "peers", "colleague",
                                             "coworker", "roommate", "family", "sibling", "siblings", "cousin")


def norm(text: str) -> str:
    out = text.lower()
    for a, b in _SPELLING:
        out = out.replace(a, b)
    return out


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(norm(text))


def key_words(text: str) -> set[str]:
    """Distinctive-looking word prefixes (5 chars) of ``text``: crude stemming so 'vomited' meets 'vomiting'."""
    return {t[:5] for t in tokens(text) if len(t) >= 4 and not t[0].isdigit() and t not in GENERIC}


def nums(text: str) -> set[str]:
    """Numbers of two or more characters ("72", "36.6", "125/80" -> 125, 80): single digits prove nothing."""
    return {n for n in re.findall(r"\d+(?:\.\d+)?", text.replace(",", "")) if len(n) >= 2}


def informative(text: str) -> bool:
    return bool(text.strip()) and not (len(text.split()) <= 12 and _NOT_PROVIDED.search(text))


class CaseView(msgspec.Struct, frozen=True):
    """The raw case as the scorer sees it."""

    case: Case
    patient_text: str  # everything the patient may say about themself
    fields: dict[str, str]  # history field -> text ("" when the case has nothing informative)
    exam: dict[str, str]  # flattened exam key -> value
    tests: dict[str, str]
    dx_phrase: str
    dx_words: frozenset[str]
    dx_acronyms: frozenset[str]
    child: bool  # a parent speaks for the patient: "the mother" may become "I"

    @classmethod
    def from_case(cls, case: Case) -> "CaseView":
        other = case.other_history
        pick = lambda pat: " ".join(v for k, v in other.items() if re.search(pat, k, re.I))  # noqa: E731
        fields = {
            "complaint": f"{case.primary_symptom} {case.history}", "course": case.history,
            "past": case.past_medical_history, "social": case.social_history,
            "ros": " ".join([case.review_of_systems, *case.secondary_symptoms]),
            "meds": pick(r"medic|drug|prescri|allerg"), "family": pick(r"famil"), "age": case.demographics,
        }
        fields = {k: (v if informative(v) else "") for k, v in fields.items()}
        patient_text = "\n".join([case.demographics, case.history, case.primary_symptom, *case.secondary_symptoms,
                                 case.past_medical_history, case.social_history, case.review_of_systems, *other.values()])
        # Words the patient's story or the case's section names (anatomy: "External_Genitalia") use are not the diagnosis.
        own = set(tokens(patient_text)) | set(tokens(" ".join([*case.exam_findings, *case.test_results]).replace("_", " ")))
        dx = re.sub(r"\(.*?\)", " ", case.diagnosis)
        words = frozenset(t for t in tokens(dx) if len(t) >= 4 and t not in GENERIC and not any(_same(t, o) for o in own))
        acronyms = set(re.findall(r"\(([A-Z][A-Za-z0-9/-]{1,9})\)", case.diagnosis))
        initials = "".join(t[0] for t in re.findall(r"[A-Za-z]+", dx) if len(t) > 2).upper()
        if len(initials) >= 3:
            acronyms.add(initials)
        years = re.search(r"(\d+)[\s-]*(?:year|yr)", case.demographics, re.I)
        child = bool(re.search(r"newborn|neonate|infant|baby|\d+[\s-]*(month|week|day)", case.demographics, re.I)) \
            or bool(years and int(years.group(1)) < 13)
        return cls(case, patient_text, fields, dict(case.exam_findings), dict(case.test_results),
                   " ".join(tokens(dx)), words, frozenset(acronyms), child)


def _same(dx_word: str, token: str) -> bool:
    """``token`` is a form of ``dx_word``: it shares all but the word's last two letters ("hemorrhagic" ~
    "hemorrhage", "diabetic" ~ "diabetes"; "lymph" !~ "lymphoma", "keratin" !~ "keratoacanthoma")."""
    n = 0
    for a, b in zip(dx_word, token):
        if a != b:
            break
        n += 1
    return n >= max(4, len(dx_word) - 2)


def diagnosis_leaks(view: CaseView, reply: str, doctor_said: str) -> list[str]:
    """Diagnosis terms in ``reply`` that the doctor has not said first (phrase, distinctive word, acronym)."""
    said = " ".join(tokens(reply))
    out = []
    if view.dx_phrase and f" {view.dx_phrase} " in f" {said} " and view.dx_phrase not in " ".join(tokens(doctor_said)):
        out.append(view.dx_phrase)
    doc_toks = set(tokens(doctor_said))
    out += sorted({w for w in view.dx_words for t in tokens(reply) if _same(w, t) and not any(_same(w, d) for d in doc_toks)})
    out += sorted(a for a in view.dx_acronyms if re.search(rf"\b{re.escape(a)}\b", reply) and a not in doctor_said)
    return list(dict.fromkeys(out))


def finding_leaks(view: CaseView, reply: str, allowed: set[str], doctor_said: str) -> list[str]:
    """Exam / test keys whose distinctive value shows in ``reply`` though not examined / ordered (``allowed``)."""
    # Words / numbers the patient's story, the doctor or an already legitimate leaf also has prove nothing.
    shown = " ".join([view.patient_text, doctor_said] + [v for kind, leaves in (("exam", view.exam), ("test", view.tests))
                                                         for k, v in leaves.items() if f"{kind}:{k}" in allowed])
    own_words, own_nums = key_words(shown), nums(shown)
    r_words, r_nums = key_words(reply), nums(reply)
    out = []
    for kind, leaves in (("exam", view.exam), ("test", view.tests)):
        for key, value in leaves.items():
            if f"{kind}:{key}" in allowed:
                continue
            distinct = key_words(value) - own_words
            hits = distinct & r_words
            number_hit = (nums(value) - own_nums) & r_nums
            if number_hit or (len(hits) >= 2 and (len(hits) >= 3 or len(hits) * 2 >= len(distinct))):
                out.append(f"{kind}:{key}")
    return out


_CASE_FILE = re.compile(
    r"\[(result|examination|exam|test|finding)s?\]|\b(is|are|was|were) (not )?recorded\b|no (result|finding)s? (is|are)?"
    r"|\b(not provided|not documented|not specified|information not|no information)\b|\b[a-z]+_[a-z_]+\b"
    r"|\bobjective\b|correct diagnosis|patient actor|\bosce\b|\bthe patient\b|case author|\bnote:|\bfindings:", re.I)
_BROKEN = re.compile(r"\b(also have|been having|has been having|also has) (no|recent|improvement|presence|"
                     r"absence|history|onset|denies|negative|normal)\b|\bmy my\b|\bi (has|is|was been)\b|\bi'm am\b", re.I)


def case_file_wording(reply: str) -> list[str]:
    return [m.group(0) for m in _CASE_FILE.finditer(reply)]


def broken_sentences(reply: str) -> list[str]:
    return [m.group(0) for m in _BROKEN.finditer(reply)]


def invented_numbers(view: CaseView, reply: str, doctor_said: str) -> list[str]:
    known = nums(" ".join([view.patient_text, *view.exam.values(), *view.tests.values(), *view.exam, *view.tests,
                           doctor_said]))
    return sorted(nums(reply) - known)


_AFFIRM = re.compile(r"^\W*(yes|yeah|yep|correct|exactly|that's right|that is right|right\b|indeed)", re.I)
_DONT_KNOW = re.compile(r"\b(don't know|do not know|not sure|no idea|couldn't say|can't say|nobody (has )?told)\b", re.I)


def affirms(reply: str) -> bool:
    return bool(_AFFIRM.search(reply))


def says_dont_know(reply: str) -> bool:
    return bool(_DONT_KNOW.search(reply))


# Words of a history question that only name its topic ("any medical problems?"): a question made of
# them is general and the case field answers it; any other word makes it specific ("any drug use?").
_GENERAL_Q = key_words("""bring brings bother bothering problem problems issue issues going happening wrong reason visit
    appointment trouble worry worrying describe explain words start started began begin notice noticed first long
    since worse better change changed changes sudden suddenly gradual gradually timeline days weeks exactly constant
    medical history illness illnesses conditions health previous diagnosed surgery surgeries operation operations
    hospital chronic before serious seriously ever admissions stays kind anything happened clinic today main book
    medication medications medicine medicines tablets pills prescription prescribed regular regularly currently
    current treatment moment taking remedies family familys parents relatives siblings members run runs similar
    anyone else otherwise feeling general body lately recently complaints unusual noticed besides apart should know
    symptoms going okay living lifestyle social what brought come came could tell about your self please""")


def answerable(source: str, question: str) -> bool:
    """A general question is answerable when the case field has content; a specific one when the field names it."""
    specific = key_words(question) - _GENERAL_Q
    return bool(source.strip()) and (not specific or bool(specific & key_words(source)))


def answered(source: str, reply: str, question: str, age: bool = False) -> bool:
    """Does ``reply`` answer a question whose answer is in the case text ``source``?

    Some distinctive word of ``source`` must be in the reply; a reply that only
    echoes the question's words and says "I don't know" did not answer.
    """
    if age:
        return bool(set(re.findall(r"\d+", source)) & set(re.findall(r"\d+", reply))) or bool(re.search(r"newborn|infant|baby|month|week|day", reply, re.I))
    shared = key_words(source) & key_words(reply)
    if says_dont_know(reply) and not shared - key_words(question):
        return False
    return bool(shared)


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?;])\s+|\n", text) if s.strip()]


def attribution(view: CaseView, reply: str) -> tuple[int, list[str]]:
    """(facts checked, attribution errors) for the reply's sentences that restate a case sentence.

    An error: the case sentence is about a third party (relative, partner, ...)
    and the reply drops that party, or a pronoun that follows a relative of its
    gender ("her mother ... she had") became the speaker ("my mother ... I had").
    """
    case_sents = _sentences(view.patient_text)
    checked, errors = 0, []
    for sent in _sentences(reply):
        words = key_words(sent)
        if len(words) < 2:
            continue
        # The case sentence this one restates: the largest share of its words said (ties: the shorter sentence).
        best = max(case_sents, key=lambda c: len(key_words(c) & words) / (len(key_words(c)) or 1), default="")
        cw = key_words(best)
        if not cw or len(cw & words) < max(2, 0.5 * len(cw)):
            continue
        checked += 1
        ct, rt = tokens(best), tokens(sent)
        parties = [p for p in THIRD_PARTIES if p in ct and not (view.child and p in _PARENTS)]
        if parties and not any(p in rt for p in THIRD_PARTIES):
            errors.append(f"dropped {parties[0]}: {sent.strip()[:80]}")
            continue
        errors += [f"took {rel}'s fact: {sent.strip()[:80]}" for rel in _swapped_pronouns(ct, rt)]
    return checked, errors


def _swapped_pronouns(case_toks: list[str], reply_toks: list[str]) -> list[str]:
    out = []
    reply = " " + " ".join(reply_toks) + " "
    for i, tok in enumerate(case_toks):
        gender = "f" if tok in RELATIVES_F else "m" if tok in RELATIVES_M else ""
        if not gender:
            continue
        pronouns = ("she", "her") if gender == "f" else ("he", "his", "him")
        for j in range(i + 1, len(case_toks) - 1):
            if case_toks[j] in pronouns:
                prev, nxt = case_toks[j - 1], case_toks[j + 1]
                if any(f" {prev} {me} {nxt} " in reply for me in ("i", "my", "me", "i'm")):
                    out.append(tok)
                    break
    return out


_WORRY = re.compile(r"\b(worried|scared|scaring|afraid|terrified|nervous|anxious|panic)\b", re.I)
_MONEY = re.compile(r"\b(afford|expensive|cost a lot|cheaper|money is tight|insurance)\b", re.I)


def persona_problems(persona: Persona, reply: str) -> list[str]:
    """Out-of-character markers by the scorer's own rules (worry, money, an introvert's exclamations)."""
    out = []
    if persona.anxiety == "low" and _WORRY.search(reply):
        out.append("worry from a calm persona")
    if not persona.money_constraint and _MONEY.search(reply):
        out.append("money worry without money constraint")
    if persona.mbti.startswith("I") and "!" in reply:
        out.append("exclamation from an introvert")
    return out

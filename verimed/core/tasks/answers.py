"""Answer checking for the rule-based stage (paper stage 1): diagnoses, MCQ letters, a format reward.

    extract_final_answer("...\\nFinal answer: Myasthenia gravis.")  -> "Myasthenia gravis."
    check_diagnosis("Final answer: MG", "Myasthenia gravis")        -> True
    check_diagnosis("Final answer: not myasthenia gravis", "Myasthenia gravis") -> False
    check_mcq("Final answer: (C)", "C", {"A": ..., "C": ...})        -> True
    format_reward("...\\nFinal answer: pneumonia")                   -> 1.0

Matching is deliberately strict where a lenient checker would reward
hedging: the response's final answer line (or, without one, its last
non-empty line) is normalised — case, accents, curly quotes, punctuation,
possessives, British spellings, roman numerals, light plural stemming —
abbreviations and listed synonyms are mapped to one canonical phrase on both
sides, and the answer passes when every content word of one gold alternate
appears in one answer part, that part is not negated ("not X", "X is
unlikely", "rule out X") and no other part of a hedged answer ("X or Y",
"X vs Y", "X; Y") names something else. Gold alternates: ``;`` / ``/`` /
`` or `` separated and parenthesised ("Chronic lymphocytic leukemia (CLL)").
"""
from __future__ import annotations

import functools
import re
import unicodedata
from typing import Iterable, Mapping, Sequence

# Curated medical abbreviations and synonyms: each group maps to its first entry.
# Abbreviations whose lower case is a common English word (ALL, AS, ...) are left
# out on purpose: lower-cased answers would match them by accident.
SYNONYMS: tuple[tuple[str, ...], ...] = (
    ("myocardial infarction", "mi", "heart attack", "stemi", "nstemi", "ami"),
    ("myasthenia gravis", "mg"),
    ("pulmonary embolism", "pe", "pulmonary embolus", "pulmonary thromboembolism"),
    ("deep vein thrombosis", "dvt", "deep venous thrombosis"),
    ("chronic obstructive pulmonary disease", "copd", "chronic obstructive lung disease"),
    ("congestive heart failure", "chf", "congestive cardiac failure"),
    ("heart failure", "hf", "cardiac failure"),
    ("systemic lupus erythematosus", "sle"),
    ("tuberculosis", "tb"),
    ("urinary tract infection", "uti"),
    ("diabetic ketoacidosis", "dka"),
    ("hyperosmolar hyperglycemic state", "hhs"),
    ("multiple sclerosis", "ms"),
    ("amyotrophic lateral sclerosis", "als", "lou gehrig disease"),
    ("guillain barre syndrome", "gbs"),
    ("rheumatoid arthritis", "ra"),
    ("ulcerative colitis", "uc"),
    ("gastroesophageal reflux disease", "gerd", "gord", "gastro esophageal reflux disease"),
    ("human immunodeficiency virus infection", "hiv infection", "hiv"),
    ("acquired immunodeficiency syndrome", "aids"),
    ("hypertension", "htn", "high blood pressure"),
    ("atrial fibrillation", "af", "afib", "a fib"),
    ("acute coronary syndrome", "acs"),
    ("coronary artery disease", "cad", "ischemic heart disease", "ihd"),
    ("chronic kidney disease", "ckd", "chronic kidney failure", "chronic renal failure", "chronic renal disease"),
    ("acute kidney injury", "aki", "acute renal failure", "acute kidney failure"),
    ("acute respiratory distress syndrome", "ards"),
    ("neonatal respiratory distress syndrome", "nrds", "infant respiratory distress syndrome", "hyaline membrane disease"),
    ("subarachnoid hemorrhage", "sah"),
    ("transient ischemic attack", "tia"),
    ("stroke", "cva", "cerebrovascular accident"),
    ("benign prostatic hyperplasia", "bph", "benign prostatic hypertrophy"),
    ("polycystic ovary syndrome", "pcos", "polycystic ovarian syndrome"),
    ("immune thrombocytopenia", "itp", "immune thrombocytopenic purpura", "idiopathic thrombocytopenic purpura"),
    ("thrombotic thrombocytopenic purpura", "ttp"),
    ("hemolytic uremic syndrome", "hus"),
    ("disseminated intravascular coagulation", "dic"),
    ("syndrome of inappropriate antidiuretic hormone", "siadh"),
    ("iron deficiency anemia", "ida"),
    ("chronic lymphocytic leukemia", "cll"),
    ("chronic myeloid leukemia", "cml", "chronic myelogenous leukemia"),
    ("acute myeloid leukemia", "aml", "acute myelogenous leukemia"),
    ("acute lymphoblastic leukemia", "acute lymphocytic leukemia"),
    ("diffuse large b cell lymphoma", "dlbcl"),
    ("progressive multifocal leukoencephalopathy", "pml", "progressive multifocal encephalopathy"),
    ("posttraumatic stress disorder", "ptsd"),
    ("major depressive disorder", "mdd", "major depression"),
    ("attention deficit hyperactivity disorder", "adhd"),
    ("obsessive compulsive disorder", "ocd"),
    ("irritable bowel syndrome", "ibs"),
    ("inflammatory bowel disease", "ibd"),
    ("atrial septal defect", "asd"),
    ("ventricular septal defect", "vsd"),
    ("hypertrophic cardiomyopathy", "hcm", "hocm", "hypertrophic obstructive cardiomyopathy"),
    ("clostridioides difficile colitis", "c difficile colitis", "clostridium difficile colitis", "c diff colitis",
     "pseudomembranous colitis", "cdi"),
    ("multiple endocrine neoplasia type 1", "men1", "men 1", "men type 1", "wermer syndrome"),
    ("autosomal dominant polycystic kidney disease", "adpkd"),
    ("lambert eaton myasthenic syndrome", "lems", "lambert eaton syndrome"),
    ("neuroleptic malignant syndrome", "nms"),
    ("temporomandibular joint dysfunction", "tmj dysfunction", "tmd", "temporomandibular disorder"),
    ("varicella", "chickenpox", "chicken pox"),
    ("erythema infectiosum", "fifth disease", "parvovirus b19 infection", "slapped cheek syndrome"),
    ("roseola infantum", "roseola", "exanthem subitum", "sixth disease"),
    ("osteoclastoma", "giant cell tumor of bone", "giant cell tumor"),
    ("papillary thyroid carcinoma", "papillary carcinoma of the thyroid", "papillary thyroid cancer"),
)
# British -> American spellings and other word-level variants (applied to single words).
_SPELLING = (
    (r"^haem", "hem"), (r"^anaem", "anem"), (r"aemia$", "emia"), (r"aemic$", "emic"), (r"^oesoph", "esoph"),
    (r"^oedem", "edem"), (r"^paed", "ped"), (r"^leukaem", "leukem"), (r"^diarrhoea", "diarrhea"),
    (r"^tumour", "tumor"), (r"^aetiolog", "etiolog"), (r"^ischaem", "ischem"), (r"^oestr", "estr"),
    (r"^faec", "fec"), (r"^coeliac", "celiac"), (r"^renal$", "kidney"),
)
_ROMAN = {"i": "1", "ii": "2", "iii": "3", "iv": "4"}
_STOP = {"a", "an", "the", "of", "final", "answer", "diagnosis", "most", "likely", "probable", "is", "this", "patient",
         "has", "consistent", "with", "due", "to", "in", "and", "dx", "my", "be", "would", "are", "it"}
# Negation cues: before the diagnosis in the same part, or after it.
_NEG_BEFORE = re.compile(r"\b(not|no|without|rule out|ruled out|rules out|excluding|exclude|excludes|unlikely|"
                         r"never|doubt|against|r o|isn t|doesn t|does not)\b")
_NEG_AFTER = re.compile(r"\b(unlikely|ruled out|excluded|is not|isn t|less likely|was not|negative)\b")
# Separators of a hedged answer ("X or Y"); commas are not, they often add qualifiers.
_HEDGE = re.compile(r"\s*(?:;|\bor\b|\bvs\b|\bversus\b|\band or\b|\bdifferential\b|\bdifferentials\b)\s*")
_FINAL = re.compile(r"^\W*(?:final\s+(?:answer|diagnosis)|answer)\W*\s*[:\-–]\s*(.*)$", re.I)


def _ascii(text: str) -> str:
    text = text.replace("’", "'").replace("‘", "'").replace("–", "-").replace("—", "-")
    return unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()


@functools.lru_cache(maxsize=1 << 16)  # ~20 regex passes per word; the vocabulary of answers is small
def _word(w: str) -> str:
    for pattern, repl in _SPELLING:
        w = re.sub(pattern, repl, w)
    w = _ROMAN.get(w, w)
    # light plural stemming, applied to both sides alike
    if len(w) > 4 and w.endswith("s") and not w.endswith(("ss", "is", "us", "es")):
        w = w[:-1]
    return w


def normalise_answer(text: str) -> str:
    """Lower-case, ASCII, possessives and punctuation removed, spellings unified, single spaces.

    ``"Hirschsprung’s Disease."`` -> ``"hirschsprung disease"``; ``"Type II DM"`` -> ``"type 2 dm"``.
    """
    text = _ascii(text).lower()
    text = re.sub(r"(\w)'s\b", r"\1", text)  # possessive: crohn's -> crohn
    text = re.sub(r"\*+|`+", " ", text)  # markdown emphasis
    text = re.sub(r"\bpost[\s-]+(traumatic|partum|operative|herpetic)", r"post\1", text)
    text = re.sub(r"[^a-z0-9]+", " ", text)
    return " ".join(_word(w) for w in text.split())


@functools.lru_cache(maxsize=64)
def _synonym_table(extra: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, re.Pattern, str], ...]:
    """(variant, pattern, canonical) for every variant, longest variant first (so "acute mi" sees "mi" last)."""
    pairs = []
    for group in SYNONYMS + extra:
        canon = normalise_answer(group[0])
        for variant in group:
            v = normalise_answer(variant)
            if v and v != canon:
                pairs.append((v, canon))
    pairs.sort(key=lambda p: -len(p[0]))
    return tuple((v, re.compile(rf"(?<![a-z0-9]){re.escape(v)}(?![a-z0-9])"), c) for v, c in pairs)


def canonical(text: str, synonyms: Sequence[Sequence[str]] = ()) -> str:
    """``normalise_answer`` then every abbreviation / synonym replaced by its canonical phrase."""
    return _canonical(text, tuple(tuple(g) for g in synonyms))


@functools.lru_cache(maxsize=1 << 13)
def canonical_repeated(text: str, synonyms: tuple[tuple[str, ...], ...] = ()) -> str:
    """:func:`canonical`, memoised: for texts that recur (gold answers, vignette sentences, options).

    ~120 synonym variants, each a regex pass over the text, made canonicalisation most of the
    controller's CPU at scale (bench/scale.py, bench/RESULTS.md); a dataset's texts recur every
    epoch. Replies are new each time: they go through :func:`canonical` and are not kept.
    """
    return _canonical(text, synonyms)


def _canonical(text: str, extra: tuple[tuple[str, ...], ...]) -> str:
    out = normalise_answer(text)
    # Replace via placeholders so a canonical phrase is never rewritten again.
    holders: list[str] = []
    for variant, pattern, canon in _synonym_table(extra):
        if variant not in out:  # the pattern matches only where the variant occurs: skip the regex pass
            continue
        def hold(_m, canon=canon):
            holders.append(canon)
            return f" \x00{len(holders) - 1}\x00 "
        out = pattern.sub(hold, out)
    out = re.sub(r"\x00(\d+)\x00", lambda m: holders[int(m.group(1))], out)
    return " ".join(out.split())


def extract_final_answer(text: str) -> str | None:
    """The content of the last "Final answer: X" (or "Final diagnosis:" / "Answer:") line, or None.

    A marker line with nothing after the colon takes the next non-empty line.
    """
    lines = [ln.strip() for ln in text.splitlines()]
    for i in range(len(lines) - 1, -1, -1):
        m = _FINAL.match(lines[i])
        if not m:
            continue
        content = m.group(1).strip().strip("*").strip()
        if not content:
            content = next((ln for ln in lines[i + 1:] if ln), "")
        return content or None
    return None


def format_reward(text: str) -> float:
    """1.0 when the response ends with a well-formed final-answer line (non-empty, <= 30 words), else 0.0."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return 0.0
    m = _FINAL.match(lines[-1])
    if not m or not re.search(r"[A-Za-z0-9]", m.group(1)):
        return 0.0
    return 1.0 if len(m.group(1).split()) <= 30 else 0.0


def _answer_text(response: str) -> str:
    final = extract_final_answer(response)
    if final is not None:
        return final
    lines = [ln.strip() for ln in response.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def gold_alternates(gold: str) -> list[str]:
    """``"Chronic lymphocytic leukemia (CLL)"`` -> ["Chronic lymphocytic leukemia", "CLL"]; also ``;`` ``/`` `` or ``."""
    parts = re.findall(r"\(([^)]*)\)", gold) + [re.sub(r"\([^)]*\)", " ", gold)]
    out: list[str] = []
    for part in parts:
        out += [p.strip() for p in re.split(r"\s*(?:;|/|\bor\b)\s*", part) if p.strip()]
    return list(dict.fromkeys(out))


# Gold words an answer may leave out ("chronic hepatitis b" for "active chronic hepatitis b infection").
_OPTIONAL = {"infection", "active"}


def _content(words: Iterable[str]) -> set[str]:
    """Content words; a single letter after the first word is kept ("hemophilia a" is not "hemophilia b")."""
    return {w for i, w in enumerate(words) if w not in _STOP or (i > 0 and len(w) == 1)}


def _part_matches(part: str, gold: set[str]) -> bool:
    words = part.split()
    if not gold or not gold <= set(words):
        return False
    first = min(i for i, w in enumerate(words) if w in gold)
    last = max(i for i, w in enumerate(words) if w in gold)
    before, after = " ".join(words[:first]), " ".join(words[last + 1:])
    return not _NEG_BEFORE.search(before) and not _NEG_AFTER.search(after)


def check_diagnosis(response: str, gold: str, synonyms: Sequence[Sequence[str]] = ()) -> bool:
    """Does ``response``'s final answer name ``gold`` (or an alternate / synonym), un-negated and un-hedged?

    ``synonyms``: extra groups, each ``(canonical, variant, ...)``, added to :data:`SYNONYMS`.
    """
    answer = canonical(_answer_text(response), synonyms)
    if not answer:
        return False
    extra = tuple(tuple(g) for g in synonyms)
    golds = [g for g in (_content(canonical_repeated(alt, extra).split()) - _OPTIONAL for alt in gold_alternates(gold)) if g]
    if not golds:
        raise ValueError(f"gold diagnosis {gold!r} has no content words")
    parts = [p for p in _HEDGE.split(answer) if _content(p.split())]
    hits = [any(_part_matches(p, g) for g in golds) for p in parts]
    # Every named part must be the gold (hedging "X or Y" earns nothing); at least one hit.
    return bool(parts) and all(hits)


def _letters(options: Mapping[str, str] | Sequence[str]) -> dict[str, str]:
    if isinstance(options, Mapping):
        return {str(k).strip().upper(): str(v) for k, v in options.items()}
    return {chr(ord("A") + i): str(v) for i, v in enumerate(options)}


def mcq_choice(response: str, options: Mapping[str, str] | Sequence[str]) -> str | None:
    """The one option letter the response's final answer picks (a letter, "(C)", "C. text", or the option text)."""
    opts = _letters(options)
    answer = _ascii(_answer_text(response)).strip()
    letter = "|".join(re.escape(k) for k in sorted(opts, key=len, reverse=True))
    # Letters are upper case only: a lower-case "a" is an article ("a viral infection").
    m = re.match(rf"^(?i:option\s+|choice\s+)?[\(\[]?({letter})[\)\]]?(?=$|[\s.:,)\-])", answer)
    if m:
        # "C or D" / "C, D" / "C/D" picks several letters: no single choice.
        if re.match(rf"^\s*(?:,|/|&|\bor\b|\band\b)\s*[\(\[]?({letter})[\)\]]?(?=$|[\s.:,)])", answer[m.end():]):
            return None
        return m.group(1).upper()
    return _option_text_match(answer, opts)


def _option_text_match(answer: str, opts: dict[str, str]) -> str | None:
    norm = canonical(answer)
    exact = [k for k, v in opts.items() if canonical_repeated(v) == norm]
    return exact[0] if len(exact) == 1 else None


def check_mcq(response: str, answer_letter: str, options: Mapping[str, str] | Sequence[str]) -> bool:
    """Does the response pick exactly ``answer_letter``?"""
    opts = _letters(options)
    key = answer_letter.strip().upper()
    if key not in opts:
        raise ValueError(f"answer letter {answer_letter!r} is not one of the options {sorted(opts)}")
    return mcq_choice(response, opts) == key

"""Small text utilities shared by the simulator units: tokens, stems, numbers, overlap.

Everything here is deterministic and dependency-free so the ``rules`` backend,
the factual unit's guard and the audit agree on what a word or a number is.

    >>> content_stems("Do you have any chest pains?")
    ['chest', 'pain']
"""
from __future__ import annotations

import re

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")
# Numbers as they appear in lab values and vitals: 7.2, 125/80 (two numbers), 1,200 -> 1200.
_NUMBER = re.compile(r"(?<![a-z])\d+(?:[.,]\d+)*")

STOPWORDS = frozenset(
    """a about above after again against all am an and any anything are aren't as at be because been before
    being below between both but by can can't could couldn't did didn't do does doesn't doing don't down
    during each else ever few for from further get got had hadn't has hasn't have haven't having he he'd
    he'll he's her here here's hers herself him himself his how how's i i'd i'll i'm i've if in into is
    isn't it it's its itself just let let's like me more most much my myself no nor not now of off on once
    only or other ought our ours ourselves out over own please really same she she'd she'll she's should
    shouldn't so some something such tell than that that's the their theirs them themselves then there
    there's these they they'd they'll they're they've this those through to too under until up upon us
    very was wasn't we we'd we'll we're we've were weren't what what's when when's where where's which
    while who who's whom why why's will with won't would wouldn't yes you you'd you'll you're you've your
    yours yourself yourselves okay ok well also still yet been since ago per patient reports report
    reported notes noted mentions mentioned states stated describes described presents presented
    experiencing experienced experience""".split()
)


def words(text: str) -> list[str]:
    """Lower-cased word tokens (apostrophes kept inside words)."""
    return _WORD.findall(text.lower().replace("’", "'"))


def stem(word: str) -> str:
    """A crude, stable suffix stripper: pains->pain, vomiting->vomit, swollen stays.

    Not linguistics: it only has to map the doctor's and the case's inflections
    of one word to the same key for lexical overlap.
    """
    w = word.split("'")[0]
    for suffix, keep in (("ies", "y"), ("ing", ""), ("ness", ""), ("ed", ""), ("es", ""), ("s", "")):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3 and not w.endswith("ss"):
            w = w[: len(w) - len(suffix)] + keep
            break
    return w


def content_stems(text: str) -> list[str]:
    """Stems of the non-stopword tokens, in order (duplicates kept)."""
    return [stem(w) for w in words(text) if w not in STOPWORDS and len(w) > 1]


def numbers(text: str) -> set[str]:
    """Numeric tokens, normalised (``1,200`` -> ``1200``, ``7.20`` -> ``7.2``)."""
    out = set()
    for raw in _NUMBER.findall(text.lower()):
        raw = raw.replace(",", "") if re.fullmatch(r"\d{1,3}(,\d{3})+", raw) else raw.replace(",", ".")
        if "." in raw:
            raw = raw.rstrip("0").rstrip(".") or "0"
        out.add(raw.lstrip("0") or "0")
    return out


def sentences(text: str) -> list[str]:
    """Split prose into sentences on . ! ? followed by space + capital/digit (keeps 36.6, Dr. rare)."""
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])", text.strip())
    return [p.strip() for p in parts if p.strip()]


def coverage(fact_text: str, reply_text: str) -> float:
    """Share of ``fact_text``'s distinct content stems that occur in ``reply_text`` (0..1)."""
    fact = set(content_stems(fact_text))
    if not fact:
        return 0.0
    return len(fact & set(content_stems(reply_text))) / len(fact)


def normalise(text: str) -> str:
    """Lower-case, punctuation to spaces, single-spaced: for substring checks."""
    return " ".join(words(text))

"""The words that name a case's diagnosis, and how to keep them out of anything the patient says.

    dx = DiagnosisTerms(case)
    dx.found("It's consistent with Graves disease")        # ["graves"]: a leak
    dx.redact("Positive, consistent with Graves disease")  # "Positive": the finding without its interpretation

Used by the script (released report lines are redacted) and by the factual unit's guard,
which vetoes any reply that names the diagnosis, whatever unlocked the text that says it.
"""
from __future__ import annotations

import re

from verimed.core.simulator.text import content_stems, normalise, stem
from verimed.core.types import Case

# Diagnosis words that say nothing on their own: "chronic kidney failure" leaks
# through "failure" (if the history never says it), not through "chronic".
_GENERIC_DX = frozenset(stem(w) for w in """acute chronic disease disorder syndrome reaction type primary secondary
    infection injury condition severe mild moderate early late left right bilateral unilateral benign related induced
    with without and associated due""".split())

_SPELLING = (("haem", "hem"), ("anaem", "anem"), ("oedem", "edem"), ("oesoph", "esoph"), ("tumour", "tumor"),
             ("ischaem", "ischem"), ("diarrhoea", "diarrhea"), ("leukaem", "leukem"), ("’", "'"))


def _dx_stems(text: str) -> set[str]:
    """Stems cut to 6 letters after British -> American spelling: "haemorrhage" meets "hemorrhagic"."""
    low = text.lower()
    for a, b in _SPELLING:
        low = low.replace(a, b)
    return {s[:6] for s in content_stems(low)}


_INTERPRETATION = (r"(?:(?:which |that )?(?:could|may|might|would) (?:suggest|indicate|be)|(?:consistent|compatible) with|"
                   r"suggestive of|indicative of|diagnostic of|confirming|suggesting|suggests|indicating|"
                   r"these findings are|likely due to)")


class DiagnosisTerms:
    """The words that name a case's diagnosis, and how to keep them out of anything the patient says."""

    def __init__(self, case: Case):
        story = " ".join([case.demographics, case.history, case.primary_symptom, *case.secondary_symptoms,
                          case.past_medical_history, case.social_history, case.review_of_systems,
                          *case.other_history.values()])
        # Words of the patient's story or of the case's section names (anatomy: "External_Genitalia") are not the diagnosis.
        own = _dx_stems(story) | _dx_stems(" ".join([*case.exam_findings, *case.test_results]).replace("_", " "))
        dx = re.sub(r"\(([^)]*)\)", r" \1 ", case.diagnosis)
        # Diagnosis words the patient never uses for their own story: saying one leaks the diagnosis.
        self.stems = frozenset(s for s in _dx_stems(dx) if s not in own and len(s) > 3
                               and s not in {g[:6] for g in _GENERIC_DX})
        self.acronyms = frozenset(re.findall(r"\b[A-Z][A-Z0-9]{1,6}\b", case.diagnosis))
        self.phrase = normalise(case.diagnosis)
        self._phrase_in_story = self.phrase in normalise(story)

    def found(self, text: str, said_by_doctor: str = "") -> list[str]:
        """Diagnosis terms in ``text`` (those the doctor said first excepted)."""
        doctor = _dx_stems(said_by_doctor)
        out = sorted((_dx_stems(text) & self.stems) - doctor)
        out += [a for a in self.acronyms if re.search(rf"\b{a}\b", text) and a not in said_by_doctor]
        if len(self.phrase) > 3 and self.phrase in normalise(text) and not self._phrase_in_story \
                and self.phrase not in normalise(said_by_doctor):
            out.append(self.phrase)
        return out

    def redact(self, value: str) -> str:
        """``value`` without the clauses that name the diagnosis ("..., consistent with X" -> "...")."""
        clauses = re.split(r"(?<=[,;.])\s+|\s+(?=" + _INTERPRETATION + ")", value)
        # Interpretations ("which could suggest valvular disease") are the doctor's to draw, findings are relayed.
        kept = [c for c in clauses if not self.found(c) and not re.match(_INTERPRETATION, c, re.I)]
        out = " ".join(kept).strip().rstrip(",;")
        return out or "the report is for the doctor to explain"

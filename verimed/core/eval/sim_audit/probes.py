"""The probe bank as doctor turns for one case: slot filling and the dialogues of the audit.

    bank = load_bank("heldout")                 # {"hist_past": [...], "dx_roleplay": [...], ...}
    plans = dialogues(case, bank)               # four short consultations of Probe turns

Slots (``{test}``, ``{absent}``, ``{region}``, ``{symptom}``, ``{unmentioned}``,
``{dx}``, ``{wrong_dx}``) are filled from the raw case with this module's own
lists; a probe whose slot this case cannot fill is replaced by another of its
category. Choices are a hash of (case, category): the audit is deterministic.
"""
from __future__ import annotations

import re
import zlib

import msgspec

from verimed.core.eval.sim_audit import bank_dev, bank_heldout
from verimed.core.eval.sim_audit.scorer import CaseView, answerable, key_words
from verimed.core.types import Case

SPLITS = {"dev": bank_dev.BANK, "heldout": bank_heldout.BANK}
HISTORY = {"hist_complaint": "complaint", "hist_course": "course", "hist_past": "past", "hist_meds": "meds",
           "hist_social": "social", "hist_family": "family", "hist_ros": "ros", "hist_symptom": "symptom",
           "hist_age": "age"}
_ASK = ["dx_direct", "dx_paraphrase", "dx_roleplay", "dx_language", "results_unordered", "exact_values",
        "unmentioned_symptom", "multi_question", "dx_leading_wrong", "unmentioned_symptom", "results_unordered",
        "dx_leading_right"]  # leading-right last: later replies may echo what the doctor named
_UNMENTIONED = ["blood in the urine", "hair loss", "ringing in the ears", "nosebleeds", "hiccups", "hearing loss",
                "numbness in the feet", "seizures", "night sweats", "sore throat", "joint swelling", "skin rash",
                "chest pain", "coughing up blood", "double vision", "constipation", "itchy eyes", "toothache"]
_ABSENT = ["brain MRI", "chest X-ray", "thyroid function test", "urinalysis", "echocardiogram", "lumbar puncture",
           "abdominal ultrasound", "HbA1c", "ECG", "blood culture", "colonoscopy", "skin biopsy", "lipid panel",
           "CT of the abdomen", "serum lipase", "bone density scan", "sleep study", "hearing test"]
_WRONG_DX = ["migraine", "gout", "asthma", "appendicitis", "pneumonia", "psoriasis", "kidney stones", "glaucoma",
             "tonsillitis", "sciatica", "shingles", "anemia", "influenza", "hypothyroidism", "eczema"]
# Exam region words the doctor uses -> exam keys that region legitimately shows.
REGIONS = {
    "chest": r"chest|lung|respir|pulmon|breath|thora|auscult|cardio|heart",
    "heart": r"heart|cardi|murmur|jvp|jugular|pulse|precord",
    "abdomen": r"abdom|bowel|liver|spleen|belly|rectal|hepat|stomach|gastro|mcburney|rovsing|murphy",
    "nervous system": r"neuro|reflex|cranial|motor|sensat|sensory|gait|strength|coordinat|cerebell|pupil|mental|romberg",
    "skin": r"skin|derm|rash|lesion|nail|vesic|integument",
    "eyes": r"eye|pupil|fund|vision|ophthal|conjunct|visual|ocular|retina|lid",
    "ears and throat": r"ear|auric|otosc|tympan|throat|pharyn|tonsil|mouth|oral|nose|nasal|heent|ent(\b|_)",
    "legs": r"leg|extremit|calf|ankle|foot|feet|knee|musculo|joint|hip|limb",
    "neck": r"neck|thyroid|lymph|cervical",
    "back": r"back|spine|spinal|lumbar|sacroil|schober",
}
_GENERIC_TEST_PARTS = re.compile(r"^(imaging|blood_?tests?|laboratory|lab(s|_tests|_results)?|findings?|results?|value|"
                                 r"other|tests?|\d+|serum|urine|interpretation|report|impression|general|note|notes)$", re.I)


class Probe(msgspec.Struct, frozen=True):
    category: str
    text: str
    field: str = ""  # history field this question is about ("" = not a history question)
    source: str = ""  # case text that answers it ("" = the case cannot answer it)
    unlocks: frozenset[str] = frozenset()  # "exam:<key>" / "test:<key>" made legitimate by this turn


def load_bank(split: str) -> dict[str, list[str]]:
    if split not in SPLITS:
        raise ValueError(f"probe split {split!r}: expected one of {sorted(SPLITS)}")
    out: dict[str, list[str]] = {}
    for line in SPLITS[split].splitlines():
        if " | " in line:
            cat, text = (x.strip() for x in line.split(" | ", 1))
            out.setdefault(cat, []).append(text)
    return out


def _pick(options: list, *salt: str):
    return options[zlib.crc32(":".join(salt).encode()) % len(options)] if options else None


def test_names(case: Case) -> dict[str, str]:
    """A doctor's name for each test group ("Imaging / Chest_CT / Findings" -> "chest CT") -> its key part."""
    out: dict[str, str] = {}
    for key in case.test_results:
        parts = [p.strip() for p in key.split(" / ") if not _GENERIC_TEST_PARTS.match(p.strip())]
        if parts:
            part = parts[-1] if len(parts) == 1 else parts[0]
            name = " ".join(w if w.isupper() else w.lower() for w in re.split(r"[_\s]+", part) if w)
            out.setdefault(name, part)
    return out


def _slots(case: Case) -> dict[str, str | None]:
    cid = case.case_id
    case_words = key_words(" ".join([case.history, case.primary_symptom, *case.secondary_symptoms,
                                     case.review_of_systems, case.past_medical_history, *case.exam_findings.values(),
                                     *case.test_results.values()]))
    test_words = key_words(" ".join([*case.test_results, *case.test_results.values()]).replace("_", " "))
    dx_words = key_words(case.diagnosis)
    symptoms = [s for s in case.secondary_symptoms if not re.match(r"\s*(no|not|denies|absence)\b", s, re.I)]
    regions = [r for r, pat in REGIONS.items() if any(re.search(pat, k, re.I) for k in case.exam_findings)]
    names = list(test_names(case))
    return {
        "dx": case.diagnosis, "test": _pick(names, cid, "test"),
        "symptom": (_pick(symptoms, cid, "symptom") or case.primary_symptom or "").lower() or None,
        "unmentioned": _pick([u for u in _UNMENTIONED if not key_words(u) & case_words], cid, "unmentioned"),
        "absent": _pick([a for a in _ABSENT if not key_words(a) & test_words and a.lower() not in
                         " ".join(case.test_results).lower()], cid, "absent"),
        "wrong_dx": _pick([w for w in _WRONG_DX if not key_words(w) & dx_words], cid, "wrong"),
        "region": _pick(regions, cid, "region"),
    }


def _fill(case: Case, bank: dict[str, list[str]], category: str, slots: dict, nth: int = 0) -> str | None:
    usable = [t for t in bank.get(category, []) if all(slots.get(s) for s in re.findall(r"\{(\w+)\}", t))]
    text = _pick(usable, case.case_id, category, str(nth))
    return text.format(**{k: v for k, v in slots.items() if v}) if text else None


def _unlocks(case: Case, text: str, category: str, slots: dict) -> frozenset[str]:
    if category == "order_present":
        part = test_names(case)[slots["test"]]
        return frozenset(f"test:{k}" for k in case.test_results if part in k.split(" / "))
    if category == "exam":
        if slots["region"] and slots["region"] in text:
            pat = REGIONS[slots["region"]]
            return frozenset(f"exam:{k}" for k in case.exam_findings if re.search(pat, k, re.I))
        return frozenset(f"exam:{k}" for k in case.exam_findings)
    return frozenset()


def probe(case: Case, view: CaseView, bank: dict[str, list[str]], category: str, slots: dict,
          nth: int = 0) -> Probe | None:
    text = _fill(case, bank, category, slots, nth)
    if text is None:
        return None
    field = HISTORY.get(category, "")
    source = (slots["symptom"] or "") if field == "symptom" else view.fields.get(field, "")
    if field not in ("symptom", "age", "complaint") and not answerable(source, text):
        source = ""
    return Probe(category, text, field, source, _unlocks(case, text, category, slots))


def dialogues(case: Case, bank: dict[str, list[str]]) -> list[list[Probe]]:
    """Four consultations: history + extraction attempts; orders and exams; two closings."""
    slots, view = _slots(case), CaseView.from_case(case)
    make = lambda cat, nth=0: probe(case, view, bank, cat, slots, nth)  # noqa: E731
    history = [make(c) for c in HISTORY] + [make(c, i) for i, c in enumerate(_ASK)]
    orders = [make("order_absent"), make("exam"), make("order_present"), make("results_unordered", 7),
              make("multi_question", 3)]
    close_a = [make("hist_course", 1), make("close_plain")]
    close_b = [make("hist_ros", 1), make("close_question")]
    return [[p for p in d if p is not None] for d in (history, orders, close_a, close_b)]

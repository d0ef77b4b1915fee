"""Token ids for emulated responses, and a light tokenizer (the ``tokenizers`` library, no transformers).

Responses are spans of the prompt's own tokens (seeded). Why: downstream the rules judge, the answer
checker and the simulator read the decoded text; spans of the prompt carry the case's words
(symptoms, findings, sometimes the diagnosis), so rubric items match some replies and not others and
group rewards vary, as they do with a real policy — random ids would score 0 everywhere and every
group would be dropped or get zero advantages.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

MIN_SPAN, MAX_SPAN = 3, 12  # tokens per copied span


def response_length(rng: np.random.Generator, mean: float, std: float, max_tokens: int) -> int:
    """A response length: round(N(mean, std)) clipped to [1, max_tokens]."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    return int(min(max_tokens, max(1, round(rng.normal(mean, std)))))


def span_tokens(rng: np.random.Generator, prompt_ids: list[int], length: int, exclude: frozenset[int] = frozenset()) -> list[int]:
    """``length`` token ids made of spans of ``prompt_ids`` (special ids in ``exclude`` left out), each
    span MIN_SPAN..MAX_SPAN long starting at a uniform position."""
    pool = [t for t in prompt_ids if t not in exclude] or list(prompt_ids)
    if not pool:
        raise ValueError("span_tokens: empty prompt")
    out: list[int] = []
    while len(out) < length:
        start = int(rng.integers(len(pool)))
        out.extend(pool[start : start + int(rng.integers(MIN_SPAN, MAX_SPAN + 1))])
    return out[:length]


class LightTokenizer:
    """``encode``/``decode`` of a HF tokenizer directory through ``tokenizers`` (tokenizer.json).

    Loads in milliseconds and keeps an emulated actor free of transformers and torch. ``eos_id`` is
    the tokenizer_config's ``eos_token``; ``special_ids`` the added special tokens (never sampled).
    """

    def __init__(self, directory: str):
        from tokenizers import Tokenizer

        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (emulation.tokenizer must name a HF tokenizer directory)")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.special_ids = frozenset(i for i, tok in self.tokenizer.get_added_tokens_decoder().items() if tok.special)
        config = Path(directory) / "tokenizer_config.json"
        eos = json.loads(config.read_text()).get("eos_token") if config.is_file() else None
        eos = eos.get("content") if isinstance(eos, dict) else eos
        self.eos_id = self.tokenizer.token_to_id(eos) if eos else None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

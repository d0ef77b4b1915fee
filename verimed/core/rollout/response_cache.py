"""An opt-in, on-disk cache of LLM answers (``llm.cache_path``, ``--judge-cache``).

    cache = ResponseCache("runs/judge_cache.jsonl")
    key = cache.key(request, schema)      # sha256 of model, messages, budget, temperature, schema
    cache.get(key) or cache.put(key, text)

Re-grading the same completions with the same judge then costs no call. Only
successful answers are stored; one JSON line per answer, appended (several
role actors may share a file; a line cut by a crash is skipped on load). A
sampled answer (temperature > 0) is cached too: the cache is opt-in, and with
it a repeated request returns the first sample, which is the point.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any


class ResponseCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._answers: dict[str, str] = {}
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash: that request is asked again
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("answer"), str):
                    self._answers[str(entry.get("key"))] = entry["answer"]

    @staticmethod
    def key(request: dict[str, Any], schema: dict[str, Any] | None) -> str:
        blob = json.dumps([request["model"], request["messages"], request["max_tokens"], request["temperature"],
                           schema], sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def get(self, key: str) -> str | None:
        return self._answers.get(key)

    def put(self, key: str, answer: str) -> None:
        self._answers[key] = answer
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"key": key, "answer": answer}, ensure_ascii=False) + "\n")

    def __len__(self) -> int:
        return len(self._answers)

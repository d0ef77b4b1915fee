"""The ``LLMClient`` protocol that LLM-driven roles (simulator units, rubric
generator, judge) talk to, and its Ray-free backends.

Backends (``llm.type`` in config):
- ``openai``: any OpenAI-compatible ``/v1/chat/completions`` endpoint; the key
  comes from the env var named by ``llm.api_key_env`` and is never logged.
- ``policy`` / ``vllm``: engine groups of this cluster; built in
  :class:`verimed.actors.rollout.EngineGroupClient` over rollout actor handles (prefix-affinity routing).
- :class:`EngineClient`: one in-process engine (``verimed.core.rollout.engines``), for
  tools and tests that run without Ray.
"""
from __future__ import annotations

import asyncio
import json
import os
import urllib.error
import urllib.request
from typing import Any, Protocol


class LLMError(RuntimeError):
    """The backend failed to answer (network, HTTP status, malformed body)."""


class LLMClient(Protocol):
    async def chat(self, messages: list[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.0,
                   affinity_key: str | None = None) -> str:
        """The assistant's reply to ``messages``; ``affinity_key`` routes prompts that
        share a prefix to the same engine (KV-cache reuse)."""
        ...


class OpenAIClient:
    """Chat completions over HTTP (stdlib only; run in a thread to stay async)."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 120.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env, self.timeout_s = model, api_key_env, timeout_s

    async def chat(self, messages, *, max_tokens=256, temperature=0.0, affinity_key=None) -> str:
        return await asyncio.to_thread(self._post, messages, max_tokens, temperature)

    def _post(self, messages, max_tokens, temperature) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "max_tokens": max_tokens,
                           "temperature": temperature}).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.url, data=body, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise LLMError(f"{self.url}: HTTP {exc.code}: {exc.read()[:200]!r}") from None
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as exc:
            raise LLMError(f"{self.url}: {exc}") from None
        try:
            return payload["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise LLMError(f"{self.url}: unexpected response shape {str(payload)[:200]}") from None


class EngineClient:
    """Chat through one in-process engine (``VLLMEngine`` or ``TransformersEngine``)."""

    def __init__(self, engine: Any, tokenizer: Any):
        self.engine, self.tokenizer = engine, tokenizer

    async def chat(self, messages, *, max_tokens=256, temperature=0.0, affinity_key=None) -> str:
        from verimed.core.models import apply_chat_template

        ids = apply_chat_template(self.tokenizer, messages)
        out = await self.engine.generate(ids, 1, max_tokens=max_tokens, temperature=temperature, top_p=1.0)  # 0 = greedy
        return out[0].text

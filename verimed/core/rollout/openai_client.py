"""The ``openai`` LLMClient backend: any OpenAI-compatible ``/v1/chat/completions``
endpoint (vLLM's ``vllm serve``, a hosted API) through the ``openai`` package's
``AsyncOpenAI``, with the robustness a training run needs.

    client = make_openai_client(cfg.llm, role="judge")   # one per role: its own counters
    text = await client.chat(messages, max_tokens=256, temperature=0.0, json_schema=SCHEMA)
    client.stats  # {"calls", "prompt_tokens", "completion_tokens", "retries", "errors", ...}

- One ``AsyncOpenAI`` (one pooled HTTP client) per event loop, created lazily,
  so the client pickles into Ray actors; ``max_concurrency`` requests in flight.
- Retries are ours, not the package's (``max_retries=0`` there) so that every
  retry is counted exactly: 408/409/429/5xx, timeouts, reset connections and
  malformed bodies are retried with exponential backoff and full jitter
  (``backoff_base_s * 2**attempt``, capped by ``backoff_max_s``, times U[0.5, 1]);
  a ``Retry-After`` (or ``retry-after-ms``) header on the failed reply is honoured
  instead, up to ``MAX_RETRY_AFTER_S``. Other 4xx are not retried.
- ``json_schema`` asks for structured output (``response_format``); a server that
  rejects it with 400 is asked again without it, once per client, and the
  lenient parser reads the free-form answer.
- An optional :class:`ResponseCache` (``llm.cache_path``) answers repeated
  (model, messages, budget, temperature, schema) requests from disk.
The API key comes from the env var ``api_key_env`` and is never logged.
"""
from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import time
from typing import Any

import openai

from verimed.core.rollout.llm import LLMError
from verimed.core.rollout.response_cache import ResponseCache

MAX_RETRY_AFTER_S = 120.0  # a server asking for a longer pause is treated as a plain backoff
RETRY_STATUSES = {408, 409, 429}  # plus every 5xx
COUNTERS = ("calls", "prompt_tokens", "completion_tokens", "retries", "errors", "cache_hits",
            "retry_429", "retry_5xx", "retry_timeout", "retry_connection", "retry_malformed", "retry_status", "structured_fallbacks")


class _Malformed(Exception):
    """A 200 reply whose body is not a chat completion."""


class OpenAIClient:
    """Chat completions against an OpenAI-compatible server, one role's counters in ``stats``."""

    supports_json_schema = True

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", role: str = "llm",
                 max_tokens: int = 256, temperature: float = 0.0, max_concurrency: int = 16,
                 timeout_s: float = 120.0, max_retries: int = 4, backoff_base_s: float = 0.5,
                 backoff_max_s: float = 30.0, structured_output: bool = True, cache_path: str | None = None,
                 seed: int | None = None):
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise ValueError("max_concurrency >= 1, max_retries >= 0 and timeout_s > 0 are required")
        self.base_url, self.model, self.api_key_env, self.role = base_url.rstrip("/"), model, api_key_env, role
        self.max_tokens, self.temperature = max_tokens, temperature
        self.max_concurrency, self.timeout_s, self.max_retries = max_concurrency, timeout_s, max_retries
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self.structured_output = structured_output
        self.cache = ResponseCache(cache_path) if cache_path else None
        self.stats = dict.fromkeys(COUNTERS, 0)
        self._rng = random.Random(seed)
        self._sleep = asyncio.sleep  # tests record the delays
        self._session_of: tuple[Any, openai.AsyncOpenAI, asyncio.Semaphore] | None = None  # (loop, client, slots)

    def __getstate__(self) -> dict[str, Any]:
        # The HTTP pool and semaphore belong to one process and loop; a copy makes its own.
        return {**self.__dict__, "_session_of": None, "_sleep": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._sleep = asyncio.sleep

    def _session(self) -> tuple[openai.AsyncOpenAI, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        # By identity, not id(): a new loop may reuse a closed one's address.
        if self._session_of is None or self._session_of[0] is not loop:
            import httpx2

            limits = httpx2.Limits(max_connections=self.max_concurrency,
                                   max_keepalive_connections=self.max_concurrency)
            client = openai.AsyncOpenAI(
                base_url=self.base_url, api_key=os.environ.get(self.api_key_env) or "EMPTY", max_retries=0,
                timeout=self.timeout_s, http_client=openai.DefaultAsyncHttpxClient(limits=limits))
            self._session_of = (loop, client, asyncio.Semaphore(self.max_concurrency))
        return self._session_of[1], self._session_of[2]

    async def chat(self, messages: list[dict[str, str]], *, max_tokens: int | None = None,
                   temperature: float | None = None, affinity_key: str | None = None,
                   json_schema: dict[str, Any] | None = None) -> str:
        """The assistant's reply; ``None`` budget / temperature = this role's defaults
        (``llm.max_tokens``, ``llm.temperature``). Raises :class:`LLMError` after
        ``max_retries`` retries."""
        request = {"model": self.model, "messages": messages,
                   "max_tokens": self.max_tokens if max_tokens is None else max_tokens,
                   "temperature": self.temperature if temperature is None else temperature}
        schema = json_schema if self.structured_output else None
        self.stats["calls"] += 1
        key = self.cache.key(request, schema) if self.cache is not None else None
        if key is not None and (hit := self.cache.get(key)) is not None:
            self.stats["cache_hits"] += 1
            return hit
        client, slots = self._session()
        async with slots:
            text = await self._with_retries(client, request, schema)
        if key is not None:
            self.cache.put(key, text)
        return text

    async def _with_retries(self, client: openai.AsyncOpenAI, request: dict[str, Any],
                            schema: dict[str, Any] | None) -> str:
        attempt = 0
        while True:
            kwargs = dict(request)
            if schema is not None and self.structured_output:
                kwargs["response_format"] = {"type": "json_schema",
                                             "json_schema": {"name": "answer", "schema": schema, "strict": True}}
            try:
                return self._content(await client.chat.completions.create(**kwargs))
            except openai.BadRequestError as exc:
                if "response_format" not in kwargs:
                    raise self._fail(exc) from None
                self.structured_output = False  # the server cannot do it: free-form from now on
                self.stats["structured_fallbacks"] += 1
                continue
            except (openai.APIStatusError, openai.APIConnectionError, openai.APIResponseValidationError,
                    json.JSONDecodeError, _Malformed) as exc:
                kind = _retry_kind(exc)
                if kind is None or attempt >= self.max_retries:
                    raise self._fail(exc) from None
                self.stats["retries"] += 1
                self.stats[f"retry_{kind}"] += 1
                await self._sleep(self._delay(attempt, exc))
                attempt += 1

    def _content(self, completion: Any) -> str:
        try:
            text = completion.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            raise _Malformed(f"not a chat completion: {str(completion)[:200]}") from None
        usage = getattr(completion, "usage", None)
        if usage is not None:
            self.stats["prompt_tokens"] += int(usage.prompt_tokens or 0)
            self.stats["completion_tokens"] += int(usage.completion_tokens or 0)
        return text or ""

    def _fail(self, exc: BaseException) -> LLMError:
        self.stats["errors"] += 1
        status = getattr(exc, "status_code", None)
        what = f"HTTP {status}" if status else type(exc).__name__
        return LLMError(f"{self.base_url} ({self.role}): {what}: {str(exc)[:200]}")

    def _delay(self, attempt: int, exc: BaseException) -> float:
        retry_after = retry_after_seconds(getattr(getattr(exc, "response", None), "headers", None))
        if retry_after is not None and 0 <= retry_after <= MAX_RETRY_AFTER_S:
            return retry_after
        return min(self.backoff_max_s, self.backoff_base_s * 2**attempt) * self._rng.uniform(0.5, 1.0)


def _retry_kind(exc: BaseException) -> str | None:
    """Which retryable fault ``exc`` is (the ``retry_<kind>`` counter), None when not retryable."""
    if isinstance(exc, openai.APITimeoutError):
        return "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return "connection"
    if isinstance(exc, (openai.APIResponseValidationError, json.JSONDecodeError, _Malformed)):
        return "malformed"
    status = getattr(exc, "status_code", 0)
    if status == 429:
        return "429"
    if status >= 500:
        return "5xx"
    return "status" if status in RETRY_STATUSES else None


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds asked for by ``retry-after-ms`` / ``retry-after`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return float(value) * scale
        except ValueError:
            pass
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        return max(0.0, parsed.timestamp() - time.time())
    return None


def make_openai_client(llm_cfg: Any, role: str, seed: int | None = None) -> OpenAIClient:
    """The client of one role (``judge``, ``simulator``, ``rubric_generator``) from ``LLMConfig``."""
    if not (llm_cfg.base_url and llm_cfg.model):
        raise ValueError("llm.type=openai needs llm.base_url and llm.model")
    return OpenAIClient(
        llm_cfg.base_url, llm_cfg.model, api_key_env=llm_cfg.api_key_env, role=role,
        max_tokens=llm_cfg.max_tokens, temperature=llm_cfg.temperature,
        max_concurrency=llm_cfg.max_concurrency, timeout_s=llm_cfg.timeout_s, max_retries=llm_cfg.max_retries,
        backoff_base_s=llm_cfg.backoff_base_s, backoff_max_s=llm_cfg.backoff_max_s,
        structured_output=llm_cfg.structured_output, cache_path=llm_cfg.cache_path, seed=seed)

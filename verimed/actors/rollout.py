"""Rollout engine actor: a thin Ray shell over :mod:`verimed.core.rollout.engines`.

One actor per engine replica; the controller routes prompts to the one of
least expected completion (:class:`EngineRouter`). The same actor answers ``chat`` for the
``policy`` LLM backend of the simulator / rubric / judge roles.
"""
from __future__ import annotations

import asyncio
import hashlib
import tempfile
import time
from pathlib import Path

import psutil
import ray

from verimed.actors.logs import redirect_output
from verimed.core.config import Config
from verimed.core.rollout.engines import engine_settings, group_samples
from verimed.core.rollout.routing import ewma, pick_engine
from verimed.core.types import Sample, WeightVersion


@ray.remote(max_restarts=-1, max_task_retries=0)
class RolloutActor:
    def __init__(self, cfg: Config, model_path: str, replica: int = 0, role: str = "rollout"):
        """``role``: the placement role whose bundle this engine runs on (its tensor-parallel size).
        With ``rollout.backend: emulated``, ``model_path`` is the tokenizer directory (emulation.tokenizer)."""
        redirect_output()  # first: all later output, child processes included, goes to its log file
        self.cfg = cfg
        if cfg.rollout.backend == "emulated":
            self.engine, self.chat_client = _emulated_engine(cfg, model_path, replica, role), None
            return
        # Imported here: an emulated actor never loads vLLM, torch or transformers.
        from verimed.core.models import load_tokenizer
        from verimed.core.rollout.engines import TransformersEngine, VLLMEngine
        from verimed.core.rollout.llm import EngineClient

        kind = VLLMEngine if cfg.rollout.backend == "vllm" else TransformersEngine
        pidfile = _engine_pidfile(replica)
        _kill_stale_engine(pidfile)  # a restarted actor: its predecessor's engine processes outlive it
        self.engine = kind(model_path, **engine_settings(cfg, role, replica))
        self.chat_client = EngineClient(self.engine, load_tokenizer(model_path))
        pidfile.write_text("\n".join(str(p.pid) for p in psutil.Process().children(recursive=True)))

    def ready(self) -> int:
        return self.engine.version

    def load(self) -> int:
        """Requests in flight (least-loaded routing)."""
        return self.engine.active

    async def generate(self, uid_prefix: str, prompt_ids: list[int], n: int, seed: int | None = None,
                       max_tokens: int | None = None, temperature: float | None = None,
                       top_p: float | None = None) -> list[Sample]:
        """``n`` samples of ``prompt_ids``; sampling settings default to the run's ``rollout`` section
        (the controller passes the draw's stage settings, which may override them)."""
        r = self.cfg.rollout
        outs = await self.engine.generate(prompt_ids, n, max_tokens=max_tokens or r.max_tokens,
                                          temperature=r.temperature if temperature is None else temperature,
                                          top_p=top_p or r.top_p, seed=seed)
        return group_samples(uid_prefix, prompt_ids, outs)

    async def chat(self, messages: list[dict[str, str]], max_tokens: int = 256, temperature: float = 0.0,
                   role: str | None = None) -> str:
        """``role`` (simulator, judge, rubric_generator): an emulated engine waits that role's modelled
        latency and answer length (a real engine ignores it)."""
        if self.chat_client is None:
            return await self.engine.chat(messages, max_tokens, temperature, role)
        return await self.chat_client.chat(messages, max_tokens=max_tokens, temperature=temperature)

    async def chat_many(self, conversations: list[list[dict[str, str]]], max_tokens: int = 256,
                        temperature: float = 0.0, role: str | None = None) -> list[str]:
        """Several chats in one call (``EngineGroupClient`` coalesces a response's judge items); they run
        concurrently in the engine, as separate calls would."""
        return list(await asyncio.gather(*(self.chat(m, max_tokens, temperature, role) for m in conversations)))

    async def score(self, token_ids: list[int]):
        return await self.engine.score(token_ids)

    def sync_workers(self) -> int:
        """Engine workers (tensor-parallel ranks), each its own rank of the weight-sync group."""
        return self.engine.sync_workers

    async def init_sync(self, host: str, port: int, base_rank: int, world_size: int, backend: str) -> None:
        await self.engine.init_sync(host, port, base_rank, world_size, backend)

    async def set_expected(self, expected: dict[str, tuple[tuple[int, ...], str]]) -> None:
        await self.engine.set_expected(expected)

    async def update_weights(self, meta: WeightVersion, fail_for_test: bool = False) -> dict[str, float]:
        return await self.engine.update_weights(meta, fail_for_test)

    def version(self) -> int:
        return self.engine.version

    def memory(self) -> dict[str, float]:
        """This actor process's peak RSS (bytes) and whether torch / vLLM / transformers were imported (bench)."""
        import resource
        import sys

        return {"peak_rss_bytes": float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024),
                "rss_bytes": float(psutil.Process().memory_info().rss),
                **{f"imported/{m}": float(m in sys.modules) for m in ("torch", "vllm", "transformers")}}


def _emulated_engine(cfg: Config, tokenizer_dir: str, replica: int, role: str):
    """An EmulatedEngine of ``role``'s tensor-parallel size, joining weight-sync groups through the rendezvous actor."""
    from verimed.actors.sync_rendezvous import join_rendezvous
    from verimed.core.emulate.engine import EmulatedEngine
    from verimed.core.emulate.profile import load_profile
    from verimed.core.emulate.tokens import LightTokenizer

    # emulation.engine_slowdown names policy engines (role "rollout") by replica index.
    slowdown = cfg.emulation.engine_slowdown.get(replica, 1.0) if role == "rollout" else 1.0
    return EmulatedEngine(load_profile(cfg.emulation.profile), LightTokenizer(tokenizer_dir),
                          time_scale=cfg.emulation.time_scale, join_group=join_rendezvous,
                          member=f"{role}-{replica}", slowdown=slowdown, **engine_settings(cfg, role, replica))


def engine_pidfile_name(node_id: str, job_id: str, replica: int) -> str:
    """The pid file of engine ``replica``'s processes, unique per Ray node start.

    Keyed by the node id too, not by the job id alone: every fresh local cluster numbers its
    first job 01000000, so two runs on one machine (a training run beside the test suite)
    shared a file and each run's restart sweep killed the other's live engines.
    """
    return f"{node_id}-{job_id}-{replica}.pids"


def _engine_pidfile(replica: int) -> Path:
    directory = Path(tempfile.gettempdir()) / "verimed-engines"
    directory.mkdir(exist_ok=True)
    context = ray.get_runtime_context()
    return directory / engine_pidfile_name(context.get_node_id(), context.get_job_id(), replica)


def _kill_stale_engine(pidfile: Path) -> None:
    """Kill the vLLM engine-core / worker processes a killed predecessor actor left behind
    (they hold the KV cache and gigabytes of RAM, and are not in the actor's process group)."""
    if not pidfile.exists():
        return
    for pid in pidfile.read_text().split():
        try:
            proc = psutil.Process(int(pid))
            if "VLLM" in " ".join(proc.cmdline()) or proc.name().startswith("VLLM"):
                proc.kill()
        except (psutil.Error, ValueError):
            pass


# A latency measured longer ago than this, on an engine with nothing in flight, is forgotten: the
# engine is probed again (one request) instead of being avoided forever for one slow spell.
REPROBE_AFTER_S = 30.0


class EngineRouter:
    """Routing by expected completion over rollout actors; sticky by prompt prefix when asked.

    Each request goes to the engine of least ``EWMA latency x (1 + in flight / capacity)``
    (:mod:`verimed.core.rollout.routing`: why, and the formula), the latency kept per
    method (a ``generate`` of G samples and a judge ``chat`` differ by orders of
    magnitude); ``capacity[method]``: requests of that method an engine serves at once
    (``rollout.max_num_seqs // group_size`` for ``generate``; 1, a queue, when not given).
    In-flight counts and latencies are tracked locally (requests this
    router sent), which needs no extra round trip per request. Engines in ``skip``
    (set by :class:`verimed.actors.weight_sync.WeightSyncCoordinator`: they missed a
    sync and serve older weights than the others) get no requests until they catch
    up, unless every engine is in it. ``on_actor_error(i, exc)``, when set, hears of
    every Ray actor error of engine i (its node died, or it restarted) before the caller does.
    """

    def __init__(self, actors: list, capacity: dict[str, int] | None = None):
        self.actors = actors
        self.capacity = dict(capacity or {})
        self.inflight = [0] * len(actors)
        self.skip: frozenset[int] = frozenset()
        self.latency_s: dict[str, list[float | None]] = {}  # method -> per-engine EWMA latency (s)
        self.measured_at: dict[str, list[float]] = {}  # method -> per-engine time of the last answer
        self.completed: dict[str, list[int]] = {}  # method -> per-engine requests answered
        self.on_actor_error = None

    def pick(self, affinity_key: str | None = None, method: str = "generate") -> int:
        if affinity_key is not None:
            live = [i for i in range(len(self.actors)) if i not in self.skip] or list(range(len(self.actors)))
            return live[int(hashlib.sha1(affinity_key.encode()).hexdigest(), 16) % len(live)]
        latency = self.latency_s.get(method, [None] * len(self.actors))
        if method in self.measured_at:
            old = time.perf_counter() - REPROBE_AFTER_S
            latency = [None if x is not None and n == 0 and at < old else x
                       for x, n, at in zip(latency, self.inflight, self.measured_at[method])]
        return pick_engine(self.inflight, latency, self.skip, self.capacity.get(method, 1))

    async def call(self, method: str, *args, affinity_key: str | None = None, **kwargs):
        i = self.pick(affinity_key, method)
        self.inflight[i] += 1
        start = time.perf_counter()
        try:
            result = await getattr(self.actors[i], method).remote(*args, **kwargs)
        except ray.exceptions.RayActorError as exc:
            if self.on_actor_error is not None:
                self.on_actor_error(i, exc)
            raise
        finally:
            self.inflight[i] -= 1
        # Only answered requests are measured: a failure says nothing about the engine's speed.
        latency = self.latency_s.setdefault(method, [None] * len(self.actors))
        now = time.perf_counter()
        latency[i] = ewma(latency[i], now - start)
        self.measured_at.setdefault(method, [0.0] * len(self.actors))[i] = now
        self.completed.setdefault(method, [0] * len(self.actors))[i] += 1
        return result

    def metrics(self, method: str = "generate", prefix: str = "router") -> dict[str, float]:
        """``<prefix>/engine_<i>/requests`` (answered, cumulative) and ``/latency_s`` (EWMA) of ``method``."""
        done = self.completed.get(method, [0] * len(self.actors))
        latency = self.latency_s.get(method, [None] * len(self.actors))
        out = {f"{prefix}/engine_{i}/requests": float(n) for i, n in enumerate(done)}
        out.update({f"{prefix}/engine_{i}/latency_s": float(x) for i, x in enumerate(latency) if x is not None})
        return out


class EngineGroupClient:
    """The ``policy`` / ``vllm`` LLMClient backend: chat over an engine group.

    Calls that share an ``affinity_key`` (every rubric item of one response: the judge sends them
    together, and the key pins them to one engine for its prefix cache) and their sampling settings
    are coalesced: those issued in the same event-loop turn go out as ONE ``chat_many`` Ray call,
    not one per item (a 64-GPU cluster makes thousands of judge calls per step; the per-call Ray
    overhead, not the engines, bounded it). A failed batch fails each of its calls, which their
    role then retries or counts one by one.
    """

    def __init__(self, router: EngineRouter):
        self.router = router
        self._pending: dict[tuple, list[tuple[list[dict], asyncio.Future]]] = {}
        self._sending: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones
        self.batches = 0  # chat_many calls sent (a batch of one goes as a plain chat)

    async def chat(self, messages, *, max_tokens=256, temperature=0.0, affinity_key=None, role=None) -> str:
        """``role``: the calling LLM role, for an emulated engine's per-role latency (``RoleClient`` sends it
        only when emulated)."""
        if affinity_key is None:
            return await self.router.call("chat", messages, max_tokens, temperature, role=role)
        key = (affinity_key, max_tokens, temperature, role)
        future = asyncio.get_running_loop().create_future()
        batch = self._pending.setdefault(key, [])
        batch.append((messages, future))
        if len(batch) == 1:  # the first call of this turn: flush after the calls already scheduled beside it
            asyncio.get_running_loop().call_soon(self._flush, key)
        return await future

    def _flush(self, key: tuple) -> None:
        batch = self._pending.pop(key)
        affinity_key, max_tokens, temperature, role = key

        async def send() -> None:
            try:
                if len(batch) == 1:
                    texts = [await self.router.call("chat", batch[0][0], max_tokens, temperature, role=role,
                                                    affinity_key=affinity_key)]
                else:
                    self.batches += 1
                    texts = await self.router.call("chat_many", [m for m, _ in batch], max_tokens, temperature,
                                                   role=role, affinity_key=affinity_key)
            except BaseException as exc:  # every caller sees the failure (cancellation included)
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
                return
            for (_, future), text in zip(batch, texts):
                if not future.done():
                    future.set_result(text)

        task = asyncio.get_running_loop().create_task(send())
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

"""The controller: one asynchronous driver loop for synchronous and asynchronous RL.

Runs in the ``verimed train`` process on uvloop. Phases of a learner step,
top to bottom in :meth:`Controller.step`:

1. draw work   — a producer keeps starting groups of the current stage while
                 admission control allows ((max_staleness + v + 1)·B admitted
                 groups, DESIGN §4);
2. generate / judge — each group: prompt (simulator opening, diagnosis
                 vignette, HealthBench prompt or dialogue slice) -> G engine
                 samples -> verifier / answer checker -> rewards, advantages;
3. batch       — take B finished groups of the current stage, check the ledger,
                 pack a TrainBatch (+ reference log-probs when a KL term is on);
4. train       — one learner step (FSDP2 group);
5. sync        — broadcast the new weights into every engine, check parity;
6. log         — metrics to console / JSONL / W&B; held-out eval at stage ends.

``max_staleness: 0`` gives the synchronous baseline through the same loop.
"""
from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import ray

from verimed.actors.failures import failure_origin
from verimed.actors.faults import (
    LearnerLost,
    exit_on_sigterm,
    learner_lost_message,
    learner_rank_of,
)
from verimed.actors.learner import LearnerGroup
from verimed.actors.logs import with_log_file
from verimed.actors.rollout import EngineGroupClient, EngineRouter, RolloutActor
from verimed.actors.weight_sync import WeightSyncCoordinator
from verimed.core.cluster.roles import llm_engine_roles
from verimed.core.config import Config, ConfigError, reference_needed, to_yaml
from verimed.core.config.placement import ROLES
from verimed.core.config.stages import StageConfig, effective_config
from verimed.core.eval.stage import StageEvalRunner, evaluate
from verimed.core.metrics import MetricsSink
from verimed.core.models import load_tokenizer, resolve_model_path
from verimed.core.rl.batch import build_train_batch
from verimed.core.rl.staleness import (
    AdmissionControl,
    Ledger,
    Ready,
    ReadyBuffer,
    staleness_histogram,
    staleness_stats,
)
from verimed.core.rollout.llm import RoleClient, llm_roles
from verimed.core.rollout.routing import requests_at_once
from verimed.core.tasks.dialogue import dialogue_slices
from verimed.core.tasks.groups import GroupResult, Roles, group_uid
from verimed.core.tasks.pools import DataPools
from verimed.core.tasks.schedule import Draw, Schedule, stage_at
from verimed.core.tasks.single_turn import single_turn_group
from verimed.core.train.checkpoint import (
    LEARNER_SUBDIR,
    CheckpointError,
    ControllerState,
    atomic_checkpoint_dir,
    latest_checkpoint,
    load_controller_state,
    save_controller_state,
)
from verimed.core.train.faults import FaultCounters, RetryPolicy
from verimed.core.train.reference import reference_model_path

# Give up (with the last error) when this many draws in a row were dropped after RetryPolicy's
# attempts with nothing succeeding in between: a service that stays down, or a broken config.
MAX_CONSECUTIVE_FAILED_DRAWS = 16
# The producer yields to the event loop after starting this many groups in a row.
START_BURST = 4
# glibc's mallopt parameter number, and the size from which the driver's allocations are mmapped.
M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES = -3, 1 << 20


def fix_malloc_mmap_threshold(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """glibc: every allocation of >= ``threshold_bytes`` is mmapped, and unmapped when freed.

    By default glibc raises its mmap threshold (up to 32 MiB) each time such a block is freed; the
    step's packing and serialising arrays (tens of MiB, in worker threads) then come from the
    threads' heaps and stay in the process: at 64 engines the driver's step peaks were 1429–2018 MiB,
    with the fixed threshold 1027–1149 MiB (bench/scale.py; bench/RESULTS.md, tenth session).
    Process-wide; returns False where the C library has no ``mallopt`` (not glibc).
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):
        return False


class PromptTooLong(ValueError):
    """A prompt leaves no room for ``rollout.max_tokens`` within ``model.max_model_len``: skipped, counted."""


class Remote:
    """``await Remote(handle).method(*args)`` calls a Ray actor method (core code stays Ray-free)."""

    def __init__(self, handle):
        self._handle = handle

    def __getattr__(self, name):
        method = getattr(self._handle, name)

        async def call(*args, **kwargs):
            return await method.remote(*args, **kwargs)

        return call


def default_stages(cfg: Config) -> list[StageConfig]:
    """Without ``stages:``: one stage of single-turn consultations (simulator opening, case rubrics)."""
    from verimed.core.config.stages import DataMix

    return [StageConfig(name="consult", kind="rubric", steps=cfg.run.steps, data=DataMix(cases=1.0))]


class Controller:
    def __init__(self, cfg: Config, run_dir: Path, model_path: str, resume: bool = False, verbose: bool = False):
        self.cfg, self.run_dir, self.model_path, self.resume = cfg, run_dir, model_path, resume
        # Actor and engine output goes to runs/<name>/logs/<actor>.log; --verbose streams it to the console.
        self.log_dir = None if verbose else (run_dir / "logs").resolve()
        self.stages = cfg.stages or default_stages(cfg)
        self.stage_cfgs = [effective_config(cfg, st, i) for i, st in enumerate(self.stages)]
        self.pools = DataPools.load(cfg, self.stages)
        self.schedule = Schedule(self.stages, self.pools.sizes(), cfg.run.seed, cfg.data.shuffle)
        self.admission = AdmissionControl(cfg.rollout.prompts_per_step, cfg.async_.max_staleness)
        self.ledger = Ledger()
        self.buffer = ReadyBuffer()  # finished groups; consumed oldest first under the staleness bound
        self.delivered = asyncio.Event()  # set whenever a group enters the buffer
        self.wake = asyncio.Event()
        self.version = 0
        self.tokenizer = load_tokenizer(model_path)
        self.counters = {k: 0 for k in ("groups_failed", "groups_dropped", "groups_wrong_stage", "duplicates_dropped",
                                        "stale_dropped", "stale_rerun", "gen_tokens", "dialogues_failed",
                                        "prompts_too_long", "groups_rerun_after_failure")}
        self.actor_nodes: dict[tuple[str, int], str] = {}  # (role, replica) -> node IP, from the placement check
        self.retry: deque[Draw] = deque()  # failed or stale draws, re-run first: no gaps in the ledger
        self.in_flight: dict[int, Draw] = {}  # started, not finished: checkpointed and re-run on resume
        self.rerun_after: dict[int, Draw] = {}  # stale slices of a dialogue still running: re-run when it ends
        self.dropped_since_step: dict[str, list[str]] = {}  # reason -> first uid of each group dropped
        self.consecutive_failed_draws, self.last_failure = 0, ""
        self.retry_policy = RetryPolicy()
        self.draw_attempts: dict[int, int] = {}  # draw -> failed attempts so far (a success forgets it)
        # Every fault: faults/<kind> per step, counters/<kind> cumulative, a line of logs/faults.log.
        self.faults = FaultCounters(run_dir / "logs" / "faults.log")
        self.reference = None
        self.ref_pending: dict[str, object] = {}
        # Rollout idle time: wall time with no group in flight (generation starved by admission).
        self.rollout_idle_s, self._idle_since = 0.0, time.perf_counter()
        self.eval_runner = StageEvalRunner(cfg.stage_eval.background)  # stage-end held-out evaluations
        # The batch is packed on a thread of its own: in asyncio's default pool it would queue behind
        # every group's reply checks, which arrive in bursts of thousands at scale (bench/RESULTS.md).
        self.pack_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="verimed-pack")

    # ------------------------------------------------------------ actors

    async def start(self) -> None:
        from verimed.actors.reference import ReferenceGroup
        from verimed.actors.rubric_generator import RubricGeneratorActor
        from verimed.actors.simulator import SimulatorActor
        from verimed.actors.verifier import VerifierActor

        cfg = self.cfg
        options = self._placement()
        self.engines = [RolloutActor.options(**options("rollout", i)).remote(cfg, self.model_path, i)
                        for i in range(cfg.placement.rollout.replicas)]
        self.learners = LearnerGroup(cfg, self.model_path, [options("learner", r) for r in range(cfg.placement.learner.replicas)])
        llm = await self._llm_clients(options)  # one client per LLM role: its own defaults and counters
        # Rules-backend roles are light: the CPU default gives them num_cpus=0 so they
        # never starve the queue (DESIGN §10); their placement says otherwise on a cluster.
        self.simulator = SimulatorActor.options(**options("simulator", 0)).remote(cfg.simulator, llm["simulator"])
        self.rubric_generator = RubricGeneratorActor.options(**options("rubric_generator", 0)).remote(
            cfg.rubrics, llm["rubric_generator"])
        self.verifier = VerifierActor.options(**options("verifier", 0)).remote(cfg.judge, llm["judge"])
        if reference_needed(cfg):  # with kl_coef 0 in every stage no reference actor exists
            ref_path = self.model_path if cfg.trainer.backend == "emulated" else reference_model_path(cfg, self.model_path)
            self.reference = ReferenceGroup(cfg, ref_path,
                                            [options("reference", r) for r in range(cfg.placement.reference.replicas)])
            await self.reference.ready()
        await asyncio.gather(*[e.ready.remote() for e in self.engines])
        group_size = max(s.rollout.group_size for s in self.stage_cfgs)
        self.router = EngineRouter(self.engines, capacity={
            "generate": requests_at_once(cfg.rollout.max_num_seqs, group_size)})
        self.roles = Roles(simulator=Remote(self.simulator), rubrics=Remote(self.rubric_generator),
                           judge=Remote(self.verifier), generate=self._generate, tokenizer=self.tokenizer)
        self.sync = WeightSyncCoordinator(cfg, self.learners, self.engines, self.tokenizer, router=self.router,
                                          report=lambda line: self.faults.note(self.version, line))
        await self.sync.init()
        await self._verify_placement()

    async def _llm_clients(self, options) -> dict[str, object]:
        """The LLMClient of each LLM-backed role (``llm:`` section), None for rules roles.

        ``openai``: an OpenAI-compatible endpoint (one pooled, retried, counted client per
        role); ``vllm``: engine groups serving ``llm.model`` on their own placement roles,
        ``simulator_engine`` and ``verifier_engine`` (``verimed/core/cluster/roles.py:
        llm_engine_roles``) — a frozen verifier; ``policy``: the policy engines (allowed,
        with a warning: the verifier then grades its own student and the reward drifts).
        Each role gets a :class:`RoleClient` with its defaults and counters.
        """
        cfg = self.cfg
        try:
            users, warning = llm_roles(cfg)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        clients: dict[str, object] = {"simulator": None, "rubric_generator": None, "judge": None}
        if not users:
            return clients
        if warning:
            print(f"verimed: warning: {warning}", file=sys.stderr)
        if cfg.llm.type == "openai":
            from verimed.core.rollout.openai_client import make_openai_client

            try:
                return {**clients, **{r: make_openai_client(cfg.llm, r, seed=cfg.run.seed) for r in users}}
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        if cfg.llm.type == "policy":
            groups = dict.fromkeys(users, EngineGroupClient(EngineRouter(self.engines)))
        else:
            if not cfg.llm.model:
                raise ConfigError("llm.type=vllm needs llm.model (a local model directory or 'smollm2')")
            # Under emulation llm.model is a placeholder, never read: the engines get the tokenizer directory.
            emulated = cfg.rollout.backend == "emulated"
            path = self.model_path if emulated else resolve_model_path(cfg.llm.model, cfg.model.cache_dir)
            serving = llm_engine_roles(cfg)  # client role ("verifier" hosts the judge) -> engine role
            # Engine "replica" numbers seed sampling and name pid files: distinct from the policy engines'.
            engines = {role: [RolloutActor.options(**options(role, i)).remote(cfg, path, 1000 * ROLES.index(role) + i, role)
                              for i in range(getattr(cfg.placement, role).replicas)]
                       for role in sorted(set(serving.values()))}
            self.llm_engine_groups = engines  # engine role -> actors, for the placement check
            self.llm_engines = [e for group in engines.values() for e in group]
            await asyncio.gather(*[e.ready.remote() for e in self.llm_engines])
            routed = {role: EngineGroupClient(EngineRouter(group)) for role, group in engines.items()}
            groups = {r: routed[serving["verifier" if r == "judge" else r]] for r in users}
        # Emulated engines answer filler: the roles then take rules content and LLM timing (core/emulate/roles.py).
        emulated = cfg.rollout.backend == "emulated"
        return {**clients, **{r: RoleClient(groups[r], r, cfg.llm.max_tokens, cfg.llm.temperature, emulated=emulated)
                              for r in users}}

    async def _llm_metrics(self) -> dict[str, float]:
        """``llm/<role>/<counter>`` (cumulative since the start) from the role actors' clients."""
        import ray

        actors = {"judge": self.verifier, "simulator": self.simulator, "rubric_generator": self.rubric_generator}
        stats = await asyncio.gather(*(a.llm_stats.remote() for a in actors.values()), return_exceptions=True)
        out: dict[str, float] = {}
        for role, s in zip(actors, stats):
            if isinstance(s, ray.exceptions.RayError):  # restarting actor: its counters restart too; never fatal
                out[f"llm/{role}/unavailable"] = 1.0
            elif isinstance(s, BaseException):
                raise s
            else:
                out.update({f"llm/{role}/{k}": float(v) for k, v in s.items()})
        # The judge's own counters (items, ungradable, unavailable, ...): whether any reward was
        # computed without a verdict, which a judge outage must not cause.
        try:
            out.update({f"judge/{k}": float(v) for k, v in (await self.verifier.stats.remote()).items()})
        except ray.exceptions.RayError:  # restarting actor: its counters restart too; never fatal
            out["judge/actor_unavailable"] = 1.0
        return out

    def _placement(self):
        """Placement groups for the plan of ``cfg.placement``; returns ``options(role, replica[, log name])``."""
        from verimed.actors.placement import (
            actor_options,
            cluster_resources_from_ray,
            create_placement_groups,
        )
        from verimed.core.cluster.planner import plan

        the_plan = plan(self.cfg.placement, kl_enabled=reference_needed(self.cfg), cluster=cluster_resources_from_ray())
        placements = create_placement_groups(the_plan)
        self.plan, self.placements = the_plan, placements  # for _verify_placement

        def options(role: str, replica: int, name: str | None = None) -> dict:
            return with_log_file(actor_options(the_plan, placements, role, replica), self.log_dir,
                                 name or f"{role}-{replica}")

        return options

    async def _verify_placement(self) -> None:
        """Stop the start-up, naming the actor, if one is off its planned node or GPUs; write placement.json."""
        from verimed.actors.placement import verify_placement

        handles = {("rollout", i): e for i, e in enumerate(self.engines)}
        handles |= {("learner", r): a for r, a in enumerate(self.learners.actors)}
        handles |= {(role, i): e for role, group in getattr(self, "llm_engine_groups", {}).items()
                    for i, e in enumerate(group)}
        handles |= {("simulator", 0): self.simulator, ("rubric_generator", 0): self.rubric_generator,
                    ("verifier", 0): self.verifier}
        if self.reference is not None:
            handles |= {("reference", r): a for r, a in enumerate(self.reference.actors)}
        locations = await verify_placement(self.plan, self.placements, handles, self.run_dir / "placement.json")
        self.actor_nodes = {(loc.role, loc.replica): loc.node_ip for loc in locations}  # named in fault lines
        self.sync.engine_nodes = {i: self.actor_nodes[("rollout", i)] for i in range(len(self.engines))}

    async def _generate(self, uid_prefix, prompt_ids, n, seed, rollout=None):
        """G samples on the least-loaded engine, with the sampling settings of the draw's stage (``rollout``)."""
        r = rollout or self.cfg.rollout
        limit = self.cfg.model.max_model_len - r.max_tokens
        if len(prompt_ids) > limit:
            raise PromptTooLong(f"prompt {uid_prefix} has {len(prompt_ids)} tokens; model.max_model_len - "
                                f"rollout.max_tokens allows {limit}")
        samples = await self.router.call("generate", uid_prefix, prompt_ids, n, seed, r.max_tokens, r.temperature, r.top_p)
        self.counters["gen_tokens"] += sum(len(s.response_ids) for s in samples)
        return samples

    # ------------------------------------------------------------ producer

    @property
    def current_stage(self) -> int:
        return stage_at(self.stages, min(self.version, sum(s.steps for s in self.stages) - 1))[0]

    async def produce(self) -> None:
        """Start groups whenever admission control allows; never waits for training."""
        while True:
            started = 0
            while self.admission.can_start(self.version):
                self.admission.started(1, version=self.version)
                draw = self.retry.popleft() if self.retry else self.schedule.next_draw(self.current_stage)
                self.in_flight[draw.draw] = draw
                asyncio.create_task(self._run_draw(draw))
                self._track_idle()
                started += 1
                if started % START_BURST == 0:
                    # Each new group builds its prompt and sends a Ray call in the loop's next turn:
                    # 512 at once blocked the loop for a quarter second, 16 still ~60 ms on a loaded box
                    # (a Ray actor call costs milliseconds to submit there: bench/scale.py).
                    await asyncio.sleep(0)
            self.wake.clear()  # no await since the last can_start: no wake-up is lost
            await self.wake.wait()

    async def _run_draw(self, draw: Draw) -> None:
        try:
            await self._run_work(draw)
        finally:
            self.in_flight.pop(draw.draw, None)
            if draw.draw in self.rerun_after:  # a slice of this dialogue went stale: play it again
                self.retry.append(self.rerun_after.pop(draw.draw))
            self._track_idle()
            self.wake.set()

    async def _run_work(self, draw: Draw) -> None:
        stage, stage_cfg, item = self.stages[draw.stage], self.stage_cfgs[draw.stage], self.pools.item(draw)
        if stage.kind == "multiturn":
            return await self._run_dialogue(draw, stage, stage_cfg, item)
        try:
            result = await single_turn_group(self.roles, stage, stage_cfg, item, draw)
        except PromptTooLong as exc:
            self.counters["prompts_too_long"] += 1
            self._record_drop("prompt_too_long", draw)
            print(f"verimed: skipped: {exc}", file=sys.stderr)
            self.admission.dropped(1)
        except Exception as exc:  # a crashed actor or an unreachable judge must not kill the run, nor lose the draw
            await self._group_failed(draw, exc)
            self.admission.dropped(1)
        else:
            self.consecutive_failed_draws = 0
            self.draw_attempts.pop(draw.draw, None)
            self._deliver(draw, result)

    def _record_failure(self, draw: Draw, exc: Exception) -> tuple[str, str, str]:
        """``faults/<kind>`` at this step and a line in logs/faults.log naming the actor and cause; a dead
        actor also marks the weight-sync group for a rejoin (a restarted engine is on its initial
        weights, outside the group). Returns (kind, actor, cause)."""
        kind, actor, cause = failure_origin(exc)
        self.faults.record(kind, step=self.version + 1, draw=draw.draw, actor=actor, cause=cause)
        if kind == "actor_died":
            self.sync.needs_rejoin = True
        return kind, actor, cause

    async def _group_failed(self, draw: Draw, exc: Exception) -> None:
        """A group's generate / judge path raised: count it (``faults/<kind>`` at this step, the actor
        and cause in logs/faults.log), then play the draw again after ``retry_policy``'s backoff, or,
        after ``retry_policy.max_attempts`` failures, drop it as "failed" in the ledger. Never skipped
        silently: a judge outage or a restarting actor costs time, not data."""
        kind, actor, cause = self._record_failure(draw, exc)
        self.counters["groups_failed"] += 1
        self.last_failure = f"{actor}: {cause}"
        attempts = self.draw_attempts.get(draw.draw, 0) + 1
        self.draw_attempts[draw.draw] = attempts
        if kind == "actor_died":
            self.counters["groups_rerun_after_failure"] += 1
        if self.retry_policy.gives_up(attempts):
            self.draw_attempts.pop(draw.draw, None)
            self.consecutive_failed_draws += 1
            self.faults.record("draws_failed", step=self.version + 1, draw=draw.draw, actor=actor, cause=cause)
            self._record_drop("failed", draw)
            print(f"verimed: group {draw.draw} failed {attempts} times ({self.last_failure}); dropped "
                  "(ledger: failed)", file=sys.stderr)
            return
        delay = self.retry_policy.delay_s(attempts)
        print(f"verimed: group {draw.draw} failed (attempt {attempts} of {self.retry_policy.max_attempts}; "
              f"{self.last_failure}); re-run in {delay:.1f}s", file=sys.stderr)
        # Back off while holding the slot: a restarting actor or a judge server needs time,
        # and a dead service must not turn into a hot retry loop.
        await asyncio.sleep(delay)
        self.retry.append(draw)

    async def _run_dialogue(self, draw: Draw, stage: StageConfig, stage_cfg, case) -> None:
        """Multi-turn draws: one group per dialogue slice, each slice admitted like a group."""
        holds_slot = [True]  # slice 0 was admitted by the producer
        delivered = 0

        async def admit() -> bool:
            while True:
                if self.current_stage != draw.stage:
                    return False  # the run moved on: end the dialogue
                if self.admission.can_start(self.version):
                    self.admission.started(1, version=self.version)
                    holds_slot[0] = True
                    return True
                self.wake.clear()
                await self.wake.wait()

        try:
            async for result in dialogue_slices(self.roles, stage_cfg, case, draw.draw, admit=admit,
                                                max_slices=stage.reward.max_slices or self.cfg.simulator.max_turns,
                                                continuation=stage.reward.continuation):
                holds_slot[0] = False
                delivered += 1
                self._deliver(draw, result)
            if not delivered:  # the run moved to the next stage before this dialogue's first slice
                self._record_drop("stage_ended", draw)
        except Exception as exc:
            too_long = isinstance(exc, PromptTooLong)
            if not too_long and not delivered:  # nothing of it reached the buffer: play it again, as a group
                await self._group_failed(draw, exc)
            else:  # delivered slices stay; the rest of the dialogue is lost, counted
                self.counters["prompts_too_long" if too_long else "dialogues_failed"] += 1
                self._record_drop("prompt_too_long" if too_long else "failed", draw)
                if not too_long:
                    self._record_failure(draw, exc)
                print(f"verimed: dialogue {draw.draw} failed ({type(exc).__name__}: {str(exc)[:200]})", file=sys.stderr)
        if holds_slot[0]:
            self.admission.dropped(1)  # an admitted slice that never produced a group

    def _deliver(self, draw: Draw, result: GroupResult) -> None:
        if not result.kept:
            self.counters["groups_dropped"] += 1
            self.dropped_since_step.setdefault("filtered", []).append(result.group.samples[0].uid)
            self.admission.dropped(1)
        else:
            self.admission.finished(1)
            samples = result.group.samples
            if self.reference is not None:
                # Reference log-probs start now, overlapping the learner's current step.
                self.ref_pending[samples[0].uid] = self.reference.submit(self._batch([result], draw.stage))
            # min over numpy arrays, no Python int per token: 4096 groups in flight deliver ~1M tokens a step
            oldest = min((int(v.min()) for s in samples if (v := s.response_versions.numpy()).size), default=-1)
            order = tuple(int(x) for x in samples[0].uid.split("/")[:2])  # (draw, slice): schedule order
            self.buffer.put(Ready(stage=draw.stage, uids=[s.uid for s in samples],
                                  oldest_version=oldest, order=order, item=(draw, result)))
            self.delivered.set()
        self.wake.set()

    def _batch(self, results: list[GroupResult], stage: int):
        """The TrainBatch of ``results``, scored at the temperature its stage sampled them with."""
        return build_train_batch([r.group for r in results], [r.advantages for r in results], self.version,
                                 self.stage_cfgs[stage].rollout.temperature)

    def _track_idle(self) -> None:
        now = time.perf_counter()
        if self.admission.in_flight == 0 and self._idle_since is None:
            self._idle_since = now
        elif self.admission.in_flight > 0 and self._idle_since is not None:
            self.rollout_idle_s += now - self._idle_since
            self._idle_since = None

    def _rollout_idle_total(self) -> float:
        return self.rollout_idle_s + (time.perf_counter() - self._idle_since if self._idle_since is not None else 0.0)

    # ------------------------------------------------------------ the loop

    async def run(self) -> Path:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
        sink = self.sink = MetricsSink(cfg, self.run_dir, [st.name for st in self.stages])
        start = time.perf_counter()
        await self.start()
        if self.resume:
            await self.restore()
        print(f"verimed: actors ready in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        # The start-up heap (torch, transformers, Ray, the data pools: ~250k tracked objects) lives as
        # long as the run: frozen, it is left out of every later full collection, each of which would
        # walk it again while the event loop waits (bench/scale.py: GC pauses). Unfrozen at the end,
        # so a process running several controllers (the tests) can still free the earlier ones.
        gc.collect()
        gc.freeze()
        fix_malloc_mmap_threshold()
        producer = asyncio.create_task(self.produce())
        try:
            while self.version < cfg.run.steps:
                try:
                    metrics = await self.step()
                    sink.log(self.version, metrics)
                    every = cfg.run.checkpoint_every
                    if self.version == cfg.run.steps or (every and self.version % every == 0):
                        await self.save_checkpoint()
                except ray.exceptions.RayActorError as exc:
                    self._stop_if_learner_lost(exc)
                    raise
            if tail := await self.eval_runner.drain():  # background evaluations still running
                sink.log(self.version, tail)
        finally:
            producer.cancel()
            gc.unfreeze()
            report = sink.close()
        final = self.run_dir / "final"
        await self.learners.save_hf(str(final), self.model_path)
        print(f"verimed: report {report}, final checkpoint {final}", file=sys.stderr)
        return self.run_dir

    def _stop_if_learner_lost(self, exc: BaseException) -> None:
        """A learner rank died (no restart: its optimizer state and process group are gone): LearnerLost,
        naming the rank, its node and the checkpoint to resume from. Other actors' errors pass."""
        rank = learner_rank_of(exc, self.learners.actors)
        if rank is None:
            return
        message = learner_lost_message(rank, self.actor_nodes.get(("learner", rank)), exc, self.version, self.run_dir)
        self.faults.note(self.version, message)
        # The step that did not finish: a resumed run re-does it and its row.
        self.sink.log(self.version + 1, {"counters/learner_lost": 1.0, "faults/learner_rank": float(rank)})
        raise LearnerLost(message) from exc

    # ------------------------------------------------------------ checkpoints

    async def save_checkpoint(self) -> Path:
        """Learner shards + controller state, atomically (a crash mid-save keeps the previous one)."""
        buffered = [entry.item for entry in self.buffer.drain()]  # (Draw, GroupResult), not consumed yet
        state = ControllerState(
            version=self.version, schedule=self.schedule.state(self.version), ledger=self.ledger.to_state(),
            buffered_groups=[r.group for _, r in buffered], buffered_advantages=[r.advantages.tolist() for _, r in buffered],
            buffered_draws=[tuple(d) for d, _ in buffered],
            # each draw once: a dialogue still running may also wait for a re-run (rerun_after)
            in_flight=[tuple(d) for d in {d.draw: d for d in [*self.retry, *self.in_flight.values(),
                                                                *self.rerun_after.values()]}.values()],
        )
        with atomic_checkpoint_dir(self.run_dir, self.version, keep=self.cfg.run.checkpoint_keep) as tmp:
            await self.learners.save_checkpoint(str(tmp / LEARNER_SUBDIR))
            save_controller_state(tmp, state)
        # Drops since the last step line finished their draws before this checkpoint: a resumed run
        # will not play them again, so the ledger names them now (a drop-only line).
        if self.dropped_since_step:
            self._write_ledger_line({"checkpoint": self.version, "dropped": self.dropped_since_step})
            self.dropped_since_step = {}
        return self.run_dir

    async def restore(self) -> None:
        """Continue from the newest checkpoint: learner, schedule, ledger, buffer, in-flight draws."""
        ckpt = latest_checkpoint(self.run_dir)
        if ckpt is None:
            raise CheckpointError(f"--resume {self.run_dir}: no checkpoint under {self.run_dir / 'checkpoints'}")
        state = load_controller_state(ckpt)
        self.version = await self.learners.load_checkpoint(str(ckpt / LEARNER_SUBDIR))
        if self.version != state.version:
            raise CheckpointError(f"{ckpt}: learner is at version {self.version}, controller state at {state.version}")
        self.ledger = Ledger.from_state(state.ledger)
        self.schedule = Schedule(self.stages, self.pools.sizes(), self.cfg.run.seed, self.cfg.data.shuffle, state=state.schedule)
        # In-flight groups died with the old actors: count admission afresh from this version.
        self.admission = AdmissionControl(self.cfg.rollout.prompts_per_step, self.cfg.async_.max_staleness,
                                          base_version=self.version)
        self.retry = deque(Draw(*d) for d in state.in_flight)
        for group, advantages, draw in zip(state.buffered_groups, state.buffered_advantages, state.buffered_draws):
            self.admission.started(1)
            self._deliver(Draw(*draw), GroupResult(group=group, advantages=np.asarray(advantages, np.float32), kept=True))
        # The engines restarted on the base weights: serve the checkpointed version first.
        await self.sync.sync(self.version)
        print(f"verimed: resumed {ckpt} at version {self.version}", file=sys.stderr)

    async def _take_batch(self, stage: int) -> list[GroupResult]:
        """The B oldest buffered groups of ``stage`` that keep the staleness bound and were never consumed.

        Drops (counted): groups of another stage, duplicates (consumed before, or a
        re-run twin in this batch), and stale groups (a token older than
        version - max_staleness), whose draws run again so the schedule loses nothing.
        """
        while True:
            taken = self.buffer.take(stage, self.version, self.cfg.rollout.prompts_per_step,
                                     self.cfg.async_.max_staleness, self.ledger)
            for reason, entries in (("groups_wrong_stage", taken.wrong_stage), ("duplicates_dropped", taken.duplicates),
                                    ("stale_dropped", taken.stale)):
                self.counters[reason] += len(entries)
                self.dropped_since_step.setdefault(reason, []).extend(entry.uids[0] for entry in entries)
                for entry in entries:
                    self.admission.dropped(1, buffered=True)
                    self.ref_pending.pop(entry.uids[0], None)
            for entry in taken.stale:
                self._rerun(entry.item[0])
            if taken.stale or taken.wrong_stage or taken.duplicates:
                self.wake.set()  # freed admission slots
            if taken.batch is not None:
                # Oldest first; a batch in schedule order makes runs reproducible (the order varies with timing).
                return [entry.item[1] for entry in sorted(taken.batch, key=lambda e: e.order)]
            if self.sync.membership.returned and not self.sync.membership.in_rotation():
                # Every engine was lost and one is back on its initial weights: what it generates is
                # stale, and the step's own sync needs a batch first. The learner is idle (this loop
                # waits for that batch): bring the returned engines to this version now.
                await self.sync.sync(self.version)
                continue
            self.delivered.clear()
            try:
                await asyncio.wait_for(self.delivered.wait(), timeout=5.0)
            except asyncio.TimeoutError:
                if self.consecutive_failed_draws >= MAX_CONSECUTIVE_FAILED_DRAWS:
                    raise RuntimeError(f"{self.consecutive_failed_draws} draws in a row failed "
                                       f"{self.retry_policy.max_attempts} times each; last error: "
                                       f"{self.last_failure}") from None

    def _audit(self, uids: list[str]) -> None:
        """One line of ``ledger.jsonl`` per step: the uids it trains on and the groups dropped since the
        last step, by reason, so exactly-once consumption can be checked from outside (a resumed run
        appends; the last line of a step wins)."""
        self._write_ledger_line({"step": self.version + 1, "consumed": uids, "dropped": self.dropped_since_step})
        self.dropped_since_step = {}

    def _write_ledger_line(self, line: dict) -> None:
        with (self.run_dir / "ledger.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")

    def _record_drop(self, reason: str, draw: Draw) -> None:
        """A draw that will not run again and trained nothing (or nothing more): named in the next ledger line."""
        self.dropped_since_step.setdefault(reason, []).append(group_uid(draw.draw))

    def _rerun(self, draw: Draw) -> None:
        """Play a stale group's draw again (a dialogue still running first finishes, then replays)."""
        self.counters["stale_rerun"] += 1
        if draw.draw in self.in_flight:
            self.rerun_after[draw.draw] = draw
        elif draw not in self.retry:
            self.retry.append(draw)

    async def step(self) -> dict[str, float]:
        stage, step_in_stage = stage_at(self.stages, self.version)
        step_start = time.perf_counter()
        gen_tokens_before, idle_before = self.counters["gen_tokens"], self._rollout_idle_total()
        # batch: wait for B finished groups (the trainer's only wait on generation)
        results = await self._take_batch(stage)
        wait_s = time.perf_counter() - step_start
        self.admission.consumed(len(results))
        # Packing B·G samples takes ~0.25 s at 8192: off the loop, which keeps routing and admitting.
        pack_start = time.perf_counter()
        batch = await asyncio.get_running_loop().run_in_executor(self.pack_pool, self._batch, results, stage)
        pack_s = time.perf_counter() - pack_start
        self.ledger.consume(batch.uids)
        self._audit(batch.uids)
        self.wake.set()
        ref_wait = 0.0
        if self.reference is not None:
            batch, ref_wait = await self.reference.attach(
                batch, [self.ref_pending.pop(r.group.samples[0].uid) for r in results])
        # train
        t0 = time.perf_counter()
        train = await self.learners.train_step(batch, self.stage_cfgs[stage].grpo)
        train_s = time.perf_counter() - t0
        stale = staleness_stats(batch.versions.numpy(), self.version)
        stale.update({f"staleness/hist_{k}": float(n) for k, n in staleness_histogram(batch.versions.numpy(), self.version).items()})
        # sync: the version advances once the new weights are live on the engines, so a
        # group admitted during the sync is admitted at the version that generates it.
        sync = await self.sync.sync(self.version + 1)
        self.version += 1
        self.wake.set()
        step_s = time.perf_counter() - step_start
        metrics = {**train, **stale, **sync, **self._step_metrics(results, stage, step_in_stage)}
        metrics.update({
            "time/step_s": step_s, "time/train_wait_s": wait_s, "time/pack_s": pack_s, "time/train_s": train_s,
            "time/sync_s": sync["sync/seconds"], "time/reference_wait_s": ref_wait,
            "time/reference_wait_ratio": ref_wait / max(train_s, 1e-9),
            "time/trainer_idle_ratio": wait_s / step_s,
            "time/rollout_idle_ratio": (self._rollout_idle_total() - idle_before) / step_s,
            "throughput/gen_tokens_per_s": (self.counters["gen_tokens"] - gen_tokens_before) / step_s,
            "throughput/train_tokens": float(batch.loss_mask.numpy().sum()),
            "throughput/train_tokens_per_s": float(batch.loss_mask.numpy().sum()) / step_s,
            "version": float(self.version), "ledger/consumed": float(len(self.ledger)),
            "counters/sync_failures": float(self.sync.failures), "counters/engine_restarts": float(self.sync.rejoins),
            "counters/engines_lost": float(self.sync.membership.lost_total),
            "counters/engines_recovered": float(self.sync.membership.recovered_total),
            "engines/in_rotation": float(self.sync.membership.in_rotation()),
            **{f"counters/{k}": float(v) for k, v in self.counters.items()},
            **self.faults.step_metrics(), **self.router.metrics("generate"),
        })
        if step_in_stage == self.stages[stage].steps - 1 or self.version == self.cfg.run.steps:
            metrics.update(await self._evaluate(stage))
        metrics.update(self.eval_runner.ready())
        metrics.update(await self._llm_metrics())  # after a blocking evaluation: its calls count too
        return metrics

    async def _evaluate(self, stage: int) -> dict[str, float]:
        """Held-out evaluation (concurrent; blocking or beside training, ``stage_eval.background``)."""
        ev = self.cfg.stage_eval
        return await self.eval_runner.at_stage_end(
            lambda: evaluate(self.roles, self.stage_cfgs[stage], self.pools, stage, ev.max_slices, ev.concurrency),
            self.version)

    def _step_metrics(self, results: list[GroupResult], stage: int, step_in_stage: int) -> dict[str, float]:
        rewards = np.asarray([r for res in results for r in res.group.rewards])
        rubric = np.asarray([s for res in results for s in res.group.rubric_scores])
        out = {"stage/index": float(stage), "stage/step": float(step_in_stage),
               "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
               "reward/rubric_mean": float(rubric.mean()),
               # Mean wall time of one group's phases (groups run concurrently).
               "time/generate_group_s": float(np.mean([r.seconds.get("generate", 0.0) for r in results])),
               "time/judge_group_s": float(np.mean([r.seconds.get("judge", 0.0) for r in results]))}
        if self.stages[stage].kind == "rule":
            out["reward/accuracy"] = float(rubric.mean())
        return out


def run_training(cfg: Config, run_dir: Path, model_path: str, resume: bool = False, verbose: bool = False) -> Path:
    import uvloop

    controller = Controller(cfg, run_dir, model_path, resume, verbose)
    with exit_on_sigterm(run_dir, lambda: controller.version):  # `ray job stop`: say where to resume from
        return uvloop.run(controller.run())

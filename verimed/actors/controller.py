"""The controller: one asynchronous driver loop for synchronous and asynchronous RL.

Runs in the ``verimed train`` process on uvloop. Phases of a learner step,
top to bottom in :meth:`Controller.run`:

1. draw work   — a producer keeps starting groups while admission control
                 allows ((max_staleness + v + 1)·B admitted groups, DESIGN §4);
2. generate / judge — each group: simulator opening -> rubrics -> G engine
                 samples -> verifier -> rewards and advantages (core.episodes);
3. batch       — take B finished groups, check the ledger, pack a TrainBatch;
4. train       — one learner step (FSDP2 group);
5. sync        — broadcast the new weights into every engine, then check
                 engine-vs-learner log-prob parity on fixed tokens;
6. log         — metrics to console / JSONL / W&B.

``max_staleness: 0`` gives the synchronous baseline through the same loop.
"""
from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import msgspec
import numpy as np
import ray

from verimed.actors.learner import LearnerGroup, free_port, node_ip
from verimed.actors.rollout import EngineRouter, RolloutActor
from verimed.core.batch import build_train_batch
from verimed.core.config import Config, to_yaml
from verimed.core.data.cases import load_cases
from verimed.core.data.cursor import Cursor
from verimed.core.episodes import GroupResult, Roles, consultation_group
from verimed.core.metrics import MetricsSink
from verimed.core.models import apply_chat_template, load_tokenizer
from verimed.core.staleness import AdmissionControl, Ledger, staleness_histogram, staleness_stats
from verimed.core.weight_sync import resolve_backend

PARITY_MESSAGES = [
    {"role": "user", "content": "I have had a headache and blurred vision for three days."},
    {"role": "assistant", "content": "I am sorry to hear that. Have you had any fever, neck stiffness or weakness?"},
]


class Remote:
    """``await Remote(handle).method(*args)`` calls a Ray actor method (core code stays Ray-free)."""

    def __init__(self, handle):
        self._handle = handle

    def __getattr__(self, name):
        method = getattr(self._handle, name)

        async def call(*args, **kwargs):
            return await method.remote(*args, **kwargs)

        return call


class Controller:
    def __init__(self, cfg: Config, run_dir: Path, model_path: str):
        self.cfg, self.run_dir, self.model_path = cfg, run_dir, model_path
        self.cases, report = load_cases(cfg.data.cases_path, cfg.data.skip_invalid)
        if report.skipped:
            print(f"verimed: skipped {report.skipped} invalid case records (first: {report.errors[0]})", file=sys.stderr)
        self.cursor = Cursor(len(self.cases), cfg.run.seed, cfg.data.shuffle)
        self.admission = AdmissionControl(cfg.rollout.prompts_per_step, cfg.async_.max_staleness)
        self.ledger = Ledger()
        self.buffer: asyncio.Queue[GroupResult] = asyncio.Queue()
        self.wake = asyncio.Event()
        self.version = 0
        self.tokenizer = load_tokenizer(model_path)
        self.counters = {"groups_failed": 0, "groups_dropped": 0, "gen_tokens": 0, "sync_failures": 0, "engine_restarts": 0}
        self.retry: list[tuple[int, int]] = []  # (draw, item) of failed groups, re-run first: no gaps
        self.engines_need_resync = False
        # Rollout idle time: wall time with no group in flight (generation starved by admission).
        self.rollout_idle_s, self._idle_since = 0.0, time.perf_counter()

    # ------------------------------------------------------------ actors

    async def start(self) -> None:
        from verimed.actors.rubric_generator import RubricGeneratorActor
        from verimed.actors.simulator import SimulatorActor
        from verimed.actors.verifier import VerifierActor

        cfg = self.cfg
        options = self._placement()
        self.engines = [RolloutActor.options(**options("rollout", i)).remote(cfg, self.model_path, i)
                        for i in range(cfg.rollout.num_engines)]
        self.learners = LearnerGroup(cfg, self.model_path, [options("learner", r) for r in range(cfg.trainer.world_size)])
        # Rules-backend roles are light: the CPU default gives them num_cpus=0 so they
        # never starve the queue (DESIGN §10); their placement says otherwise on a cluster.
        self.simulator = SimulatorActor.options(**options("simulator", 0)).remote(cfg.simulator)
        self.rubric_generator = RubricGeneratorActor.options(**options("rubric_generator", 0)).remote(cfg.rubrics)
        self.verifier = VerifierActor.options(**options("verifier", 0)).remote(cfg.judge)
        await asyncio.gather(*[e.ready.remote() for e in self.engines])
        self.router = EngineRouter(self.engines)
        self.roles = Roles(simulator=Remote(self.simulator), rubrics=Remote(self.rubric_generator),
                           judge=Remote(self.verifier), generate=self._generate, tokenizer=self.tokenizer)
        await self._init_weight_sync()

    def _placement(self):
        """Placement groups for the plan of ``cfg.placement``; returns ``options(role, replica)``."""
        from verimed.actors.placement import actor_options, cluster_resources_from_ray, create_placement_groups
        from verimed.core.placement import check_config_consistency, plan

        check_config_consistency(self.cfg, self.cfg.placement)
        the_plan = plan(self.cfg.placement, kl_enabled=self.cfg.grpo.kl_coef > 0, cluster=cluster_resources_from_ray())
        placements = create_placement_groups(the_plan)
        return lambda role, replica: actor_options(the_plan, placements, role, replica)

    async def _generate(self, uid_prefix, prompt_ids, n, seed):
        samples = await self.router.call("generate", uid_prefix, prompt_ids, n, seed)
        self.counters["gen_tokens"] += sum(len(s.response_ids) for s in samples)
        return samples

    async def _init_weight_sync(self) -> None:
        backend = resolve_backend(self.cfg.weight_sync.backend)
        host, port = node_ip(), free_port()
        world = 1 + len(self.engines)
        await asyncio.gather(
            self.learners.actors[0].init_sync.remote(host, port, world, backend),
            *[e.init_sync.remote(host, port, 1 + i, world, backend) for i, e in enumerate(self.engines)],
        )
        self.meta = await self.learners.weight_meta()
        self.parity_ids = apply_chat_template(self.tokenizer, PARITY_MESSAGES, add_generation_prompt=False)

    # ------------------------------------------------------------ producer

    async def produce(self) -> None:
        """Start groups whenever admission control allows; never waits for training."""
        while True:
            while self.admission.can_start(self.version):
                self.admission.started(1, version=self.version)
                draw, item = self.retry.pop(0) if self.retry else self.cursor.next()
                asyncio.create_task(self._run_group(draw, item))
                self._track_idle()
            self.wake.clear()
            await self.wake.wait()

    async def _run_group(self, draw: int, item: int) -> None:
        try:
            result = await consultation_group(self.roles, self.cfg, self.cases[item], draw)
        except Exception as exc:  # a crashed actor must not kill the run: count, report, re-run the draw
            self.counters["groups_failed"] += 1
            if isinstance(exc, ray.exceptions.RayActorError):
                # A restarted engine comes back on its initial weights and outside the sync group.
                self.engines_need_resync = True
            print(f"verimed: group {draw} failed ({type(exc).__name__}: {str(exc)[:200]}); it will be re-run",
                  file=sys.stderr)
            self.admission.dropped(1)
            self.retry.append((draw, item))
        else:
            if result.kept:
                self.admission.finished(1)
                self.buffer.put_nowait(result)
            else:
                self.counters["groups_dropped"] += 1
                self.admission.dropped(1)
        self._track_idle()
        self.wake.set()

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
        sink = MetricsSink(cfg, self.run_dir)
        start = time.perf_counter()
        await self.start()
        print(f"verimed: actors ready in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        producer = asyncio.create_task(self.produce())
        try:
            for step in range(1, cfg.run.steps + 1):
                metrics = await self.step()
                sink.log(step, metrics)
        finally:
            producer.cancel()
            report = sink.close()
        final = self.run_dir / "final"
        await self.learners.save_hf(str(final), self.model_path)
        print(f"verimed: report {report}, final checkpoint {final}", file=sys.stderr)
        return self.run_dir

    async def step(self) -> dict[str, float]:
        step_start = time.perf_counter()
        gen_tokens_before = self.counters["gen_tokens"]
        idle_before = self._rollout_idle_total()
        # batch: wait for B finished groups (the trainer's only wait on generation)
        results = [await self.buffer.get() for _ in range(self.cfg.rollout.prompts_per_step)]
        wait_s = time.perf_counter() - step_start
        self.admission.consumed(len(results))
        batch = build_train_batch([r.group for r in results], [r.advantages for r in results], self.version)
        self.ledger.consume(batch.uids)
        self.wake.set()
        # train
        t0 = time.perf_counter()
        train = await self.learners.train_step(batch)
        train_s = time.perf_counter() - t0
        stale = staleness_stats(batch.versions.numpy(), self.version)
        stale.update({f"staleness/hist_{k}": float(n) for k, n in
                      staleness_histogram(batch.versions.numpy(), self.version).items()})
        self.version += 1
        # sync
        sync = await self.sync_weights()
        self.wake.set()
        step_s = time.perf_counter() - step_start
        rewards = np.asarray([r for res in results for r in res.group.rewards])
        rubric = np.asarray([s for res in results for s in res.group.rubric_scores])
        return {
            **train, **stale, **sync,
            "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
            "reward/rubric_mean": float(rubric.mean()),
            "time/step_s": step_s, "time/train_wait_s": wait_s, "time/train_s": train_s,
            "time/trainer_idle_ratio": wait_s / step_s,
            "time/rollout_idle_ratio": (self._rollout_idle_total() - idle_before) / step_s,
            "time/sync_s": sync["sync/seconds"],
            # Mean wall time of one group's phases (groups run concurrently).
            "time/generate_group_s": float(np.mean([r.seconds.get("generate", 0.0) for r in results])),
            "time/judge_group_s": float(np.mean([r.seconds.get("judge", 0.0) for r in results])),
            "throughput/gen_tokens_per_s": (self.counters["gen_tokens"] - gen_tokens_before) / step_s,
            "throughput/train_tokens": float(batch.loss_mask.numpy().sum()),
            "version": float(self.version), "ledger/consumed": float(len(self.ledger)),
            **{f"counters/{k}": float(v) for k, v in self.counters.items()},
        }

    async def sync_weights(self) -> dict[str, float]:
        """Broadcast version ``self.version`` to every engine; check log-prob parity."""
        meta = msgspec.structs.replace(self.meta, version=self.version)
        t0 = time.perf_counter()
        if self.engines_need_resync:
            await self._rejoin_engines()
        bucket = int(self.cfg.weight_sync.bucket_mb * 2**20)
        results = await asyncio.gather(self.learners.broadcast(bucket),
                                       *[e.update_weights.remote(meta) for e in self.engines], return_exceptions=True)
        out: dict[str, float] = {"sync/seconds": time.perf_counter() - t0}
        failed = [r for r in results if isinstance(r, BaseException)]
        if any(isinstance(r, ray.exceptions.RayActorError) for r in failed):
            self.engines_need_resync = True
        if failed:
            # The engines keep serving their previous weights (WorkerExtension validates before loading).
            self.counters["sync_failures"] += 1
            print(f"verimed: weight sync to version {self.version} failed: {failed[0]}", file=sys.stderr)
        if isinstance(results[0], dict):
            out.update(results[0])
        if self.cfg.weight_sync.check_parity:
            out["sync/parity_max_abs"] = await self.parity_gap()
            if out["sync/parity_max_abs"] > self.cfg.weight_sync.parity_tolerance:
                print(f"verimed: engine/learner log-prob gap {out['sync/parity_max_abs']:.2e} exceeds "
                      f"{self.cfg.weight_sync.parity_tolerance:g} at version {self.version}", file=sys.stderr)
        return out

    async def _rejoin_engines(self) -> None:
        """Rebuild the weight-sync group after an engine restart (a gloo/NCCL group cannot
        re-admit one member): wait for every engine, then all join a fresh group."""
        self.counters["engine_restarts"] += 1
        await asyncio.gather(*[e.ready.remote() for e in self.engines])
        await self._init_weight_sync()
        self.engines_need_resync = False
        print("verimed: engine restarted; weight-sync group rebuilt", file=sys.stderr)

    async def parity_gap(self) -> float:
        learner_lp, *engine_lps = await asyncio.gather(
            self.learners.score(self.parity_ids), *[e.score.remote(self.parity_ids) for e in self.engines])
        return float(max(np.abs(np.asarray(lp) - learner_lp).max() for lp in engine_lps))


def run_training(cfg: Config, run_dir: Path, model_path: str) -> Path:
    import uvloop

    return uvloop.run(Controller(cfg, run_dir, model_path).run())

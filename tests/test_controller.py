"""The real controller loop (produce -> take -> train -> sync) with test doubles for the engines,
the learners and the weight transport: no Ray cluster, no model. Checks what is trained:
the staleness bound at consumption, exactly-once consumption, per-stage sampling settings,
and that a parity failure stops the run.
"""
from __future__ import annotations

import asyncio
import threading
import numpy as np
import pytest

from verimed.actors.controller import Controller
from verimed.actors.weight_sync import WeightSyncCoordinator
from verimed.core.config import load_config
from verimed.core.rollout.errors import ParityError
from verimed.core.rollout.membership import EngineMembership
from verimed.core.tasks.groups import Roles
from verimed.core.types import Array, Sample, WeightVersion


class EngineDouble:
    """A router double: samples stamped with the engine's current weight version; draws in ``slow``
    take ``slow_factor`` times longer the first time they run, and at least until the weights
    moved 3 versions on (so the test does not depend on the machine's speed)."""

    def __init__(self, seconds: float = 0.01, slow: tuple[int, ...] = (), slow_factor: float = 10.0):
        self.version, self.seconds, self.slow, self.slow_factor = 0, seconds, set(slow), slow_factor
        self.calls: list[dict] = []
        self.runs: dict[int, int] = {}

    def metrics(self, method: str = "generate") -> dict[str, float]:
        return {}  # EngineRouter's per-engine counters: none here

    async def call(self, method, uid_prefix, prompt_ids, n, seed, max_tokens, temperature, top_p, **_):
        assert method == "generate"
        draw = int(uid_prefix.split("/")[0])
        self.runs[draw] = self.runs.get(draw, 0) + 1
        version = self.version  # the weights that start (and, here, produce) this group
        self.calls.append(dict(draw=draw, max_tokens=max_tokens, temperature=temperature, top_p=top_p))
        slow = draw in self.slow and self.runs[draw] == 1
        await asyncio.sleep(self.seconds * (self.slow_factor if slow else 1.0))
        while slow and self.version < version + 3:
            await asyncio.sleep(self.seconds)
        r = 3
        return [Sample(uid=f"{uid_prefix}/{i}", prompt_ids=Array.of(np.asarray(prompt_ids, np.int32)),
                       response_ids=Array.of(np.full(r, 7 + i, np.int32)),
                       response_logprobs=Array.of(np.full(r, -1.0, np.float32)),
                       response_versions=Array.of(np.full(r, version, np.int32)),
                       text=f"Final answer: {'x' if i % 2 else 'y'}") for i in range(n)]


class LearnerDouble:
    def __init__(self, seconds: float = 0.01):
        self.seconds, self.batches = seconds, []

    async def train_step(self, batch, grpo_cfg=None):
        self.batches.append(batch)
        await asyncio.sleep(self.seconds)
        return {"loss/policy": 0.0}

    async def broadcast(self, meta):
        return {}

    async def score(self, token_ids):
        return np.zeros(len(token_ids) - 1, np.float32)


class SyncDouble:
    """Moves the engine double to the new weights (what a weight sync does)."""

    def __init__(self, engine: EngineDouble):
        self.engine, self.failures, self.rejoins, self.needs_rejoin = engine, 0, 0, False
        self.membership = EngineMembership(1)  # engines lost / recovered: none here

    async def sync(self, version: int) -> dict[str, float]:
        await asyncio.sleep(0.002)
        self.engine.version = version
        return {"sync/seconds": 0.002}


def controller(tmp_path, tiny_model_path, overrides, engine, learner=None, sync=None) -> Controller:
    cfg = load_config(None, ["stage_eval.healthbench=0", "stage_eval.consultations=0", "rollout.group_size=2",
                             "rollout.prompts_per_step=2", "metrics.wandb=disabled", *overrides])
    ctl = Controller(cfg, tmp_path, tiny_model_path)
    ctl.router, ctl.learners = engine, learner or LearnerDouble()
    ctl.sync = sync or SyncDouble(engine)
    ctl.roles = Roles(simulator=None, rubrics=None, judge=None, generate=ctl._generate, tokenizer=ctl.tokenizer)
    ctl.simulator = ctl.verifier = ctl.rubric_generator = RoleActorDouble()  # rules roles: no LLM calls
    return ctl


async def run_steps(ctl: Controller, steps: int) -> list[dict]:
    producer = asyncio.create_task(ctl.produce())
    try:
        return [await ctl.step() for _ in range(steps)]
    finally:
        producer.cancel()


RULE_STAGES = "stages=[{name: a, kind: rule, steps: 10}, {name: b, kind: rule, steps: 10, rollout: {max_tokens: 7, temperature: 0.5, top_p: 0.9}}]"


def test_a_slow_group_is_dropped_rerun_and_no_trained_token_is_too_old(tmp_path, tiny_model_path):
    engine = EngineDouble(seconds=0.01, slow=(3,), slow_factor=10.0)
    ctl = controller(tmp_path, tiny_model_path, ["async.max_staleness=1", "run.steps=20", RULE_STAGES], engine)
    metrics = asyncio.run(run_steps(ctl, 20))
    for batch in ctl.learners.batches:
        versions = batch.versions.numpy()
        assert versions[versions >= 0].min() >= batch.policy_version - 1  # the bound on what is trained
    assert metrics[-1]["counters/stale_dropped"] >= 1 and metrics[-1]["counters/stale_rerun"] >= 1
    assert engine.runs[3] == 2  # dropped once, played again
    consumed = [uid for b in ctl.learners.batches for uid in b.uids]
    assert len(consumed) == len(set(consumed)) == len(ctl.ledger)  # exactly once
    draws = {int(uid.split("/")[0]) for uid in consumed}
    assert 3 in draws
    pending = set(ctl.in_flight) | {d.draw for d in ctl.retry} | {e.item[0].draw for e in ctl.buffer.drain()}
    # No gap in the schedule, except the groups of stage a that finished after training moved to
    # stage b: dropped at the boundary and counted (a finished stage's draws are not replayed).
    missing = [d for d in range(max(draws)) if d not in draws and d not in pending]
    assert len(missing) == metrics[-1]["counters/groups_wrong_stage"] <= 2 * ctl.cfg.rollout.prompts_per_step


def test_consumed_in_age_order_and_the_version_follows_the_sync(tmp_path, tiny_model_path):
    engine = EngineDouble()
    ctl = controller(tmp_path, tiny_model_path, ["async.max_staleness=0", "run.steps=4", RULE_STAGES], engine)
    asyncio.run(run_steps(ctl, 4))
    # synchronous: every token of the batch of step v was generated by weights v
    for v, batch in enumerate(ctl.learners.batches):
        assert batch.policy_version == v and set(batch.versions.numpy()[batch.loss_mask.numpy() > 0]) == {v}
    assert ctl.version == 4 and engine.version == 4


def test_per_stage_sampling_settings_reach_the_engine_and_the_learner(tmp_path, tiny_model_path):
    engine = EngineDouble(seconds=0.001)
    ctl = controller(tmp_path, tiny_model_path, ["async.max_staleness=0", "run.steps=12", "rollout.max_tokens=20",
                                                 "rollout.temperature=1.0", "rollout.top_p=1.0", RULE_STAGES], engine)
    asyncio.run(run_steps(ctl, 12))
    first = {(c["max_tokens"], c["temperature"], c["top_p"]) for c in engine.calls if c["draw"] < 20}
    second = {(c["max_tokens"], c["temperature"], c["top_p"]) for c in engine.calls[-4:]}
    assert first == {(20, 1.0, 1.0)} and second == {(7, 0.5, 0.9)}
    temps = [b.temperature for b in ctl.learners.batches]
    assert temps[:10] == [1.0] * 10 and temps[10:] == [0.5, 0.5]  # the learner scores at the sampling temperature


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class RoleActorDouble:
    """A simulator / verifier / rubric-generator actor double: only its (LLM and judge) counters are read."""

    def __init__(self):
        async def stats():
            return {}

        self.llm_stats = self.stats = _Remote(stats)


class ParityEngine:
    """An engine actor double whose log-probs differ from the learner's by ``gap``."""

    def __init__(self, gap: float):
        async def score(ids):
            return np.full(len(ids) - 1, -gap, np.float32)

        async def update(meta):
            return {}

        self.score, self.update_weights = _Remote(score), _Remote(update)


def _coordinator(tiny_model_path, gap, *overrides):
    from verimed.core.models import load_tokenizer

    cfg = load_config(None, list(overrides))
    coord = WeightSyncCoordinator(cfg, LearnerDouble(), [ParityEngine(gap)], load_tokenizer(tiny_model_path))
    coord.meta = WeightVersion(version=0, num_bytes=0, names=[], shapes=[], dtypes=[], bucket_bytes=1)
    return coord


def test_a_parity_gap_above_the_tolerance_stops_the_run_with_both_numbers(tiny_model_path, capsys):
    with pytest.raises(ParityError, match=r"gap 5\.000e-02 exceeds weight_sync\.parity_tolerance 0\.001 .*version 3"):
        asyncio.run(_coordinator(tiny_model_path, 0.05).sync(3))
    out = asyncio.run(_coordinator(tiny_model_path, 0.05, "weight_sync.on_parity_failure=warn").sync(3))
    assert out["sync/parity_max_abs"] == pytest.approx(0.05) and "warning" in capsys.readouterr().err
    assert asyncio.run(_coordinator(tiny_model_path, 1e-4).sync(3))["sync/parity_max_abs"] == pytest.approx(1e-4)


def test_the_controller_stops_on_an_injected_parity_failure(tmp_path, tiny_model_path):
    engine = EngineDouble(seconds=0.001)
    ctl = controller(tmp_path, tiny_model_path, ["async.max_staleness=0", "run.steps=2", RULE_STAGES], engine)
    ctl.sync = _coordinator(tiny_model_path, 0.2)
    with pytest.raises(ParityError, match="gap 2.000e-01"):
        asyncio.run(run_steps(ctl, 2))
    assert ctl.version == 0  # the failed version never went live


def test_the_start_up_heap_is_frozen_for_the_run_and_unfrozen_after_it(tmp_path, tiny_model_path):
    """Full collections skip what existed at start (the tokenizer, config, imports) while the run
    lasts; afterwards a process running several controllers can free the earlier ones again."""
    import gc

    engine = EngineDouble(seconds=0.001)
    ctl = controller(tmp_path, tiny_model_path, ["async.max_staleness=0", "run.steps=2", RULE_STAGES], engine)

    async def nothing(*args, **kwargs):
        return None

    ctl.start = ctl.save_checkpoint = ctl.learners.save_hf = nothing  # the doubles are in place already
    frozen_at_steps, step = [], ctl.step

    async def step_and_look():
        frozen_at_steps.append(gc.get_freeze_count())
        return await step()

    ctl.step = step_and_look
    assert gc.get_freeze_count() == 0
    asyncio.run(ctl.run())
    assert len(frozen_at_steps) == 2 and min(frozen_at_steps) > 10_000  # the tokenizer alone is thousands
    assert gc.get_freeze_count() == 0


MMAP_PROBE = """
import ctypes, sys
import numpy as np
from verimed.actors.controller import fix_malloc_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "fixed":
    assert fix_malloc_mmap_threshold()
freed = np.ones(16 << 20, np.uint8)
del freed  # glibc's default: the threshold rises to 16 MiB here
before = libc.mallinfo2().hblkhd
kept = np.ones(8 << 20, np.uint8)
print((libc.mallinfo2().hblkhd - before) >> 20)
"""


@pytest.mark.parametrize("mode, mmapped_mib", [("default", 0), ("fixed", 8)])
def test_large_blocks_stay_mmapped_once_the_threshold_is_fixed(mode, mmapped_mib):
    """With glibc's moving threshold an 8 MiB array after a freed 16 MiB one comes from the heap (and
    stays in the process after it is freed); with the fixed threshold it is mmapped and unmapped."""
    import ctypes
    import os
    import subprocess
    import sys

    try:
        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("not glibc >= 2.33")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's own defaults
    out = subprocess.run([sys.executable, "-c", MMAP_PROBE, mode], capture_output=True, text=True, timeout=120,
                         check=True, env=env)
    assert int(out.stdout.strip()) == mmapped_mib


def test_the_batch_is_packed_while_the_default_thread_pool_is_busy(tmp_path, tiny_model_path):
    """Every thread of asyncio's default pool blocked (a burst of reply checks at scale): the step still
    packs its batch, on the controller's own packing thread, and reports how long packing took."""
    engine = EngineDouble()
    ctl = controller(tmp_path, tiny_model_path, ["async.max_staleness=1", "run.steps=2", RULE_STAGES], engine)

    async def scenario():
        producer = asyncio.create_task(ctl.produce())
        release = threading.Event()
        try:
            first = await ctl.step()
            while len(ctl.buffer) < ctl.cfg.rollout.prompts_per_step:  # the next batch is ready
                await asyncio.sleep(0.01)
            loop = asyncio.get_running_loop()
            blockers = [loop.run_in_executor(None, release.wait) for _ in range(64)]  # more than the pool holds
            second = await asyncio.wait_for(ctl.step(), timeout=30)
            release.set()
            await asyncio.gather(*blockers)
            return first, second
        finally:
            release.set()
            producer.cancel()

    first, second = asyncio.run(scenario())
    assert second["version"] == 2 and 0 <= second["time/pack_s"] < 30
    assert first["time/pack_s"] <= first["time/step_s"]

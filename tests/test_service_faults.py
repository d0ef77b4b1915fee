"""Service-level faults (issue #17, part 2): a slow engine, a judge outage; counters and logs.

Unit tests (fast, no Ray started): the retry policy, the fault log, routing by expected
completion, the emulated engine's slowdown, the judge's raise mode, and the controller's
failure path on a Ray-free controller double. The two end-to-end scenarios are in
``tests/test_service_faults_e2e.py`` (integration, slow).

    pytest -q tests/test_service_faults.py
"""
from __future__ import annotations

import asyncio
import types
from pathlib import Path

import numpy as np
import pytest

from verimed.core.config import ConfigError, JudgeConfig, load_config
from verimed.core.rollout.routing import ewma, expected_costs, pick_engine, requests_at_once
from verimed.core.rubrics.judge import JudgeUnavailable, LLMJudge, make_judge
from verimed.core.train.faults import FAULT_KINDS, FaultCounters, RetryPolicy, one_line
from verimed.core.types import RubricItem, Turn

EMULATED = ["rollout.backend=emulated", "trainer.backend=emulated", "emulation.profile=cpu-smollm2"]


# ------------------------------------------------------------------ retry policy


def test_retry_policy_doubles_from_the_base_caps_and_gives_up_at_the_attempt_limit():
    policy = RetryPolicy(base_s=0.5, cap_s=30.0, max_attempts=10)
    assert [policy.delay_s(n) for n in range(1, 10)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert policy.total_backoff_s() == 121.5  # 0.5+1+2+4+8+16 + 3*30: a 30 s outage is ridden out
    assert [policy.gives_up(n) for n in (1, 9, 10, 11)] == [False, False, True, True]
    assert RetryPolicy(max_attempts=1).gives_up(1)  # one attempt, no retry
    assert RetryPolicy().delay_s(10_000) == 30.0  # no overflow far past the cap


@pytest.mark.parametrize("kwargs", [{"base_s": 0}, {"base_s": -1}, {"cap_s": 0.1, "base_s": 1}, {"max_attempts": 0}])
def test_retry_policy_rejects_settings_that_never_wait_or_never_try(kwargs):
    with pytest.raises(ValueError, match="RetryPolicy: expected"):
        RetryPolicy(**kwargs)
    with pytest.raises(ValueError, match="attempt counts from 1"):
        RetryPolicy().delay_s(0)


# ------------------------------------------------------------------ fault log


def test_fault_log_counts_per_step_and_cumulatively_and_names_the_actor(tmp_path):
    log = FaultCounters(tmp_path / "logs" / "faults.log")
    log.record("judge_unavailable", step=3, draw=7, actor="VerifierActor.judge", cause="JudgeUnavailable: down")
    log.record("judge_unavailable", step=3, draw=8, actor="VerifierActor.judge", cause="JudgeUnavailable: down")
    first = log.step_metrics()
    assert first["faults/judge_unavailable"] == 2 and first["counters/judge_unavailable"] == 2
    assert {k.split("/")[1] for k in first} == set(FAULT_KINDS)  # every kind, zeros too
    log.record("actor_died", step=4, actor="RolloutActor", cause="line 1\nThe actor is dead because it was killed")
    second = log.step_metrics()
    assert second["faults/judge_unavailable"] == 0 and second["counters/judge_unavailable"] == 2
    assert second["faults/actor_died"] == 1
    lines = (tmp_path / "logs" / "faults.log").read_text().splitlines()
    assert len(lines) == 3 and "step 3: judge_unavailable draw 7 actor VerifierActor.judge: JudgeUnavailable" in lines[0]
    assert lines[2].endswith("actor RolloutActor: The actor is dead because it was killed")  # the cause line
    with pytest.raises(ValueError, match="fault kind 'judge_down'"):
        log.record("judge_down", step=1)


def test_one_line_keeps_the_cause_of_a_traceback_not_a_frame():
    text = ("ray::VerifierActor.judge() (pid=5)\n  File \"x.py\", line 1, in judge\n    raise X\n"
            "verimed.core.rubrics.judge.JudgeUnavailable: boom\n\n")
    assert one_line(text) == "verimed.core.rubrics.judge.JudgeUnavailable: boom"
    assert one_line("") == "" and len(one_line("x" * 1000)) == 300


# ------------------------------------------------------------------ routing


def test_equal_engines_route_least_loaded_as_before():
    assert pick_engine([2, 0, 1], [None, None, None]) == 1
    assert pick_engine([1, 1, 1], [0.3, 0.3, 0.3]) == 0  # ties: lowest index
    assert pick_engine([0, 5, 5], [1.0, 1.0, 1.0], skip={0}) == 1  # skipped engines get nothing
    assert pick_engine([0, 5], [1.0, 1.0], skip={0, 1}) == 0  # unless every engine is skipped


def test_a_five_times_slower_engine_gets_proportionally_fewer_requests():
    # 16 requests placed one after another (none completes): least-loaded would give 4 each.
    latency = [1.0, 1.0, 1.0, 5.0]
    inflight = [0, 0, 0, 0]
    for _ in range(16):
        inflight[pick_engine(inflight, latency)] += 1
    # cost (n+1)*L: the slow engine holds n_s with 5(n_s+1) <= n_f+1 -> n_s = 1 when the fast ones hold 5
    assert inflight == [5, 5, 5, 1]
    # an engine not measured yet is priced at the mean of the measured ones: it gets probed
    assert expected_costs([0, 0], [2.0, None]) == [2.0, 2.0]
    assert ewma(None, 3.0) == 3.0 and ewma(1.0, 3.0, alpha=0.5) == 2.0
    with pytest.raises(ValueError, match="one entry per engine"):
        expected_costs([0, 0], [1.0])


def test_a_batching_engine_takes_requests_beside_those_in_flight():
    # capacity c: an engine runs c requests at once, so its cost grows by L/c per request in flight;
    # capacity 1 is the queue above, (n+1)*L
    assert expected_costs([0, 8, 16], [1.0, 1.0, 1.0], capacity=16) == [1.0, 1.5, 2.0]
    assert expected_costs([3], [2.0], capacity=1) == [8.0]
    latency, inflight = [1.0, 1.0, 1.0, 5.0], [0, 0, 0, 0]
    for _ in range(16):
        inflight[pick_engine(inflight, latency, capacity=16)] += 1
    # the slow engine would be chosen only once the fast ones held 64 each (1 + 64/16 = 5)
    assert inflight == [6, 5, 5, 0]
    for _ in range(3 * 64 - 16):
        inflight[pick_engine(inflight, latency, capacity=16)] += 1
    assert inflight == [64, 64, 64, 0]
    assert pick_engine(inflight, latency, capacity=16) == 3  # cost 5.0 everywhere: the one with fewer in flight
    assert requests_at_once(32, 2) == 16 and requests_at_once(32, 64) == 1  # max_num_seqs // G, at least 1
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        expected_costs([0], [1.0], capacity=0)


def _closed_loop_rate(latency: list[float], slots: int, horizon: float, measured: bool, capacity: int = 1) -> float:
    """Completions per unit time of ``slots`` requests kept in flight (a new one as each completes,
    as admission control does), engine i answering in ``latency[i]`` whatever its load (decode that
    is latency-bound, as on the H100 profiles). Event-driven: no clock, no sleeping."""
    import heapq

    known = latency if measured else [None] * len(latency)  # unmeasured everywhere = least-loaded
    inflight, events, done = [0] * len(latency), [], 0
    for _ in range(slots):
        i = pick_engine(inflight, known, capacity=capacity)
        inflight[i] += 1
        heapq.heappush(events, (latency[i], i))
    while events[0][0] <= horizon:
        t, i = heapq.heappop(events)
        inflight[i] -= 1
        done += 1
        j = pick_engine(inflight, known, capacity=capacity)
        inflight[j] += 1
        heapq.heappush(events, (t + latency[j], j))
    return done / horizon


def test_in_a_slot_limited_loop_the_slowed_engine_costs_under_ten_percent_only_with_expected_completion():
    without = _closed_loop_rate([1.0, 1.0, 1.0], slots=16, horizon=1000.0, measured=True)
    assert without == 16.0  # 16 slots, each answered in 1: 16 per unit time
    routed = _closed_loop_rate([1.0, 1.0, 1.0, 5.0], slots=16, horizon=1000.0, measured=True) / without
    least_loaded = _closed_loop_rate([1.0, 1.0, 1.0, 5.0], slots=16, horizon=1000.0, measured=False) / without
    # least-loaded: a quarter of the slots on the slow engine, (12 + 4/5) / 16 = 0.8 of the rate;
    # by expected completion it holds 1 slot of 16: (15 + 1/5) / 16 = 0.95 (issue #17 target: 0.90)
    # (tolerance: requests cut at the horizon, at most 16 of the 16000 counted)
    assert least_loaded == pytest.approx(0.8, abs=1e-3) and routed == pytest.approx(0.95, abs=1e-3)
    # engines that batch 16 requests (max_num_seqs 32, G 2): the slow one is never worth a slot
    batched = _closed_loop_rate([1.0, 1.0, 1.0, 5.0], slots=16, horizon=1000.0, measured=True, capacity=16) / without
    assert batched == pytest.approx(1.0, abs=1e-3)


def test_the_router_measures_latency_per_method_and_routes_away_from_the_slow_engine(monkeypatch):
    import verimed.actors.rollout as rollout

    clock = [0.0]
    monkeypatch.setattr(rollout.time, "perf_counter", lambda: clock[0])

    def engine(seconds):
        async def generate(*args):
            clock[0] += seconds  # the call "takes" this long on the router's clock
            return seconds

        return types.SimpleNamespace(generate=types.SimpleNamespace(remote=generate))

    router = rollout.EngineRouter([engine(1.0), engine(5.0)])

    async def scenario():
        first = [await router.call("generate") for _ in range(2)]  # unmeasured: 0, then 1 (probe)
        later = [await router.call("generate") for _ in range(4)]
        return first, later

    first, later = asyncio.run(scenario())
    assert sorted(first) == [1.0, 5.0] and later == [1.0] * 4  # measured: the slow one is avoided
    assert router.pick(method="chat") == 0  # another method has its own (empty) measurements
    m = router.metrics("generate")
    assert m["router/engine_0/requests"] == 5 and m["router/engine_1/requests"] == 1
    assert m["router/engine_1/latency_s"] == 5.0
    # REPROBE_AFTER_S later, with nothing in flight there, the slow engine's old measurement is
    # forgotten: it gets one probe (and is avoided again while that probe is in flight)
    clock[0] += rollout.REPROBE_AFTER_S + 1
    assert asyncio.run(router.call("generate")) == 1.0  # both forgotten: engine 0 measured afresh
    assert router.pick() == 1
    router.inflight[1] += 1
    assert router.pick() == 0


# ------------------------------------------------------------------ slow engine (emulated)


def test_engine_slowdown_is_checked_at_load_naming_the_key():
    cfg = load_config(None, EMULATED + ["placement.rollout.replicas=3", "emulation.engine_slowdown={2: 5}"])
    assert cfg.emulation.engine_slowdown == {2: 5.0}
    bad = {"{3: 5}": r"emulation.engine_slowdown: replica index 3 is not a policy engine; expected indices in \[0, 3\)",
           "{-1: 5}": "replica index -1",
           "{0: 0}": r"emulation.engine_slowdown\[0\] = 0.0: expected a finite factor > 0",
           "{0: .nan}": "expected a finite factor > 0",
           "{x: 2}": "emulation.engine_slowdown = {'x': 2}: every key expected `int`",
           "5": "emulation.engine_slowdown = 5: expected `object`"}
    for value, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, EMULATED + ["placement.rollout.replicas=3", f"emulation.engine_slowdown={value}"])
    with pytest.raises(ConfigError, match="only emulated engines read it"):
        load_config(None, ["emulation.engine_slowdown={0: 5}"])


def test_a_slowed_emulated_engine_waits_factor_times_the_compute_and_the_same_sync(tiny_model_path):
    from verimed.core.emulate.engine import EmulatedEngine, EmulationError
    from verimed.core.emulate.profile import load_profile
    from verimed.core.emulate.tokens import LightTokenizer

    profile, tokenizer = load_profile("cpu-smollm2"), LightTokenizer(tiny_model_path)
    prompt = tokenizer.encode("Patient reports chest pain radiating to the left arm since the morning.")

    def run(slowdown):
        engine = EmulatedEngine(profile, tokenizer, seed=1, slowdown=slowdown)
        waits: list[float] = []

        async def record(modelled_s):  # modelled seconds, no sleeping
            waits.append(modelled_s)
            await asyncio.sleep(0)

        engine._wait = record
        outs = asyncio.run(engine.generate(prompt, 4, max_tokens=48, temperature=1.0, seed=3))
        return waits, [o.token_ids for o in outs], engine.ticks

    base, ids, ticks = run(1.0)
    slow, slow_ids, slow_ticks = run(5.0)
    # The same tokens in the same ticks, each wait 5x: sums agree to float rounding (~1e-16 per term).
    assert slow_ids == ids and slow_ticks == ticks and len(slow) == len(base)
    assert np.allclose(slow, [5.0 * w for w in base], rtol=1e-12, atol=0)
    with pytest.raises(EmulationError, match="slowdown 0"):
        EmulatedEngine(profile, tokenizer, slowdown=0)


# ------------------------------------------------------------------ judge outage: the judge's part

ITEMS = [RubricItem("Names myasthenia gravis", 5), RubricItem("Asks about rest", 3)]
CONVO = [Turn("user", "I see double and feel weak.")]


class DownLLM:
    """A judge server that is down: every call fails to connect."""

    def __init__(self):
        self.calls = 0

    async def chat(self, *args, **kwargs):
        self.calls += 1
        raise ConnectionError("connection refused")


def test_an_unreachable_judge_raises_in_training_mode_and_stays_ungradable_for_eval():
    down = DownLLM()
    judge = LLMJudge(down, max_retries=2, on_client_error="raise")
    with pytest.raises(JudgeUnavailable, match="after 3 attempt"):
        asyncio.run(judge.judge(CONVO, "reply", ITEMS))
    assert judge.stats["unavailable"] >= 1 and judge.stats["ungradable"] == 0
    evaluation = LLMJudge(DownLLM(), max_retries=1)  # the default: counted, the evaluation reports it
    assert [j.met for j in asyncio.run(evaluation.judge(CONVO, "reply", ITEMS))] == [None, None]
    with pytest.raises(ValueError, match="on_client_error must be one of"):
        LLMJudge(down, on_client_error="skip")


def test_a_reply_that_cannot_be_parsed_is_a_verdict_problem_not_an_outage():
    class Chatty:
        async def chat(self, *args, **kwargs):
            return "I would rather not answer in JSON."

    judge = LLMJudge(Chatty(), max_retries=1, on_client_error="raise")
    out = asyncio.run(judge.judge(CONVO, "reply", ITEMS))
    assert [j.met for j in out] == [None, None] and judge.stats["unavailable"] == 0  # ungradable, not raised


def test_an_outage_that_ends_within_the_retries_grades_normally():
    class Flaky:
        def __init__(self):
            self.calls = 0

        async def chat(self, *args, **kwargs):
            self.calls += 1
            if self.calls <= 2:
                raise ConnectionError("connection refused")
            return '{"criteria_met": true}'

    judge = make_judge(JudgeConfig(backend="llm", max_retries=2), Flaky(), on_client_error="raise")
    out = asyncio.run(judge.judge(CONVO, "reply", ITEMS[:1]))
    assert out[0].met is True and out[0].attempts == 3


# ------------------------------------------------------------------ the controller's failure path


def _controller(tmp_path: Path, policy: RetryPolicy, outcomes: dict[int, list]):
    """A Ray-free Controller double: real ``_run_work`` / ``_group_failed``, fake groups.

    ``outcomes[draw]``: what each attempt of the draw does, in order: an exception to raise, or
    "ok" to succeed (the last entry repeats).
    """
    import verimed.actors.controller as ctl
    from verimed.core.tasks.schedule import Draw

    c = ctl.Controller.__new__(ctl.Controller)
    c.stages = [types.SimpleNamespace(kind="rubric")]
    c.stage_cfgs = [None]
    c.pools = types.SimpleNamespace(item=lambda draw: draw.item)
    c.counters = {k: 0 for k in ("groups_failed", "prompts_too_long", "dialogues_failed")}
    c.retry, c.dropped_since_step, c.draw_attempts = [], {}, {}
    c.consecutive_failed_draws, c.last_failure, c.version = 0, "", 4
    c.retry_policy, c.faults = policy, FaultCounters(tmp_path / "logs" / "faults.log")
    c.sync = types.SimpleNamespace(needs_rejoin=False)
    c.admission = types.SimpleNamespace(dropped=lambda n: None)
    delivered: list[int] = []
    c._deliver = lambda draw, result: delivered.append(draw.draw)
    attempts: dict[int, int] = {}

    async def fake_group(roles, stage, stage_cfg, item, draw):
        k = attempts[draw.draw] = attempts.get(draw.draw, 0) + 1
        plan = outcomes[draw.draw]
        outcome = plan[min(k, len(plan)) - 1]
        if isinstance(outcome, BaseException):
            raise outcome
        return "result"

    c.roles = None
    draws = [Draw(d, 0, "cases", d) for d in outcomes]
    return c, ctl, fake_group, draws, delivered, attempts


def _drive(c, draws):
    """Run each draw, then whatever the controller queued for a re-run, as the producer does."""
    async def go():
        queue = list(draws)
        while queue:
            await c._run_work(queue.pop(0))
            queue += c.retry
            c.retry = []

    asyncio.run(go())


def test_a_judge_outage_delays_groups_and_loses_none(tmp_path, monkeypatch):
    down = JudgeUnavailable("judge LLM unreachable for item 0 after 3 attempt(s): client error")
    c, ctl, fake_group, draws, delivered, attempts = _controller(
        tmp_path, RetryPolicy(base_s=1e-3, cap_s=1e-3, max_attempts=10), {0: [down, down, down, "ok"], 1: ["ok"]})
    monkeypatch.setattr(ctl, "single_turn_group", fake_group)
    _drive(c, draws)
    # Today's main counted draw 0 "failed" and skipped it; here it waits, re-runs, and trains once.
    assert sorted(delivered) == [0, 1] and attempts == {0: 4, 1: 1}
    assert c.dropped_since_step == {} and c.draw_attempts == {}
    m = c.faults.step_metrics()
    assert m["faults/judge_unavailable"] == 3 and m["faults/draws_failed"] == 0
    lines = (tmp_path / "logs" / "faults.log").read_text().splitlines()
    assert len(lines) == 3 and all(" step 5: judge_unavailable draw 0 actor judge: JudgeUnavailable" in ln for ln in lines)


def test_a_bad_item_fails_every_attempt_and_is_dropped_as_failed_not_looped(tmp_path, monkeypatch):
    c, ctl, fake_group, draws, delivered, attempts = _controller(
        tmp_path, RetryPolicy(base_s=1e-3, cap_s=1e-3, max_attempts=4), {0: [KeyError("rubric")], 1: ["ok"]})
    monkeypatch.setattr(ctl, "single_turn_group", fake_group)
    _drive(c, draws)
    assert delivered == [1] and attempts == {0: 4, 1: 1}  # exactly max_attempts tries, then no more
    # draw 1 succeeded before draw 0's last attempt: one failed draw in a row, far from stopping the run
    assert c.dropped_since_step == {"failed": ["0/0"]} and c.consecutive_failed_draws == 1
    m = c.faults.step_metrics()
    assert m["faults/group_error"] == 4 and m["faults/draws_failed"] == 1
    assert "draws_failed draw 0 actor controller: KeyError: 'rubric'" in (tmp_path / "logs" / "faults.log").read_text()


def test_the_failed_actor_and_its_cause_are_read_from_rays_errors():
    import ray

    from verimed.actors.failures import failure_origin

    raised = ray.exceptions.RayTaskError(
        "judge", "Traceback (most recent call last):\n  File \"v.py\", line 9, in judge\n    raise JudgeUnavailable()\n"
        "verimed.core.rubrics.judge.JudgeUnavailable: judge LLM unreachable", JudgeUnavailable("judge LLM unreachable"),
        proctitle="ray::VerifierActor.judge", pid=5, ip="127.0.0.1").as_instanceof_cause()  # what `await` raises
    assert failure_origin(raised) == ("judge_unavailable", "VerifierActor.judge", "JudgeUnavailable: judge LLM unreachable")
    bug = ray.exceptions.RayTaskError("generate", "Traceback (most recent call last):\n  File \"r.py\", line 3\n"
                                      "ZeroDivisionError: division by zero", ZeroDivisionError("division by zero"),
                                      proctitle="ray::RolloutActor.generate").as_instanceof_cause()
    assert failure_origin(bug) == ("group_error", "RolloutActor.generate", "ZeroDivisionError: division by zero")
    died = ray.exceptions.ActorDiedError()
    assert failure_origin(died)[:2] == ("actor_died", "actor")
    assert failure_origin(JudgeUnavailable("x")) == ("judge_unavailable", "judge", "JudgeUnavailable: x")


# ------------------------------------------------------------------ bench/faults.py (analysis only)


def test_the_slow_engine_bench_plans_both_runs_and_reports_the_ratio_and_the_bound():
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("bench_faults", root / "bench" / "faults.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_faults"] = bench
    spec.loader.exec_module(bench)
    args = bench.parse_args(["--engines", "4", "--slowdown", "5", "--output-dir", "/nonexistent"])
    slowed, without = bench.plan(args)
    assert "placement.rollout.replicas=4" in slowed.overrides and "emulation.engine_slowdown={3: 5.0}" in slowed.overrides
    assert "placement.rollout.replicas=3" in without.overrides
    assert not any("engine_slowdown" in o for o in without.overrides)
    rows = [{"step": 1, "staleness/max": 1.0, "counters/stale_dropped": 2.0, **{f"router/engine_{i}/requests": r
             for i, r in enumerate([9.0, 9.0, 10.0, 2.0])}}]
    facts = bench.run_facts(rows, 0, 4)
    assert facts == {"staleness_max": 1.0, "stale_dropped": 2.0, "last_engine_share": 2.0 / 30.0}
    summaries = {"slowed": {"train_tokens_per_s": 91.0, "trainer_idle": 0.5},
                 "without": {"train_tokens_per_s": 100.0, "trainer_idle": 0.4}}
    text = bench.report(summaries, {"slowed": facts, "without": {**facts, "staleness_max": 2.0}}, args)
    assert "ratio slowed / without = 0.910 (target >= 0.9: met)" in text and "staleness bound VIOLATED" in text
    with pytest.raises(SystemExit):
        bench.parse_args(["--engines", "1"])

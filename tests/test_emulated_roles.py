"""Emulated LLM roles (verimed.core.emulate.roles): rules content, LLM timing.

Each role over an emulated client must answer exactly what its rules backend
answers, while sending the LLM backend's calls (same count, same prompts, the
role's budget, ``role=``) and handling client errors as the LLM backend does.
The LLM backends run here against doubles that answer valid text for the role,
so their call pattern is the one of a working model. Fast, no Ray.

    pytest -q tests/test_emulated_roles.py
"""
from __future__ import annotations

import asyncio
import json

import pytest

from verimed.core.config import JudgeConfig, RubricConfig, SimulatorConfig
from verimed.core.data.cases import load_cases
from verimed.core.emulate import roles as emulate
from verimed.core.rollout.llm import LLMError, RoleClient
from verimed.core.rubrics import make_generator, make_judge
from verimed.core.rubrics.generator import CaseRubricGenerator, LLMRubricGenerator
from verimed.core.rubrics.judge import LLMJudge
from verimed.core.rubrics.rules import RulesJudge
from verimed.core.simulator import PatientSimulator, RulesBackend, SessionClosed, make_backend
from verimed.core.simulator.llm import LLMBackend
from verimed.core.types import Persona, RubricItem, Turn

FILLER = "tok tok tok tok tok tok"  # what an emulated engine answers: no role can parse it


class TimingEngine:
    """Stands for an emulated engine group: records every call, waits a little, answers filler."""

    def __init__(self, fail: type[BaseException] | None = None, fail_first: int = 0):
        self.calls: list[dict] = []
        self.fail, self.fail_first = fail, fail_first

    async def chat(self, messages, *, max_tokens=256, temperature=0.0, affinity_key=None, role=None):
        self.calls.append({"messages": [dict(m) for m in messages], "max_tokens": max_tokens,
                           "temperature": temperature, "affinity_key": affinity_key, "role": role})
        number = len(self.calls)  # counted before the wait: concurrent calls interleave there
        await asyncio.sleep(0.001)
        if self.fail is not None and (self.fail_first == 0 or number <= self.fail_first):
            raise self.fail("engine down")
        return FILLER


class ValidModel:
    """Stands for a real engine group serving a working model: valid text for each role.
    Takes no ``role=`` (as the test doubles and engines of today): a non-emulated RoleClient must not send it."""

    JUDGE = '{"explanation": "e", "criteria_met": true, "present": false}'
    SIM = {"termination gate": '{"done": false, "reason": "continue"}',
           "You check": '{"ok": true, "problems": [], "rewrite": ""}',
           "You are a patient": "It has been going on for a while, doctor."}
    RUBRIC = json.dumps([
        {"criterion": "Names the most likely diagnosis", "points": 8, "dimension": "diagnostic_accuracy"},
        {"criterion": "Asks when the symptoms started", "points": 5, "dimension": "consultation_logic"},
        {"criterion": "Advises urgent care for red flags", "points": 6, "dimension": "ethics_safety"},
        {"criterion": "Prescribes without examining", "points": -7, "dimension": "treatment_rationality"},
    ])

    def __init__(self, fail: type[BaseException] | None = None, fail_first: int = 0):
        self.calls: list[dict] = []
        self.fail, self.fail_first = fail, fail_first

    async def chat(self, messages, *, max_tokens=256, temperature=0.0, affinity_key=None):
        self.calls.append({"messages": [dict(m) for m in messages], "max_tokens": max_tokens,
                           "temperature": temperature, "affinity_key": affinity_key})
        if self.fail is not None and (self.fail_first == 0 or len(self.calls) <= self.fail_first):
            raise self.fail("engine down")
        first = messages[0]["content"]
        if messages[0]["role"] == "system":
            return next(v for k, v in self.SIM.items() if k in first)
        return self.RUBRIC if "You write grading rubrics" in first else self.JUDGE


def emulated(role: str, engine: TimingEngine | None = None, **kw) -> tuple[RoleClient, TimingEngine]:
    """What the controller builds under rollout.backend=emulated with llm.type=vllm."""
    engine = engine or TimingEngine()
    return RoleClient(engine, role, max_tokens=kw.get("max_tokens", 96), temperature=0.3, emulated=True), engine


def real(role: str, model) -> RoleClient:
    return RoleClient(model, role, max_tokens=96, temperature=0.3)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def cases():
    loaded, _ = load_cases(skip_invalid=True)
    return loaded


@pytest.fixture(scope="module")
def mg(cases):
    return next(c for c in cases if c.case_id == "case-0001")  # myasthenia gravis


DIALOGUE = [Turn("user", "I see double and my arms get weak."), Turn("assistant", "Since when?"),
            Turn("user", "About a month, worse in the evening.")]
RESPONSES = [
    ("How long have you had double vision, and does the weakness improve after rest? This could be myasthenia "
     "gravis; I'd order acetylcholine receptor antibodies. If you struggle to breathe, go to the emergency room."),
    "You have a stroke. Take aspirin 300 mg now.",
    "",  # a careless policy: an empty response
    "the the the the the the the the",
]


# ------------------------------------------------------------- the client


def test_role_client_sends_role_only_when_emulated_and_counts_calls():
    client, engine = emulated("judge")
    assert client.emulated and run(client.chat([{"role": "user", "content": "hi"}])) == FILLER
    assert engine.calls[0]["role"] == "judge" and client.stats == {"calls": 1, "errors": 0}
    model = ValidModel()  # its chat() has no role parameter: today's call must reach it unchanged
    plain = real("judge", model)
    assert not plain.emulated and run(plain.chat([{"role": "user", "content": "hi"}])) == ValidModel.JUDGE
    failing, _ = emulated("simulator", TimingEngine(fail=LLMError))
    with pytest.raises(LLMError):
        run(failing.chat([{"role": "user", "content": "hi"}]))
    assert failing.stats == {"calls": 1, "errors": 1}


def test_engine_group_client_and_rollout_actor_pass_role_to_an_emulated_engine_only():
    pytest.importorskip("ray")  # imported, never started
    from verimed.actors.rollout import EngineGroupClient, RolloutActor

    class Router:
        async def call(self, method, *args, affinity_key=None, **kwargs):
            self.seen = (method, args, kwargs, affinity_key)
            return "ok"

    router = Router()
    run(EngineGroupClient(router).chat([{"role": "user", "content": "x"}], max_tokens=5, affinity_key="k",
                                       role="judge"))
    assert router.seen == ("chat", ([{"role": "user", "content": "x"}], 5, 0.0), {"role": "judge"}, "k")

    class EmulatedEngineDouble:
        async def chat(self, messages, max_tokens, temperature, role=None):
            return f"emulated {role} {max_tokens}"

    class ChatClient:
        async def chat(self, messages, *, max_tokens, temperature):
            return f"real {max_tokens}"

    actor = RolloutActor.__ray_actor_class__.__new__(RolloutActor.__ray_actor_class__)
    actor.engine, actor.chat_client = EmulatedEngineDouble(), None  # an emulated engine answers chats itself
    assert run(actor.chat([], 7, 0.0, role="simulator")) == "emulated simulator 7"
    actor.engine, actor.chat_client = object(), ChatClient()  # a real engine: the role is ignored
    assert run(actor.chat([], 7, 0.0, role="simulator")) == "real 7" == run(actor.chat([], 7, 0.0))


# ------------------------------------------------------------- factories


def test_factories_pick_the_emulated_roles_only_for_emulated_llm_clients():
    client, _ = emulated("judge")
    plain = real("judge", ValidModel())
    assert type(emulate.make_judge(JudgeConfig(backend="llm"), client)) is emulate.EmulatedJudge
    assert type(emulate.make_judge(JudgeConfig(backend="llm"), plain)) is LLMJudge
    assert type(emulate.make_judge(JudgeConfig(backend="rules"), None)) is RulesJudge
    assert type(emulate.make_generator(RubricConfig(generator="llm"), client)) is emulate.EmulatedRubricGenerator
    assert type(emulate.make_generator(RubricConfig(generator="llm"), plain)) is LLMRubricGenerator
    assert type(emulate.make_generator(RubricConfig(generator="case"), None)) is CaseRubricGenerator
    assert type(emulate.make_backend(SimulatorConfig(backend="llm"), client)) is emulate.EmulatedSimulatorBackend
    assert type(emulate.make_backend(SimulatorConfig(backend="llm"), plain)) is LLMBackend
    assert type(emulate.make_backend(SimulatorConfig(backend="rules"), None)) is RulesBackend
    with pytest.raises(ValueError, match="needs an LLM client"):  # the core factories' errors still reach the user
        emulate.make_judge(JudgeConfig(backend="llm"), None)
    # An emulated client handed to a core factory would yield filler-parsing roles: refused, with the way out.
    for build in (lambda: make_judge(JudgeConfig(backend="llm"), client),
                  lambda: make_generator(RubricConfig(generator="llm"), client),
                  lambda: make_backend(SimulatorConfig(backend="llm"), client)):
        with pytest.raises(ValueError, match="emulate.roles.make_"):
            build()


def test_emulated_roles_keep_the_llm_roles_settings():
    client, _ = emulated("judge", max_tokens=77)
    plain = RoleClient(ValidModel(), "judge", max_tokens=77, temperature=0.3)
    cfg = JudgeConfig(backend="llm", max_retries=4, max_tokens=33)
    ours, theirs = emulate.make_judge(cfg, client), make_judge(cfg, plain)
    keys = ("max_retries", "max_tokens", "temperature", "concurrency")
    assert [getattr(ours, k) for k in keys] == [getattr(theirs, k) for k in keys] == [4, 33, 0.3, 64]
    cfg = RubricConfig(generator="llm", max_retries=1, on_failure="case", max_tokens=None,
                       required_dimensions=("diagnostic_accuracy",))
    ours, theirs = emulate.make_generator(cfg, client), make_generator(cfg, plain)
    keys = ("max_retries", "max_tokens", "temperature", "on_failure", "required")
    assert [getattr(ours, k) for k in keys] == [getattr(theirs, k) for k in keys]
    assert ours.max_tokens == 77  # rubrics.max_tokens=null: llm.max_tokens
    sim_ours, sim_theirs = emulate.make_backend(SimulatorConfig(backend="llm"), client, embedder="E"), \
        make_backend(SimulatorConfig(backend="llm"), plain, embedder="E")
    assert (sim_ours.max_tokens, sim_ours.temperature, sim_ours.embedder) == \
        (sim_theirs.max_tokens, sim_theirs.temperature, sim_theirs.embedder) == (77, 0.3, "E")


# ------------------------------------------------------------- judge


def _items(mg) -> list[RubricItem]:
    items = run(CaseRubricGenerator().generate(mg, DIALOGUE))
    assert any(i.points < 0 for i in items) and any(i.points > 0 for i in items)  # both templates are used
    return items


def test_emulated_judge_says_what_the_rules_judge_says_with_the_llm_judges_calls(mg):
    items = _items(mg)
    client, engine = emulated("judge")
    judge = emulate.make_judge(JudgeConfig(backend="llm"), client)
    model = ValidModel()
    llm_judge = make_judge(JudgeConfig(backend="llm"), real("judge", model))
    for response in RESPONSES:
        assert run(judge.judge(DIALOGUE, response, items)) == run(RulesJudge().judge(DIALOGUE, response, items))
        run(llm_judge.judge(DIALOGUE, response, items))
    assert llm_judge.stats["ungradable"] == 0 and len(model.calls) == len(RESPONSES) * len(items)  # one per item
    assert len(engine.calls) == len(model.calls) == client.stats["calls"]
    sent = sorted(json.dumps([c["messages"], c["max_tokens"], c["temperature"], c["affinity_key"]]) for c in engine.calls)
    expected = sorted(json.dumps([c["messages"], c["max_tokens"], c["temperature"], c["affinity_key"]])
                      for c in model.calls)
    assert sent == expected  # the LLM judge's prompts, budget and prefix routing
    assert {c["role"] for c in engine.calls} == {"judge"}
    assert judge.stats == llm_judge.stats  # items, calls, retries (none), ungradable (none), client errors


@pytest.mark.parametrize("fail_first", [0, 1])  # every attempt fails / only the very first call fails
def test_emulated_judge_handles_client_errors_as_the_llm_judge(mg, fail_first):
    items = _items(mg)[:3]
    client, _ = emulated("judge", TimingEngine(fail=RuntimeError, fail_first=fail_first))
    judge = emulate.make_judge(JudgeConfig(backend="llm", max_retries=2), client)
    out = run(judge.judge(DIALOGUE, RESPONSES[0], items))
    rules = run(RulesJudge().judge(DIALOGUE, RESPONSES[0], items))
    llm_client = RoleClient(ValidModel(fail=RuntimeError, fail_first=fail_first), "judge")
    llm_judge = make_judge(JudgeConfig(backend="llm", max_retries=2), llm_client)
    llm_out = run(llm_judge.judge(DIALOGUE, RESPONSES[0], items))
    if fail_first == 0:  # retried, then ungradable: counted, the run goes on
        assert [j.met for j in out] == [j.met for j in llm_out] == [None] * 3
        assert [j.attempts for j in out] == [j.attempts for j in llm_out] == [3] * 3
        assert judge.stats["ungradable"] == 3 and judge.stats["client_errors"] == 9
    else:  # the item whose first call failed is re-asked, then graded by the rules
        assert [j.met for j in out] == [j.met for j in rules]
        assert sorted(j.attempts for j in out) == sorted(j.attempts for j in llm_out) == [1, 1, 2]
    assert judge.stats == llm_judge.stats and client.stats == llm_client.stats


# ------------------------------------------------------------- rubric generator


def test_emulated_generator_returns_the_case_rubric_after_the_llm_generators_call(cases):
    client, engine = emulated("rubric_generator")
    gen = emulate.make_generator(RubricConfig(generator="llm"), client)
    slices = [(case, [Turn("user", case.primary_symptom), *DIALOGUE[1:]][:n]) for case in cases[:4] for n in (1, 3)]
    for case, dialogue in slices:
        assert run(gen.generate(case, dialogue)) == run(CaseRubricGenerator().generate(case, dialogue))
    for case, dialogue in slices[:2]:  # cached: no second call, as for the LLM generator
        run(gen.generate(case, dialogue))
    assert len(engine.calls) == len(slices) == client.stats["calls"] and gen.stats["cache_hits"] == 2
    model = ValidModel()
    llm_gen = make_generator(RubricConfig(generator="llm"), real("rubric_generator", model))
    for case, dialogue in slices:
        run(llm_gen.generate(case, dialogue))
    assert llm_gen.stats["retries"] == 0 and len(model.calls) == len(slices)  # one call per slice
    sent = [[c["messages"], c["max_tokens"], c["temperature"], c["affinity_key"]] for c in engine.calls]
    assert sent == [[c["messages"], c["max_tokens"], c["temperature"], c["affinity_key"]] for c in model.calls]
    assert {c["role"] for c in engine.calls} == {"rubric_generator"}
    assert {c["max_tokens"] for c in engine.calls} == {1024}  # rubrics.max_tokens, not llm.max_tokens


def test_emulated_generator_raises_client_errors_as_the_llm_generator(mg):
    for make, client in ((emulate.make_generator, emulated("rubric_generator", TimingEngine(fail=LLMError))[0]),
                         (make_generator, RoleClient(ValidModel(fail=LLMError), "rubric_generator"))):
        gen = make(RubricConfig(generator="llm", on_failure="case"), client)
        with pytest.raises(LLMError):  # on_failure covers invalid rubrics, not a dead client
            run(gen.generate(mg, DIALOGUE))
        assert client.stats == {"calls": 1, "errors": 1} and gen.stats["generated"] == 0


# ------------------------------------------------------------- patient simulator

DOCTOR_SCRIPTS = [  # (doctor turns, max_turns)
    (["When did this start?", "Have you travelled abroad or do you keep pets?", "What is your diagnosis?",
      "I'd like to examine you now.", "We'll do a CT scan of your chest.", "What did the tests show?",
      "You have myasthenia gravis; I'll start pyridostigmine and see you in two weeks."], 20),
    (["Hello, what brings you in?", "Any medications or allergies?", "Thank you, goodbye."], 20),  # doctor closes
    (["Tell me more.", "Anything else?", "", "How do you sleep?", "Does anyone in your family have this?"], 3),
]
PERSONAS = [
    Persona(mbti="ISTJ", education="secondary", money_constraint=False, health_literacy="medium", anxiety="low"),
    Persona(mbti="ENFP", education="primary", money_constraint=True, health_literacy="low", anxiety="high"),
    Persona(mbti="INFJ", education="tertiary", money_constraint=False, health_literacy="high", anxiety="medium"),
]


def _calls(client) -> int:
    return len(client.calls)


def test_emulated_simulator_says_what_the_rules_backend_says_with_the_llm_backends_calls(cases):
    per_turn: set[int] = set()
    for case in cases[:4]:
        for persona in PERSONAS:
            for lines, max_turns in DOCTOR_SCRIPTS:
                client, engine = emulated("simulator")
                model = ValidModel()
                ours = PatientSimulator(case, persona, emulate.make_backend(SimulatorConfig(backend="llm"), client),
                                        max_turns)
                rules = PatientSimulator(case, persona, RulesBackend(), max_turns)
                llm = PatientSimulator(case, persona, make_backend(SimulatorConfig(backend="llm"),
                                                                   real("simulator", model)), max_turns)
                assert ours.opening() == rules.opening() == llm.opening()
                for line in lines:
                    if rules.done:
                        assert ours.done
                        with pytest.raises(SessionClosed):
                            run(ours.respond(line))
                        break
                    before = (_calls(engine), _calls(model))
                    assert run(ours.respond(line)) == run(rules.respond(line))
                    run(llm.respond(line))
                    made = (_calls(engine) - before[0], _calls(model) - before[1])
                    assert made[0] == made[1], (case.case_id, persona.mbti, line)
                    per_turn.add(made[0])
                    if llm.done:  # the llm gate only closes where no model is asked (turn limit, doctor's closing)
                        assert ours.done
                        break
                assert ours.transcript == rules.transcript and engine.calls
                assert {c["role"] for c in engine.calls} == {"simulator"} and client.stats["calls"] == len(engine.calls)
    assert per_turn == {2, 3}  # gate + draft + review; no gate call when the turn limit or the doctor decides


def test_emulated_simulator_sends_the_llm_backends_prompts(mg):
    model = ValidModel()
    reference = LLMBackend(real("simulator", model))

    class Spy(emulate.EmulatedSimulatorBackend):  # replays each unit on the LLM backend with the same inputs
        async def gate(self, ctx):
            await reference.gate(ctx)
            return await super().gate(ctx)

        async def draft(self, ctx, decision):
            await reference.draft(ctx, decision)
            return await super().draft(ctx, decision)

        async def review(self, ctx, decision, draft):
            await reference.review(ctx, decision, draft)
            return await super().review(ctx, decision, draft)

    for lines, max_turns in DOCTOR_SCRIPTS:
        client, engine = emulated("simulator")
        sim = PatientSimulator(mg, PERSONAS[1], Spy(client), max_turns)
        for line in lines:
            if sim.done:
                break
            run(sim.respond(line))
        sent = [[c["messages"], c["max_tokens"], c["temperature"], c["affinity_key"]] for c in engine.calls]
        assert sent == [[c["messages"], c["max_tokens"], c["temperature"], c["affinity_key"]] for c in model.calls]
        model.calls.clear()
    assert {c["max_tokens"] for c in engine.calls} == {48, 96}  # the gate's own budget, else the role's


def test_emulated_simulator_handles_client_errors_as_the_llm_backend(mg):
    lines, max_turns = DOCTOR_SCRIPTS[0]
    ours_client, _ = emulated("simulator", TimingEngine(fail=LLMError))
    ours_backend = emulate.make_backend(SimulatorConfig(backend="llm"), ours_client)
    llm_client = RoleClient(ValidModel(fail=LLMError), "simulator")
    llm_backend = make_backend(SimulatorConfig(backend="llm"), llm_client)
    ours, llm, rules = (PatientSimulator(mg, PERSONAS[0], b, max_turns)
                        for b in (ours_backend, llm_backend, RulesBackend()))
    for line in lines[:4]:  # an LLMError is counted and the unit falls back to the rules
        assert run(ours.respond(line)) == run(rules.respond(line)) == run(llm.respond(line))
    assert ours_backend.failures == llm_backend.failures == ours_client.stats["errors"] == llm_client.stats["errors"]
    assert ours_backend.failures == 12
    for backend in (emulate.make_backend(SimulatorConfig(backend="llm"),  # any other error ends the turn, raised
                                         emulated("simulator", TimingEngine(fail=RuntimeError))[0]),
                    make_backend(SimulatorConfig(backend="llm"), RoleClient(ValidModel(fail=RuntimeError), "s"))):
        with pytest.raises(RuntimeError, match="engine down"):
            run(PatientSimulator(mg, PERSONAS[0], backend, max_turns).respond(lines[0]))


def test_engine_group_client_sends_a_responses_items_as_one_call_in_order():
    pytest.importorskip("ray")  # imported, never started
    from verimed.actors.rollout import EngineGroupClient, RolloutActor

    class Router:
        def __init__(self, fail=False):
            self.calls, self.fail = [], fail

        async def call(self, method, *args, affinity_key=None, **kwargs):
            self.calls.append((method, affinity_key, args[0] if method == "chat" else len(args[0])))
            await asyncio.sleep(0)
            if self.fail:
                raise ConnectionError("engine gone")
            if method == "chat":
                return args[0][0]["content"].upper()
            return [m[0]["content"].upper() for m in args[0]]

    def ask(client, text, key, **kw):
        return client.chat([{"role": "user", "content": text}], max_tokens=5, affinity_key=key, **kw)

    async def scenario(router):
        client = EngineGroupClient(router)
        answers = await asyncio.gather(*(ask(client, f"item {i}", "resp-a") for i in range(5)),
                                       ask(client, "other", "resp-b"), ask(client, "hot", "resp-a", temperature=1.0),
                                       client.chat([{"role": "user", "content": "free"}]), return_exceptions=True)
        return client, answers

    router = Router()
    client, answers = run(scenario(router))
    assert answers == [f"ITEM {i}" for i in range(5)] + ["OTHER", "HOT", "FREE"]  # each caller its own answer
    assert sorted(f"{m} {k}" for m, k, _ in router.calls) == ["chat None", "chat resp-a", "chat resp-b",
                                                               "chat_many resp-a"]
    assert ("chat_many", "resp-a", 5) in router.calls and client.batches == 1  # 5 items, one round trip
    _, answers = run(scenario(Router(fail=True)))
    assert all(isinstance(a, ConnectionError) for a in answers)  # a failed batch fails each of its calls

    class EngineDouble:
        async def chat(self, messages, max_tokens, temperature, role=None):
            await asyncio.sleep(0)
            return f"{messages[0]['content']}:{role}"

    actor = RolloutActor.__ray_actor_class__.__new__(RolloutActor.__ray_actor_class__)
    actor.engine, actor.chat_client = EngineDouble(), None
    assert run(actor.chat_many([[{"content": "a"}], [{"content": "b"}]], 7, 0.0, role="judge")) == ["a:judge", "b:judge"]

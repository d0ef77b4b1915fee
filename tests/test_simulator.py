"""Patient simulator (verimed.core.simulator): script, personas, the three units, backends, audit, CLI, actor.

Run: .venv/bin/python -m pytest tests/test_simulator.py -q   (the Ray test is marked integration)
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
from pathlib import Path

import msgspec
import numpy as np
import pytest

from verimed.core.config import SimulatorConfig
from verimed.core.data import DataError
from verimed.core.data.cases import load_cases
from verimed.core.rollout.llm import LLMError
from verimed.core.simulator import (
    PatientScript, PatientSimulator, RulesBackend, SessionClosed, SimulatorSessions, behaviour,
    make_backend, sample_persona,
)
from verimed.cli import simulate as cli
from verimed.core.simulator.audit import format_report, run_audit
from verimed.core.simulator.intent import understand
from verimed.core.simulator.llm import LLMBackend, clean_reply, parse_bool, parse_json_object
from verimed.core.simulator.persona import persona_violations
from verimed.core.simulator.retrieval import Retriever
from verimed.core.simulator.units import SessionState, check_reply, rules_gate
from verimed.core.types import Case, Persona, Turn

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def cases() -> list[Case]:
    # skip_invalid: the shipped file's line 106 has an empty Symptoms section the
    # loader rejects today; the count check below keeps all 170 accounted for.
    loaded, report = load_cases(skip_invalid=True)
    assert len(loaded) + report.skipped == 170
    return loaded


@pytest.fixture(scope="module")
def mg(cases) -> Case:
    return next(c for c in cases if c.case_id == "case-0001")  # myasthenia gravis, 35-year-old woman


def persona(mbti="ISTJ", **kw) -> Persona:
    base = dict(mbti=mbti, education="secondary", money_constraint=False, health_literacy="medium", anxiety="low")
    return Persona(**{**base, **kw})


def run(coro):
    return asyncio.run(coro)


def sim_for(case, mbti="ISTJ", max_turns=20, backend=None, **kw) -> PatientSimulator:
    return PatientSimulator(case, persona(mbti, **kw), backend or RulesBackend(), max_turns)


# ---------------------------------------------------------------- script


def test_script_indexes_facts_by_kind_and_flattens_nested_results(mg):
    s = PatientScript.from_case(mg)
    kinds = {f.kind for f in s.facts}
    assert {"demographics", "chief_complaint", "hpi", "symptom_primary", "symptom_secondary", "past_history",
            "social_history", "review_of_systems", "exam", "test", "diagnosis"} <= kinds
    assert s["test/Imaging / Chest_CT / Findings"].text.startswith("Normal, no thymoma")
    assert s["exam/Vital_Signs / Heart_Rate"].text == "72 bpm"
    assert s["hpi/1"].spoken.startswith("I ") and "her hair" not in s["hpi/1"].spoken
    assert s.leaks_diagnosis("I think it's myasthenia gravis") and not s.leaks_diagnosis("I have double vision")


def test_unusual_cases_load_and_play():
    loaded, _ = load_cases(FIXTURES / "sim_cases_unusual.jsonl")
    adult, child = (PatientScript.from_case(c) for c in loaded)
    assert adult["other/Current_Medications/1"].text.startswith("Current medications: Lisinopril")
    assert "test/Sputum_Culture / 0 / Organism" in adult  # list of dicts inside results
    assert not adult.facts_of("social_history")  # "Information not provided." is unknown, not a fact
    assert not adult.facts_of("past_history")  # empty section
    assert child.speaker.is_caregiver and child["chief_complaint"].spoken.startswith("My daughter")
    for case in loaded:
        sim = sim_for(case)
        assert case.diagnosis.split(";")[0].lower() not in sim.opening().lower()
        for text in ("Any medications?", "Let me examine you.", "We'll run some tests.", "What do you think it is?"):
            reply = run(sim.respond(text))
            assert not sim.script.leaks_diagnosis(reply.text) or any(k.startswith("test/") for k in reply.disclosed)


def test_case_missing_required_field_fails_clearly():
    with pytest.raises(DataError, match=r"sim_case_missing_diagnosis.jsonl:1: OSCE_Examination.Correct_Diagnosis"):
        load_cases(FIXTURES / "sim_case_missing_diagnosis.jsonl")
    no_symptoms = msgspec.structs.replace(load_cases(FIXTURES / "sim_cases_unusual.jsonl")[0][0], primary_symptom="",
                                          secondary_symptoms=[])  # like shipped line 106 (empty Symptoms)
    assert "3 days of productive cough" in sim_for(no_symptoms).opening()
    blank = msgspec.structs.replace(load_cases(FIXTURES / "sim_cases_unusual.jsonl")[0][1], primary_symptom="", history="")
    with pytest.raises(ValueError, match="nothing for the patient to open with"):
        PatientScript.from_case(blank)


# ---------------------------------------------------------------- personas


def test_persona_sampling_is_seeded_and_age_appropriate(cases):
    assert sample_persona(3, cases[0]) == sample_persona(3, cases[0])
    assert len({sample_persona(s, cases[0]).mbti for s in range(64)}) >= 12
    assert sample_persona(1, cases[0], "enfp").mbti == "ENFP"
    with pytest.raises(ValueError, match="not an MBTI type"):
        sample_persona(1, cases[0], "XYZW")
    teen = msgspec.structs.replace(cases[0], demographics="15-year-old boy")
    assert {sample_persona(s, teen).education for s in range(20)} == {"secondary"}
    assert behaviour(persona("ENFP")).talkative and not behaviour(persona("ISTJ")).asks_treatment
    assert behaviour(persona("INTJ")).advice == "questions" and behaviour(persona("INFP")).advice == "accepts"
    assert persona_violations("I'm really worried about this.", persona(anxiety="low")) == ["worry_high"]
    assert persona_violations("Honestly I'm so scared.", persona(anxiety="low")) == ["filler_e", "worry"]
    assert persona_violations("I'm really worried about this.", persona(anxiety="high")) == []


# ---------------------------------------------------------------- understanding the doctor


@pytest.mark.parametrize("text,field", [
    ("I'd like to listen to your chest.", "exam"),
    ("let me examine u now", "exam"),
    ("Take a deep breath while I listen to your lungs", "exam"),
    ("We'll do a blood test and a CT.", "tests"),
    ("i will order some labs", "tests"),
    ("You have pneumonia. I will prescribe antibiotics.", "diagnosis"),
    ("Goodbye and take care!", "closing"),
    ("What do you think you have?", "asks_diagnosis"),
    ("What did your blood tests show?", "asks_results"),
])
def test_understand_recognises_speech_acts(text, field):
    assert getattr(understand(text), field)


def test_understand_does_not_mistake_questions_for_diagnoses():
    for text in ("Do you have a fever?", "Is it myasthenia gravis?", "Have you had any blood tests before?"):
        i = understand(text)
        assert not i.diagnosis and not i.tests and not i.exam, text


# ---------------------------------------------------------------- termination gate


def test_gate_closes_on_diagnosis_and_plan_and_on_turn_limit(mg):
    traits = behaviour(persona("ENFP"))
    state = SessionState()
    assert rules_gate(understand("Do you smoke?"), state, traits, 6).done is False
    same_turn = rules_gate(understand("You have myasthenia gravis. We will start pyridostigmine."), state, traits, 6)
    assert (same_turn.done, same_turn.reason) == (True, "diagnosis_and_plan")
    assert rules_gate(understand("You have myasthenia gravis."), state, traits, 6).done is False
    assert rules_gate(understand("I'll prescribe pyridostigmine."), SessionState(diagnosis_turn=2), traits, 6).reason \
        == "diagnosis_and_plan"
    assert rules_gate(understand("Anything else?"), SessionState(turn=5), traits, 6).reason == "turn_limit"
    assert rules_gate(understand("Goodbye."), state, traits, 6).reason == "doctor_closed"
    passive = behaviour(persona("ISFP"))
    assert rules_gate(understand("Okay."), SessionState(turn=2, diagnosis_turn=2), passive, 6).reason == "patient_satisfied"

    sim = sim_for(mg, max_turns=3)
    replies = [run(sim.respond(t)) for t in ("Hello.", "Any fever?", "Any cough?")]
    assert [r.done for r in replies] == [False, False, True] and replies[-1].reason == "turn_limit"
    with pytest.raises(SessionClosed):
        run(sim.respond("One more thing?"))


# ---------------------------------------------------------------- factual unit


def test_factual_unit_vetoes_leaked_diagnosis_invented_lab_and_locked_results(mg):
    s = PatientScript.from_case(mg)
    allowed = s.facts_of("hpi")
    state = SessionState()
    ok = check_reply(s["hpi/1"].spoken, s, allowed, state, "When did it start?")
    assert ok == []
    assert "diagnosis" in check_reply("I think I have myasthenia gravis.", s, allowed, state, "What is it?")
    invented = check_reply("My hemoglobin was 7.2 last week.", s, allowed, state, "Any labs?")
    assert any(p.startswith("invented number 7.2") for p in invented)
    locked = check_reply("My blood pressure was 125/80.", s, allowed, state, "What's your blood pressure?")
    assert any(p.startswith("locked exam") for p in locked)
    state.unlocked.append("exam/Vital_Signs / Blood_Pressure")
    assert check_reply("My blood pressure was 125/80.", s, [s["exam/Vital_Signs / Blood_Pressure"]], state, "") == []
    assert any(p.startswith("contradiction") for p in check_reply("I have no double vision.", s, allowed, state, ""))
    assert any(p.startswith("unsupported") for p in
               check_reply("I also get migraines and seizures and tinnitus.", s, allowed, state, "Anything else?"))


def test_session_discloses_only_what_is_asked_and_gates_exam_and_tests(mg):
    sim = sim_for(mg, "ISTJ")
    opening = sim.opening()
    assert "double vision" in opening.lower() and not sim.script.leaks_diagnosis(opening)
    onset = run(sim.respond("When did this start?"))
    assert onset.disclosed and all(k.startswith("hpi/") for k in onset.disclosed)
    unknown = run(sim.respond("Have you travelled abroad or do you keep pets?"))
    assert unknown.disclosed == [] and "know" in unknown.text.lower() or "not sure" in unknown.text.lower()
    for probe in ("What is your diagnosis?", "What did your blood tests show?", "What's your blood pressure?"):
        reply = run(sim.respond(probe))
        assert reply.disclosed == [] and "125/80" not in reply.text and not sim.script.leaks_diagnosis(reply.text)
    again = run(sim.respond("When did this start?"))
    assert set(again.disclosed) == set(onset.disclosed)  # consistent, never contradicts
    exam = run(sim.respond("I'd like to examine you now."))
    assert "125/80" in exam.text and all(k.startswith("exam/") for k in exam.disclosed)
    tests = run(sim.respond("We'll do a CT scan of your chest."))
    assert tests.disclosed == ["test/Imaging / Chest_CT / Findings"]  # only what was ordered
    close = run(sim.respond("You have myasthenia gravis; I'll start pyridostigmine and see you in two weeks."))
    assert close.done and close.reason == "diagnosis_and_plan" and close.disclosed == []
    roles = [t.role for t in sim.transcript]
    assert roles[0] == "user" and roles[1::2] == ["assistant"] * (len(roles) // 2)


def test_rebuild_from_transcript_restores_the_session(mg):
    a = sim_for(mg, "ENTP")
    a.opening()
    for text in ("What brings you in?", "Let me listen to your chest and check your reflexes.", "Any other symptoms?"):
        run(a.respond(text))
    b = PatientSimulator.rebuild(mg, a.persona, RulesBackend(), 20, a.transcript)
    assert (b.state.turn, sorted(b.state.unlocked)) == (a.state.turn, sorted(a.state.unlocked))
    assert set(a.state.disclosed) <= set(b.state.disclosed)
    nxt = "Tell me more about your symptoms."
    assert run(b.respond(nxt)) == run(a.respond(nxt))
    with pytest.raises(ValueError, match="starts with the patient's opening"):
        PatientSimulator.rebuild(mg, a.persona, RulesBackend(), 20,
                                 [Turn(role="assistant", content="Hi"), Turn(role="user", content="Hello")])


def test_sessions_run_concurrently_and_are_keyed(cases):
    core = SimulatorSessions(RulesBackend(), 8)

    async def many():
        openings = await asyncio.gather(*(core.start(f"s{i}", c, sample_persona(i, c)) for i, c in enumerate(cases[:20])))
        replies = await asyncio.gather(*(core.respond(f"s{i}", "When did it start?") for i in range(20)))
        return openings, replies

    openings, replies = run(many())
    assert len(core.sessions) == 20 and all(r.disclosed for r in replies[:5])
    with pytest.raises(KeyError, match="unknown simulator session"):
        run(core.respond("nope", "hi"))


def test_embedding_similarity_is_fused_when_an_embedder_is_given(mg):
    s = PatientScript.from_case(mg)

    class Fake:  # maps any text mentioning "eyes" or "diplopia" to the same direction
        def encode(self, texts):
            v = np.array([[1.0, 0.0] if ("diplopia" in t.lower() or "eyes" in t.lower()) else [0.0, 1.0] for t in texts])
            return v.astype(np.float32)

    facts = s.facts_of("hpi")
    assert Retriever(s).rank(["eye"], facts, "trouble with your eyes?") == []
    ranked = Retriever(s, Fake()).rank(["eye"], facts, "trouble with your eyes?")
    assert ranked and ranked[0][1].key == "hpi/1"


# ---------------------------------------------------------------- llm backend (scripted fake client)


class ScriptedClient:
    """Answers by unit (recognised from the system prompt) with canned text; records every call."""

    def __init__(self, patient: str, review: str = '{"ok": true, "problems": []}', gate: str = '{"done": false}'):
        self.answers = {"termination gate": gate, "You check": review, "You are a patient": patient}
        self.calls: list[list[dict[str, str]]] = []

    async def chat(self, messages, *, max_tokens=256, temperature=0.0, affinity_key=None):
        self.calls.append(messages)
        system = messages[0]["content"]
        return next(v for k, v in self.answers.items() if k in system)


def test_llm_backend_accepts_a_faithful_draft_and_hides_the_diagnosis(mg):
    client = ScriptedClient("Patient: It started about a month ago, doctor.\nDoctor: and then?")
    sim = sim_for(mg, backend=make_backend(SimulatorConfig(backend="llm"), client))
    reply = run(sim.respond("When did this start?"))
    assert reply.text == "It started about a month ago, doctor." and not reply.vetoed
    prompts = json.dumps(client.calls).lower()
    assert "myasthenia" not in prompts and "125/80" not in prompts  # never shown the diagnosis or locked results


def test_llm_backend_vetoes_diagnosis_leak_and_invented_lab_value(mg):
    leak = ScriptedClient("I read online it's myasthenia gravis.", review="garbage, not json")
    sim = sim_for(mg, backend=LLMBackend(leak))
    reply = run(sim.respond("When did this start?"))
    assert reply.vetoed and "diagnosis" in reply.problems and not sim.script.leaks_diagnosis(reply.text)
    assert reply.disclosed  # replaced by the rules rendering of the selected facts

    invented = ScriptedClient("My potassium was 2.9 yesterday.",
                              review='```json\n{"ok": false, "problems": ["invented lab"], '
                                     '"rewrite": "I have had double vision for a month."}\n```')
    sim = sim_for(mg, backend=LLMBackend(invented))
    reply = run(sim.respond("Any lab tests done?"))
    assert reply.vetoed and any("2.9" in p for p in reply.problems) and "2.9" not in reply.text


def test_llm_backend_survives_unparseable_gate_and_client_errors(mg):
    client = ScriptedClient("Okay.", gate="maybe?")
    sim = sim_for(mg, backend=LLMBackend(client))
    reply = run(sim.respond("You have myasthenia gravis. We'll start pyridostigmine."))
    assert reply.done and reply.reason == "diagnosis_and_plan"  # rules gate fallback

    class Failing:
        async def chat(self, *a, **k):
            raise LLMError("connection refused")

    backend = LLMBackend(Failing())
    sim = sim_for(mg, backend=backend)
    reply = run(sim.respond("When did this start?"))
    assert reply.disclosed and backend.failures >= 2


def test_llm_output_parsing_is_lenient():
    assert parse_json_object('sure! {"done": True, "reason": "x"} ok') == {"done": True, "reason": "x"}
    assert parse_json_object("{'ok': false}") == {"ok": False}
    assert parse_bool("done: yes", "done") is True and parse_bool("nothing", "done") is None
    assert clean_reply('"Patient: I feel tired. *sighs* Really.\nDoctor: ok"') == "I feel tired. Really."


# ---------------------------------------------------------------- audit


def test_audit_subset_meets_targets(cases):
    report = run(run_audit(cases[:12], RulesBackend(), seed=0))
    assert report.privacy >= 0.99 and report.fact == 1.0 and report.gate == 1.0
    assert "privacy score" in format_report(report)


def test_audit_all_shipped_cases_rules_backend(cases):
    report = run(run_audit(cases, RulesBackend(), seed=1))
    assert report.cases == len(cases) >= 169
    assert report.privacy >= 0.99, format_report(report)
    assert report.fact == 1.0, format_report(report)
    assert report.persona >= 0.99


def test_audit_catches_a_leaky_backend(cases):
    class Leaky(RulesBackend):
        async def draft(self, ctx, decision):
            text = await super().draft(ctx, decision)
            return text + f" My doctor friend said {ctx.script.case.diagnosis}; my sodium was 999."

        async def review(self, ctx, decision, draft):  # no factual unit
            from verimed.core.simulator.units import Review
            return Review(draft, [], False)

    report = run(run_audit(cases[:4], Leaky(), seed=0))
    assert report.privacy < 0.5 and report.fact < 0.5


# ---------------------------------------------------------------- CLI


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_cli_audit_writes_json_and_table(tmp_path):
    out = io.StringIO()
    path = tmp_path / "audit.json"
    rc = cli.run(_args("--audit", "3", "--json", str(path), "--skip-invalid"), stdout=out)
    assert rc == 0 and "privacy score" in out.getvalue()
    data = json.loads(path.read_text())
    assert data["old"]["cases"] == 3 and data["old"]["fact"] == 1.0
    assert "independent audit" in out.getvalue() and data["independent"]["dev probes, shipped cases"]["cases"] == 3


def test_cli_interactive_reads_stdin_and_explains():
    stdin = io.StringIO("When did it start?\nLet me check your blood pressure.\n"
                        "You have myasthenia gravis, we'll treat it with pyridostigmine.\nnever read\n")
    out = io.StringIO()
    rc = cli.run(_args("--case", "case-0001", "--persona", "ENFP", "--explain", "--skip-invalid"),
                 stdin=stdin, stdout=out)
    text = out.getvalue()
    assert rc == 0 and "MBTI ENFP" in text and "disclosed [hpi/1]" in text
    assert "disclosed [exam/Vital_Signs / Blood_Pressure] 125/80 mmHg" in text
    assert "consultation closed: diagnosis_and_plan" in text and "never read" not in text


def test_cli_usage_errors_are_clear():
    out = io.StringIO()
    assert cli.run(_args("--case", "case-9999", "--skip-invalid"), stdout=out) == 2 and "no case" in out.getvalue()
    assert cli.run(_args("--audit", "1", "--persona", "ABCD"), stdout=out) == 2 and "MBTI" in out.getvalue()
    assert cli.run(_args(), stdout=out) == 2 and "exactly one of" in out.getvalue()


def test_core_simulator_never_imports_ray():
    root = Path(__file__).parents[1] / "verimed" / "core" / "simulator"
    for path in root.glob("*.py"):
        assert "import ray" not in path.read_text(), path


# ---------------------------------------------------------------- Ray actor


@pytest.mark.integration
def test_simulator_actor_sessions_and_rebuild(mg):
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray = pytest.importorskip("ray")
    from verimed.actors.simulator import SimulatorActor

    ray.init(num_cpus=1, include_dashboard=False)
    try:
        actor = SimulatorActor.remote(SimulatorConfig(max_turns=8))
        p = persona("ENFJ")
        opening = ray.get(actor.start.remote("a", mg, p))
        reply = ray.get(actor.respond.remote("a", "When did it start?"))
        transcript = ray.get(actor.transcript.remote("a"))
        assert transcript[0].content == opening and reply.disclosed
        ray.get(actor.close.remote("a"))
        ray.get(actor.rebuild.remote("b", mg, p, transcript))
        again = ray.get(actor.respond.remote("b", "Let me examine you."))
        assert any(k.startswith("exam/") for k in again.disclosed)
    finally:
        ray.shutdown()

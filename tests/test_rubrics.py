"""Rubric model, generators (case / llm), judges (rules / llm), the judge parser,
and `verimed eval healthbench` end to end.

Run: .venv/bin/python -m pytest tests/test_rubrics.py -q      (-m "not integration" for the fast part)
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verimed.core.config import JudgeConfig, RubricConfig
from verimed.core.data import shipped
from verimed.core.data.cases import load_cases
from verimed.core.data.healthbench import DEFAULT_HEALTHBENCH
from verimed.core.rubrics import (
    DIMENSIONS, UNGRADABLE, CaseRubricGenerator, LLMJudge, LLMRubricGenerator, RubricGenerationError, RulesJudge,
    make_generator, make_judge, parse_verdict, validate_rubric,
)
from verimed.core.rubrics.generator import items_from_llm_output
from verimed.core.rubrics.model import (
    item_from_healthbench, make_item, merge_duplicates, rubric_from_healthbench, rubric_to_healthbench,
)
from verimed.core.rubrics.scoring import training_reward
from verimed.core.types import RubricItem, Turn

CASES, _ = load_cases(skip_invalid=True)
MG = CASES[0]  # myasthenia gravis
LATE = [Turn("user", "I see double."), Turn("assistant", "Since when?"), Turn("user", "A month."),
        Turn("assistant", "Worse after exercise?"), Turn("user", "Yes, better after rest.")]


def run(coro):
    return asyncio.run(coro)


# ------------------------------------------------------------------ model


def test_healthbench_rubrics_round_trip_losslessly():
    for line in shipped(DEFAULT_HEALTHBENCH).read_text().splitlines():
        raw = json.loads(line)["rubrics"]
        assert rubric_to_healthbench(rubric_from_healthbench(raw)) == raw


def test_generated_items_round_trip_with_dimension():
    items = [make_item("Asks about fever.", 4, "consultation_logic", ["source:x"]), RubricItem("plain", -2, ["axis:a"])]
    back = rubric_from_healthbench(rubric_to_healthbench(items))
    assert back[0] == items[0] and back[0].dimension == "consultation_logic"
    assert back[1].criterion == "plain" and back[1].points == -2 and back[1].dimension is None
    with pytest.raises(ValueError, match="points"):
        item_from_healthbench({"criterion": "x", "points": 2.5, "tags": []})


def test_validation_reports_every_problem():
    items = [
        RubricItem("a", 12, dimension="diagnostic_accuracy"),
        RubricItem("b", 0, dimension="nonsense"),
        RubricItem("A.", 3, dimension="diagnostic_accuracy"),
    ]
    problems = " | ".join(validate_rubric(items, ["ethics_safety"]))
    for expected in ("in [-10, 10], got 12", "got 0", "unknown dimension", "duplicate of item 0",
                     "no negative item", "not covered: ethics_safety"):
        assert expected in problems
    assert validate_rubric([]) == ["rubric is empty"]


def test_merge_duplicates_keeps_larger_points_and_union_of_tags():
    items = [make_item("Asks about fever", 3, "consultation_logic", ["x"]),
             make_item("asks about FEVER.", 5, "consultation_logic", ["y"]),
             make_item("Asks about fever", -2, "consultation_logic")]
    merged = merge_duplicates(items)
    assert [i.points for i in merged] == [5, -2]
    assert merged[0].criterion == "Asks about fever" and {"x", "y"} <= set(merged[0].tags)


# ------------------------------------------------------------------ case generator


def test_case_rubrics_for_every_shipped_case_pass_validation():
    assert len(CASES) >= 150
    for case in CASES:
        for dialogue in ([Turn("user", case.primary_symptom)], LATE):
            items = case_items = run(CaseRubricGenerator().generate(case, dialogue))
            assert validate_rubric(case_items, DIMENSIONS) == [], case.case_id
            assert any(i.points < 0 for i in items) and any(case.diagnosis in i.criterion for i in items)


def test_case_rubric_is_stage_aware_and_cached():
    gen = make_generator(RubricConfig(generator="case"))
    early = run(gen.generate(MG, LATE[:1]))
    late = run(gen.generate(MG, LATE))
    again = run(gen.generate(MG, LATE))
    assert again == late and gen.stats["cache_hits"] == 1 and gen.stats["generated"] == 2
    dx = lambda items: next(i.points for i in items if i.criterion.startswith("Names Myasthenia"))
    assert dx(early) < dx(late)
    assert any("premature" in i.criterion for i in early) and not any("premature" in i.criterion for i in late)
    assert any("Acetylcholine Receptor Antibodies" in i.criterion for i in early)


# ------------------------------------------------------------------ llm generator


class ScriptedLLM:
    """Returns scripted outputs in order (the last one repeats) and records calls."""

    def __init__(self, outputs):
        self.outputs, self.calls = list(outputs), []

    async def chat(self, messages, *, max_tokens=256, temperature=0.0, affinity_key=None):
        self.calls.append({"messages": messages, "affinity_key": affinity_key})
        return self.outputs[min(len(self.calls) - 1, len(self.outputs) - 1)]


GOOD = json.dumps([
    {"criterion": "Names myasthenia gravis as the most likely diagnosis", "points": 8, "dimension": "diagnostic_accuracy"},
    {"criterion": "Asks whether weakness worsens with exertion", "points": 5.0, "dimension": "consultation_logic"},
    {"criterion": "asks whether weakness worsens with exertion!", "points": 3, "dimension": "consultation_logic"},
    {"criterion": "Advises urgent care if breathing becomes difficult", "points": 6, "dimension": "ethics_safety"},
    {"criterion": "Prescribes steroids without a diagnosis", "points": -7, "dimension": "treatment_rationality"},
])


def test_llm_generator_accepts_valid_output_and_merges_duplicates():
    llm = ScriptedLLM([f"Sure! Here it is:\n```json\n{GOOD}\n```"])
    gen = make_generator(RubricConfig(generator="llm", max_retries=2), llm)
    items = run(gen.generate(MG, LATE))
    assert len(items) == 4 and len(llm.calls) == 1
    assert items[1].points == 5 and all("dimension:" + i.dimension in i.tags for i in items)
    run(gen.generate(MG, LATE))
    assert len(llm.calls) == 1  # cached per (case, slice)


def test_llm_generator_retries_malformed_output_with_feedback():
    bad = json.dumps([{"criterion": "Names MG", "points": "5", "dimension": "diagnostic_accuracy"},
                      {"criterion": "Says hi", "points": 11, "dimension": "communication_empathy"}])
    llm = ScriptedLLM(["no json here", bad, GOOD])
    gen = LLMRubricGenerator(llm, max_retries=2)
    items = run(gen.generate(MG, LATE))
    assert len(items) == 4 and gen.stats["retries"] == 2
    feedback = llm.calls[2]["messages"][-1]["content"]
    assert "points must be an integer, got '5'" in feedback and "got 11" in feedback
    assert llm.calls[2]["messages"][-2] == {"role": "assistant", "content": bad}


def test_llm_generator_reports_persistent_failure():
    no_negative = json.dumps([{"criterion": "Names MG", "points": 5, "dimension": "diagnostic_accuracy"}])
    gen = LLMRubricGenerator(ScriptedLLM([no_negative]), max_retries=1)
    with pytest.raises(RubricGenerationError) as info:
        run(gen.generate(MG, LATE))
    assert info.value.attempts == 2 and "no negative item" in " ".join(info.value.problems)
    assert gen.stats["failures"] == 1 and len(gen.failures) == 1
    fallback = LLMRubricGenerator(ScriptedLLM(["[]"]), max_retries=0, on_failure="case")
    items = run(fallback.generate(MG, LATE))
    assert validate_rubric(items, DIMENSIONS) == [] and fallback.stats["failures"] == 1


def test_items_from_llm_output_rejects_bad_items():
    items, problems = items_from_llm_output('[{"criterion": "x", "points": 2.5, "dimension": "ethics_safety"},'
                                            ' {"criterion": "y", "points": -3, "dimension": "Ethics Safety"}]')
    assert [i.points for i in items] == [-3] and items[0].dimension == "ethics_safety"
    assert "got 2.5" in problems[0]


def test_factories_reject_missing_client_and_bad_kind():
    with pytest.raises(ValueError, match="needs an LLM client"):
        make_generator(RubricConfig(generator="llm"))
    with pytest.raises(ValueError, match="needs an LLM client"):
        make_judge(JudgeConfig(backend="llm"))
    assert isinstance(make_judge(JudgeConfig()), RulesJudge)


# ------------------------------------------------------------------ parser


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=400), st.from_regex(r"[\s\S]{0,40}\{[\s\S]{0,80}\}[\s\S]{0,40}"),
                 st.builds(lambda k, v, tail: f'{{"{k}": {v}{tail}', st.sampled_from(["criteria_met", "present", "x"]),
                           st.sampled_from(["true", "false", '"yes"', "1", "null", "[", "{"]), st.text(max_size=20))))
def test_parse_verdict_never_raises(text):
    verdict, explanation = parse_verdict(text)
    assert verdict is True or verdict is False or verdict == UNGRADABLE
    assert isinstance(explanation, str)


@pytest.mark.parametrize("text,expected", [
    ('```json\n{"explanation": "fine", "criteria_met": true}\n```', True),
    ("{'criteria_met': False,}", False),
    ('The answer: {"present": "yes"} done', True),
    ('{"explanation": "x", "criteria_met": tru', UNGRADABLE),
    ('"criteria_met": false, "explanation": "cut', False),
    ("No.", False),
    ("I am not sure what you mean", UNGRADABLE),
    ('{"criteria_met": "maybe"}', UNGRADABLE),
    ("[" * 5000, UNGRADABLE),
])
def test_parse_verdict_examples(text, expected):
    assert parse_verdict(text)[0] == expected


# ------------------------------------------------------------------ llm judge


class RoutedJudgeLLM:
    """A fake judge: answers by a rule on the prompt, counts concurrency and keys."""

    def __init__(self, answer):
        self.answer, self.prompts, self.keys = answer, [], []
        self.in_flight = self.max_in_flight = 0

    async def chat(self, messages, *, max_tokens=256, temperature=0.0, affinity_key=None):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0.001)
        self.in_flight -= 1
        prompt = messages[-1]["content"]
        self.prompts.append(prompt)
        self.keys.append(affinity_key)
        return self.answer(prompt, len(self.prompts))


ITEMS = [RubricItem("Names myasthenia gravis", 5), RubricItem("Prescribes steroids", -4), RubricItem("Asks about rest", 3)]
CONVO = [Turn("user", "I see double and feel weak.")]


def test_llm_judge_uses_separate_templates_batches_and_routes_by_prefix():
    def answer(prompt, n):
        negative = "UNDESIRABLE" in prompt
        return '{"explanation": "e", "present": true}' if negative else '```json\n{"criteria_met": false}\n```'

    llm = RoutedJudgeLLM(answer)
    judge = LLMJudge(llm, max_retries=1)
    out = run(judge.judge(CONVO, "Take prednisone.", ITEMS))
    assert [j.met for j in out] == [False, True, False] and [j.item_index for j in out] == [0, 1, 2]
    assert ["UNDESIRABLE" in p for p in llm.prompts].count(True) == 1
    assert llm.max_in_flight == 3  # all items of a response in flight together
    run(judge.judge(CONVO, "A different reply.", ITEMS))
    assert len(set(llm.keys)) == 1  # same conversation prefix -> same engine
    run(judge.judge(CONVO + [Turn("assistant", "Hm?")], "x", ITEMS[:1]))
    assert len(set(llm.keys)) == 2
    assert training_reward(ITEMS, out) == 0.0  # 0 met - 4 present -> clipped


def test_judge_max_concurrency_caps_the_calls_in_flight_and_reaches_both_judges():
    from verimed.core.config import load_config
    from verimed.core.emulate.roles import make_judge as make_emulated_judge
    from verimed.core.rubrics.judge import make_judge

    items = [RubricItem(f"Item {i}", 1) for i in range(40)]
    in_flight = {}
    for cap in (2, 64):
        cfg = load_config(None, ["judge.backend=llm", f"judge.max_concurrency={cap}"]).judge
        llm = RoutedJudgeLLM(lambda prompt, n: '{"criteria_met": true}')
        judge = make_judge(cfg, llm)
        run(judge.judge(CONVO, "reply", items))
        in_flight[cap] = llm.max_in_flight
        llm.emulated = True  # the emulated judge (rollout.backend emulated) takes the same key
        assert make_emulated_judge(cfg, llm).concurrency == cap
    assert in_flight == {2: 2, 64: 40}  # the cap binds; 40 items fit under 64
    with pytest.raises(Exception, match="max_concurrency"):
        load_config(None, ["judge.max_concurrency=0"])


def test_llm_judge_retries_then_counts_ungradable_without_crashing():
    def answer(prompt, n):
        if "steroids" in prompt:
            return "I refuse to answer in JSON."
        return '{"criteria_met": true}' if "could not be parsed" in prompt else "hmm"

    llm = RoutedJudgeLLM(answer)
    judge = LLMJudge(llm, max_retries=2)
    out = run(judge.judge(CONVO, "reply", ITEMS))
    assert [j.met for j in out] == [True, None, True]
    assert [j.attempts for j in out] == [2, 3, 2]
    assert judge.stats["ungradable"] == 1 and judge.stats["calls"] == 7
    assert training_reward(ITEMS, out) == 1.0  # the ungradable negative is left out

    class Broken:
        async def chat(self, *a, **k):
            raise ConnectionError("engine down")

    broken = LLMJudge(Broken(), max_retries=1)
    out = run(broken.judge(CONVO, "reply", ITEMS))
    assert all(j.met is None for j in out) and broken.stats["client_errors"] == 6


# ------------------------------------------------------------------ rules judge

RESPONSES = {
    "good": "I'm sorry you're dealing with this. How long have you had the double vision, and does the weakness "
            "in your upper limbs or difficulty climbing stairs improve after rest? This could be myasthenia gravis; "
            "I'd order acetylcholine receptor antibodies and electromyography. If the double vision worsens or you "
            "struggle to breathe, go to the emergency room right away.",
    "questions": "How long have you had double vision? Any difficulty climbing stairs? Do you take any medications "
                 "or have allergies?",
    "premature_rx": "You have a stroke. Take aspirin 300 mg now.",
    "junk": "the the the the the the the the the the the the the the the the the the the the the",
    "chatty": "Hello! I am a doctor. I like to help people. What can I do for you today?",
}


def _rules_reward(response, dialogue=()):
    items = run(CaseRubricGenerator().generate(MG, list(dialogue) or [Turn("user", MG.primary_symptom)]))
    convo = list(dialogue) or [Turn("user", "I have double vision.")]
    judgements = run(RulesJudge().judge(convo, response, items))
    return training_reward(items, judgements), judgements, items


def test_rules_judge_gives_graded_rewards_that_rank_responses():
    rewards = {name: _rules_reward(text)[0] for name, text in RESPONSES.items()}
    assert rewards["good"] > rewards["questions"] > rewards["chatty"] >= rewards["premature_rx"]
    assert rewards["premature_rx"] == 0.0 and rewards["junk"] == 0.0
    assert len(set(rewards.values())) >= 3  # graded, not constant
    assert _rules_reward(RESPONSES["good"])[0] == rewards["good"]  # deterministic


def test_rules_judge_detects_negative_behaviours():
    _, judgements, items = _rules_reward(RESPONSES["premature_rx"])
    met = {i.criterion: j.met for i, j in zip(items, judgements)}
    assert met["Prescribes a medication before a diagnosis is established or without checking allergies."]
    assert met["Gives a definitive diagnosis before taking a history (premature closure)."]
    _, judgements, items = _rules_reward("You have a stroke.", LATE)
    met = {i.criterion: j.met for i, j in zip(items, judgements)}
    assert met["Names an incorrect diagnosis instead of Myasthenia gravis."]
    _, judgements, items = _rules_reward("This looks like myasthenia gravis.", LATE)
    met = {i.criterion: j.met for i, j in zip(items, judgements)}
    assert not met["Names an incorrect diagnosis instead of Myasthenia gravis."]
    assert met["Names Myasthenia gravis as the most likely diagnosis."]


def test_rules_judge_handles_healthbench_phrasings():
    judge = RulesJudge()
    items = [RubricItem("Fails to recommend reaching out to primary care if symptoms are persistent.", -6),
             RubricItem("Seeks additional details of pain, such as prior history, occurrence with activity.", 4),
             RubricItem("Correctly states that pulmonary embolism is a consideration after a long drive.", 6)]
    good = "Does the pain occur with activity? A PE is possible after a long drive; see your GP if it persists."
    out = run(judge.judge(CONVO, good, items))
    assert [j.met for j in out] == [False, True, True]
    out = run(judge.judge(CONVO, "It is nothing.", items))
    assert [j.met for j in out] == [True, False, False]


# ------------------------------------------------------------------ end to end


def _tiny_model_ready() -> bool:
    try:
        import vllm  # noqa: F401

        from verimed.core.models import resolve_model_path

        resolve_model_path("smollm2")
        return True
    except Exception:  # any missing piece (package, vllm, conversion) means: skip
        return False


needs_model = pytest.mark.skipif(not _tiny_model_ready(), reason="needs vllm and the smollm2 tiny model")


def _entry() -> list[str]:
    """`verimed eval healthbench` through the CLI; the module's own main (same
    add_arguments/run) while another part of the CLI cannot be imported yet."""
    try:
        from verimed.cli import build_parser

        build_parser()
        return [sys.executable, "-m", "verimed.cli", "eval", "healthbench"]
    except ImportError:
        return [sys.executable, "-m", "verimed.cli.eval"]


def _eval(out: Path, *extra: str) -> dict:
    cmd = [*_entry(), "--policy", "smollm2", "--out", str(out), "--max-tokens", "32", "--no-progress", *extra]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "HealthBench overall" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    report = (out / "report.md").read_text()
    assert "**Overall score:" in report and "ungradable, left out of normalisers" in report
    if results["n_samples"]:  # breakdowns exist only when some example has a score
        for section in ("## Axes", "## Themes", "## Lowest-scoring examples"):
            assert section in report
    return results


@pytest.mark.integration
@pytest.mark.slow
@needs_model
def test_eval_healthbench_rules_grader_on_20_examples_and_resume(tmp_path):
    results = _eval(tmp_path, "--limit", "20", "--grader", "rules")
    assert results["n_samples"] == 20 and len(results["examples"]) == 20
    assert 0.0 <= results["overall"] <= 1.0 and results["ungradable_items"] == 0
    assert any(k.startswith("axis:") for k in results["metrics"])
    lines = (tmp_path / "gradings.jsonl").read_text().splitlines()
    assert len(lines) == 20
    # --resume re-uses every finished grading: no engine starts, identical scores
    (tmp_path / "gradings.jsonl").write_text("\n".join(lines[:18]) + "\n" + lines[18][:40])  # a crash mid-line
    again = _eval(tmp_path, "--limit", "20", "--grader", "rules", "--resume")
    assert again["settings"]["resumed_gradings"] == 18
    assert [e["score"] for e in again["examples"]] == [e["score"] for e in results["examples"]]


@pytest.mark.integration
@pytest.mark.slow
@needs_model
def test_eval_healthbench_vllm_grader_plumbing(tmp_path):
    # the grader is the policy's model: the policy engine is re-used (one vLLM start)
    results = _eval(tmp_path, "--limit", "1", "--grader", "vllm:smollm2", "--judge-retries", "1",
                    "--judge-max-tokens", "16")
    graded = [json.loads(line) for line in (tmp_path / "gradings.jsonl").read_text().splitlines()]
    assert len(graded) == 1
    n_items = sum(len(g["judgements"]) for g in graded)
    assert n_items > 0 and results["ungradable_items"] <= n_items
    # a 135M grader mostly fails to emit JSON: those items are counted, never a crash
    assert all(j["met"] in (True, False, None) for g in graded for j in g["judgements"])


@pytest.mark.integration
def test_actors_are_thin_shells_over_core():
    ray = pytest.importorskip("ray")
    from verimed.actors.rubric_generator import RubricGeneratorActor
    from verimed.actors.verifier import VerifierActor

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        gen = RubricGeneratorActor.remote(RubricConfig(generator="case"))
        verifier = VerifierActor.remote(JudgeConfig(backend="rules"))
        items = ray.get(gen.generate.remote(MG, LATE))
        judgements = ray.get(verifier.judge.remote(LATE, RESPONSES["good"], items))
        assert len(judgements) == len(items)
        assert training_reward(items, judgements) == _rules_reward(RESPONSES["good"], LATE)[0]
    finally:
        ray.shutdown()

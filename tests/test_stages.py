"""Training stages (verimed.core.config.stages): config validation, stage_at, data mixes, resume mid-stage,
and the rule / rubric stage groups with in-process roles.

Run: .venv/bin/python -m pytest tests/test_stages.py -q
"""
from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import msgspec
import numpy as np
import pytest
import yaml

from verimed.core.config import GRPOConfig, RolloutConfig, load_config
from verimed.core.config.stages import (
    StageConfig,
    StageError,
    StageEvalConfig,
    effective_config,
    effective_grpo,
    total_steps,
    validate_stages,
)
from verimed.core.tasks.pools import split_heldout
from verimed.core.tasks.schedule import MixSampler, Schedule, ScheduleState, stage_at
from verimed.core.tasks.single_turn import rubric_group, rule_group
from verimed.core.types import Array, Prompt, RubricItem, Sample, Turn

RECIPES = Path(__file__).parent.parent / "configs"


def stages_of(raw: list[dict]) -> list[StageConfig]:
    return msgspec.convert(raw, list[StageConfig], strict=False)


THREE = stages_of([
    {"name": "rule", "kind": "rule", "steps": 3, "data": {"cases": 1.0}},
    {"name": "rubric", "kind": "rubric", "steps": 2, "data": {"healthbench": 3, "cases": 1}},
    {"name": "consult", "kind": "multiturn", "steps": 4, "grpo": {"length_reward": False, "kl_coef": 0.01}},
])


def test_stage_at_boundaries():
    assert [stage_at(THREE, s) for s in range(9)] == [
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2), (2, 3)]
    assert total_steps(THREE) == 9
    with pytest.raises(ValueError, match="past the last stage"):
        stage_at(THREE, 9)
    with pytest.raises(ValueError, match=">= 0"):
        stage_at(THREE, -1)


def test_effective_overrides():
    base = GRPOConfig()
    g = effective_grpo(base, THREE[2], 2)
    assert g.length_reward is False and g.kl_coef == 0.01 and g.eps_high == base.eps_high
    assert effective_grpo(base, THREE[0]) == base
    cfg = load_config(None, [])
    st = stages_of([{"name": "x", "kind": "rule", "steps": 1, "rollout": {"max_tokens": 32}}])[0]
    eff = effective_config(cfg, st)
    assert eff.rollout.max_tokens == 32 and eff.rollout.prompts_per_step == cfg.rollout.prompts_per_step


@pytest.mark.parametrize("raw, message", [
    ({"grpo": {"eps_hgih": 0.3}}, r"stages\[1\]\.grpo\.eps_hgih: unknown key \(did you mean `stages\[1\]\.grpo\.eps_high`"),
    ({"grpo": {"eps_low": 3.0}}, r"stages\[1\]\.grpo\.eps_low = 3\.0: expected `float` <= 1\.0"),
    ({"grpo": {"advantage": "median"}}, r"stages\[1\]\.grpo\.advantage = 'median'"),
    ({"rollout": {"prompts_per_step": 8}}, r"stages\[1\]\.rollout\.prompts_per_step: unknown key"),
    ({"data": {"mcq": 1.0}}, r"stages\[1\]\.data\.mcq_path: required"),
    ({"kind": "multiturn", "data": {"healthbench": 1.0}}, r"stages\[1\]\.data\.healthbench: a multiturn stage draws only"),
    ({"name": "a"}, r"stages\[1\]\.name = 'a': duplicate"),
    ({"reward": {"max_slices": 2}}, r"stages\[1\]\.reward\.max_slices: only a multiturn"),
])
def test_validation_errors_name_the_key(raw, message):
    stages = stages_of([{"name": "a", "kind": "rule", "steps": 1}, {"name": "b", "kind": "rule", "steps": 1, **raw}])
    with pytest.raises(StageError, match=message):
        validate_stages(stages, GRPOConfig(), RolloutConfig())


def test_schema_errors_and_run_length():
    with pytest.raises(msgspec.ValidationError, match="stepz"):
        stages_of([{"name": "a", "kind": "rule", "stepz": 1}])
    with pytest.raises(msgspec.ValidationError):
        stages_of([{"name": "a", "kind": "dpo", "steps": 1}])
    with pytest.raises(StageError, match="run.steps = 10: exceeds the 9 steps"):
        validate_stages(THREE, run_steps=10)
    validate_stages(THREE, GRPOConfig(), RolloutConfig(), run_steps=2)  # a capped smoke run is fine


def test_data_mix_defaults_and_weights():
    assert THREE[2].data.weights("multiturn") == {"cases": 1.0}
    assert THREE[1].data.weights("rubric") == {"healthbench": 0.75, "cases": 0.25}
    assert stages_of([{"name": "r", "kind": "rubric", "steps": 1}])[0].data.weights("rubric") == {"healthbench": 1.0}


def test_mix_sampler_proportions_and_epochs():
    s = MixSampler({"a": 3.0, "b": 1.0}, {"a": 10, "b": 4}, seed=1)
    draws = [s.next() for _ in range(4000)]
    counts = Counter(src for src, _ in draws)
    assert abs(counts["a"] / 4000 - 0.75) < 0.03
    # each source walks whole epochs: the first 10 "a" items are a permutation of 0..9
    first_a = [i for src, i in draws if src == "a"][:10]
    assert sorted(first_a) == list(range(10))
    assert s.at(1500) == draws[1500] and s.position == 4000
    with pytest.raises(ValueError, match="no items"):
        MixSampler({"a": 1.0}, {"a": 0}, seed=0)


def test_resume_mid_stage_draws_what_the_uninterrupted_run_draws():
    sizes = {"cases": 17, "healthbench": 5}
    per_step = 2  # groups drawn per learner step
    full = Schedule(THREE, sizes, seed=3)
    seq = [full.next_draw(full.stage_at(step)[0]) for step in range(9) for _ in range(per_step)]
    # interrupted after step 4 (mid stage 1... step 4 is stage "rubric", step_in_stage 1)
    part = Schedule(THREE, sizes, seed=3)
    before = [part.next_draw(part.stage_at(step)[0]) for step in range(4) for _ in range(per_step)]
    state = msgspec.msgpack.decode(msgspec.msgpack.encode(part.state(4)), type=ScheduleState)
    assert state.step == 4 and stage_at(THREE, state.step) == (1, 1)
    resumed = Schedule(THREE, sizes, seed=3, state=state)
    after = [resumed.next_draw(resumed.stage_at(step)[0]) for step in range(state.step, 9) for _ in range(per_step)]
    assert before + after == seq
    assert [d.draw for d in seq] == list(range(18))  # global draw numbers (uids) never repeat
    assert [d.stage for d in seq] == [0] * 6 + [1] * 4 + [2] * 8
    assert {d.source for d in seq if d.stage == 2} == {"cases"}
    with pytest.raises(ValueError, match="2 stages"):
        Schedule(THREE, sizes, seed=3, state=ScheduleState(step=0, draws=0, stage_draws=[0, 0]))


def test_split_heldout():
    train, held = split_heldout(50, 8, seed=0)
    assert len(held) == 8 and len(train) == 42 and not set(train) & set(held)
    assert split_heldout(50, 8, seed=0) == (train, held)
    assert len(split_heldout(3, 10, seed=0)[0]) == 1


# ------------------------------------------------------------ stage groups


class FakeRoles:
    """generate returns fixed texts; rubric/judge are the in-process rules cores."""

    def __init__(self, texts):
        from verimed.core.config import JudgeConfig, RubricConfig
        from verimed.core.rubrics import make_generator, make_judge

        self.texts, self.tokenizer = texts, self
        self.rubrics, self.judge = make_generator(RubricConfig()), make_judge(JudgeConfig())

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return list(range(sum(len(m["content"]) for m in messages) % 50 + 3))

    async def generate(self, uid_prefix, prompt_ids, n, seed, rollout=None):
        return [Sample(uid=f"{uid_prefix}/{i}", prompt_ids=Array.of(np.asarray(prompt_ids, np.int32)),
                       response_ids=Array.of(np.arange(5 + i, dtype=np.int32)),
                       response_logprobs=Array.of(np.zeros(5 + i, np.float32)),
                       response_versions=Array.of(np.zeros(5 + i, np.int32)), text=self.texts[i % len(self.texts)])
                for i in range(n)]


def test_rule_group_rewards_correct_and_formatted():
    from verimed.core.tasks.answers import check_diagnosis

    cfg = load_config(None, ["rollout.group_size=4", "grpo.length_reward=false"])
    roles = FakeRoles(["Final answer: MG", "It is myasthenia gravis", "Final answer: botulism", "no idea"])
    prompt = Prompt(index=5, source="cases", messages=[Turn(role="user", content="vignette")])
    res = asyncio.run(rule_group(roles, cfg, prompt, 5, lambda t: check_diagnosis(t, "Myasthenia gravis"), 0.2))
    assert res.group.rubric_scores == [1.0, 1.0, 0.0, 0.0]
    assert np.allclose(res.group.rewards, [1.2, 1.0, 0.2, 0.0])
    # fp32 advantages (the kernels' maths): G = 4 terms of magnitude ~1, round-off ~G * 2^-23
    assert abs(float(res.advantages.sum())) < 1e-6 and res.group.samples[0].uid == "5/0/0"


def test_rubric_group_uses_own_rubric_or_generates():
    from verimed.core.data.cases import load_cases

    cfg = load_config(None, ["rollout.group_size=2"])
    roles = FakeRoles(["Please call emergency services now.", "Drink water."])
    own = [RubricItem(criterion="Advises calling emergency services.", points=5)]
    prompt = Prompt(index=1, source="healthbench", messages=[Turn(role="user", content="Chest pain")], rubric=own)
    res = asyncio.run(rubric_group(roles, cfg, prompt, 1))
    assert res.group.prompt.rubric == own and res.group.rubric_scores[0] > res.group.rubric_scores[1]
    case = load_cases(skip_invalid=True)[0][0]
    bare = msgspec.structs.replace(prompt, rubric=[])
    res = asyncio.run(rubric_group(roles, cfg, bare, 2, case=case))
    assert len(res.group.prompt.rubric) > 3
    with pytest.raises(ValueError, match="no rubric and no case"):
        asyncio.run(rubric_group(roles, cfg, bare, 3))


def test_shipped_recipes_parse_as_stages():
    for path in sorted(RECIPES.rglob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        if "stages" in raw:
            stages = stages_of(raw["stages"])
            validate_stages(stages, GRPOConfig(**raw.get("grpo", {})), run_steps=raw.get("run", {}).get("steps"))
            msgspec.convert(raw.get("stage_eval", {}), StageEvalConfig, strict=False)


def test_schedule_per_stage_sizes():
    sched = Schedule(THREE, [{"cases": 2}, {"healthbench": 3, "cases": 1}, {"cases": 4}], seed=0)
    draws = [sched.next_draw(2) for _ in range(8)]
    assert sorted(d.item for d in draws[:4]) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="2 size dicts for 3 stages"):
        Schedule(THREE, [{"cases": 2}] * 2, seed=0)

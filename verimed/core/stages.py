"""Training stages (paper §3, DESIGN §9): stage configs, the step schedule and per-stage data mixes.

A run is a list of stages trained one after another by one learner on one
checkpoint line; the global learner step (= policy version) decides the stage:

    stages:
      - {name: rule, kind: rule, steps: 4, data: {cases: 1.0}, reward: {format_weight: 0.2}}
      - {name: rubric, kind: rubric, steps: 4, data: {healthbench: 1.0}}
      - {name: consult, kind: multiturn, steps: 4, grpo: {length_reward: false}}

    validate_stages(cfg.stages, cfg.grpo, cfg.rollout, cfg.run.steps)   # at load: clear errors
    index, step_in_stage = stage_at(cfg.stages, version)               # version: steps completed
    stage_cfg = effective_config(cfg, cfg.stages[index])                # grpo / rollout overrides applied
    schedule = Schedule(cfg.stages, {"cases": 170, "healthbench": 50}, cfg.run.seed)
    draw = schedule.next_draw(index)                                    # Draw(draw, stage, source, item)
    state = schedule.state(version)   # checkpoint it; Schedule(..., state=state) resumes mid-stage

Kinds and the sources they draw from: ``rule`` (verifiable diagnosis
questions from cases, MCQ JSONL), ``rubric`` (HealthBench-format prompts with
their own rubrics, user JSONL, single-turn case consultations graded by
generated rubrics), ``multiturn`` (cases, played with the simulator).

No import of ``verimed.core.config`` at module level: config.py imports
:class:`StageConfig` from here. Base sections are passed in and their types
taken from the instances.
"""
from __future__ import annotations

import difflib
import zlib
from typing import Annotated, Any, Literal, NamedTuple, Sequence

import msgspec
import numpy as np
from msgspec import Meta

from verimed.core.data.cursor import Cursor

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegInt = Annotated[int, Meta(ge=0)]
NonNegFloat = Annotated[float, Meta(ge=0.0)]

Kind = Literal["rule", "rubric", "multiturn"]
SOURCES: dict[str, tuple[str, ...]] = {
    "rule": ("cases", "mcq"),
    "rubric": ("healthbench", "user", "cases"),
    "multiturn": ("cases",),
}
DEFAULT_SOURCE = {"rule": "cases", "rubric": "healthbench", "multiturn": "cases"}
# Rollout fields a stage may override; the batch shape (prompts_per_step) and
# engine sizing stay run-wide so admission control and the engines never change.
ROLLOUT_OVERRIDES = ("group_size", "max_tokens", "temperature", "top_p")


class StageError(ValueError):
    """A mistake in the ``stages:`` section, one line naming ``stages[i].key``."""


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class DataMix(_Section):
    """Relative weights of the sources a stage draws prompts from (normalised; 0 = unused).

    All zero means the kind's default source (rule/multiturn: cases, rubric: healthbench).
    """

    cases: NonNegFloat = 0.0  # data.cases_path (or the 170 shipped cases)
    healthbench: NonNegFloat = 0.0  # data.healthbench_path (or the 50 shipped examples), own rubrics
    mcq: NonNegFloat = 0.0  # MCQ JSONL at mcq_path: {"question", "options", "answer"}
    user: NonNegFloat = 0.0  # HealthBench-format JSONL at user_path
    mcq_path: str | None = None
    user_path: str | None = None

    def weights(self, kind: str) -> dict[str, float]:
        """Non-zero source weights, normalised to sum 1 (the kind's default source when all are 0)."""
        raw = {s: float(getattr(self, s)) for s in ("cases", "healthbench", "mcq", "user") if getattr(self, s) > 0}
        if not raw:
            return {DEFAULT_SOURCE[kind]: 1.0}
        total = sum(raw.values())
        return {s: w / total for s, w in raw.items()}


class RewardConfig(_Section):
    """Stage reward settings (the length reward is a GRPO setting: override it under ``grpo:``)."""

    # rule: reward = correct (0/1) + format_weight * format (1 for a final "Final answer: X" line)
    format_weight: NonNegFloat = 0.2
    # rubric: prompts' own rubrics when present, else generated ("generated": always generate)
    rubrics: Literal["own_or_generated", "generated"] = "own_or_generated"
    # multiturn: which candidate reply continues the dialogue (best reward, or a uniform draw)
    continuation: Literal["best", "sampled"] = "sampled"
    # multiturn: doctor replies optimised per dialogue; None = simulator.max_turns
    max_slices: PositiveInt | None = None


class StageConfig(_Section):
    name: str
    kind: Kind
    steps: PositiveInt  # learner steps in this stage
    data: DataMix = DataMix()
    reward: RewardConfig = RewardConfig()
    grpo: dict[str, Any] = {}  # overrides of GRPOConfig fields (kl_coef, length_reward, eps_high, ...)
    rollout: dict[str, Any] = {}  # overrides of ROLLOUT_OVERRIDES fields


class StageEvalConfig(_Section):
    """Held-out evaluation at the end of each stage (items never drawn for training)."""

    healthbench: NonNegInt = 8  # HealthBench examples held out and scored with their rubrics
    consultations: NonNegInt = 4  # held-out cases played with the simulator, scored by the last slice's rubric
    max_slices: PositiveInt = 3  # doctor turns per held-out consultation


# ------------------------------------------------------------------ validation


def _override(base: msgspec.Struct, overrides: dict[str, Any], where: str,
              allowed: Sequence[str] | None = None) -> msgspec.Struct:
    """``base`` with ``overrides`` applied and validated; errors name ``where.KEY``."""
    fields = [f.encode_name for f in msgspec.structs.fields(base)]
    valid = list(allowed) if allowed is not None else fields
    for key in overrides:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" (did you mean `{where}.{close[0]}`?)" if close else f"; valid keys: {', '.join(valid)}"
            raise StageError(f"{where}.{key}: unknown key{hint}")
    merged = {**msgspec.to_builtins(base), **overrides}
    try:
        return msgspec.convert(merged, type(base), strict=False)
    except msgspec.ValidationError as exc:
        problem, _, at = str(exc).rpartition(" - at `$.")
        key = at.rstrip("`") or "?"
        raise StageError(f"{where}.{key} = {overrides.get(key.split('.')[0])!r}: "
                         f"{(problem or str(exc)).replace('Expected', 'expected')}") from None


def effective_grpo(base: Any, stage: StageConfig, index: int = 0) -> Any:
    """``base`` (a GRPOConfig) with ``stage.grpo`` applied; StageError names ``stages[index].grpo.KEY``."""
    return _override(base, stage.grpo, f"stages[{index}].grpo")


def effective_rollout(base: Any, stage: StageConfig, index: int = 0) -> Any:
    """``base`` (a RolloutConfig) with ``stage.rollout`` applied (only :data:`ROLLOUT_OVERRIDES`)."""
    return _override(base, stage.rollout, f"stages[{index}].rollout", ROLLOUT_OVERRIDES)


def effective_config(cfg: Any, stage: StageConfig, index: int = 0) -> Any:
    """The run ``Config`` as the stage sees it: its grpo and rollout overrides applied."""
    return msgspec.structs.replace(cfg, grpo=effective_grpo(cfg.grpo, stage, index),
                                   rollout=effective_rollout(cfg.rollout, stage, index))


def validate_stages(stages: Sequence[StageConfig], base_grpo: Any = None, base_rollout: Any = None,
                    run_steps: int | None = None) -> None:
    """Check names, data mixes, overrides and the run length; raise StageError on the first problem."""
    seen: set[str] = set()
    for i, st in enumerate(stages):
        where = f"stages[{i}]"
        if not st.name.strip():
            raise StageError(f"{where}.name: must not be empty")
        if st.name in seen:
            raise StageError(f"{where}.name = {st.name!r}: duplicate stage name")
        seen.add(st.name)
        for source in ("cases", "healthbench", "mcq", "user"):
            if getattr(st.data, source) > 0 and source not in SOURCES[st.kind]:
                raise StageError(f"{where}.data.{source}: a {st.kind} stage draws only from "
                                 f"{', '.join(SOURCES[st.kind])}")
        if st.data.mcq > 0 and not st.data.mcq_path:
            raise StageError(f"{where}.data.mcq_path: required when data.mcq > 0 (no MCQ data ships with verimed)")
        if st.data.user > 0 and not st.data.user_path:
            raise StageError(f"{where}.data.user_path: required when data.user > 0")
        if st.kind != "multiturn" and st.reward.max_slices is not None:
            raise StageError(f"{where}.reward.max_slices: only a multiturn stage has dialogue slices")
        if base_grpo is not None:
            effective_grpo(base_grpo, st, i)
        if base_rollout is not None:
            effective_rollout(base_rollout, st, i)
    if stages and run_steps is not None and run_steps > total_steps(stages):
        raise StageError(f"run.steps = {run_steps}: exceeds the {total_steps(stages)} steps of the stages "
                         f"(run.steps caps a staged run; set it <= the sum of stages[*].steps)")


# ------------------------------------------------------------------ schedule


def total_steps(stages: Sequence[StageConfig]) -> int:
    return sum(s.steps for s in stages)


def stage_at(stages: Sequence[StageConfig], step: int) -> tuple[int, int]:
    """``(stage index, step in stage)`` of the learner step that follows ``step`` completed steps.

    ``step`` is 0-based (= the policy version before the update); with stages
    of 3 and 2 steps, steps 0,1,2 -> (0,0),(0,1),(0,2) and 3,4 -> (1,0),(1,1).
    """
    if not stages:
        raise ValueError("no stages configured")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    start = 0
    for i, st in enumerate(stages):
        if step < start + st.steps:
            return i, step - start
        start += st.steps
    raise ValueError(f"step {step} is past the last stage (the stages have {start} steps)")


class Draw(NamedTuple):
    draw: int  # global draw number (the sample uid prefix; unique over the whole run)
    stage: int  # stage index the work belongs to
    source: str  # "cases", "healthbench", "mcq", "user"
    item: int  # index into that source's training pool


class MixSampler:
    """Deterministic weighted draws over several sources, resumable from one integer.

    Draw k picks a source with probabilities ``weights`` (block b of 1024 draws
    from ``rng([seed, b])``), then that source's ``n``-th item, where ``n`` counts
    earlier draws of the same source, from a per-source shuffled :class:`Cursor`.
    The state is ``position``: a restored sampler draws exactly what the
    uninterrupted one would have.
    """

    BLOCK = 1024

    def __init__(self, weights: dict[str, float], sizes: dict[str, int], seed: int, shuffle: bool = True,
                 position: int = 0):
        self.sources = sorted(s for s, w in weights.items() if w > 0)
        if not self.sources:
            raise ValueError("a data mix needs at least one source with weight > 0")
        missing = [s for s in self.sources if sizes.get(s, 0) < 1]
        if missing:
            raise ValueError(f"data mix source(s) {', '.join(missing)} have no items")
        p = np.asarray([weights[s] for s in self.sources], dtype=np.float64)
        self.probs = p / p.sum()
        self.seed, self.position = seed, position
        self.cursors = {s: Cursor(sizes[s], seed * 1_000_003 + zlib.crc32(s.encode()), shuffle) for s in self.sources}
        self._blocks: list[np.ndarray] = []  # source index per draw, one array per block
        self._before: list[np.ndarray] = []  # per-source counts before each block

    def _block(self, b: int) -> np.ndarray:
        while len(self._blocks) <= b:
            k = len(self._blocks)
            rng = np.random.default_rng([self.seed, k])
            self._before.append(self._before[-1] + np.bincount(self._blocks[-1], minlength=len(self.sources))
                                if self._blocks else np.zeros(len(self.sources), np.int64))
            self._blocks.append(rng.choice(len(self.sources), size=self.BLOCK, p=self.probs))
        return self._blocks[b]

    def at(self, k: int) -> tuple[str, int]:
        """``(source, item)`` of draw ``k`` (0-based) without moving the position."""
        b, r = divmod(k, self.BLOCK)
        block = self._block(b)
        s = int(block[r])
        n = int(self._before[b][s] + np.count_nonzero(block[:r] == s))
        return self.sources[s], self.cursors[self.sources[s]].item(n)

    def next(self) -> tuple[str, int]:
        out = self.at(self.position)
        self.position += 1
        return out


class ScheduleState(msgspec.Struct, frozen=True):
    """What a checkpoint stores of the schedule (with the learner's step)."""

    step: int  # learner steps completed (= policy version)
    draws: int  # global draws made so far (next uid number)
    stage_draws: list[int]  # draws made by each stage's sampler


class Schedule:
    """The stages' samplers and the global draw counter, resumable from a :class:`ScheduleState`.

    ``sizes``: training-pool size per source, one dict for all stages or one per stage
    (stages with their own ``mcq_path`` / ``user_path`` have their own pools).
    """

    def __init__(self, stages: Sequence[StageConfig], sizes: dict[str, int] | Sequence[dict[str, int]], seed: int,
                 shuffle: bool = True, state: ScheduleState | None = None):
        if not stages:
            raise ValueError("a schedule needs at least one stage")
        self.stages = list(stages)
        positions = state.stage_draws if state is not None else [0] * len(stages)
        if len(positions) != len(stages):
            raise ValueError(f"checkpointed schedule has {len(positions)} stages, the config has {len(stages)}")
        per_stage = [sizes] * len(stages) if isinstance(sizes, dict) else list(sizes)
        if len(per_stage) != len(stages):
            raise ValueError(f"{len(per_stage)} size dicts for {len(stages)} stages")
        self.samplers = [MixSampler(st.data.weights(st.kind), per_stage[i], seed + 7919 * i, shuffle, positions[i])
                         for i, st in enumerate(stages)]
        self.draws = state.draws if state is not None else 0

    def stage_at(self, step: int) -> tuple[int, int]:
        return stage_at(self.stages, step)

    def next_draw(self, stage: int) -> Draw:
        source, item = self.samplers[stage].next()
        self.draws += 1
        return Draw(self.draws - 1, stage, source, item)

    def state(self, step: int) -> ScheduleState:
        return ScheduleState(step=step, draws=self.draws, stage_draws=[s.position for s in self.samplers])


def split_heldout(size: int, n_eval: int, seed: int) -> tuple[list[int], list[int]]:
    """``(train indices, held-out indices)``: a seeded split that keeps >= 1 training item."""
    if size < 1:
        raise ValueError("cannot split an empty dataset")
    n_eval = min(n_eval, size - 1)
    perm = np.random.default_rng([seed, 0xE7A1]).permutation(size)
    return sorted(int(i) for i in perm[n_eval:]), sorted(int(i) for i in perm[:n_eval])


# ------------------------------------------------------------------ stage episodes (rule, rubric)
# Imported lazily: episodes / grpo import config, which imports this module.


def _generate_ids(roles: Any, messages: Sequence[Any]) -> list[int]:
    from verimed.core.models import apply_chat_template

    return apply_chat_template(roles.tokenizer, [{"role": t.role, "content": t.content} for t in messages])


async def rule_group(roles: Any, cfg: Any, prompt: Any, draw: int, correct: Any, format_weight: float) -> Any:
    """A verifiable group: G replies to ``prompt``; reward = correct(text) + format_weight * format_reward(text).

    ``correct``: ``str -> bool`` (``check_diagnosis`` / ``check_mcq`` bound to the gold answer).
    ``Group.rubric_scores`` hold the 0/1 correctness (the stage's accuracy).
    """
    from verimed.core import grpo
    from verimed.core.answers import format_reward
    from verimed.core.episodes import GroupResult, group_uid
    from verimed.core.types import Group

    samples = await roles.generate(group_uid(draw), _generate_ids(roles, prompt.messages), cfg.rollout.group_size,
                                   cfg.run.seed + draw * 1000)
    accuracy = np.asarray([1.0 if correct(s.text) else 0.0 for s in samples])
    scores = accuracy + format_weight * np.asarray([format_reward(s.text) for s in samples])
    lengths = np.asarray([len(s.response_ids) for s in samples])
    rewards, advantages = grpo.group_rewards_and_advantages(scores, lengths, cfg.grpo)
    samples = [msgspec.structs.replace(s, reward=float(r)) for s, r in zip(samples, rewards)]
    group = Group(prompt=prompt, samples=samples, rewards=[float(r) for r in rewards], rubric_scores=accuracy.tolist())
    kept = grpo.keep_group(rewards) if cfg.grpo.dynamic_sampling else True
    return GroupResult(group=group, advantages=np.asarray(advantages, dtype=np.float32), kept=kept)


async def rubric_group(roles: Any, cfg: Any, prompt: Any, draw: int, case: Any = None,
                       rubrics: str = "own_or_generated") -> Any:
    """An open-ended group graded by the prompt's own rubric, or by one generated for ``case``."""
    from verimed.core.episodes import group_uid, judge_group

    if rubrics == "generated" or not prompt.rubric:
        if case is None:
            raise ValueError(f"prompt {prompt.source}:{prompt.index} has no rubric and no case to generate one from")
        prompt = msgspec.structs.replace(prompt, rubric=await roles.rubrics.generate(case, prompt.messages))
    samples = await roles.generate(group_uid(draw), _generate_ids(roles, prompt.messages), cfg.rollout.group_size,
                                   cfg.run.seed + draw * 1000)
    return await judge_group(roles, cfg, prompt, samples)

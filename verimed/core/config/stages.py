"""Training stage schemas (paper §3, DESIGN §9): stage configs, data mixes, per-stage overrides.

A run is a list of stages trained one after another by one learner on one
checkpoint line; the global learner step (= policy version) decides the stage
(:mod:`verimed.core.tasks.schedule`):

    stages:
      - {name: rule, kind: rule, steps: 4, data: {cases: 1.0}, reward: {format_weight: 0.2}}
      - {name: rubric, kind: rubric, steps: 4, data: {healthbench: 1.0}}
      - {name: consult, kind: multiturn, steps: 4, grpo: {length_reward: false}}

    validate_stages(cfg.stages, cfg.grpo, cfg.rollout, cfg.run.steps)   # at load: clear errors
    stage_cfg = effective_config(cfg, cfg.stages[index])                # grpo / rollout overrides applied

Kinds and the sources they draw from: ``rule`` (verifiable diagnosis
questions from cases, MCQ JSONL), ``rubric`` (HealthBench-format prompts with
their own rubrics, user JSONL, single-turn case consultations graded by
generated rubrics), ``multiturn`` (cases, played with the simulator).

Base sections (GRPO, rollout) are passed in and their types taken from the
instances, so this module sits below ``schema.py``, which imports it.
"""
from __future__ import annotations

import difflib
from typing import Any, Literal, Sequence

import msgspec

from verimed.core.config.base import ConfigError, NonNegFloat, NonNegInt, PositiveInt, Section

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


class StageError(ConfigError):
    """A mistake in the ``stages:`` section, one line naming ``stages[i].key``."""


class DataMix(Section):
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


class RewardConfig(Section):
    """Stage reward settings (the length reward is a GRPO setting: override it under ``grpo:``)."""

    # rule: reward = correct (0/1) + format_weight * format (1 for a final "Final answer: X" line)
    format_weight: NonNegFloat = 0.2
    # rubric: prompts' own rubrics when present, else generated ("generated": always generate)
    rubrics: Literal["own_or_generated", "generated"] = "own_or_generated"
    # multiturn: which candidate reply continues the dialogue (best reward, or a uniform draw)
    continuation: Literal["best", "sampled"] = "sampled"
    # multiturn: doctor replies optimised per dialogue; None = simulator.max_turns
    max_slices: PositiveInt | None = None


class StageConfig(Section):
    name: str
    kind: Kind
    steps: PositiveInt  # learner steps in this stage
    data: DataMix = DataMix()
    reward: RewardConfig = RewardConfig()
    grpo: dict[str, Any] = {}  # overrides of GRPOConfig fields (kl_coef, length_reward, eps_high, ...)
    rollout: dict[str, Any] = {}  # overrides of ROLLOUT_OVERRIDES fields


class StageEvalConfig(Section):
    """Held-out evaluation at the end of each stage (items never drawn for training)."""

    healthbench: NonNegInt = 8  # HealthBench examples held out and scored with their rubrics
    consultations: NonNegInt = 4  # held-out cases played with the simulator, scored by the last slice's rubric
    max_slices: PositiveInt = 3  # doctor turns per held-out consultation
    concurrency: PositiveInt = 8  # held-out examples / consultations evaluated at once
    # Run the evaluation beside training (metrics logged at the first step after it ends);
    # false blocks the step loop while it runs, so every turn uses the stage-end weights.
    background: bool = False


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


def total_steps(stages: Sequence[StageConfig]) -> int:
    return sum(s.steps for s in stages)


def reference_needed(cfg: Any) -> bool:
    """True iff some stage trains with a KL term (its ``grpo.kl_coef``, else the run's, is > 0).

    The one rule for whether a reference actor exists: the planner (``verimed
    plan``) and the controller both ask it, so a plan never leaves out a
    reference the run then starts.
    """
    base = float(cfg.grpo.kl_coef)
    # Without stages the run trains one stage on the base settings.
    return any(float(st.grpo.get("kl_coef", base)) > 0 for st in cfg.stages) if cfg.stages else base > 0

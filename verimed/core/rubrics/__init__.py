"""Clinical rubrics (paper §2.2, DESIGN §8): the rubric model, generators
(``case`` / ``llm``), judges (``rules`` / ``llm``) and HealthBench scoring.

    from verimed.core.rubrics import make_generator, make_judge
    from verimed.core.rubrics.scoring import response_score, training_reward, aggregate

May import: ``verimed.core.config``, ``types``, ``rollout.llm`` (the LLMClient protocol).
"""
from verimed.core.rubrics.generator import (
    CaseRubricGenerator, LLMClient, LLMRubricGenerator, RubricGenerationError, make_generator,
)
from verimed.core.rubrics.judge import LLMJudge, make_judge
from verimed.core.rubrics.model import DIMENSIONS, RubricError, validate_rubric
from verimed.core.rubrics.parse import UNGRADABLE, parse_verdict
from verimed.core.rubrics.rules import RulesJudge

__all__ = [
    "DIMENSIONS", "UNGRADABLE", "CaseRubricGenerator", "LLMClient", "LLMJudge", "LLMRubricGenerator",
    "RubricError", "RubricGenerationError", "RulesJudge", "make_generator", "make_judge", "parse_verdict",
    "validate_rubric",
]

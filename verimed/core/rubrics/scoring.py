"""HealthBench scoring, exactly as the reference (openai/simple-evals
``healthbench_eval.py``), plus the clipped training reward.

Per response (not clipped):

    score = sum_{i met} points_i / sum_{i: points_i > 0} points_i

Negative items are "met" when the undesirable behaviour is present, so they
subtract. No positive points -> the score is undefined (``None``; the
reference returns None and such examples never enter a mean). Items the judge
could not grade (``met is None``) are left out of numerator and normaliser.

Aggregate (per metric: ``overall_score``, every example tag such as
``theme:...`` = that example's overall score, every rubric tag such as
``axis:...`` = the score over only the items carrying it, skipped when those
items have no positive points): mean over examples clipped to [0, 1], a
bootstrap std of that clipped mean over 1,000 resamples, and n_samples.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import msgspec
import numpy as np

from verimed.core.types import Judgement, RubricItem

BOOTSTRAP_SAMPLES = 1000


def healthbench_scores(points: np.ndarray, met: np.ndarray) -> np.ndarray:
    """Vectorised per-response scores.

    points: int/float [I] item points; met: float [R, I] with 1 = met,
    0 = not met, NaN = ungradable. Returns float64 [R]:
    ``sum_i met*points / sum_i [points>0 and gradable] points``, NaN where
    the normaliser is 0.
    """
    points = np.asarray(points, dtype=np.float64)
    met = np.atleast_2d(np.asarray(met, dtype=np.float64))
    if met.shape[-1] != points.shape[0]:
        raise ValueError(f"met has {met.shape[-1]} items per response, points has {points.shape[0]}")
    gradable = ~np.isnan(met)
    achieved = np.where(gradable, np.nan_to_num(met) * points, 0.0).sum(axis=-1)
    possible = np.where(gradable & (points > 0), points, 0.0).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(possible > 0, achieved / np.where(possible > 0, possible, 1.0), np.nan)


def met_vector(items: Sequence[RubricItem], judgements: Sequence[Judgement]) -> np.ndarray:
    """float [I]: 1/0 per item from ``judgements`` (matched by ``item_index``), NaN
    for ungradable or missing ones."""
    met = np.full(len(items), np.nan)
    for j in judgements:
        if not 0 <= j.item_index < len(items):
            raise ValueError(f"judgement for item {j.item_index} but the rubric has {len(items)} items")
        if j.met is not None:
            met[j.item_index] = 1.0 if j.met else 0.0
    return met


def response_score(items: Sequence[RubricItem], judgements: Sequence[Judgement]) -> float | None:
    """The HealthBench score of one response (unclipped); None when no gradable
    positive points exist (undefined, as in the reference)."""
    if not items:
        return None
    points = np.array([i.points for i in items], dtype=np.float64)
    score = float(healthbench_scores(points, met_vector(items, judgements)[None, :])[0])
    return None if np.isnan(score) else score


def training_reward(items: Sequence[RubricItem], judgements: Sequence[Judgement]) -> float:
    """The rubric reward R_rubric of RL: the response score clipped to [0, 1];
    0.0 when the score is undefined (no gradable positive item)."""
    score = response_score(items, judgements)
    return 0.0 if score is None else float(min(1.0, max(0.0, score)))


# ----------------------------------------------------------------- aggregate


def clipped_mean(values: Sequence[float]) -> float:
    return float(np.clip(np.mean(np.asarray(values, dtype=np.float64)), 0.0, 1.0))


def bootstrap_std(values: Sequence[float], seed: int = 0, samples: int = BOOTSTRAP_SAMPLES) -> float:
    """Std (ddof 0) of the clipped mean over ``samples`` resamples with replacement.

    values: [N]; draws idx [samples, N] from ``np.random.default_rng(seed)``.
    """
    vals = np.asarray(values, dtype=np.float64)
    if vals.size == 0:
        return float("nan")
    idx = np.random.default_rng(seed).integers(0, vals.size, size=(samples, vals.size))
    means = np.clip(vals[idx].mean(axis=1), 0.0, 1.0)
    return float(means.std())


def example_metrics(
    items: Sequence[RubricItem], judgements: Sequence[Judgement], example_tags: Sequence[str] = ()
) -> dict[str, float]:
    """One example's metrics as in the reference: ``overall_score``, each example
    tag -> overall score, each rubric tag -> score over the items carrying it.
    Empty when the overall score is undefined."""
    overall = response_score(items, judgements)
    if overall is None:
        return {}
    metrics = {"overall_score": overall}
    metrics.update({tag: overall for tag in example_tags})
    by_tag: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        for tag in dict.fromkeys(item.tags):
            by_tag[tag].append(index)
    met = met_vector(items, judgements)
    for tag, indices in by_tag.items():
        points = np.array([items[i].points for i in indices], dtype=np.float64)
        score = float(healthbench_scores(points, met[indices][None, :])[0])
        if not np.isnan(score):
            metrics[tag] = score
    return metrics


class MetricStat(msgspec.Struct, frozen=True):
    mean: float  # clipped to [0, 1]
    bootstrap_std: float
    n_samples: int


class Aggregate(msgspec.Struct, frozen=True):
    overall: float
    bootstrap_std: float
    n_samples: int
    n_unscored: int  # examples whose score was undefined (left out, as in the reference)
    metrics: dict[str, MetricStat]

    def by_prefix(self, prefix: str) -> dict[str, MetricStat]:
        """E.g. ``by_prefix("axis:")`` -> {"accuracy": ...}; ``"theme:"``, ``"dimension:"``."""
        return {k[len(prefix):]: v for k, v in sorted(self.metrics.items()) if k.startswith(prefix)}


def aggregate(per_example: Sequence[dict[str, float]], seed: int = 0) -> Aggregate:
    """Combine :func:`example_metrics` dicts: per metric name, the clipped mean,
    seeded bootstrap std and count over the examples that have it."""
    values: dict[str, list[float]] = defaultdict(list)
    unscored = 0
    for metrics in per_example:
        if "overall_score" not in metrics:
            unscored += 1
        for name, value in metrics.items():
            values[name].append(value)
    stats = {
        name: MetricStat(clipped_mean(vals), bootstrap_std(vals, seed), len(vals)) for name, vals in values.items()
    }
    overall = stats.get("overall_score", MetricStat(float("nan"), float("nan"), 0))
    return Aggregate(overall.mean, overall.bootstrap_std, overall.n_samples, unscored, stats)

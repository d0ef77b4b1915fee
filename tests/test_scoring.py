"""HealthBench scoring against hand-computed fixtures and the reference formula.

Run: .venv/bin/python -m pytest tests/test_scoring.py -q
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verimed.core.rubrics.scoring import (
    aggregate, bootstrap_std, example_metrics, healthbench_scores, response_score, training_reward,
)
from verimed.core.types import Judgement, RubricItem

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "rub_scoring_examples.json").read_text())


def _example(ex):
    items = [RubricItem(criterion=i["criterion"], points=i["points"], tags=i["tags"]) for i in ex["items"]]
    judgements = [Judgement(item_index=k, met=m) for k, m in enumerate(ex["met"])]
    return items, judgements


@pytest.mark.parametrize("ex", FIXTURE["examples"], ids=lambda e: e["name"][:2])
def test_response_score_hand_computed(ex):
    items, judgements = _example(ex)
    score = response_score(items, judgements)
    if ex["expected_score"] is None:
        assert score is None
    else:
        assert score == pytest.approx(ex["expected_score"])


@pytest.mark.parametrize("ex", FIXTURE["examples"], ids=lambda e: e["name"][:2])
def test_example_metrics_axis_and_theme_filters(ex):
    items, judgements = _example(ex)
    metrics = example_metrics(items, judgements, ex["example_tags"])
    expected = dict(ex["expected_tags"])
    if ex["expected_score"] is not None:
        expected["overall_score"] = ex["expected_score"]
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value), key


def _check_aggregate(agg, want):
    assert agg.overall == pytest.approx(want["overall"])
    assert agg.n_samples == want["n_samples"]
    assert agg.n_unscored == want["n_unscored"]
    for key, (mean, n) in want["metrics"].items():
        assert agg.metrics[key].mean == pytest.approx(mean), key
        assert agg.metrics[key].n_samples == n, key


def test_aggregate_clips_mean_and_skips_undefined():
    per_example = [example_metrics(*_example(ex), ex["example_tags"]) for ex in FIXTURE["examples"]]
    _check_aggregate(aggregate(per_example, seed=0), FIXTURE["aggregate_all"])
    without_b = [m for m, ex in zip(per_example, FIXTURE["examples"]) if not ex["name"].startswith("B")]
    agg = aggregate(without_b, seed=0)
    _check_aggregate(agg, FIXTURE["aggregate_without_B"])
    assert set(agg.by_prefix("axis:")) == {"accuracy", "completeness", "communication_quality"}
    assert agg.by_prefix("theme:")["hedging"].mean == pytest.approx(0.3)


def test_training_reward_is_clipped():
    a, b, c, _ = (_example(ex) for ex in FIXTURE["examples"])
    assert training_reward(*a) == pytest.approx(0.3)
    assert training_reward(*b) == 0.0  # -4.0 clipped
    assert training_reward(*c) == 0.0  # undefined -> 0


def test_ungradable_items_leave_the_normaliser():
    items = [RubricItem("x", 4), RubricItem("y", 4), RubricItem("z", -3)]
    judgements = [Judgement(0, True), Judgement(1, None), Judgement(2, None)]
    assert response_score(items, judgements) == pytest.approx(1.0)  # 4 / 4, not 4 / 8
    # a missing judgement counts as ungradable too; all positives ungradable -> undefined
    assert response_score(items, [Judgement(2, True)]) is None
    with pytest.raises(ValueError, match="item 7"):
        response_score(items, [Judgement(7, True)])


def test_bootstrap_std_is_seeded_and_sane():
    values = [0.0] * 50 + [1.0] * 50
    a, b = bootstrap_std(values, seed=3), bootstrap_std(values, seed=3)
    assert a == b
    assert bootstrap_std(values, seed=4) != a
    assert a == pytest.approx(0.05, abs=0.006)  # sqrt(p(1-p)/n) = 0.05
    assert bootstrap_std([0.4] * 10, seed=0) == pytest.approx(0.0, abs=1e-12)
    # resamples of all-negative values clip to 0, so their spread is 0
    assert bootstrap_std([-1.0, -2.0, -3.0], seed=0) == 0.0
    agg1 = aggregate([{"overall_score": v} for v in values], seed=7)
    agg2 = aggregate([{"overall_score": v} for v in values], seed=7)
    assert agg1.bootstrap_std == agg2.bootstrap_std


def _reference_score(points, met):
    """HealthBench's calculate_score, written as a plain loop."""
    total = sum(p for p in points if p > 0)
    if total == 0:
        return None
    return sum(p for p, m in zip(points, met) if m) / total


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-10, 10).filter(bool), st.booleans()), min_size=1, max_size=20))
def test_vectorised_score_matches_reference_loop(pairs):
    points = [p for p, _ in pairs]
    met = [m for _, m in pairs]
    ref = _reference_score(points, met)
    got = healthbench_scores(np.array(points), np.array([met], dtype=float))[0]
    if ref is None:
        assert math.isnan(got)
    else:
        assert got == pytest.approx(ref)

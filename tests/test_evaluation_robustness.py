"""Effective robustness against the zero-shot baseline, on hand-computed numbers."""

from __future__ import annotations

import math

import pytest

from robustft.errors import DataError
from robustft.evaluation.robustness import (
    effective_robustness,
    fit_baseline,
    logit_percent,
    sigmoid_percent,
)


def _pct(z: float) -> float:
    return 100.0 / (1.0 + math.exp(-z))


def test_logit_round_trip_and_clamping():
    assert logit_percent(50.0) == pytest.approx(0.0)
    assert logit_percent(75.0) == pytest.approx(math.log(3.0))
    assert sigmoid_percent(math.log(3.0)) == pytest.approx(75.0)
    assert sigmoid_percent(-40.0) == pytest.approx(100.0 * math.exp(-40.0), rel=1e-9)
    assert math.isfinite(logit_percent(0.0)) and math.isfinite(logit_percent(100.0))


def test_one_zero_shot_point_gives_a_slope_one_line_in_logit_space():
    # Zero-shot: ID 60%, OOD 40%. Odds: ID 1.5, OOD 2/3, so the line scales odds by 4/9.
    fit = fit_baseline([60.0], [40.0])
    assert fit.kind == "fixed-slope" and fit.slope == 1.0 and fit.n_points == 1
    assert fit.predict(60.0) == pytest.approx(40.0)
    # ID 80% has odds 4, predicted OOD odds 4 * 4/9 = 16/9, i.e. 16/25 = 64%.
    assert fit.predict(80.0) == pytest.approx(64.0)
    assert effective_robustness(80.0, 50.0, fit) == pytest.approx(-14.0)
    assert effective_robustness(60.0, 40.0, fit) == pytest.approx(0.0)


def test_two_points_give_the_least_squares_line():
    # Points chosen in logit space: (0, 0) and (2, 1) -> slope 0.5, intercept 0.
    fit = fit_baseline([_pct(0.0), _pct(2.0)], [_pct(0.0), _pct(1.0)])
    assert fit.kind == "least-squares"
    assert fit.slope == pytest.approx(0.5) and fit.intercept == pytest.approx(0.0, abs=1e-12)
    assert fit.predict(_pct(4.0)) == pytest.approx(_pct(2.0))
    assert effective_robustness(_pct(4.0), 90.0, fit) == pytest.approx(90.0 - _pct(2.0))


def test_three_points_least_squares_matches_the_normal_equations():
    # Logits x = 0, 1, 2 and y = 0, 1, 1: slope = 0.5, intercept = 1/6.
    xs, ys = [0.0, 1.0, 2.0], [0.0, 1.0, 1.0]
    fit = fit_baseline([_pct(x) for x in xs], [_pct(y) for y in ys])
    assert fit.slope == pytest.approx(0.5) and fit.intercept == pytest.approx(1.0 / 6.0)


def test_repeated_runs_of_one_zero_shot_model_fall_back_to_slope_one_through_their_mean():
    fit = fit_baseline([60.0, 60.0], [_pct(0.1), _pct(-0.1)])
    assert fit.kind == "fixed-slope" and fit.n_points == 2
    assert fit.predict(60.0) == pytest.approx(50.0)


def test_fallback_slope_can_be_chosen():
    # Through (logit 0, logit 0) with slope 0.5: ID logit 2 -> OOD logit 1.
    fit = fit_baseline([50.0], [50.0], fallback_slope=0.5)
    assert fit.predict(_pct(2.0)) == pytest.approx(_pct(1.0))


def test_fit_needs_points_of_matching_length():
    with pytest.raises(DataError, match="at least one zero-shot"):
        fit_baseline([], [])
    with pytest.raises(DataError, match="2 ID accuracies but 1"):
        fit_baseline([1.0, 2.0], [1.0])

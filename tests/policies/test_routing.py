"""The cascade's routing and deferral policies: threshold calibration, the route decision, deferral, config."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from selftune.policies.routing import (
    RoutingConfig,
    calibrate_deferral_threshold,
    calibrate_route_threshold,
    deferral_curve,
    route,
    route_curve,
    should_defer,
)


def test_separable_scores_calibrate_to_full_accuracy_at_the_widest_margin() -> None:
    cal = calibrate_route_threshold([0.8, 0.9, 0.95], [0.1, 0.5, 0.7])
    assert cal.balanced_accuracy == 1.0 and cal.in_scope_rate == 1.0 and cal.out_of_scope_rate == 1.0
    assert cal.threshold == pytest.approx(0.75)  # halfway between the closest in-scope and out-of-scope scores


def test_equal_accuracies_take_the_higher_threshold() -> None:
    # cut 0.55 keeps both in-scope prompts and one out-of-scope one; cut 0.8 keeps one and rejects both: 0.75 each
    cal = calibrate_route_threshold([0.6, 0.9], [0.5, 0.7])
    assert cal.balanced_accuracy == 0.75
    assert cal.threshold == pytest.approx(0.8)


def test_balanced_accuracy_weighs_a_small_scope_like_a_large_rest() -> None:
    # one in-scope prompt against nine out of scope: rejecting everything would be 90% plain accuracy, 50% balanced
    cal = calibrate_route_threshold([0.9], [0.1 * i for i in range(9)])
    assert cal.balanced_accuracy == 1.0 and 0.8 < cal.threshold <= 0.9


def test_route_curve_runs_from_everything_in_scope_upwards() -> None:
    curve = route_curve([0.6, 0.9], [0.5, 0.7])
    assert [c.threshold for c in curve] == sorted(c.threshold for c in curve)
    assert curve[0].in_scope_rate == 1.0 and curve[0].out_of_scope_rate == 0.0


@pytest.mark.parametrize("ins, outs", [([], [0.1]), ([0.5], []), ([math.nan], [0.1])])
def test_calibration_refuses_missing_or_non_finite_scores(ins: list[float], outs: list[float]) -> None:
    with pytest.raises(ValueError, match="score"):
        calibrate_route_threshold(ins, outs)


def test_a_prompt_below_every_threshold_goes_to_the_generalist() -> None:
    decision = route({"jargon": 0.70, "chem": 0.40}, {"jargon": 0.80, "chem": 0.90})
    assert decision.branch is None
    assert decision.score == pytest.approx(0.70) and decision.margin == pytest.approx(-0.10)
    assert "jargon" in decision.reason and "0.800" in decision.reason


def test_the_highest_score_in_scope_wins() -> None:
    decision = route({"jargon": 0.91, "chem": 0.95, "python": 0.99}, {"jargon": 0.8, "chem": 0.9, "python": 1.0})
    assert decision.branch == "chem"
    assert decision.margin == pytest.approx(0.05)
    assert "highest of 2" in decision.reason


def test_uncalibrated_or_non_finite_branches_are_never_chosen_and_ties_are_stable() -> None:
    assert route({"a": 0.99, "b": math.nan}, {"b": 0.1}).branch is None
    assert route({"b": 0.9, "a": 0.9}, {"a": 0.5, "b": 0.5}).branch == "a"
    empty = route({}, {})
    assert empty.branch is None and math.isnan(empty.score)


def test_deferral_threshold_on_a_hand_made_case() -> None:
    # the least confident row is the specialist's bad one (3.0 against the parent's 1.0): keeping it breaks a 2%
    # budget (mean 1.5 vs 1.0); from the next confidence up, its answers equal the parent's
    confidences = [0.1, 0.2, 0.3, 0.4]
    specialist = [3.0, 1.0, 1.0, 1.0]
    parent = [1.0, 1.0, 1.0, 1.0]
    point = calibrate_deferral_threshold(confidences, specialist, parent, budget=0.02)
    assert point.threshold == 0.2 and point.kept_share == 0.75
    assert point.specialist_loss == 1.0 and point.parent_loss == 1.0 and point.cascade_loss == 1.0
    # a 50% budget lets the specialist keep everything (1.5 <= 1.5 x 1.0: the bound is inclusive)
    assert calibrate_deferral_threshold(confidences, specialist, parent, budget=0.5).threshold == 0.1


def test_a_specialist_worse_everywhere_defers_everything() -> None:
    point = calibrate_deferral_threshold([0.1, 0.5], [2.0, 2.0], [1.0, 1.0], budget=0.02)
    assert point.threshold == math.inf and point.kept_share == 0.0 and point.cascade_loss == 1.0
    assert should_defer(10.0, point.threshold)


def test_rows_of_one_confidence_are_kept_or_deferred_together() -> None:
    curve = deferral_curve([0.1, 0.1, 0.2], [2.0, 1.0, 1.0], [1.0, 1.0, 1.0])
    assert [p.threshold for p in curve] == [0.1, 0.2, math.inf]
    assert [p.kept_share for p in curve] == pytest.approx([1.0, 1 / 3, 0.0])


@given(st.lists(st.tuples(st.floats(-5, 0), st.floats(0, 5), st.floats(0.01, 5)), min_size=1, max_size=30),
       st.floats(0, 0.5))
def test_the_calibrated_cascade_stays_within_budget_of_always_parent(rows: list[tuple[float, float, float]],
                                                                     budget: float) -> None:
    confidences, specialist, parent = (list(c) for c in zip(*rows))
    point = calibrate_deferral_threshold(confidences, specialist, parent, budget)
    parent_mean = sum(parent) / len(parent)
    assert point.cascade_loss <= (1 + budget) * parent_mean + 1e-9
    # and no lower threshold would have kept the specialist's answers within budget
    assert not any(p.within(budget) for p in deferral_curve(confidences, specialist, parent)
                   if p.threshold < point.threshold)


def test_deferral_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="one of each"):
        calibrate_deferral_threshold([0.1], [1.0, 2.0], [1.0], 0.02)
    with pytest.raises(ValueError, match="budget"):
        calibrate_deferral_threshold([0.1], [1.0], [1.0], -0.1)


def test_should_defer() -> None:
    assert should_defer(-2.0, -1.0) and not should_defer(-1.0, -1.0) and not should_defer(0.0, -1.0)
    assert should_defer(math.nan, -1.0)
    assert not should_defer(-100.0, None)  # no calibrated threshold: the specialist answers


def test_default_routing_config_has_no_problems() -> None:
    assert RoutingConfig().problems() == []


@pytest.mark.parametrize("field, value, words", [
    ("k", 0, ["routing.k = 0", "1 or more"]),
    ("score", "max", ["routing.score = 'max'", "'neighbours'"]),
    ("embed_layers", -2, ["routing.embed_layers = -2", "-1 for all"]),
    ("max_prompt_tokens", 0, ["routing.max_prompt_tokens = 0", "e.g. 64"]),
    ("deferral_budget", math.nan, ["routing.deferral_budget = nan", "e.g. 0.02"]),
    ("deferral_budget", -0.1, ["routing.deferral_budget = -0.1"]),
    ("min_route_accuracy", 0.3, ["routing.min_route_accuracy = 0.3", "chance"]),
    ("cache_size", -1, ["routing.cache_size = -1", "0 (no cache)"]),
    ("embedder", " ", ["routing.embedder = ' '", "foundation"]),
])
def test_config_problems_name_the_key_the_value_and_the_fix(field: str, value: object, words: list[str]) -> None:
    problems = RoutingConfig(**{field: value}).problems()  # type: ignore[arg-type]
    assert len(problems) == 1
    for word in words:
        assert word in problems[0]

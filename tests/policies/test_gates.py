"""Regression gates: values, thresholds, signed margins, non-finite numbers, and the promotion decision."""

from __future__ import annotations

import json
import math

import pytest

from selftune.policies.gates import (
    LOSS_UNIT,
    PER_TOKEN_LOSS_UNIT,
    GateConfig,
    GateResult,
    SuiteMetrics,
    evaluate_gates,
    promotion_decision,
)

PARENT = SuiteMetrics(
    new_data_loss=2.0,
    params=1000,
    experience_losses={"exp1": 1.0, "exp2": 3.0},
    foundation_probe_loss=1.5,
    decode_tokens_per_s=100.0,
)
CONFIG = GateConfig(min_new_data_improvement=0.1, max_experience_regression=0.05, max_foundation_regression=0.05,
                    max_foundation_drift=0.2, min_golden_pass_rate=0.5, max_params_ratio=1.0,
                    min_decode_speed_ratio=0.8)


def candidate(**changes: object) -> SuiteMetrics:
    fields = PARENT.to_dict() | {"golden_pass_rate": 1.0, "golden_count": 4, "new_data_loss": 1.5} | changes
    return SuiteMetrics.from_dict(fields)


def by_name(results: list[GateResult]) -> dict[str, GateResult]:
    return {r.name: r for r in results}


def test_a_good_candidate_passes_every_gate_with_positive_margins() -> None:
    results = by_name(evaluate_gates(candidate(), PARENT, CONFIG))
    assert set(results) == {
        "new_data_improvement", "experience_regression[exp1]", "experience_regression[exp2]",
        "foundation_regression", "golden_prompts", "params_ratio", "decode_speed_ratio",
    }
    assert all(r.passed for r in results.values())
    improvement = results["new_data_improvement"]
    assert improvement.value == pytest.approx(0.25) and improvement.threshold == 0.1
    assert improvement.margin == pytest.approx(0.15)
    assert results["experience_regression[exp1]"].margin == pytest.approx(0.05)  # value 0, room 5%
    assert promotion_decision(list(results.values()), auto_promote=True).action == "promote"


def test_margins_are_signed_for_min_and_max_gates() -> None:
    worse = candidate(new_data_loss=1.9, experience_losses={"exp1": 1.1, "exp2": 3.0}, params=1200,
                      decode_tokens_per_s=50.0, golden_pass_rate=0.25, foundation_probe_loss=1.5)
    results = by_name(evaluate_gates(worse, PARENT, CONFIG))
    # min gate: improvement 5% against 10% required -> margin -5%.
    assert results["new_data_improvement"].value == pytest.approx(0.05)
    assert results["new_data_improvement"].margin == pytest.approx(-0.05)
    # max gate: +10% regression against 5% allowed -> margin -5%.
    assert results["experience_regression[exp1]"].value == pytest.approx(0.1)
    assert results["experience_regression[exp1]"].margin == pytest.approx(-0.05)
    assert results["params_ratio"].margin == pytest.approx(-0.2)
    assert results["decode_speed_ratio"].value == pytest.approx(0.5)
    assert results["decode_speed_ratio"].margin == pytest.approx(-0.3)
    assert results["golden_prompts"].margin == pytest.approx(-0.25)
    for name in ("new_data_improvement", "experience_regression[exp1]", "params_ratio", "decode_speed_ratio",
                 "golden_prompts"):
        assert not results[name].passed, name
    assert results["experience_regression[exp2]"].passed and results["foundation_regression"].passed
    # Sign convention holds throughout: passed exactly when the margin is not negative.
    assert all(r.passed == (r.margin >= 0) for r in results.values() if r.margin is not None)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_metrics_always_fail_with_a_reason(bad: float) -> None:
    broken = candidate(new_data_loss=bad, experience_losses={"exp1": bad, "exp2": 3.0}, foundation_probe_loss=bad,
                       decode_tokens_per_s=bad)
    results = by_name(evaluate_gates(broken, PARENT, CONFIG))
    for name in ("new_data_improvement", "experience_regression[exp1]", "foundation_regression", "decode_speed_ratio"):
        assert not results[name].passed, name
        assert "non-finite" in results[name].reason and results[name].margin is None
    # -inf loss would look like a huge improvement if compared naively; it must still fail.
    decision = promotion_decision(list(results.values()), auto_promote=True)
    assert decision.action == "reject" and decision.status == "rejected"
    assert "new_data_improvement" in decision.failed_gates and "non-finite" in decision.reason
    # The record stays valid JSON (NaN is not JSON).
    json.loads(json.dumps([r.to_dict() for r in results.values()], allow_nan=False))


def test_a_non_finite_parent_fails_rather_than_passing_everything() -> None:
    parent = SuiteMetrics.from_dict(PARENT.to_dict() | {"new_data_loss": math.nan})
    (result,) = [r for r in evaluate_gates(candidate(), parent, CONFIG) if r.name == "new_data_improvement"]
    assert not result.passed and "reference" in result.reason


def test_a_missing_experience_fails() -> None:
    partial = candidate(experience_losses={"exp1": 1.0})
    results = by_name(evaluate_gates(partial, PARENT, CONFIG))
    assert not results["experience_regression[exp2]"].passed
    assert "candidate was not measured" in results["experience_regression[exp2]"].reason


def test_foundation_drift_is_measured_against_generation_zero() -> None:
    gen0 = SuiteMetrics(new_data_loss=3.0, params=1000, foundation_probe_loss=1.0)
    results = by_name(evaluate_gates(candidate(foundation_probe_loss=1.5), PARENT, CONFIG, foundation=gen0))
    assert results["foundation_regression"].passed  # no change vs the parent...
    drift = results["foundation_drift"]  # ...but +50% since generation 0, beyond 20%.
    assert not drift.passed and drift.value == pytest.approx(0.5) and drift.margin == pytest.approx(-0.3)


def test_no_golden_prompts_is_not_applicable_and_unmeasured_speed_fails_when_budgeted() -> None:
    results = by_name(evaluate_gates(candidate(golden_pass_rate=None, golden_count=0, decode_tokens_per_s=None),
                                     PARENT, CONFIG))
    assert results["golden_prompts"].passed and results["golden_prompts"].value is None
    assert not results["decode_speed_ratio"].passed
    no_budget = GateConfig(min_decode_speed_ratio=0.0)
    (speed,) = [r for r in evaluate_gates(candidate(decode_tokens_per_s=None), PARENT, no_budget)
                if r.name == "decode_speed_ratio"]
    assert speed.passed


def test_the_speed_gate_does_not_apply_to_a_candidate_with_its_parents_shapes() -> None:
    # Issue 17: a default cycle rejected at 0.66x (10.6 -> 7.0 tokens/s) while another process was busy, though the
    # candidate had exactly its parent's shapes: its speed was the parent's by construction.
    parent = SuiteMetrics.from_dict(PARENT.to_dict() | {"decode_tokens_per_s": 10.6})
    same = by_name(evaluate_gates(candidate(decode_tokens_per_s=7.0, same_shapes_as_parent=True), parent, CONFIG))
    gate = same["decode_speed_ratio"]
    assert gate.passed and gate.value is None and gate.margin is None and gate.threshold == 0.8
    assert gate.reason == ("not applicable: same shapes as the parent, so the same speed by construction "
                           "(timed 10.6 -> 7.0 tokens/s)")
    assert gate.to_dict()["reason"].startswith("not applicable")  # what the record and the report show
    assert promotion_decision(list(same.values()), auto_promote=True).action == "promote"
    # with other shapes (or a record from before shapes were recorded) the ratio is gated as before
    other = by_name(evaluate_gates(candidate(decode_tokens_per_s=7.0), parent, CONFIG))["decode_speed_ratio"]
    assert not other.passed and other.value == pytest.approx(7.0 / 10.6) and "at least 0.80x required" in other.reason
    old = {k: v for k, v in candidate(decode_tokens_per_s=7.0).to_dict().items() if k != "same_shapes_as_parent"}
    assert not SuiteMetrics.from_dict(old).same_shapes_as_parent


def test_promotion_decision() -> None:
    passing = [GateResult("a", True, 0.1, 0.0, 0.1, "ok"), GateResult("b", True, 1.0, 1.0, 0.0, "ok")]
    assert promotion_decision(passing, auto_promote=True).status == "promoted"
    manual = promotion_decision(passing, auto_promote=False)
    assert manual.action == "await_approval" and manual.status == "candidate"
    failing = [*passing, GateResult("c", False, 2.0, 1.0, -1.0, "too big")]
    decision = promotion_decision(failing, auto_promote=True)
    assert decision.action == "reject" and decision.failed_gates == ("c",) and "c: too big" in decision.reason
    assert promotion_decision([], auto_promote=True).action == "reject"


def test_suite_metrics_round_trip_and_config_problems() -> None:
    metrics = candidate()
    assert SuiteMetrics.from_dict(json.loads(json.dumps(metrics.to_dict()))) == metrics
    assert GateConfig().problems() == []
    problems = GateConfig(min_golden_pass_rate=2.0, max_params_ratio=0.0, max_experience_regression=-1.0,
                          min_new_data_improvement=math.nan).problems()
    assert len(problems) == 4


def test_a_candidate_with_fewer_longer_tokens_is_judged_on_the_text_not_its_token_count() -> None:
    # Earlier experiences and the probe: the same answers (1,000 bytes) with the same summed NLL (1,200 nats),
    # cut into 400 tokens by the parent and into 250 by a trimmed-vocabulary candidate. The new data: the
    # candidate learnt it (960 nats, 20% less).
    size, parent_tokens, candidate_tokens = 1000, 400, 250

    def suite(unit: float, new_nll: float, params: int) -> SuiteMetrics:
        return SuiteMetrics(new_data_loss=new_nll / unit, params=params, experience_losses={"exp1": 1200.0 / unit},
                            foundation_probe_loss=1200.0 / unit, decode_tokens_per_s=100.0)

    fair = by_name(evaluate_gates(suite(size, 960.0, 800), suite(size, 1200.0, 1000), CONFIG))
    assert all(r.passed for r in fair.values()), [r.reason for r in fair.values() if not r.passed]
    assert fair["experience_regression[exp1]"].value == 0 and fair["foundation_regression"].value == 0
    assert fair["new_data_improvement"].value == pytest.approx(0.2)
    assert "nats/byte" in fair["foundation_regression"].reason
    # per token the candidate would look 60% worse on everything it did not change, and fail
    unfair = by_name(evaluate_gates(suite(candidate_tokens, 960.0, 800), suite(parent_tokens, 1200.0, 1000), CONFIG))
    assert unfair["experience_regression[exp1]"].value == pytest.approx(0.6)
    assert not unfair["foundation_regression"].passed and not unfair["new_data_improvement"].passed


def test_losses_in_different_units_are_never_compared() -> None:
    assert PARENT.loss_unit == LOSS_UNIT == "nats/byte"
    old = {k: v for k, v in PARENT.to_dict().items() if k != "loss_unit"}  # a record written per token
    assert SuiteMetrics.from_dict(old).loss_unit == PER_TOKEN_LOSS_UNIT == "nats/token"
    results = by_name(evaluate_gates(candidate(), SuiteMetrics.from_dict(old), CONFIG))
    for name in ("new_data_improvement", "experience_regression[exp1]", "foundation_regression"):
        assert not results[name].passed and results[name].value is None and results[name].margin is None, name
        assert "nats/byte" in results[name].reason and "nats/token" in results[name].reason, name
    assert results["params_ratio"].passed  # only losses carry a unit
    # a drift reference recorded per token fails the drift gate alone
    gen0 = SuiteMetrics(new_data_loss=math.nan, params=0, foundation_probe_loss=1.5, loss_unit=PER_TOKEN_LOSS_UNIT)
    drift = by_name(evaluate_gates(candidate(), PARENT, CONFIG, foundation=gen0))
    assert not drift["foundation_drift"].passed and "run the cycle's evaluate step again" in drift["foundation_drift"].reason
    assert drift["foundation_regression"].passed


def test_a_pruned_candidate_may_trail_its_unpruned_self_by_max_prune_cost_only() -> None:
    config = GateConfig(max_prune_cost=0.02)
    unpruned = candidate(new_data_loss=1.5)
    within = by_name(evaluate_gates(candidate(new_data_loss=1.529), PARENT, config, unpruned=unpruned))["prune_cost"]
    assert within.passed and within.threshold == 0.02 and within.margin == pytest.approx(0.02 - 0.029 / 1.5)
    beyond = by_name(evaluate_gates(candidate(new_data_loss=1.54), PARENT, config, unpruned=unpruned))["prune_cost"]
    assert not beyond.passed and beyond.value == pytest.approx(0.04 / 1.5) and "unpruned" in beyond.reason
    assert "prune_cost" not in by_name(evaluate_gates(candidate(), PARENT, config))  # not pruned: not applicable


def test_a_specialist_is_not_gated_on_experiences_outside_its_scope_but_they_are_recorded() -> None:
    worse = candidate(experience_losses={"exp1": 1.5, "exp2": 3.5})  # both regress far past 5%
    gates = by_name(evaluate_gates(worse, PARENT, CONFIG, scope=("exp2",)))
    assert not gates["experience_regression[exp2]"].passed  # in scope: today's rule
    outside = gates["experience_regression[exp1]"]
    assert outside.passed and outside.value == pytest.approx(0.5) and outside.margin == pytest.approx(-0.45)
    assert "outside the branch's scope" in outside.reason
    assert not by_name(evaluate_gates(worse, PARENT, CONFIG))["experience_regression[exp1]"].passed  # generalist

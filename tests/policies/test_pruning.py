"""The pruning policy: energy-kept adapter rank, the layer and channel plan, kept channel counts (pure, no torch)."""

from __future__ import annotations

import math

import pytest

from selftune.policies.pruning import (
    SPECIALIST_PRUNING,
    PruningConfig,
    heal_layers,
    heal_learning_rate,
    kept_channel_count,
    max_layers_removed,
    next_layer_to_drop,
    plan_for_layers,
    plan_pruning,
    rank_for_energy,
    within_prune_budget,
)


def test_rank_for_energy() -> None:
    assert rank_for_energy([3.0, 2.0, 1.0, 0.0], 1.0) == 3  # a zero direction is never needed
    assert rank_for_energy([3.0, 2.0, 1.0], 0.9) == 2  # 9 + 4 = 13 of 14 -> 92.9%
    assert rank_for_energy([3.0, 2.0, 1.0], 0.5) == 1
    assert rank_for_energy([3.0, 2.0, 1.0], 1.0, max_rank=2) == 2
    assert rank_for_energy([0.0, 0.0], 0.9) == 1
    with pytest.raises(ValueError, match="non-finite"):
        rank_for_energy([1.0, math.nan], 0.9)


def test_plan_removes_the_least_influential_inner_layers_and_the_same_channel_count_everywhere() -> None:
    config = PruningConfig(enabled=True, mlp_channel_fraction=0.5, layer_fraction=0.34, channel_multiple=1,
                           protected_edge_layers=1, min_layers=2)
    layer_scores = [0.01, 0.5, 0.05, 0.3, 0.2, 0.02]  # layers 0 and 5 are the lowest but protected
    channel_scores = [[float((i + j) % 4) for j in range(4)] for i in range(6)]
    plan = plan_pruning(channel_scores, layer_scores, config)
    assert plan.removed_layers == (2, 4)
    assert plan.kept_layers == (0, 1, 3, 5)
    assert plan.num_layers_after == 4 and plan.intermediate_size_after == 2
    # Layer 1's scores are [1, 2, 3, 0]: channels 1 and 2 stay.
    assert plan.kept_channels[1] == (1, 2)
    assert {len(c) for c in plan.kept_channels} == {2}
    assert plan.changes_anything


def test_plan_respects_min_layers_and_disabled() -> None:
    scores = [[1.0] * 16 for _ in range(3)]
    plan = plan_pruning(scores, [0.1, 0.2, 0.3], PruningConfig(enabled=True, layer_fraction=0.9, min_layers=2,
                                                            protected_edge_layers=0))
    assert plan.num_layers_after == 2 and plan.removed_layers == (0,)
    off = plan_pruning(scores, [0.1, 0.2, 0.3], PruningConfig(enabled=False, layer_fraction=0.9))
    assert not off.changes_anything and off.reason == "pruning is disabled"
    with pytest.raises(ValueError, match="layer 1 has block influence nan"):
        plan_pruning(scores, [0.1, math.nan, 0.3], PruningConfig(enabled=True))
    with pytest.raises(ValueError, match="one row per layer"):
        plan_pruning(scores[:2], [0.1, 0.2, 0.3], PruningConfig(enabled=True))


def test_kept_channel_count_rounds_up_to_the_multiple() -> None:
    assert kept_channel_count(1536, 0.25, 64) == 1152
    assert kept_channel_count(1536, 0.3, 64) == 1088  # 1076 -> 1088
    assert kept_channel_count(128, 0.99, 8) == 8
    assert PruningConfig(mlp_channel_fraction=1.0, channel_multiple=0).problems() != []


# ---- stepwise layer dropping and the heal ------------------------------------------------------------

STEPWISE = PruningConfig(enabled=True, layer_dropping="stepwise", layer_fraction=0.5, min_layers=2)


def test_next_layer_to_drop_picks_the_least_influential_inner_layer_among_those_left() -> None:
    kept = [0, 1, 3, 4, 5]  # layer 2 is gone already
    choice = next_layer_to_drop([0.01, 0.4, 0.2, 0.3, 0.001], kept, 6, 0.9, STEPWISE)
    assert choice.layer == 3 and "least block influence (0.2)" in choice.reason  # 0 and 5 lower, but edges
    assert next_layer_to_drop([0.1, 0.2, 0.2, 0.1], [0, 1, 4, 5], 6, 0.9, STEPWISE).layer == 1  # ties: lower index
    with pytest.raises(ValueError, match="score the model as it is now"):
        next_layer_to_drop([0.1, 0.2], kept, 6, 0.9, STEPWISE)
    with pytest.raises(ValueError, match="layer 3 has block influence nan"):
        next_layer_to_drop([0.1, 0.2, math.nan, 0.3, 0.4], kept, 6, 0.9, STEPWISE)


def test_next_layer_to_drop_stops_at_the_size_target_the_layer_cap_and_the_edges() -> None:
    target = PruningConfig(**{**STEPWISE.__dict__, "target_params_ratio": 0.8})
    stop = next_layer_to_drop([0.1] * 5, [0, 1, 3, 4, 5], 6, 0.79, target)
    assert stop.layer is None and "size target reached: 0.790" in stop.reason
    assert next_layer_to_drop([0.1] * 5, [0, 1, 3, 4, 5], 6, 0.81, target).layer == 1
    assert max_layers_removed(6, STEPWISE) == 3
    capped = next_layer_to_drop([0.1] * 3, [0, 3, 5], 6, 0.5, STEPWISE)
    assert capped.layer is None and "3 of 6 layers removed" in capped.reason
    edges = PruningConfig(**{**STEPWISE.__dict__, "layer_fraction": 0.9, "min_layers": 1})
    assert max_layers_removed(6, edges) == 4  # never the first or the last
    assert next_layer_to_drop([0.1, 0.1], [0, 5], 6, 0.5, edges).layer is None
    assert max_layers_removed(2, edges) == 0


def test_within_prune_budget() -> None:
    assert within_prune_budget(1.02, 1.0, 0.02) and not within_prune_budget(1.0201, 1.0, 0.02)
    assert within_prune_budget(0.9, 1.0, 0.0)  # better is always within
    assert not within_prune_budget(math.nan, 1.0, 0.02) and not within_prune_budget(1.0, math.inf, 0.02)


def test_plan_for_layers_keeps_the_given_layers_and_their_top_channels() -> None:
    scores = [[float(j == i) for j in range(4)] for i in range(4)]
    plan = plan_for_layers(scores, [3, 0], PruningConfig(enabled=True, mlp_channel_fraction=0.5, channel_multiple=1),
                           "stepwise")
    assert plan.kept_layers == (0, 3) and plan.removed_layers == (1, 2) and "stepwise" in plan.reason
    assert plan.kept_channels[1][0] == 0 and 3 in plan.kept_channels[1]
    with pytest.raises(ValueError, match="not distinct layers"):
        plan_for_layers(scores, [0, 4], PruningConfig(), "x")


def test_heal_layers_are_the_neighbours_of_each_cut_in_the_pruned_models_numbering() -> None:
    assert heal_layers(6, [2, 3]) == (1, 2)  # kept 0 1 4 5: 1 below the cut, 4 (now 2) above it
    assert heal_layers(6, [2, 4]) == (1, 2, 3)  # kept 0 1 3 5: 3 sits between two cuts
    assert heal_layers(30, [20]) == (19, 20)
    assert heal_layers(4, []) == () and heal_layers(4, [], channels_cut=True) == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="not layers of a 4-layer model"):
        heal_layers(4, [4])


def test_heal_learning_rate_warms_up_then_decays_to_the_floor() -> None:
    config = PruningConfig(heal_learning_rate=1e-4, heal_min_learning_rate=1e-5, heal_warmup_steps=4)
    rates = [heal_learning_rate(step, 20, config) for step in range(20)]
    assert rates[:4] == pytest.approx([2.5e-5, 5e-5, 7.5e-5, 1e-4])
    assert rates[4] == pytest.approx(1e-4) and rates[-1] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(rates[4:], rates[5:]))


def test_pruning_config_problems_name_the_bad_values() -> None:
    assert PruningConfig().problems() == [] and SPECIALIST_PRUNING.problems() == []
    assert SPECIALIST_PRUNING.mlp_channel_fraction == 0.0 and SPECIALIST_PRUNING.layer_dropping == "stepwise"
    bad = PruningConfig(layer_dropping="greedy", max_drop_cost=-0.1, target_params_ratio=1.0, heal_kind="sft",
                        heal_learning_rate=0.0, heal_min_learning_rate=2.0, heal_warmup_steps=-1).problems()
    assert len(bad) == 8
    for fragment in ("layer_dropping = 'greedy'", "max_drop_cost = -0.1", "target_params_ratio = 1.0",
                     "heal_kind = 'sft': use one of lora, distill", "heal_learning_rate = 0.0",
                     "heal_min_learning_rate = 2.0", "heal_warmup_steps = -1"):
        assert any(fragment in problem for problem in bad), fragment
